//! Stage 6: the answer, wherever it came from (the local model, the cloud, or the local model
//! after the cloud failed), as one [`Produced`].

use std::time::Duration;

use llm_engine::{Conversation, FinishReason};
use outcome_log::CloudAttempt;
use tmod_api::Timings;

use super::answer::{Answering, CloudOrLocal, CloudTurn};
use super::ms;
use crate::link::CloudAnswered;
use crate::local_llm::LocalAnswer;
use crate::service::Service;

/// A turn's answer, wherever it came from.
pub(super) struct Produced {
    pub text: String,
    pub prompt_tokens: u32,
    pub generated_tokens: u32,
    pub time_to_first_token: Duration,
    pub decode_tokens_per_sec: f64,
    pub finish: &'static str,
    queue: Duration,
    generate: Duration,
    cloud_wait: Duration,
    pub cloud_price_usd: f64,
    pub route: &'static str,
}

/// An answer, the local model's view of the dialogue with it, and the cloud attempt if any.
pub(super) type Answered = (Produced, Conversation, Option<CloudAttempt>);

impl Service {
    /// Waits for the answer of a turn; the error says why there is none.
    pub(super) async fn await_answer(
        &self,
        answering: Answering,
        conversation: &Conversation,
        question: &str,
    ) -> Result<Answered, String> {
        match answering {
            Answering::Local { answer, route } => {
                let answer = answer.await.map_err(|_| "the model thread ended".to_owned())?;
                let (produced, conversation) = Produced::local(answer, route)?;
                Ok((produced, conversation, None))
            }
            Answering::Cloud(task) => {
                let CloudTurn { attempt, answer } =
                    task.await.map_err(|e| format!("the cloud task failed: {e}"))?;
                if attempt.outcome != "answered" {
                    self.metrics.cloud_failure(&attempt.outcome);
                }
                let cloud_wait = Duration::from_secs_f64(attempt.wait_secs);
                let (mut produced, conversation) = match answer? {
                    CloudOrLocal::Local(local) => {
                        let (mut produced, conversation) = Produced::local(local, "local:cloud-fallback")?;
                        // The local answer started after the cloud's failure.
                        produced.time_to_first_token += cloud_wait;
                        (produced, conversation)
                    }
                    CloudOrLocal::Cloud { answered, first_shown } => {
                        let (mut produced, conversation) = Produced::cloud(answered, conversation, question);
                        produced.time_to_first_token = first_shown.unwrap_or(cloud_wait);
                        (produced, conversation)
                    }
                    CloudOrLocal::CloudPart { text, first_shown, cancelled } => {
                        // No reply came: no model, no token counts; the price is the expected one.
                        let answered = CloudAnswered {
                            answer: tmo_protocol::CloudAnswer {
                                answer: text,
                                model: String::new(),
                                prompt_tokens: 0,
                                completion_tokens: 0,
                                cost_usd: attempt.cost_usd,
                            },
                            backend_latency_ms: 0,
                        };
                        let (mut produced, conversation) = Produced::cloud(answered, conversation, question);
                        produced.time_to_first_token = first_shown.unwrap_or(cloud_wait);
                        produced.finish = if cancelled { "cancelled" } else { "cloud_partial" };
                        (produced, conversation)
                    }
                };
                produced.cloud_wait = cloud_wait;
                Ok((produced, conversation, Some(attempt)))
            }
        }
    }
}

impl Produced {
    fn local(answer: LocalAnswer, route: &'static str) -> Result<(Produced, Conversation), String> {
        if answer.context_restarted {
            tracing::info!("dialogue outgrew the model's context: its view restarted");
        }
        let generation = answer.generation.map_err(|e| format!("local generation: {e}"))?;
        let report = &generation.report;
        let produced = Produced {
            prompt_tokens: report.prompt_tokens as u32,
            generated_tokens: report.generated_tokens as u32,
            time_to_first_token: report.time_to_first_token,
            decode_tokens_per_sec: report.decode_tokens_per_sec,
            finish: finish_name(report.finish),
            queue: answer.queue_time,
            generate: report.wall_time,
            cloud_wait: Duration::ZERO,
            cloud_price_usd: 0.0,
            route,
            text: generation.text,
        };
        Ok((produced, answer.conversation))
    }

    /// A cloud answer (or the part of it shown) as a turn's answer; the local model's view of
    /// the dialogue gains the turn.
    fn cloud(
        answered: CloudAnswered,
        conversation: &Conversation,
        question: &str,
    ) -> (Produced, Conversation) {
        let mut conversation = conversation.clone();
        conversation.add_answered_turn(question, answered.answer.answer.clone());
        let backend_secs = f64::from(answered.backend_latency_ms) / 1e3;
        let completion = answered.answer.completion_tokens;
        let produced = Produced {
            text: answered.answer.answer,
            prompt_tokens: answered.answer.prompt_tokens,
            generated_tokens: completion,
            time_to_first_token: Duration::ZERO,
            decode_tokens_per_sec: if backend_secs > 0.0 {
                f64::from(completion) / backend_secs
            } else {
                0.0
            },
            finish: "cloud",
            queue: Duration::ZERO,
            generate: Duration::ZERO,
            cloud_wait: Duration::ZERO,
            cloud_price_usd: answered.answer.cost_usd,
            route: "cloud",
        };
        (produced, conversation)
    }

    /// The answer's stages in the turn's timings.
    pub fn set_timings(&self, timings: &mut Timings) {
        timings.queue_ms = ms(self.queue);
        timings.generate_ms = ms(self.generate);
        timings.cloud_ms = ms(self.cloud_wait);
    }
}

fn finish_name(finish: FinishReason) -> &'static str {
    match finish {
        FinishReason::EndOfTurn => "end_of_turn",
        FinishReason::MaxTokens => "max_tokens",
        FinishReason::Deadline => "deadline",
        FinishReason::Cancelled => "cancelled",
        FinishReason::ContextFull => "context_full",
    }
}
