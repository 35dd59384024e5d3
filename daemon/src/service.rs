//! One question's path through the daemon: dialogue, task, observation, decision, answer,
//! outcome. The HTTP layer (`api.rs`) only translates to and from this.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use llm_engine::{EngineConfig, FinishReason, GenerationParams};
use outcome_log::{OutcomeLogError, OutcomeWriter, ScoreSource, ScoreUpdate, TurnOutcome};
use policy_onnx::train::sim::{REFUSAL_MARKERS, argmax};
use policy_onnx::{
    Action, Availability, Decider, DecisionRequest, Exploration, LoadOptions, ModalitySet, Policy, Schema,
    TaskCategory, Turn,
};
use sensing::{Sensing, SensingHandle};
use task_classifier::TaskClassifier;
use tmod_api::{AskRequest, Budget, DecisionEvent, DialogueCreated, OutcomeEvent, Timings};
use tokio::sync::{mpsc, oneshot};

use crate::config::Config;
use crate::dialogues::{DialogueError, Dialogues, TurnStart};
use crate::estimates::CostEstimates;
use crate::local_llm::{LocalAnswer, LocalJob, LocalLlm};
use crate::metrics::{ActionLabel, Metrics};

/// Joules in a kilowatt-hour.
const JOULES_PER_KWH: f64 = 3.6e6;

/// A request the daemon refuses, with the HTTP status it maps to.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Dialogue(#[from] DialogueError),
    #[error("the local model is busy; retry in a moment")]
    Busy { retry_after_secs: u64 },
    #[error("internal error: {0}")]
    Internal(String),
}

/// The policy in service and what identifies it.
#[derive(Debug)]
struct PolicyState {
    decider: Decider,
    version: String,
    sha256: String,
}

/// Everything a request needs; shared by every connection.
#[derive(Debug)]
pub struct Service {
    config: Config,
    schema: Schema,
    modality_names: Vec<String>,
    policy: Mutex<PolicyState>,
    classifier: TaskClassifier,
    llm: LocalLlm,
    dialogues: Mutex<Dialogues>,
    estimates: Mutex<CostEstimates>,
    sensing: SensingHandle,
    outcomes: OutcomeWriter,
    pub metrics: Metrics,
    started: Instant,
    usd_per_joule: f64,
    /// Whether the cloud path can take a request (the MQTT link; absent so far).
    cloud_reachable: bool,
}

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
    answer: oneshot::Receiver<LocalAnswer>,
    start: TurnStart,
    question: String,
    task: TaskCategory,
    action: Action,
    observation: Vec<f32>,
    propensity: f64,
    route: Option<String>,
    received: Instant,
    timings: Timings,
    telemetry: serde_json::Value,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves consistent data (every critical section
    // is a few assignments), so a poisoned lock is taken over.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Service {
    /// Loads the policy, the classifier and the model, starts sensing and opens the outcome log.
    /// Returns the sensing owner too: the caller shuts it down at exit.
    pub fn start(config: Config) -> anyhow::Result<(Arc<Self>, Sensing)> {
        let file = &config.file;
        std::fs::create_dir_all(&file.state_dir)
            .with_context(|| format!("cannot create the state directory {}", file.state_dir.display()))?;
        let profile = config.sensing_profile();
        let schema = Schema::new(profile.modality_count(), 5);
        let options = LoadOptions { schema: schema.clone(), max_bytes: file.policy.max_bytes };
        let policy = if file.policy.path.is_empty() {
            Policy::from_bytes(policy_onnx::DEFAULT_POLICY, &options)
                .context("the built-in default policy")?
        } else {
            Policy::from_file(Path::new(&file.policy.path), &options)
                .with_context(|| format!("policy {}", file.policy.path))?
        };
        let exploration = match file.policy.exploration.as_str() {
            "epsilon" => Exploration::EpsilonGreedy { epsilon: file.policy.epsilon },
            _ => Exploration::Greedy,
        };
        let (version, sha256) = (policy.info().version(), policy.info().sha256.clone());
        let decider = Decider::new(Arc::new(policy), exploration, None).context("policy session")?;

        let classifier_dir = llm_engine::resolve_model(&file.classifier.model)
            .with_context(|| format!("classifier model {:?}", file.classifier.model))?;
        let classifier = if file.classifier.head.is_empty() {
            TaskClassifier::from_parts(&classifier_dir, task_classifier::DEFAULT_HEAD)
        } else {
            TaskClassifier::load(&classifier_dir, Path::new(&file.classifier.head))
        }
        .context("task classifier")?;

        let model = llm_engine::resolve_model(&file.model.name)
            .with_context(|| format!("model {:?} (install it with `tmoctl model fetch`)", file.model.name))?;
        let engine_config = EngineConfig {
            threads: (file.model.threads > 0).then_some(file.model.threads),
            max_context_tokens: None,
            requantize_q4_1: config.requantize().map_err(anyhow::Error::msg)?,
        };
        let llm = LocalLlm::start(&model, engine_config, file.model.queue_limit, &file.model.system_prompt)
            .with_context(|| format!("loading {}", model.display()))?;
        tracing::info!(model = %model.display(), load_ms = llm.info().load_time.as_millis(), "local model ready");

        let outcome_path = config.state_path(&file.outcomes.path);
        let outcomes = OutcomeWriter::open(
            &outcome_path,
            outcome_log::OutcomeLogConfig { max_bytes: file.outcomes.max_bytes, ..Default::default() },
        )
        .with_context(|| format!("outcome log {}", outcome_path.display()))?;

        let sensing = Sensing::start(&profile).context("sensing")?;
        let metrics = Metrics::new();
        metrics.set_policy(&version, &sha256);
        let dialogues = Dialogues::new(
            config.budgets(),
            Duration::from_secs(file.dialogues.idle_expiry_secs),
            file.dialogues.max_active,
            &file.model.system_prompt,
        );
        let service = Service {
            schema,
            modality_names: profile.modalities.iter().map(|m| m.name.clone()).collect(),
            policy: Mutex::new(PolicyState { decider, version, sha256 }),
            classifier,
            llm,
            dialogues: Mutex::new(dialogues),
            estimates: Mutex::new(CostEstimates::from_profile(&profile.costs)),
            sensing: sensing.handle(),
            outcomes,
            metrics,
            started: Instant::now(),
            usd_per_joule: file.energy.electricity_usd_per_kwh / JOULES_PER_KWH,
            cloud_reachable: false,
            config,
        };
        Ok((Arc::new(service), sensing))
    }

    /// Starts a dialogue.
    pub fn new_dialogue(&self) -> DialogueCreated {
        let mut dialogues = lock(&self.dialogues);
        let dialogue_id = dialogues.create(Instant::now());
        let (latency_secs, cost_usd) = dialogues.budgets();
        self.metrics.open_dialogues.set(dialogues.len() as i64);
        DialogueCreated { dialogue_id, budget: Budget { latency_secs, cost_usd } }
    }

    /// Forgets idle dialogues.
    pub fn expire_dialogues(&self) {
        let mut dialogues = lock(&self.dialogues);
        let expired = dialogues.expire(Instant::now());
        if expired > 0 {
            tracing::debug!(expired, "idle dialogues expired");
        }
        self.metrics.open_dialogues.set(dialogues.len() as i64);
    }

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
        let mut timings = Timings { decode_ms, ..Timings::default() };

        let started = Instant::now();
        let (task, task_source, task_probabilities) = match &request.task {
            Some(name) => {
                let task = TaskCategory::from_name(name).ok_or_else(|| {
                    AskError::BadRequest(format!(
                        "unknown task {name:?} (one of: {})",
                        TaskCategory::ALL.map(TaskCategory::name).join(", ")
                    ))
                })?;
                (task, "request", Vec::new())
            }
            None => {
                let c = self.classifier.classify(&question).map_err(|e| AskError::Internal(e.to_string()))?;
                (c.task, "classifier", c.probabilities.to_vec())
            }
        };
        timings.classify_ms = ms(started.elapsed());

        let dialogue_id = match request.dialogue_id {
            Some(id) => id,
            None => self.new_dialogue().dialogue_id,
        };
        let start = lock(&self.dialogues).start_turn(&dialogue_id, Instant::now())?;

        let started = Instant::now();
        let telemetry = self.sensing.telemetry();
        let available = ModalitySet::from_indices(
            self.sensing.availability().iter().enumerate().filter(|(_, ok)| **ok).map(|(i, _)| i),
        );
        let costs = lock(&self.estimates).table().clone();
        let availability = Availability {
            modalities: available,
            cloud_reachable: self.cloud_reachable,
            remaining_latency_secs: start.remaining_latency_secs,
            remaining_cost_usd: start.remaining_cost_usd,
            costs: &costs,
        };
        let decided = {
            let mut policy = lock(&self.policy);
            let request = DecisionRequest { history: &start.history, task, availability };
            match policy.decider.decide(&request) {
                Ok(decision) => {
                    let d = &policy.decider;
                    let preferred = argmax(d.scores());
                    Ok((
                        decision,
                        preferred,
                        d.observation().to_vec(),
                        policy.version.clone(),
                        policy.sha256.clone(),
                    ))
                }
                Err(e) => Err(AskError::Internal(format!("decision: {e}"))),
            }
        };
        let (decision, preferred, observation, policy_version, policy_sha256) = match decided {
            Ok(d) => d,
            Err(e) => {
                lock(&self.dialogues).abandon_turn(start);
                return Err(e);
            }
        };
        timings.decide_ms = ms(started.elapsed());

        // The cloud path is not there yet: a cloud action is masked (cloud unreachable), so the
        // decision is local; the route records when the policy preferred the cloud.
        let preferred_action = self.schema.action(preferred).unwrap_or(Action::Local);
        let route = (preferred_action.is_cloud() && !decision.action.is_cloud())
            .then(|| "cloud preferred, unavailable, answered locally".to_owned());

        let (token_tx, tokens) = mpsc::unbounded_channel();
        let (done_tx, answer) = oneshot::channel();
        let remaining = Duration::from_secs_f64(self.config.file.model.max_answer_secs);
        let params = GenerationParams {
            max_tokens: self.config.file.model.max_tokens,
            deadline: Some(Instant::now() + remaining),
            ..GenerationParams::default()
        };
        let job = LocalJob {
            conversation: start.conversation.clone(),
            question: question.clone(),
            params,
            tokens: token_tx,
            done: done_tx,
            enqueued: Instant::now(),
        };
        if let Err(full) = self.llm.submit(job) {
            lock(&self.dialogues).abandon_turn(start);
            self.metrics.reject("queue_full");
            tracing::warn!(waiting = full.waiting, "local model queue full: 503");
            return Err(AskError::Busy { retry_after_secs: 2 });
        }
        self.metrics.queue_waiting.set(self.llm.waiting() as i64);

        let decision_event = DecisionEvent {
            dialogue_id: dialogue_id.clone(),
            turn: start.turn,
            task: task.name().to_owned(),
            task_source: task_source.to_owned(),
            task_probabilities,
            action_index: decision.action_index as u32,
            action: if decision.action.is_cloud() { "cloud" } else { "local" }.to_owned(),
            modalities: self.names(decision.action.modalities()),
            propensity: decision.propensity,
            preferred_action_index: preferred as u32,
            route: route_name(decision.action, route.is_some()).to_owned(),
            policy_version,
            policy_sha256,
        };
        Ok(DecidedTurn {
            decision: decision_event,
            tokens,
            pending: PendingTurn {
                answer,
                start,
                question,
                task,
                action: decision.action,
                observation,
                propensity: decision.propensity,
                route,
                received,
                timings,
                telemetry: serde_json::to_value(&*telemetry).unwrap_or(serde_json::Value::Null),
            },
        })
    }

    /// Waits for the answer, accounts for it and logs it durably.
    pub async fn finish(
        &self,
        decision: &DecisionEvent,
        turn: PendingTurn,
    ) -> Result<OutcomeEvent, AskError> {
        let PendingTurn {
            answer,
            start,
            question,
            task,
            action,
            observation,
            propensity,
            route,
            received,
            mut timings,
            telemetry,
        } = turn;
        let Ok(answer) = answer.await else {
            lock(&self.dialogues).abandon_turn(start);
            return Err(AskError::Internal("the model thread ended".into()));
        };
        let generation = match answer.generation {
            Ok(g) => g,
            Err(e) => {
                lock(&self.dialogues).abandon_turn(start);
                return Err(AskError::Internal(format!("local generation: {e}")));
            }
        };
        if answer.context_restarted {
            tracing::info!(dialogue = %decision.dialogue_id, "dialogue outgrew the model's context: its view restarted");
        }
        let finished = Instant::now();
        timings.queue_ms = ms(answer.queue_time);
        timings.generate_ms = ms(generation.report.wall_time);
        let latency_secs = finished.duration_since(received).as_secs_f64();

        let class = CostEstimates::class_of(action.is_cloud().then(|| action.modalities().len()));
        let measured = self
            .sensing
            .energy_between(received, finished)
            .ok()
            .filter(|span| span.span_secs > 0.0 && span.covered_secs >= 0.8 * span.span_secs);
        let (energy_j, energy_source) = match measured {
            Some(span) => (span.joules, "measured"),
            None => {
                let expected = lock(&self.estimates).cost(class);
                let watts =
                    if expected.latency_secs > 0.0 { expected.energy_j / expected.latency_secs } else { 0.0 };
                (watts * latency_secs, "estimated")
            }
        };
        let cost_usd = energy_j * self.usd_per_joule;
        lock(&self.estimates).record(class, latency_secs, cost_usd, energy_j);

        let refusal = REFUSAL_MARKERS.iter().any(|m| generation.text.contains(m));
        let (score, score_source) =
            if refusal { (Some(0.0), Some(ScoreSource::RefusalHeuristic)) } else { (None, None) };
        let (left_latency, left_cost) = lock(&self.dialogues).finish_turn(
            start,
            Turn { task, action },
            answer.conversation,
            latency_secs,
            cost_usd,
            finished,
        );

        let report = &generation.report;
        let outcome = TurnOutcome {
            dialogue_id: decision.dialogue_id.clone(),
            turn: decision.turn,
            question,
            task,
            observation,
            action_index: decision.action_index,
            action,
            propensity,
            policy_version: decision.policy_version.clone(),
            policy_sha256: decision.policy_sha256.clone(),
            latency_secs,
            energy_joules: (energy_source == "measured").then_some(energy_j),
            cost_usd,
            prompt_tokens: report.prompt_tokens as u32,
            generated_tokens: report.generated_tokens as u32,
            answer: generation.text.clone(),
            score,
            score_source,
            telemetry,
            route: route.clone(),
            created_at_ms: outcome_log::now_ms(),
        };
        let logging = Instant::now();
        let logged = self.outcomes.append(outcome).await;
        timings.log_ms = ms(logging.elapsed());
        if let Err(e) = logged {
            // The user still gets the answer; the loss is visible in the log and the metrics.
            tracing::error!(dialogue = %decision.dialogue_id, turn = decision.turn, "outcome not logged: {e}");
            self.metrics.reject(if e.is_out_of_space() { "outcome_log_full" } else { "outcome_log_error" });
        }
        timings.total_ms = ms(received.elapsed());

        let label = ActionLabel { action: decision.action.clone(), route: decision.route.clone() };
        let m = &self.metrics;
        m.requests.get_or_create(&label).inc();
        m.latency.get_or_create(&label).observe(latency_secs);
        m.energy_j.get_or_create(&label).inc_by(energy_j);
        m.cost_usd.get_or_create(&label).inc_by(cost_usd);
        m.budget_left_latency.observe(left_latency);
        m.budget_left_cost.observe(left_cost);
        m.decode_tokens_per_sec.set(report.decode_tokens_per_sec);
        m.generated_tokens.inc_by(report.generated_tokens as u64);
        m.queue_waiting.set(self.llm.waiting() as i64);
        for (stage, value) in [
            ("decode", timings.decode_ms),
            ("classify", timings.classify_ms),
            ("decide", timings.decide_ms),
            ("queue", timings.queue_ms),
            ("generate", timings.generate_ms),
            ("log", timings.log_ms),
            ("overhead", timings.overhead_ms()),
        ] {
            m.stage(stage, value);
        }

        Ok(OutcomeEvent {
            dialogue_id: decision.dialogue_id.clone(),
            turn: decision.turn,
            answer: generation.text,
            latency_secs,
            energy_j,
            energy_source: energy_source.to_owned(),
            cost_usd,
            prompt_tokens: report.prompt_tokens as u32,
            generated_tokens: report.generated_tokens as u32,
            time_to_first_token_secs: report.time_to_first_token.as_secs_f64(),
            decode_tokens_per_sec: report.decode_tokens_per_sec,
            finish: finish_name(report.finish).to_owned(),
            budget_left: Budget { latency_secs: left_latency, cost_usd: left_cost },
            score,
            score_source: score_source.map(|s| s.as_str().to_owned()),
            timings,
        })
    }

    /// Stores a user's score of an earlier turn.
    pub async fn feedback(&self, dialogue_id: &str, turn: u32, score: f64) -> Result<ScoreUpdate, AskError> {
        if !(score.is_finite() && (0.0..=1.0).contains(&score)) {
            return Err(AskError::BadRequest(format!("`score` must be in [0, 1], found {score}")));
        }
        match self.outcomes.set_score(dialogue_id, turn, score, ScoreSource::Feedback).await {
            Ok(update) => Ok(update),
            Err(OutcomeLogError::UnknownTurn { dialogue, turn }) => {
                Err(AskError::Dialogue(DialogueError::UnknownTurn { dialogue, turn }))
            }
            Err(e) => Err(AskError::Internal(e.to_string())),
        }
    }

    /// The `/v1/status` report.
    pub async fn status(&self) -> serde_json::Value {
        let (policy_version, policy_sha256) = {
            let p = lock(&self.policy);
            (p.version.clone(), p.sha256.clone())
        };
        let (open, least_left) = {
            let mut d = lock(&self.dialogues);
            d.expire(Instant::now());
            (d.len(), d.least_budget_left())
        };
        self.metrics.open_dialogues.set(open as i64);
        let estimates = lock(&self.estimates).classes().to_vec();
        let class_names: Vec<String> = std::iter::once("local".to_owned())
            .chain((0..estimates.len().saturating_sub(1)).map(|k| format!("cloud_{k}_modalities")))
            .collect();
        let estimates: serde_json::Map<String, serde_json::Value> = class_names
            .into_iter()
            .zip(estimates)
            .map(|(name, e)| (name, serde_json::to_value(e).unwrap_or_default()))
            .collect();
        let outcomes = match self.outcomes.stats().await {
            Ok(stats) => serde_json::to_value(stats).unwrap_or_default(),
            Err(e) => serde_json::json!({ "error": e.to_string() }),
        };
        let info = self.llm.info();
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "device_id": self.config.device_id(),
            "profile": self.config.profile.board.name,
            "uptime_secs": self.started.elapsed().as_secs_f64(),
            "policy": { "version": policy_version, "sha256": policy_sha256 },
            "model": {
                "name": info.name,
                "architecture": format!("{:?}", info.architecture),
                "file_bytes": info.file_bytes,
                "load_secs": info.load_time.as_secs_f64(),
                "queue_waiting": self.llm.waiting(),
            },
            "cloud": {
                "reachable": self.cloud_reachable,
                "broker": format!("{}:{}", self.config.file.mqtt.host, self.config.file.mqtt.port),
                "reason": "the cloud path over MQTT is not part of this build yet",
            },
            "dialogues": { "open": open, "least_budget_left": least_left.map(|(l, c)| Budget { latency_secs: l, cost_usd: c }) },
            "expected_costs": estimates,
            "outcomes": outcomes,
            "sensing": self.sensing.status(),
        })
    }

    fn names(&self, set: ModalitySet) -> Vec<String> {
        set.indices().filter_map(|i| self.modality_names.get(i).cloned()).collect()
    }
}

fn route_name(action: Action, cloud_unavailable: bool) -> &'static str {
    match (action.is_cloud(), cloud_unavailable) {
        (true, _) => "cloud",
        (false, true) => "local:cloud-unavailable",
        (false, false) => "local",
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

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
