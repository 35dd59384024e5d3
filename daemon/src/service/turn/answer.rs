//! Stage 5: the answer starts. A local action goes into the local model's bounded queue (a full
//! queue is a 503 at once); a cloud action's request goes out from a tokio task, which passes the
//! streamed answer on as it comes, and answers locally, streaming to the same client, when the
//! cloud does not before anything was shown. A stream that breaks after text was shown ends the
//! turn with that text.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use llm_engine::GenerationParams;
use outcome_log::CloudAttempt;
use tmo_protocol::CloudRequest;
use tmod_api::Generation;
use tokio::sync::{mpsc, oneshot};

use super::attach::CloudCall;
use crate::dialogues::TurnStart;
use crate::estimates::CostEstimates;
use crate::link::{CloudAnswered, CloudFailure, DeviceLink};
use crate::local_llm::{LocalAnswer, LocalJob, LocalLlm, SubmitError};
use crate::service::{AskError, Service};
use crate::util::lock;

/// How a turn's answer is coming.
#[derive(Debug)]
pub(super) enum Answering {
    /// From the local model, on `route` (`local` or `local:cloud-unavailable`).
    Local { answer: oneshot::Receiver<LocalAnswer>, route: &'static str },
    /// From the cloud, or locally when the cloud request fails.
    Cloud(tokio::task::JoinHandle<CloudTurn>),
}

/// A turn the policy sent to the cloud: the attempt, and the answer that came of it.
#[derive(Debug)]
pub(super) struct CloudTurn {
    pub attempt: CloudAttempt,
    pub answer: Result<CloudOrLocal, String>,
}

#[derive(Debug)]
pub(super) enum CloudOrLocal {
    /// The cloud's answer; `first_shown` is when its first text was passed on.
    Cloud { answered: CloudAnswered, first_shown: Option<Duration> },
    /// The stream broke (stalled, cut at its deadline, or the client went away) after `text`
    /// was shown: the turn ends with it, charged the class's expected price (the attempt's
    /// `cost_usd`).
    CloudPart { text: String, first_shown: Option<Duration>, cancelled: bool },
    /// The cloud request failed before anything was shown; the local model answered.
    Local(LocalAnswer),
}

/// What a cloud turn needs to answer locally when the cloud does not.
struct LocalFallback {
    llm: LocalLlm,
    job: LocalJob,
    answer: oneshot::Receiver<LocalAnswer>,
    max_answer: Duration,
}

impl Service {
    /// Starts the answer: in the cloud when `cloud` is given, else on the local model (on
    /// `local_route`). Returns how it is coming and the stream of its text pieces.
    pub(super) fn start_answer(
        &self,
        start: &TurnStart,
        question: &str,
        generation: &Generation,
        local_route: &'static str,
        mut cloud: Option<CloudCall>,
    ) -> Result<(Answering, mpsc::UnboundedReceiver<String>), AskError> {
        let (token_tx, tokens) = mpsc::unbounded_channel();
        let (done_tx, answer) = oneshot::channel();
        let max_answer = Duration::from_secs_f64(self.config.file.model.max_answer_secs);
        // The request's settings, within the board's bound on the answer's length.
        let max_tokens = generation.max_tokens.map_or(self.config.file.model.max_tokens, |n| {
            (n as usize).min(self.config.file.model.max_tokens)
        });
        let defaults = GenerationParams::default();
        let params = GenerationParams {
            max_tokens,
            temperature: generation.temperature.or(defaults.temperature),
            top_p: generation.top_p.or(defaults.top_p),
            seed: generation.seed.unwrap_or(defaults.seed),
            deadline: Some(Instant::now() + max_answer),
            ..defaults
        };
        if let (Some(call), Some(asked)) = (cloud.as_mut(), generation.max_tokens) {
            call.request.max_tokens = call.request.max_tokens.min(asked);
        }
        let job = LocalJob {
            conversation: start.conversation.clone(),
            question: question.to_owned(),
            params,
            tokens: token_tx,
            done: done_tx,
            enqueued: Instant::now(),
        };
        let answering = match cloud {
            Some(CloudCall { link, request, wait, .. }) => {
                let fallback = LocalFallback { llm: self.llm.clone(), job, answer, max_answer };
                let estimates = self.estimates.clone();
                let stall = Duration::from_secs_f64(self.config.file.cloud.stall_secs);
                let call = answer_in_cloud(link, request, (wait, stall), fallback, estimates);
                Answering::Cloud(tokio::spawn(call))
            }
            None => {
                match self.llm.submit(job) {
                    Ok(()) => {}
                    Err(SubmitError::Full { waiting }) => {
                        self.metrics.reject("queue_full");
                        tracing::warn!(waiting, "local model queue full: 503");
                        return Err(AskError::Busy { retry_after_secs: 2 });
                    }
                    Err(stopped @ SubmitError::Stopped) => {
                        self.metrics.reject("model_stopped");
                        return Err(AskError::Internal(format!("{stopped}; tmod exits to be restarted")));
                    }
                }
                Answering::Local { answer, route: local_route }
            }
        };
        self.metrics.queue_waiting.set(self.llm.waiting() as i64);
        Ok((answering, tokens))
    }
}

/// Sends the cloud request, passing its streamed answer on; on a failure before anything was
/// shown answers locally. What the link measured (the PUBACK time of the request's bytes, the
/// bridge's backend time and price) moves the expected cost table.
async fn answer_in_cloud(
    cloud: Arc<DeviceLink>,
    request: CloudRequest,
    (wait, stall): (Duration, Duration),
    fallback: LocalFallback,
    estimates: Arc<Mutex<CostEstimates>>,
) -> CloudTurn {
    let LocalFallback { llm, mut job, answer, max_answer } = fallback;
    let (result, cost) = cloud.ask(&request, wait, stall, &job.tokens).await;
    let class = CostEstimates::class_of(Some(request.attachments.len()));
    let expected_price_usd = {
        let mut estimates = lock(&estimates);
        if let Some(acknowledged) = cost.acknowledged {
            estimates.record_delivery(cost.bytes, acknowledged.as_secs_f64());
        }
        if let Ok(answered) = &result {
            estimates.record_cloud_reply(
                request.attachments.len(),
                cost.bytes,
                f64::from(answered.backend_latency_ms) / 1e3,
                answered.answer.cost_usd,
            );
        }
        estimates.cost(class).cost_usd
    };
    let mut attempt = CloudAttempt {
        outcome: "answered".to_owned(),
        detail: None,
        wait_secs: cost.wait.as_secs_f64(),
        deadline_secs: wait.as_secs_f64(),
        request_bytes: cost.bytes as u64,
        model: None,
        backend_latency_ms: None,
        cost_usd: 0.0,
    };
    let shown = cost.shown;
    let failure = match result {
        Ok(answered) => {
            attempt.model = Some(answered.answer.model.clone());
            attempt.backend_latency_ms = Some(answered.backend_latency_ms);
            attempt.cost_usd = answered.answer.cost_usd;
            let answer = CloudOrLocal::Cloud { answered, first_shown: shown.first };
            return CloudTurn { attempt, answer: Ok(answer) };
        }
        Err(failure) => failure,
    };
    attempt.outcome = failure.kind().to_owned();
    let cancelled = failure == CloudFailure::Cancelled;
    if !shown.text.is_empty() || cancelled {
        tracing::info!(
            request_id = %request.request_id,
            shown_bytes = shown.text.len(),
            reason = failure.kind(),
            "cloud answer ended early ({failure}); the turn ends with what was shown"
        );
        attempt.detail =
            Some(format!("{failure}, after {} bytes of the answer were shown", shown.text.len()));
        attempt.cost_usd = expected_price_usd;
        let part = CloudOrLocal::CloudPart { text: shown.text, first_shown: shown.first, cancelled };
        return CloudTurn { attempt, answer: Ok(part) };
    }
    tracing::warn!(
        request_id = %request.request_id,
        dialogue = %request.dialogue_id,
        turn = request.turn,
        reason = failure.kind(),
        "cloud request failed ({failure}); answering locally"
    );
    attempt.detail = Some(failure.to_string());
    job.enqueued = Instant::now();
    job.params.deadline = Some(Instant::now() + max_answer);
    let answer = match llm.submit(job) {
        Err(full) => Err(format!("the cloud request failed ({failure}) and the local model refused: {full}")),
        Ok(()) => answer.await.map(CloudOrLocal::Local).map_err(|_| "the model thread ended".to_owned()),
    };
    CloudTurn { attempt, answer }
}
