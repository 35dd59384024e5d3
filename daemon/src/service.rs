//! One question's path through the daemon: dialogue, task, observation, decision, answer,
//! outcome. The HTTP layer (`api.rs`) only translates to and from this.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use llm_engine::{Conversation, EngineConfig, FinishReason, GenerationParams};
use outcome_log::{CloudAttempt, OutcomeLogError, OutcomeWriter, ScoreSource, ScoreUpdate, TurnOutcome};
use policy_onnx::train::sim::{REFUSAL_MARKERS, argmax};
use policy_onnx::{
    Action, Availability, DecisionRequest, Exploration, LoadOptions, ModalitySet, Schema, TaskCategory, Turn,
};
use sensing::{Sensing, SensingHandle};
use task_classifier::TaskClassifier;
use tmo_protocol::{
    Attachment, CloudRequest, DeviceId, HistoryTurn, JudgeScore, MediaType, PolicyUpdateReport, RequestId,
    StatusCounters,
};
use tmod_api::{AskRequest, Budget, DecisionEvent, DialogueCreated, OutcomeEvent, Timings};
use tokio::sync::{mpsc, oneshot};

use crate::config::Config;
use crate::dialogues::{DialogueError, Dialogues, TurnStart};
use crate::estimates::CostEstimates;
use crate::link::{CloudAnswered, DeviceLink};
use crate::local_llm::{LocalAnswer, LocalJob, LocalLlm};
use crate::metrics::{ActionLabel, Metrics};
use crate::policies::{Policies, ServingPolicy};

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

/// Everything a request needs; shared by every connection.
#[derive(Debug)]
pub struct Service {
    config: Config,
    schema: Schema,
    modality_names: Vec<String>,
    policies: Mutex<Policies>,
    policy_options: LoadOptions,
    /// The last policy bundle or command handled, for the status topic.
    last_policy_update: Mutex<Option<PolicyUpdateReport>>,
    /// Wakes the outcome uploader: a row was logged.
    pub upload_wakeup: tokio::sync::Notify,
    /// Wakes the status publisher: counters or the policy changed.
    pub status_wakeup: tokio::sync::Notify,
    pub counters: Counters,
    classifier: TaskClassifier,
    llm: LocalLlm,
    dialogues: Mutex<Dialogues>,
    estimates: Mutex<CostEstimates>,
    sensing: SensingHandle,
    pub(crate) outcomes: OutcomeWriter,
    pub metrics: Metrics,
    started: Instant,
    usd_per_joule: f64,
    /// The MQTT link of the cloud path, when `[mqtt] enabled`.
    cloud: Option<Arc<DeviceLink>>,
}

/// What the status topic reports, counted since the daemon started.
#[derive(Debug, Default)]
pub struct Counters {
    requests: AtomicU64,
    local_answers: AtomicU64,
    cloud_answers: AtomicU64,
    cloud_fallbacks: AtomicU64,
    energy_millijoules: AtomicU64,
    last_outcome_ms: AtomicU64,
    /// Sum and count of the scores received (refusal heuristic, judge, feedback).
    scores: Mutex<(f64, u64)>,
}

impl Counters {
    fn score(&self, score: f64) {
        let mut s = lock(&self.scores);
        s.0 += score;
        s.1 += 1;
    }

    /// The counters as the status message carries them (the log's figures added by the caller).
    pub fn snapshot(&self) -> StatusCounters {
        let (sum, n) = *lock(&self.scores);
        let last = self.last_outcome_ms.load(Ordering::Relaxed);
        StatusCounters {
            requests: self.requests.load(Ordering::Relaxed),
            local_answers: self.local_answers.load(Ordering::Relaxed),
            cloud_answers: self.cloud_answers.load(Ordering::Relaxed),
            cloud_fallbacks: self.cloud_fallbacks.load(Ordering::Relaxed),
            mean_reward: (n > 0).then(|| sum / n as f64),
            energy_joules: Some(self.energy_millijoules.load(Ordering::Relaxed) as f64 / 1e3),
            last_outcome_unix_ms: (last > 0).then_some(last),
            ..StatusCounters::default()
        }
    }
}

/// How a turn's answer is coming.
#[derive(Debug)]
enum Answering {
    /// From the local model.
    Local(oneshot::Receiver<LocalAnswer>),
    /// From the cloud, or locally when the cloud request fails.
    Cloud(tokio::task::JoinHandle<CloudTurn>),
}

/// A turn the policy sent to the cloud: the attempt, and the answer that came of it.
#[derive(Debug)]
struct CloudTurn {
    attempt: CloudAttempt,
    answer: Result<CloudOrLocal, String>,
}

#[derive(Debug)]
enum CloudOrLocal {
    Cloud(CloudAnswered),
    /// The cloud request failed; the local model answered.
    Local(LocalAnswer),
}

/// A turn's answer, wherever it came from.
struct Produced {
    text: String,
    conversation: Conversation,
    prompt_tokens: u32,
    generated_tokens: u32,
    time_to_first_token: Duration,
    decode_tokens_per_sec: f64,
    finish: &'static str,
    queue: Duration,
    generate: Duration,
    cloud_wait: Duration,
    cloud_price_usd: f64,
    route: &'static str,
}

impl Produced {
    fn local(answer: LocalAnswer, route: &'static str) -> Result<Produced, String> {
        if answer.context_restarted {
            tracing::info!("dialogue outgrew the model's context: its view restarted");
        }
        let generation = answer.generation.map_err(|e| format!("local generation: {e}"))?;
        let report = &generation.report;
        Ok(Produced {
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
            conversation: answer.conversation,
        })
    }
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
    start: TurnStart,
    question: String,
    task: TaskCategory,
    action: Action,
    observation: Vec<f32>,
    propensity: f64,
    answering: Answering,
    /// The policy preferred the cloud, which was unreachable.
    cloud_unavailable: bool,
    received: Instant,
    timings: Timings,
    telemetry: serde_json::Value,
}

/// Now, in unix milliseconds.
pub(crate) fn unix_ms_now() -> u64 {
    outcome_log::now_ms().max(0) as u64
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
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
        let policy_options = LoadOptions { schema: schema.clone(), max_bytes: file.policy.max_bytes };
        let exploration = match file.policy.exploration.as_str() {
            "epsilon" => Exploration::EpsilonGreedy { epsilon: file.policy.epsilon },
            _ => Exploration::Greedy,
        };
        let policies = Policies::load(&file.state_dir, &file.policy.path, &policy_options, exploration)?;

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
        };
        if file.model.requantize.is_some() {
            tracing::warn!(
                "[model] requantize is no longer used and is ignored: remove it from the configuration"
            );
        }
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
        let (scores_tx, scores) = mpsc::channel(256);
        let (fleet_tx, fleet_rx) = mpsc::channel(64);
        let fleet_config = crate::fleet::FleetConfig::from_config(&config)?;
        let cloud = if file.mqtt.enabled {
            let device = DeviceId::new(config.device_id())
                .context("the device id must be a valid MQTT topic level (set `device_id`)")?;
            let topics = fleet_config.topics(&device);
            let link = DeviceLink::start(&config.link_config(), device, topics, scores_tx, fleet_tx)
                .context("MQTT link")?;
            tracing::info!(broker = %format!("{}:{}", file.mqtt.host, file.mqtt.port), "MQTT link started");
            Some(Arc::new(link))
        } else {
            None
        };
        let metrics = Metrics::new();
        metrics.set_policy(&policies.current().version, &policies.current().sha256);
        let dialogues = Dialogues::new(
            config.budgets(),
            Duration::from_secs(file.dialogues.idle_expiry_secs),
            file.dialogues.max_active,
            &file.model.system_prompt,
        );
        let service = Service {
            schema,
            modality_names: profile.modalities.iter().map(|m| m.name.clone()).collect(),
            policies: Mutex::new(policies),
            policy_options,
            last_policy_update: Mutex::new(None),
            upload_wakeup: tokio::sync::Notify::new(),
            status_wakeup: tokio::sync::Notify::new(),
            counters: Counters::default(),
            classifier,
            llm,
            dialogues: Mutex::new(dialogues),
            estimates: Mutex::new(CostEstimates::from_profile(&profile.costs)),
            sensing: sensing.handle(),
            outcomes,
            metrics,
            started: Instant::now(),
            usd_per_joule: file.energy.electricity_usd_per_kwh / JOULES_PER_KWH,
            cloud,
            config,
        };
        let service = Arc::new(service);
        tokio::spawn(store_judge_scores(scores, Arc::downgrade(&service)));
        if let Some(link) = &service.cloud {
            crate::fleet::start(&service, link.clone(), fleet_rx, fleet_config);
        }
        Ok((service, sensing))
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
            cloud_reachable: self.cloud_reachable(),
            remaining_latency_secs: start.remaining_latency_secs,
            remaining_cost_usd: start.remaining_cost_usd,
            costs: &costs,
        };
        let decided = {
            let mut policies = lock(&self.policies);
            let request = DecisionRequest { history: &start.history, task, availability };
            let mut decided = policies.decider().decide(&request);
            if let Err(e) = &decided {
                // A policy that fails gives way to the previous one at once.
                let reason = format!("the policy failed: {e}");
                if let Ok(version) = policies.rollback(None, None) {
                    tracing::error!(%reason, restored = %version, "policy rolled back");
                    self.metrics.set_policy(&policies.current().version, &policies.current().sha256);
                    self.report_policy_update(version, true, Some(format!("rolled back: {reason}")));
                    decided = policies.decider().decide(&request);
                }
            }
            match decided {
                Ok(decision) => {
                    let preferred = argmax(policies.decider().scores());
                    let observation = policies.decider().observation().to_vec();
                    let current = policies.current();
                    Ok((decision, preferred, observation, current.version.clone(), current.sha256.clone()))
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

        let preferred_action = self.schema.action(preferred).unwrap_or(Action::Local);
        let cloud_unavailable = preferred_action.is_cloud() && !decision.action.is_cloud();

        let (token_tx, tokens) = mpsc::unbounded_channel();
        let (done_tx, answer) = oneshot::channel();
        let max_answer = Duration::from_secs_f64(self.config.file.model.max_answer_secs);
        let params = GenerationParams {
            max_tokens: self.config.file.model.max_tokens,
            deadline: Some(Instant::now() + max_answer),
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
        let answering = match (&self.cloud, decision.action) {
            (Some(cloud), Action::Cloud { modalities }) => {
                let started = Instant::now();
                let (request, wait) = self.cloud_request(&start, task, &question, modalities, cloud.device());
                timings.attach_ms = ms(started.elapsed());
                let fallback = LocalFallback { llm: self.llm.clone(), job, answer, max_answer };
                Answering::Cloud(tokio::spawn(answer_in_cloud(cloud.clone(), request, wait, fallback)))
            }
            _ => {
                if let Err(full) = self.llm.submit(job) {
                    lock(&self.dialogues).abandon_turn(start);
                    self.metrics.reject("queue_full");
                    tracing::warn!(waiting = full.waiting, "local model queue full: 503");
                    return Err(AskError::Busy { retry_after_secs: 2 });
                }
                Answering::Local(answer)
            }
        };
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
            route: route_name(decision.action, cloud_unavailable).to_owned(),
            policy_version,
            policy_sha256,
        };
        Ok(DecidedTurn {
            decision: decision_event,
            tokens,
            pending: PendingTurn {
                start,
                question,
                task,
                action: decision.action,
                observation,
                propensity: decision.propensity,
                answering,
                cloud_unavailable,
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
            start,
            question,
            task,
            action,
            observation,
            propensity,
            answering,
            cloud_unavailable,
            received,
            mut timings,
            telemetry,
        } = turn;
        let (produced, cloud_attempt) = match answering {
            Answering::Local(answer) => {
                let route = if cloud_unavailable { "local:cloud-unavailable" } else { "local" };
                let produced = match answer.await {
                    Ok(answer) => Produced::local(answer, route),
                    Err(_) => Err("the model thread ended".to_owned()),
                };
                (produced, None)
            }
            Answering::Cloud(task) => match task.await {
                Ok(CloudTurn { attempt, answer }) => {
                    let produced = answer.and_then(|answer| match answer {
                        CloudOrLocal::Local(local) => Produced::local(local, "local:cloud-fallback"),
                        CloudOrLocal::Cloud(answered) => {
                            Ok(cloud_produced(answered, &start.conversation, &question))
                        }
                    });
                    let produced = produced.map(|mut p| {
                        p.cloud_wait = Duration::from_secs_f64(attempt.wait_secs);
                        match p.route {
                            // The whole answer arrives in one reply.
                            "cloud" => p.time_to_first_token = p.cloud_wait,
                            // The local answer started after the cloud's failure.
                            _ => p.time_to_first_token += p.cloud_wait,
                        }
                        p
                    });
                    if attempt.outcome != "answered" {
                        self.metrics.cloud_failure(&attempt.outcome);
                    }
                    (produced, Some(attempt))
                }
                Err(e) => (Err(format!("the cloud task failed: {e}")), None),
            },
        };
        let produced = match produced {
            Ok(p) => p,
            Err(e) => {
                lock(&self.dialogues).abandon_turn(start);
                return Err(AskError::Internal(e));
            }
        };
        let finished = Instant::now();
        timings.queue_ms = ms(produced.queue);
        timings.generate_ms = ms(produced.generate);
        timings.cloud_ms = ms(produced.cloud_wait);
        let latency_secs = finished.duration_since(received).as_secs_f64();

        // Expected costs follow the chosen action, failures included: that is what choosing it costs.
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
        let cost_usd = energy_j * self.usd_per_joule + produced.cloud_price_usd;
        lock(&self.estimates).record(class, latency_secs, cost_usd, energy_j);

        let refusal = REFUSAL_MARKERS.iter().any(|m| produced.text.contains(m));
        let (score, score_source) =
            if refusal { (Some(0.0), Some(ScoreSource::RefusalHeuristic)) } else { (None, None) };
        let (left_latency, left_cost) = lock(&self.dialogues).finish_turn(
            start,
            Turn { task, action },
            produced.conversation,
            latency_secs,
            cost_usd,
            finished,
        );

        let route = produced.route;
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
            prompt_tokens: produced.prompt_tokens,
            generated_tokens: produced.generated_tokens,
            answer: produced.text.clone(),
            score,
            score_source,
            telemetry,
            route: (route != decision.action).then(|| route.to_owned()),
            cloud_attempt: cloud_attempt.clone(),
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

        let c = &self.counters;
        c.requests.fetch_add(1, Ordering::Relaxed);
        match route {
            "cloud" => &c.cloud_answers,
            "local:cloud-fallback" => &c.cloud_fallbacks,
            _ => &c.local_answers,
        }
        .fetch_add(1, Ordering::Relaxed);
        c.energy_millijoules.fetch_add((energy_j * 1e3) as u64, Ordering::Relaxed);
        c.last_outcome_ms.store(unix_ms_now(), Ordering::Relaxed);
        if let Some(score) = score {
            c.score(score);
        }
        self.upload_wakeup.notify_one();
        self.status_wakeup.notify_one();

        let label = ActionLabel { action: decision.action.clone(), route: route.to_owned() };
        let m = &self.metrics;
        m.requests.get_or_create(&label).inc();
        m.latency.get_or_create(&label).observe(latency_secs);
        m.energy_j.get_or_create(&label).inc_by(energy_j);
        m.cost_usd.get_or_create(&label).inc_by(cost_usd);
        m.budget_left_latency.observe(left_latency);
        m.budget_left_cost.observe(left_cost);
        if produced.finish != "cloud" {
            m.decode_tokens_per_sec.set(produced.decode_tokens_per_sec);
            m.generated_tokens.inc_by(u64::from(produced.generated_tokens));
        }
        m.queue_waiting.set(self.llm.waiting() as i64);
        for (stage, value) in [
            ("decode", timings.decode_ms),
            ("classify", timings.classify_ms),
            ("decide", timings.decide_ms),
            ("attach", timings.attach_ms),
            ("queue", timings.queue_ms),
            ("generate", timings.generate_ms),
            ("cloud", timings.cloud_ms),
            ("log", timings.log_ms),
            ("overhead", timings.overhead_ms()),
        ] {
            m.stage(stage, value);
        }

        Ok(OutcomeEvent {
            dialogue_id: decision.dialogue_id.clone(),
            turn: decision.turn,
            answer: produced.text,
            latency_secs,
            energy_j,
            energy_source: energy_source.to_owned(),
            cost_usd,
            route: route.to_owned(),
            cloud_attempt: cloud_attempt.and_then(|a| serde_json::to_value(a).ok()),
            prompt_tokens: produced.prompt_tokens,
            generated_tokens: produced.generated_tokens,
            time_to_first_token_secs: produced.time_to_first_token.as_secs_f64(),
            decode_tokens_per_sec: produced.decode_tokens_per_sec,
            finish: produced.finish.to_owned(),
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
            Ok(update) => {
                self.counters.score(score);
                Ok(update)
            }
            Err(OutcomeLogError::UnknownTurn { dialogue, turn }) => {
                Err(AskError::Dialogue(DialogueError::UnknownTurn { dialogue, turn }))
            }
            Err(e) => Err(AskError::Internal(e.to_string())),
        }
    }

    /// The `/v1/status` report.
    pub async fn status(&self) -> serde_json::Value {
        let (policy_version, policy_sha256, previous_policy) = {
            let p = lock(&self.policies);
            (p.current().version.clone(), p.current().sha256.clone(), p.previous().map(|p| p.version.clone()))
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
            "policy": {
                "version": policy_version,
                "sha256": policy_sha256,
                "previous_version": previous_policy,
                "last_update": lock(&self.last_policy_update).clone(),
            },
            "model": {
                "name": info.name,
                "architecture": format!("{:?}", info.architecture),
                "file_bytes": info.file_bytes,
                "load_secs": info.load_time.as_secs_f64(),
                "queue_waiting": self.llm.waiting(),
            },
            "cloud": {
                "enabled": self.cloud.is_some(),
                "reachable": self.cloud_reachable(),
                "broker": format!("{}:{}", self.config.file.mqtt.host, self.config.file.mqtt.port),
            },
            "dialogues": { "open": open, "least_budget_left": least_left.map(|(l, c)| Budget { latency_secs: l, cost_usd: c }) },
            "expected_costs": estimates,
            "outcomes": outcomes,
            "sensing": self.sensing.status(),
        })
    }

    /// How bundles are loaded on this board (schema, size limit).
    pub fn policy_options(&self) -> &LoadOptions {
        &self.policy_options
    }

    /// The serving policy's version, its bundle's creation time, and the previous version.
    pub fn policy_versions(&self) -> (String, u64, Option<String>) {
        let p = lock(&self.policies);
        (p.current().version.clone(), p.current().created_unix_ms, p.previous().map(|p| p.version.clone()))
    }

    /// Records what became of a bundle or command, for `/v1/status` and the status topic.
    pub fn report_policy_update(&self, version: String, accepted: bool, reason: Option<String>) {
        let report = PolicyUpdateReport { version, accepted, reason, unix_ms: unix_ms_now() };
        *lock(&self.last_policy_update) = Some(report);
        self.status_wakeup.notify_one();
    }

    pub fn last_policy_update(&self) -> Option<PolicyUpdateReport> {
        lock(&self.last_policy_update).clone()
    }

    /// Serves a verified, prepared policy from the next decision on.
    pub fn adopt_policy(&self, prepared: ServingPolicy) -> Result<(), String> {
        let mut policies = lock(&self.policies);
        policies.adopt(prepared)?;
        self.metrics.set_policy(&policies.current().version, &policies.current().sha256);
        Ok(())
    }

    /// Applies a rollback command issued at `issued_unix_ms`; returns the version now serving,
    /// or `None` when the command was for an older policy (or applied already) and changed
    /// nothing.
    pub fn rollback_policy(
        &self,
        command_id: &str,
        to_version: Option<&str>,
        issued_unix_ms: u64,
    ) -> Option<Result<String, String>> {
        let mut policies = lock(&self.policies);
        if policies.command_applied(command_id) {
            return None;
        }
        // A command older than the serving policy's bundle was meant for an earlier one
        // (a device that was offline receives the retained bundle and command together).
        if issued_unix_ms < policies.current().created_unix_ms {
            policies.skip_command(command_id);
            return None;
        }
        if to_version == Some(policies.current().version.as_str()) {
            policies.skip_command(command_id);
            return None; // serving that version already
        }
        let result = policies.rollback(to_version, Some(command_id));
        if result.is_ok() {
            self.metrics.set_policy(&policies.current().version, &policies.current().sha256);
        } else {
            policies.skip_command(command_id);
        }
        Some(result)
    }

    /// Publishes `offline` on the availability topic and closes the MQTT link.
    pub async fn shutdown_cloud(&self) {
        if let Some(cloud) = &self.cloud {
            cloud.shutdown(Duration::from_secs(2)).await;
        }
    }

    /// Whether a cloud request can be sent now.
    fn cloud_reachable(&self) -> bool {
        let up = self.cloud.as_ref().is_some_and(|c| c.reachable());
        self.metrics.cloud_connected.set(i64::from(up));
        up
    }

    /// The cloud request of a turn, and how long to wait for its reply: the dialogue's remaining
    /// latency budget less the expected local answer (so that a fallback still fits), within
    /// `[cloud] min_wait_secs..=max_wait_secs`.
    fn cloud_request(
        &self,
        start: &TurnStart,
        task: TaskCategory,
        question: &str,
        modalities: ModalitySet,
        device: &DeviceId,
    ) -> (CloudRequest, Duration) {
        let c = &self.config.file.cloud;
        let expected_local = lock(&self.estimates).cost(CostEstimates::class_of(None)).latency_secs;
        let wait_secs =
            (start.remaining_latency_secs - expected_local).clamp(c.min_wait_secs, c.max_wait_secs);
        let wait = Duration::from_secs_f64(wait_secs);
        let exchanges: Vec<HistoryTurn> = start
            .conversation
            .exchanges()
            .map(|(question, answer)| HistoryTurn {
                question: question.to_owned(),
                answer: answer.to_owned(),
            })
            .collect();
        let history = exchanges[exchanges.len().saturating_sub(c.max_history_turns)..].to_vec();
        let request = CloudRequest {
            request_id: RequestId::generate(),
            device_id: device.clone(),
            dialogue_id: start.dialogue_id.clone(),
            turn: start.turn,
            task: task.name().to_owned(),
            question: question.to_owned(),
            history,
            attachments: modalities.indices().filter_map(|i| self.attachment(i)).collect(),
            deadline_unix_ms: unix_ms_now() + wait.as_millis() as u64,
            max_tokens: c.max_tokens,
        };
        (request, wait)
    }

    /// The latest JPEG of camera modality `index`, or the latest utterance of an audio one.
    /// A modality that cannot be captured now is left out (and logged): the question still goes.
    fn attachment(&self, index: usize) -> Option<Attachment> {
        let name = self.modality_names.get(index)?.clone();
        let captured = match self.sensing.modality_jpeg(index) {
            Ok(jpeg) => Ok((MediaType::ImageJpeg, jpeg.bytes)),
            Err(sensing::SensingError::WrongKind { .. }) => {
                self.sensing.utterance_wav().map(|wav| (MediaType::AudioWav, wav))
            }
            Err(e) => Err(e),
        };
        match captured {
            Ok((media_type, data)) => Some(Attachment { modality: index as u8, name, media_type, data }),
            Err(e) => {
                tracing::warn!(modality = %name, "not attached to the cloud request: {e}");
                None
            }
        }
    }

    fn names(&self, set: ModalitySet) -> Vec<String> {
        set.indices().filter_map(|i| self.modality_names.get(i).cloned()).collect()
    }
}

/// Stores the judge scores the bridges publish for this device's cloud answers.
async fn store_judge_scores(mut scores: mpsc::Receiver<JudgeScore>, service: std::sync::Weak<Service>) {
    while let Some(score) = scores.recv().await {
        let Some(service) = service.upgrade() else { break };
        for attempt in 0.. {
            let stored = service
                .outcomes
                .set_score(&score.dialogue_id, score.turn, score.score, ScoreSource::Judge)
                .await;
            match stored {
                Ok(update) => {
                    tracing::debug!(dialogue = %score.dialogue_id, turn = score.turn, ?update, "judge score");
                    service.counters.score(score.score);
                    break;
                }
                // The turn's row may not be durable yet when a fast judge answers.
                Err(OutcomeLogError::UnknownTurn { .. }) if attempt < 3 => {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                Err(e) => {
                    tracing::warn!(dialogue = %score.dialogue_id, turn = score.turn, "judge score not stored: {e}");
                    break;
                }
            }
        }
    }
}

/// What a cloud turn needs to answer locally when the cloud does not.
struct LocalFallback {
    llm: LocalLlm,
    job: LocalJob,
    answer: oneshot::Receiver<LocalAnswer>,
    max_answer: Duration,
}

/// Sends the cloud request; on any failure answers locally, with the same token stream.
async fn answer_in_cloud(
    cloud: Arc<DeviceLink>,
    request: CloudRequest,
    wait: Duration,
    fallback: LocalFallback,
) -> CloudTurn {
    let (result, cost) = cloud.ask(&request, wait).await;
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
    let LocalFallback { llm, mut job, answer, max_answer } = fallback;
    match result {
        Ok(answered) => {
            attempt.model = Some(answered.answer.model.clone());
            attempt.backend_latency_ms = Some(answered.backend_latency_ms);
            attempt.cost_usd = answered.answer.cost_usd;
            let _ = job.tokens.send(answered.answer.answer.clone());
            CloudTurn { attempt, answer: Ok(CloudOrLocal::Cloud(answered)) }
        }
        Err(failure) => {
            tracing::warn!(
                request_id = %request.request_id,
                dialogue = %request.dialogue_id,
                turn = request.turn,
                reason = failure.kind(),
                "cloud request failed ({failure}); answering locally"
            );
            attempt.outcome = failure.kind().to_owned();
            attempt.detail = Some(failure.to_string());
            job.enqueued = Instant::now();
            job.params.deadline = Some(Instant::now() + max_answer);
            let answer = match llm.submit(job) {
                Err(full) => {
                    Err(format!("the cloud request failed ({failure}) and the local model refused: {full}"))
                }
                Ok(()) => {
                    answer.await.map(CloudOrLocal::Local).map_err(|_| "the model thread ended".to_owned())
                }
            };
            CloudTurn { attempt, answer }
        }
    }
}

/// A cloud answer as a turn's answer; the local model's view of the dialogue gains the turn.
fn cloud_produced(answered: CloudAnswered, conversation: &Conversation, question: &str) -> Produced {
    let mut conversation = conversation.clone();
    conversation.add_answered_turn(question, answered.answer.answer.clone());
    let backend_secs = f64::from(answered.backend_latency_ms) / 1e3;
    let completion = answered.answer.completion_tokens;
    Produced {
        text: answered.answer.answer,
        conversation,
        prompt_tokens: answered.answer.prompt_tokens,
        generated_tokens: completion,
        time_to_first_token: Duration::ZERO,
        decode_tokens_per_sec: if backend_secs > 0.0 { f64::from(completion) / backend_secs } else { 0.0 },
        finish: "cloud",
        queue: Duration::ZERO,
        generate: Duration::ZERO,
        cloud_wait: Duration::ZERO,
        cloud_price_usd: answered.answer.cost_usd,
        route: "cloud",
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
