//! One question's path through the daemon, as named stages. [`Service::decide`] runs on a
//! blocking thread and returns once the answer is on its way:
//!
//! 1. [`classify`](classify): the task, named by the app or found by the classifier;
//! 2. the dialogue's turn is taken (one turn at a time per dialogue);
//! 3. [`encode_and_decide`](decide): the observation (history, task, budgets, fresh modalities,
//!    expected costs) is scored and masked by the serving policy;
//! 4. [`attach`](attach): for a cloud action, the chosen views and the history make the cloud
//!    request;
//! 5. [`start_answer`](answer): the local model's queue, or the cloud with the local model as
//!    fallback; tokens stream back to the client.
//!
//! [`Service::finish`] runs once the tokens have stopped:
//!
//! 6. [`await_answer`](produced): the answer, wherever it came from;
//! 7. [`account`](account): latency, energy, cost; the expected costs move and the dialogue's
//!    budgets are spent;
//! 8. [`log`](log): the outcome row, made durable, then the counters and metrics; the outcome
//!    event is sent only after the row is durable.
//!
//! A turn that fails before its answer is abandoned: the dialogue takes its next question and
//! nothing is logged.

mod account;
mod answer;
mod attach;
mod classify;
mod decide;
mod log;
mod produced;

use std::time::{Duration, Instant};

use policy_onnx::{Action, TaskCategory};
use tmod_api::{AskRequest, DecisionEvent, OutcomeEvent, Timings};
use tokio::sync::mpsc;

use self::answer::Answering;
use super::{AskError, Service};
use crate::dialogues::TurnStart;
use crate::estimates::Load;
use crate::util::lock;

/// A decided turn whose answer is on its way.
#[derive(Debug)]
pub struct DecidedTurn {
    pub decision: DecisionEvent,
    /// Text pieces of the answer as they are generated; dropping it cancels the generation.
    pub tokens: mpsc::UnboundedReceiver<String>,
    /// What [`Service::finish`] needs.
    pub pending: PendingTurn,
}

/// The part of a decided turn that the outcome is made of.
#[derive(Debug)]
pub struct PendingTurn {
    start: TurnStart,
    record: TurnRecord,
    answering: Answering,
    received: Instant,
    timings: Timings,
}

/// What the outcome row keeps of the question and its decision.
#[derive(Debug)]
struct TurnRecord {
    question: String,
    task: TaskCategory,
    action: Action,
    observation: Vec<f32>,
    propensity: f64,
    telemetry: serde_json::Value,
    /// The board's load when the turn was decided (a local answer's latency is normalised by it).
    load: Load,
    /// The app forced the route.
    forced: bool,
}

impl Service {
    /// Classifies, decides and queues the answer. Errors here are the request's fault or a
    /// full queue; nothing is logged for them.
    pub fn decide(
        &self,
        request: AskRequest,
        received: Instant,
        decode_ms: f64,
    ) -> Result<DecidedTurn, AskError> {
        let question = request.text.trim().to_owned();
        if question.is_empty() {
            return Err(AskError::BadRequest("`text` must not be empty".into()));
        }
        if let Err((field, why)) = request.generation.check() {
            return Err(AskError::BadRequest(format!("`generation.{field}` {why}")));
        }
        let app_images = request
            .images
            .iter()
            .enumerate()
            .map(|(i, url)| {
                jpeg_of_data_url(url).map_err(|why| AskError::BadRequest(format!("`images[{i}]` {why}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if request.dialogue_id.is_some() && request.system_prompt.is_some() {
            return Err(AskError::BadRequest(
                "`system_prompt` starts a dialogue: it cannot be given with `dialogue_id`".into(),
            ));
        }
        let mut timings = Timings { decode_ms, ..Timings::default() };

        let views = self.snapshot_views();
        let started = Instant::now();
        let classified = self.classify(&question, request.task.as_deref())?;
        timings.classify_ms = ms(started.elapsed());

        let dialogue_id = match request.dialogue_id {
            Some(id) => id,
            None => self.new_dialogue_with(request.system_prompt.as_deref()).dialogue_id,
        };
        let start = lock(&self.dialogues).start_turn(&dialogue_id, Instant::now())?;

        let started = Instant::now();
        let decided = match self.encode_and_decide(&start, classified.task, request.route) {
            Ok(decided) => decided,
            Err(e) => return Err(self.abandon(start, e)),
        };
        timings.decide_ms = ms(started.elapsed());

        let started = Instant::now();
        let cloud =
            self.attach(&start, classified.task, &question, decided.decision.action, app_images, &views);
        let app_images_sent = cloud.as_ref().map_or(0, |c| c.app_images);
        if cloud.is_some() {
            timings.attach_ms = ms(started.elapsed());
        }

        let answer = self.start_answer(&start, &question, &request.generation, decided.local_route(), cloud);
        let (answering, tokens) = match answer {
            Ok(answer) => answer,
            Err(e) => return Err(self.abandon(start, e)),
        };

        let mut decision = self.decision_event(dialogue_id, start.turn, &classified, &decided);
        decision.app_images_sent = app_images_sent;
        let record = decided.into_record(question, classified.task);
        Ok(DecidedTurn {
            decision,
            tokens,
            pending: PendingTurn { start, record, answering, received, timings },
        })
    }

    /// Waits for the answer, accounts for it and logs it durably.
    pub async fn finish(
        &self,
        decision: &DecisionEvent,
        turn: PendingTurn,
    ) -> Result<OutcomeEvent, AskError> {
        let PendingTurn { start, record, answering, received, mut timings } = turn;
        let answered = self.await_answer(answering, &start.conversation, &record.question).await;
        let (produced, conversation, cloud_attempt) = match answered {
            Ok(answered) => answered,
            Err(e) => return Err(self.abandon(start, AskError::Internal(e))),
        };
        produced.set_timings(&mut timings);

        let spent = self.account(start, &record, conversation, &produced, received);
        let score = log::refusal_score(&produced.text);
        timings.log_ms = self.log(decision, record, &produced, &spent, score, cloud_attempt.clone()).await;
        timings.total_ms = ms(received.elapsed());
        self.count(decision, &produced, &spent, score, &timings);

        Ok(log::outcome_event(decision, produced, &spent, score, cloud_attempt, timings))
    }

    /// Gives the dialogue its turn back after a failure, and returns the failure.
    fn abandon(&self, start: TurnStart, error: AskError) -> AskError {
        lock(&self.dialogues).abandon_turn(start);
        error
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The JPEG bytes of a `data:image/jpeg;base64,...` URL, or why it is not one.
fn jpeg_of_data_url(url: &str) -> Result<Vec<u8>, String> {
    use base64::Engine as _;
    let Some(encoded) = url.strip_prefix("data:image/jpeg;base64,") else {
        let shown: String = url.chars().take(40).collect();
        return Err(format!("must be a data URL of a JPEG (data:image/jpeg;base64,...), found {shown:?}"));
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|e| format!("is not valid base64: {e}"))?;
    if !bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return Err("does not hold a JPEG (no FF D8 FF start)".into());
    }
    Ok(bytes)
}
