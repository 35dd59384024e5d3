//! tmod's local API, the contract between the daemon and the kitchen-assistant app: the JSON
//! bodies and server-sent events of every route, and [`Client`], which speaks them over the
//! daemon's Unix socket (the default) or a loopback TCP port.
//!
//! Routes:
//! - `POST /v1/ask` ([`AskRequest`]): answered with server-sent events, in order one
//!   `decision` ([`DecisionEvent`]), any number of `token` (a JSON string each), then one
//!   `outcome` ([`OutcomeEvent`]) or one `error` ([`ErrorBody`]). With `"stream": false` the
//!   answer is one JSON [`AskResponse`] instead.
//! - `POST /v1/dialogues`: starts a dialogue, answered with [`DialogueCreated`].
//! - `POST /v1/feedback` ([`FeedbackRequest`]): scores an earlier turn.
//! - `GET /v1/status`: a JSON report (free-form, documented by the daemon).
//! - `GET /metrics`: Prometheus text.
//!
//! Errors are 4xx/5xx with an [`ErrorBody`]; 503 carries `Retry-After`.

mod client;

pub use client::{Client, ClientError, Endpoint};

use serde::{Deserialize, Serialize};

/// `POST /v1/ask`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AskRequest {
    /// The dialogue this question continues; absent starts a new dialogue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dialogue_id: Option<String>,
    /// The user's question.
    pub text: String,
    /// The task category when the app knows it (`"Assistive System"`, `"Message Editing"`,
    /// `"Query"`, `"Recommendation"`); absent lets the device's classifier decide.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// Stream the answer as server-sent events (default) or return one JSON body.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub stream: bool,
    /// The system prompt of the dialogue this question starts (the device's configured one
    /// when absent); refused for a question that continues a dialogue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    /// How to generate this answer; absent settings are the device's.
    #[serde(default, skip_serializing_if = "Generation::is_default")]
    pub generation: Generation,
    /// Answer here whatever the policy prefers (logged as forced, and kept out of off-policy
    /// estimates); absent lets the policy decide.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<ForcedRoute>,
    /// The app's own JPEG images, as data URLs (`data:image/jpeg;base64,...`): sent with a cloud
    /// request besides the views the policy chose, when the cloud takes images; a local answer
    /// leaves them out (`DecisionEvent::app_images_sent` says how many went).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<String>,
}

/// Where an app may force a turn to be answered.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ForcedRoute {
    /// The local model.
    Local,
    /// The cloud, with the attachments the policy scores highest among those allowed now.
    Cloud,
}

/// Generation settings of one answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Generation {
    /// Most tokens of the answer (the device's `[model] max_tokens` bounds it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Sampling temperature (0 to 2; 0 is greedy, the device's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Nucleus sampling mass (above 0, up to 1), used with a temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Seed of the sampler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

impl Generation {
    /// No setting given.
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// Why the settings cannot be used, naming the field.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.max_tokens == Some(0) {
            return Err(("max_tokens", "must be at least 1".into()));
        }
        if let Some(t) = self.temperature.filter(|t| !(t.is_finite() && (0.0..=2.0).contains(t))) {
            return Err(("temperature", format!("must be from 0 to 2, found {t}")));
        }
        if let Some(p) = self.top_p.filter(|p| !(p.is_finite() && *p > 0.0 && *p <= 1.0)) {
            return Err(("top_p", format!("must be above 0 and at most 1, found {p}")));
        }
        Ok(())
    }
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl AskRequest {
    /// A streamed question in `dialogue_id` (or a new dialogue).
    pub fn new(dialogue_id: Option<&str>, text: &str) -> Self {
        Self {
            dialogue_id: dialogue_id.map(str::to_owned),
            text: text.to_owned(),
            task: None,
            stream: true,
            system_prompt: None,
            generation: Generation::default(),
            route: None,
            images: Vec::new(),
        }
    }
}

/// The `decision` event: what the policy chose for this turn, before any answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DecisionEvent {
    pub dialogue_id: String,
    /// The turn's index in its dialogue, from 0.
    pub turn: u32,
    /// The task category used for the observation.
    pub task: String,
    /// Where the task came from: `classifier` or `request`.
    pub task_source: String,
    /// The classifier's probabilities in task-id order (empty when the request named the task).
    pub task_probabilities: Vec<f32>,
    /// The action index of policy contract v1 (0 = local, k >= 1 = cloud with subset k - 1).
    pub action_index: u32,
    /// `local` or `cloud`.
    pub action: String,
    /// The modalities attached (names from the device profile).
    pub modalities: Vec<String>,
    /// Probability with which this action was chosen (1 for the greedy arg-max).
    pub propensity: f64,
    /// The unmasked arg-max of the policy's scores.
    pub preferred_action_index: u32,
    /// The app forced the route (`AskRequest::route`); the propensity is then 1.
    #[serde(default, skip_serializing_if = "is_false")]
    pub forced: bool,
    /// The app's images (`AskRequest::images`) sent with the cloud request.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub app_images_sent: u32,
    /// How the turn is answered: `local`, `cloud`, or `local:cloud-unavailable` when the
    /// policy preferred a cloud action that the mask removed.
    pub route: String,
    pub policy_version: String,
    pub policy_sha256: String,
    /// The policy's observation contract: `tmo-obs-v1` or `tmo-obs-v2`.
    #[serde(default)]
    pub policy_schema: String,
    /// The cost table the decision used (the device's expectation at that moment): what a v2
    /// policy read and what the budget mask checked.
    #[serde(default)]
    pub expected_costs: CostClasses,
}

/// Expected latency and usage of each cost class, in the order [local, cloud with 0
/// attachments, ..., cloud with X].
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CostClasses {
    pub latency_secs: Vec<f64>,
    pub usage_usd: Vec<f64>,
}

/// The `outcome` event: what the turn cost and produced.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OutcomeEvent {
    pub dialogue_id: String,
    pub turn: u32,
    /// The whole answer.
    pub answer: String,
    /// Wall time from the request's arrival to the end of the answer.
    pub latency_secs: f64,
    /// Energy of the device over the turn.
    pub energy_j: f64,
    /// `measured` (a power meter) or `estimated` (the moving average of the action class).
    pub energy_source: String,
    /// Electricity of the device's energy, plus the cloud's price for a cloud answer.
    pub cost_usd: f64,
    /// How the answer was produced: `local`, `cloud`, `local:cloud-unavailable` (the policy
    /// preferred the cloud, the link was down) or `local:cloud-fallback` (the cloud request
    /// failed or timed out; `cloud_attempt` says how).
    #[serde(default)]
    pub route: String,
    /// The cloud request of this turn, if one was sent: `outcome` (`answered`, `timeout`,
    /// `connection_lost`, ...), `detail`, `wait_secs`, `deadline_secs`, `request_bytes`, `model`,
    /// `backend_latency_ms`, `cost_usd` (the outcome log's record, as JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_attempt: Option<serde_json::Value>,
    pub prompt_tokens: u32,
    pub generated_tokens: u32,
    pub time_to_first_token_secs: f64,
    pub decode_tokens_per_sec: f64,
    /// Why generation stopped: `end_of_turn`, `max_tokens`, `deadline`, `cancelled`,
    /// `context_full`; `cloud` for a cloud answer.
    pub finish: String,
    /// What is left of the dialogue's budgets after this turn.
    pub budget_left: Budget,
    /// A score given on the device (0 for a refusal), if any.
    pub score: Option<f64>,
    pub score_source: Option<String>,
    /// Where the request's time went.
    pub timings: Timings,
}

/// Latency and cost budget of a dialogue.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Budget {
    pub latency_secs: f64,
    pub cost_usd: f64,
}

/// Milliseconds spent in each stage of a request on the daemon.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Timings {
    /// Waiting for and parsing the request body.
    pub decode_ms: f64,
    pub classify_ms: f64,
    pub decide_ms: f64,
    /// Encoding the attached camera frames and audio of a cloud request.
    #[serde(default)]
    pub attach_ms: f64,
    /// Waiting in the engine's queue.
    pub queue_ms: f64,
    /// The engine's generation call.
    pub generate_ms: f64,
    /// Waiting for the cloud's reply (or its failure).
    #[serde(default)]
    pub cloud_ms: f64,
    /// Until the outcome row was durable.
    pub log_ms: f64,
    /// Everything on the daemon.
    pub total_ms: f64,
}

impl Timings {
    /// The daemon's own time: everything but waiting for and running the model or the cloud.
    pub fn overhead_ms(&self) -> f64 {
        self.total_ms - self.generate_ms - self.queue_ms - self.cloud_ms
    }
}

/// The body of `POST /v1/ask` with `"stream": false`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AskResponse {
    pub decision: DecisionEvent,
    pub outcome: OutcomeEvent,
}

/// The body of `POST /v1/dialogues`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DialogueCreated {
    pub dialogue_id: String,
    pub budget: Budget,
}

/// `POST /v1/feedback`: a user's score of an earlier answer, in [0, 1].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FeedbackRequest {
    pub dialogue_id: String,
    pub turn: u32,
    pub score: f64,
}

/// Any error answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorBody {
    pub error: String,
}

/// One server-sent event of `POST /v1/ask`.
#[derive(Debug, Clone, PartialEq)]
pub enum AskEvent {
    Decision(DecisionEvent),
    Token(String),
    Outcome(OutcomeEvent),
    Error(String),
}
