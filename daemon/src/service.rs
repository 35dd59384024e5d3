//! The daemon's shared state, [`Service`]: loading everything at start, dialogues, feedback, the
//! status report, and the serving policy as the fleet tasks see it ([`FleetHost`]). A question's
//! path, stage by stage, is in [`turn`]. The HTTP layer (`api.rs`) only translates to and from
//! these.

mod turn;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use llm_engine::EngineConfig;
use outcome_log::{OutcomeLogError, OutcomeWriter, ScoreSource, ScoreUpdate};
use policy_onnx::{Exploration, LoadOptions, Schema};
use sensing::{Sensing, SensingHandle};
use task_classifier::TaskClassifier;
use tmo_protocol::{DeviceId, JudgeScore, MediaType, PolicyStats, PolicyUpdateReport, StatusCounters};
use tmod_api::{Budget, DialogueCreated};
use tokio::sync::mpsc;

pub use self::turn::DecidedTurn;
use crate::config::Config;
use crate::dialogues::{DialogueError, Dialogues};
use crate::estimates::CostEstimates;
use crate::fleet::FleetHost;
use crate::link::DeviceLink;
use crate::local_llm::LocalLlm;
use crate::metrics::Metrics;
use crate::policies::{Policies, ServingPolicy};
use crate::util::{lock, unix_ms_now};

/// Joules in a kilowatt-hour.
const JOULES_PER_KWH: f64 = 3.6e6;

/// How often an outcome log that cannot be opened is tried again.
const OUTCOME_LOG_RETRY: Duration = Duration::from_secs(5);

/// What a part of the daemon is doing, for the watchdog and `/v1/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PartState {
    Running,
    /// Its thread is alive but did not answer in time.
    NotAnswering,
    /// Its thread has ended.
    Stopped,
}

/// The state of the parts that must run ([`Service::health`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Health {
    pub local_model: PartState,
    pub outcome_writer: PartState,
    /// Why the outcome log cannot be opened, while it cannot: tmod serves degraded (answers go
    /// on, rows are held in memory and written once it opens).
    pub outcome_log_unavailable: Option<String>,
}

impl Health {
    /// Every part runs and answers: the watchdog may be fed.
    pub fn serving(&self) -> bool {
        self.local_model == PartState::Running && self.outcome_writer == PartState::Running
    }

    /// The parts whose thread has ended, by name: nothing brings them back but a restart.
    pub fn stopped(&self) -> Vec<&'static str> {
        [("the local model's thread", self.local_model), ("the outcome writer's thread", self.outcome_writer)]
            .into_iter()
            .filter(|(_, state)| *state == PartState::Stopped)
            .map(|(name, _)| name)
            .collect()
    }
}

/// A request the daemon refuses, with the HTTP status it maps to.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Dialogue(#[from] DialogueError),
    #[error(
        "tmod is busy (the local model's queue, or the turns being decided, are full); retry in a moment"
    )]
    Busy { retry_after_secs: u64 },
    /// What the request needs cannot be had now (a forced cloud route with the cloud out of
    /// reach or over budget).
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// Everything a request needs; shared by every connection.
#[derive(Debug)]
pub struct Service {
    config: Config,
    schema: Schema,
    modality_names: Vec<String>,
    /// The media each modality is sent as (camera views as JPEG, audio as WAV).
    modality_media: Vec<MediaType>,
    policies: Mutex<Policies>,
    policy_options: LoadOptions,
    /// The last policy bundle or command handled, for the status topic.
    last_policy_update: Mutex<Option<PolicyUpdateReport>>,
    /// Wakes the outcome uploader: a row was logged.
    upload_wakeup: tokio::sync::Notify,
    /// Wakes the status publisher: counters or the policy changed.
    status_wakeup: tokio::sync::Notify,
    counters: Counters,
    classifier: TaskClassifier,
    llm: LocalLlm,
    dialogues: Mutex<Dialogues>,
    /// The expected cost table, shared with the cloud tasks and the link probe.
    estimates: Arc<Mutex<CostEstimates>>,
    sensing: SensingHandle,
    outcomes: OutcomeWriter,
    pub metrics: Metrics,
    started: Instant,
    /// Turns being classified and decided (`[api] max_turns_deciding`).
    deciding: Arc<tokio::sync::Semaphore>,
    usd_per_joule: f64,
    /// The MQTT link of the cloud path, when `[mqtt] enabled`.
    cloud: Option<Arc<DeviceLink>>,
}

/// What the status topic reports, counted since the daemon started.
#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    local_answers: AtomicU64,
    cloud_answers: AtomicU64,
    cloud_fallbacks: AtomicU64,
    energy_millijoules: AtomicU64,
    last_outcome_ms: AtomicU64,
    /// Sum and count of the scores received (refusal heuristic, judge, feedback).
    scores: Mutex<(f64, u64)>,
    /// How each recent policy version served, most recently created first.
    policies: Mutex<Vec<PolicyStats>>,
}

/// Policy versions whose figures the status carries.
const POLICY_STATS_KEPT: usize = 4;

impl Counters {
    /// A score for an answer of policy `version`, counted for it (see [`Counters::score`]).
    fn policy_score(&self, version: &str, score: f64) {
        self.policy(version, |p| {
            p.scored += 1;
            p.score_sum += score;
        });
    }

    fn score(&self, score: f64) {
        let mut s = lock(&self.scores);
        s.0 += score;
        s.1 += 1;
    }

    /// Updates the figures of policy `version` (made on first use, the oldest dropped).
    fn policy(&self, version: &str, update: impl FnOnce(&mut PolicyStats)) {
        let mut book = lock(&self.policies);
        let i = match book.iter().position(|p| p.version == version) {
            Some(i) => i,
            None => {
                book.insert(
                    0,
                    PolicyStats { version: version.to_owned(), committed: true, ..PolicyStats::default() },
                );
                book.truncate(POLICY_STATS_KEPT);
                0
            }
        };
        update(&mut book[i]);
    }

    /// The policies' figures, the serving one (`current`, committed or on trial) first.
    fn policy_stats(&self, current: &str, committed: bool) -> Vec<PolicyStats> {
        self.policy(current, |p| p.committed = committed);
        let mut book = lock(&self.policies).clone();
        book.sort_by_key(|p| p.version != current);
        book
    }

    /// The counters as the status message carries them (the log's figures added by the caller).
    fn snapshot(&self) -> StatusCounters {
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

impl Service {
    /// Loads the policy, the classifier and the model, starts sensing and opens the outcome log.
    /// Returns the sensing owner too: the caller shuts it down at exit.
    pub fn start(config: Config) -> anyhow::Result<(Arc<Self>, Sensing)> {
        let file = &config.file;
        // A state directory that cannot be written (an SD card remounted read-only, a full
        // disk) degrades tmod, it does not stop it: answers go on, the outcome log is retried.
        if let Err(e) = std::fs::create_dir_all(&file.state_dir) {
            tracing::error!(dir = %file.state_dir.display(), "cannot create the state directory: {e}; serving degraded");
        }
        let profile = config.sensing_profile();
        let schema = Schema::new(profile.modality_count(), 5);
        let policy_options = LoadOptions { schema: schema.clone(), max_bytes: file.policy.max_bytes };
        let exploration = match file.policy.exploration.as_str() {
            "epsilon" => Exploration::EpsilonGreedy { epsilon: file.policy.epsilon },
            _ => Exploration::Greedy,
        };
        let mut policies = Policies::load(&file.state_dir, &file.policy.path, &policy_options, exploration)?;
        policies.set_trial_decisions(file.policy.trial_decisions);
        let restart_rollback = policies.take_restart_rollback().map(|(version, reason)| PolicyUpdateReport {
            version,
            accepted: true,
            reason: Some(reason),
            unix_ms: unix_ms_now(),
        });

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
        let outcomes = OutcomeWriter::open_retrying(
            &outcome_path,
            outcome_log::OutcomeLogConfig { max_bytes: file.outcomes.max_bytes, ..Default::default() },
            outcome_log::WriterConfig::default(),
            OUTCOME_LOG_RETRY,
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
            modality_media: profile
                .modalities
                .iter()
                .map(|m| match m.kind {
                    device_profiles::ModalityKind::Camera => MediaType::ImageJpeg,
                    device_profiles::ModalityKind::Audio => MediaType::AudioWav,
                })
                .collect(),
            policies: Mutex::new(policies),
            policy_options,
            last_policy_update: Mutex::new(restart_rollback),
            upload_wakeup: tokio::sync::Notify::new(),
            status_wakeup: tokio::sync::Notify::new(),
            counters: Counters::default(),
            classifier,
            llm,
            dialogues: Mutex::new(dialogues),
            estimates: Arc::new(Mutex::new(CostEstimates::from_device_profile(&profile))),
            sensing: sensing.handle(),
            outcomes,
            metrics,
            started: Instant::now(),
            deciding: Arc::new(tokio::sync::Semaphore::new(file.api.max_turns_deciding)),
            usd_per_joule: file.energy.electricity_usd_per_kwh / JOULES_PER_KWH,
            cloud,
            config,
        };
        let service = Arc::new(service);
        tokio::spawn(store_judge_scores(scores, Arc::downgrade(&service)));
        if let Some(link) = &service.cloud {
            crate::fleet::start(&service, link.clone(), fleet_rx, fleet_config);
            let interval = service.config.file.cloud.probe_interval_secs;
            if interval > 0.0 {
                let every = Duration::from_secs_f64(interval);
                tokio::spawn(probe_link(link.clone(), service.estimates.clone(), every));
            }
        }
        Ok((service, sensing))
    }

    /// Starts a dialogue.
    pub fn new_dialogue(&self) -> DialogueCreated {
        self.new_dialogue_with(None)
    }

    /// The local model's name: its registry name, else the GGUF's `general.name`, else the
    /// file's stem.
    pub fn local_model_name(&self) -> String {
        let configured = &self.config.file.model.name;
        if !configured.contains('/') {
            return configured.clone();
        }
        self.llm.info().name.clone().unwrap_or_else(|| {
            Path::new(configured)
                .file_stem()
                .map_or_else(|| configured.clone(), |s| s.to_string_lossy().into_owned())
        })
    }

    /// A new dialogue with its own system prompt (the configured one when `None`).
    pub fn new_dialogue_with(&self, system_prompt: Option<&str>) -> DialogueCreated {
        let mut dialogues = lock(&self.dialogues);
        let dialogue_id = dialogues.create(Instant::now(), system_prompt);
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

    /// Stores a user's score of an earlier turn.
    pub async fn feedback(&self, dialogue_id: &str, turn: u32, score: f64) -> Result<ScoreUpdate, AskError> {
        if !(score.is_finite() && (0.0..=1.0).contains(&score)) {
            return Err(AskError::BadRequest(format!("`score` must be in [0, 1], found {score}")));
        }
        match self.outcomes.set_score(dialogue_id, turn, score, ScoreSource::Feedback).await {
            Ok(update) => {
                self.counters.score(score);
                if let ScoreUpdate::Updated { policy_version } = &update {
                    self.counters.policy_score(policy_version, score);
                }
                Ok(update)
            }
            Err(OutcomeLogError::UnknownTurn { dialogue, turn }) => {
                Err(AskError::Dialogue(DialogueError::UnknownTurn { dialogue, turn }))
            }
            Err(e) => Err(AskError::Internal(e.to_string())),
        }
    }

    /// The `/v1/status` report.
    /// A place among the turns being decided, or 503 when `[api] max_turns_deciding` are.
    pub fn admit_turn(&self) -> Result<tokio::sync::OwnedSemaphorePermit, AskError> {
        self.deciding.clone().try_acquire_owned().map_err(|_| {
            self.metrics.reject("deciding_full");
            AskError::Busy { retry_after_secs: 1 }
        })
    }

    /// The parts that must run for the daemon to serve: the local model's thread and the
    /// outcome writer's (which must also answer within `timeout`). A part whose thread ended is
    /// `stopped` (tmod exits for systemd to restart it); a writer that does not answer in time
    /// is `not answering` (the watchdog is not fed meanwhile).
    pub async fn health(&self, timeout: Duration) -> Health {
        let model = if self.llm.running() { PartState::Running } else { PartState::Stopped };
        let writer = if !self.outcomes.running() {
            PartState::Stopped
        } else {
            match tokio::time::timeout(timeout, self.outcomes.stats()).await {
                Ok(_) => PartState::Running,
                Err(_) => PartState::NotAnswering,
            }
        };
        Health {
            local_model: model,
            outcome_writer: writer,
            outcome_log_unavailable: self.outcomes.unavailable(),
        }
    }

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
        let (estimates, cost_model) = {
            let e = lock(&self.estimates);
            (e.classes().to_vec(), e.snapshot())
        };
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
        let health = self.health(Duration::from_secs(1)).await;
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "health": health,
            "device_id": self.config.device_id(),
            "profile": self.config.profile.board.name,
            "uptime_secs": self.started.elapsed().as_secs_f64(),
            "policy": {
                "version": policy_version,
                "sha256": policy_sha256,
                "previous_version": previous_policy,
                "last_update": lock(&self.last_policy_update).clone(),
                "stats": FleetHost::policy_stats(self),
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
                // What the bridges said the backend takes (null until one has).
                "accepts": self.cloud.as_ref().and_then(|c| c.cloud_accepts()),
            },
            "dialogues": { "open": open, "least_budget_left": least_left.map(|(l, c)| Budget { latency_secs: l, cost_usd: c }) },
            "expected_costs": estimates,
            "cost_model": cost_model,
            "outcomes": outcomes,
            "sensing": self.sensing.status(),
        })
    }

    /// Publishes `offline` on the availability topic and closes the MQTT link.
    pub async fn shutdown_cloud(&self) {
        if let Some(cloud) = &self.cloud {
            cloud.shutdown(Duration::from_secs(2)).await;
        }
    }

    /// Whether the cloud takes modality `index` (its media), as far as the bridges have said.
    fn cloud_takes(&self, index: usize) -> bool {
        self.modality_media.get(index).is_none_or(|media| self.cloud_takes_media(*media))
    }

    /// Whether the cloud takes `media`, as far as the bridges have said (yes until they have).
    fn cloud_takes_media(&self, media: MediaType) -> bool {
        self.cloud.as_ref().is_none_or(|c| c.cloud_takes(media))
    }

    /// Whether a cloud request can be sent now.
    fn cloud_reachable(&self) -> bool {
        let up = self.cloud.as_ref().is_some_and(|c| c.reachable());
        self.metrics.cloud_connected.set(i64::from(up));
        up
    }
}

/// The fleet tasks' view of the service (`fleet.rs` never names [`Service`]).
impl FleetHost for Service {
    fn outcomes(&self) -> &OutcomeWriter {
        &self.outcomes
    }

    fn upload_wakeup(&self) -> &tokio::sync::Notify {
        &self.upload_wakeup
    }

    fn status_wakeup(&self) -> &tokio::sync::Notify {
        &self.status_wakeup
    }

    fn status_counters(&self) -> StatusCounters {
        self.counters.snapshot()
    }

    fn policy_options(&self) -> &LoadOptions {
        &self.policy_options
    }

    fn policy_versions(&self) -> (String, u64, Option<String>) {
        let p = lock(&self.policies);
        (p.current().version.clone(), p.current().created_unix_ms, p.previous().map(|p| p.version.clone()))
    }

    fn report_policy_update(&self, version: String, accepted: bool, reason: Option<String>) {
        let report = PolicyUpdateReport { version, accepted, reason, unix_ms: unix_ms_now() };
        *lock(&self.last_policy_update) = Some(report);
        self.status_wakeup.notify_one();
    }

    fn last_policy_update(&self) -> Option<PolicyUpdateReport> {
        lock(&self.last_policy_update).clone()
    }

    fn policy_stats(&self) -> Vec<PolicyStats> {
        let (current, committed) = {
            let p = lock(&self.policies);
            (p.current().version.clone(), p.committed())
        };
        self.counters.policy_stats(&current, committed)
    }

    fn note_clean_stop(&self) {
        lock(&self.policies).note_clean_stop();
    }

    fn policy_sequence_high_water(&self) -> u64 {
        lock(&self.policies).sequence_high_water()
    }

    fn raise_policy_sequence(&self, sequence: u64) -> Result<(), String> {
        lock(&self.policies).raise_sequence_high_water(sequence)
    }

    fn adopt_policy(&self, prepared: ServingPolicy) -> Result<(), String> {
        let mut policies = lock(&self.policies);
        policies.adopt(prepared)?;
        self.metrics.set_policy(&policies.current().version, &policies.current().sha256);
        Ok(())
    }
}

/// Measures the link every `every` while it is up: the time to a small publish's PUBACK is the
/// round trip, which moves the cloud classes of the expected cost table without risking a turn.
async fn probe_link(link: Arc<DeviceLink>, estimates: Arc<Mutex<CostEstimates>>, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if Arc::strong_count(&estimates) == 1 {
            break; // the service is gone
        }
        if let Some((bytes, took)) = link.probe(every.max(Duration::from_secs(5))).await {
            lock(&estimates).record_delivery(bytes, took.as_secs_f64());
        }
    }
}

/// Stores the judge scores the bridges publish for this device's cloud answers (only for turns
/// the cloud answered: see [`outcome_log::OutcomeLog::set_judge_score`]).
async fn store_judge_scores(mut scores: mpsc::Receiver<JudgeScore>, service: std::sync::Weak<Service>) {
    while let Some(score) = scores.recv().await {
        let Some(service) = service.upgrade() else { break };
        for attempt in 0.. {
            let stored = service.outcomes.set_judge_score(&score.dialogue_id, score.turn, score.score).await;
            match stored {
                Ok(update) => {
                    tracing::debug!(dialogue = %score.dialogue_id, turn = score.turn, ?update, "judge score");
                    service.counters.score(score.score);
                    if let ScoreUpdate::Updated { policy_version } = &update {
                        service.counters.policy_score(policy_version, score.score);
                    }
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
