//! The policy serving decisions and the one before it: loaded at start (a pushed policy on disk
//! wins over the configured one), replaced by a verified bundle (a fleet rollback is a newer
//! bundle of the earlier policy), given back when the new one fails at decision time. The
//! highest bundle sequence taken is kept with them, so that no older bundle is taken again.
//!
//! A bundle is checked before anything changes: size, schema (the ONNX must load with this
//! board's observation and action counts), the daemon version it needs, and a probe run over
//! every task and a spread of budgets that must give finite scores. Only then are its bytes and
//! the new state written (atomically, see `policy_store.rs`) and the decider swapped.
//!
//! An adopted policy is then on trial: the device commits to it once its first
//! `[policy] trial_decisions` decisions succeed. A decision that fails goes back to the previous
//! policy at once (at any time, on trial or not), and a tmod that dies while its policy is on
//! trial (a crash, the watchdog, a power cut: anything but a clean stop) starts again with the
//! previous policy, reporting why.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use policy_onnx::{Decider, Exploration, LoadOptions, Policy, TaskCategory};
use tmo_protocol::PolicyManifest;
use tmo_protocol::bundle::sha256_hex;

use crate::policy_store::{PolicyStore, StoreState, StoredPolicy};

/// The contract versions this daemon decides with, as bundle manifests name them: `v1` (the
/// paper's observation) and `v2` (with the live cost table). The ONNX file's own manifest or
/// input width must say the same.
pub const SCHEMAS: [&str; 2] = ["v1", "v2"];
/// The bundle manifest name of `version`.
pub fn bundle_schema(version: policy_onnx::ObservationVersion) -> &'static str {
    match version {
        policy_onnx::ObservationVersion::V1 => SCHEMAS[0],
        policy_onnx::ObservationVersion::V2 => SCHEMAS[1],
    }
}

/// A loaded policy with its bytes (kept to store it as the previous one) and its record.
#[derive(Debug, Clone)]
pub struct ServingPolicy {
    policy: Arc<Policy>,
    bytes: Arc<[u8]>,
    pub record: StoredPolicy,
    /// Its bundle's sequence (0 for the configured or built-in policy).
    sequence: u64,
}

impl ServingPolicy {
    /// Checks `onnx` against `manifest` and this board: size, schema, daemon version, probe.
    /// Blocking (tract optimises the graph): call it off the async workers.
    pub fn prepare(onnx: Vec<u8>, manifest: &PolicyManifest, options: &LoadOptions) -> Result<Self, String> {
        if onnx.len() as u64 > options.max_bytes {
            return Err(format!(
                "size: {} bytes, over the limit of {} (policy.max_bytes)",
                onnx.len(),
                options.max_bytes
            ));
        }
        if !SCHEMAS.contains(&manifest.schema.as_str()) {
            return Err(format!(
                "schema: the bundle is for {:?}, this daemon decides with {SCHEMAS:?}",
                manifest.schema
            ));
        }
        if newer_than_this_daemon(&manifest.min_daemon_version) {
            return Err(format!(
                "daemon version: needs {} or later, this is {}",
                manifest.min_daemon_version,
                env!("CARGO_PKG_VERSION")
            ));
        }
        let policy = Policy::from_bytes(&onnx, options).map_err(|e| format!("schema: {e}"))?;
        if bundle_schema(policy.version()) != manifest.schema {
            return Err(format!(
                "schema: the bundle says {:?}, its ONNX reads {}",
                manifest.schema,
                policy.version()
            ));
        }
        probe(&policy)?;
        let record = StoredPolicy {
            version: manifest.version.clone(),
            sha256: sha256_hex(&onnx),
            created_unix_ms: manifest.created_unix_ms,
        };
        Ok(Self { policy: Arc::new(policy), bytes: onnx.into(), record, sequence: manifest.sequence })
    }

    fn from_bytes(bytes: Vec<u8>, options: &LoadOptions, created_unix_ms: u64) -> anyhow::Result<Self> {
        let policy = Policy::from_bytes(&bytes, options)?;
        let record = StoredPolicy {
            version: policy.info().version(),
            sha256: policy.info().sha256.clone(),
            created_unix_ms,
        };
        Ok(Self { policy: Arc::new(policy), bytes: bytes.into(), record, sequence: 0 })
    }
}

/// Runs the policy on observations of every task with full, half and nearly spent budgets,
/// with and without history (and for a v2 policy under a fast link, a slow link and a slow
/// board); every score must be finite.
fn probe(policy: &Policy) -> Result<(), String> {
    let schema = policy.schema();
    let cloud = policy_onnx::Action::Cloud { modalities: policy_onnx::ModalitySet::all(schema.modalities()) };
    let history = [policy_onnx::Turn { task: TaskCategory::Query, action: cloud }];
    let tables = policy_onnx::runtime::probe_cost_tables(schema);
    for task in TaskCategory::ALL {
        for (latency, cost) in [(30.0, 0.05), (15.0, 0.02), (0.5, 0.0001)] {
            for (past, costs) in
                [&history[..0], &history[..]].into_iter().flat_map(|p| tables.iter().map(move |t| (p, t)))
            {
                let observation = schema.observation_with_costs(past, task, latency, cost, costs);
                let scores = policy.scores(&observation).map_err(|e| format!("probe run: {e}"))?;
                if let Some(bad) = scores.iter().find(|s| !s.is_finite()) {
                    return Err(format!("probe run: score {bad} for task {}", task.name()));
                }
            }
        }
    }
    Ok(())
}

/// Whether `required` (x.y.z) is newer than this daemon's version; an unparsable one is newer.
fn newer_than_this_daemon(required: &str) -> bool {
    let parse = |v: &str| -> Option<(u64, u64, u64)> {
        let mut parts = v.trim().trim_start_matches('v').split('.').map(|p| p.parse::<u64>().ok());
        Some((parts.next()??, parts.next().unwrap_or(Some(0))?, parts.next().unwrap_or(Some(0))?))
    };
    if required.trim().is_empty() {
        return false;
    }
    match (parse(required), parse(env!("CARGO_PKG_VERSION"))) {
        (Some(r), Some(ours)) => r > ours,
        _ => true,
    }
}

/// Decisions an adopted policy makes on trial unless `[policy] trial_decisions` says otherwise.
pub const DEFAULT_TRIAL_DECISIONS: u32 = 3;

/// The serving policy, its decider and the previous policy.
#[derive(Debug)]
pub struct Policies {
    decider: Decider,
    current: ServingPolicy,
    previous: Option<ServingPolicy>,
    exploration: Exploration,
    store: PolicyStore,
    state: StoreState,
    /// Decisions an adopted policy must make before the device commits to it.
    trial_decisions: u32,
    /// Decisions made by the policy on trial since this start.
    trial_passed: u32,
    /// A policy left on trial by a tmod that did not stop cleanly, gone back from at this start:
    /// the version now serving and why.
    restart_rollback: Option<(String, String)>,
}

impl Policies {
    /// The store's current policy if one was pushed, else the configured file, else the
    /// built-in default. A stored policy that no longer loads is reported and skipped.
    pub fn load(
        state_dir: &Path,
        configured: &str,
        options: &LoadOptions,
        exploration: Exploration,
    ) -> anyhow::Result<Self> {
        let store = PolicyStore::open(state_dir);
        let mut state = store.state().unwrap_or_else(|e| {
            tracing::error!("pushed policy state unreadable, using the configured policy: {e}");
            StoreState::default()
        });
        let stored = |record: &Option<StoredPolicy>| -> Option<ServingPolicy> {
            let record = record.as_ref()?;
            let loaded = store
                .load_onnx(record)
                .map_err(anyhow::Error::from)
                .and_then(|bytes| ServingPolicy::from_bytes(bytes, options, record.created_unix_ms));
            match loaded {
                Ok(mut p) => {
                    p.record.version = record.version.clone();
                    Some(p)
                }
                Err(e) => {
                    tracing::error!(version = %record.version, "stored policy not loaded: {e:#}");
                    None
                }
            }
        };
        let configured = if configured.is_empty() {
            ServingPolicy::from_bytes(policy_onnx::DEFAULT_POLICY.to_vec(), options, 0)
                .context("the built-in default policy")?
        } else {
            let bytes = std::fs::read(configured).with_context(|| format!("policy {configured}"))?;
            ServingPolicy::from_bytes(bytes, options, 0).with_context(|| format!("policy {configured}"))?
        };
        let (current, previous) = match stored(&state.current) {
            Some(current) => {
                tracing::info!(version = %current.record.version, "serving the pushed policy");
                (current, stored(&state.previous).or(Some(configured)))
            }
            None => {
                state.current = None;
                (configured, None)
            }
        };
        if state.current.is_none() {
            state.on_trial = false;
        }
        let decider = Decider::new(current.policy.clone(), exploration, None).context("policy session")?;
        let mut policies = Self {
            decider,
            current,
            previous,
            exploration,
            store,
            state,
            trial_decisions: DEFAULT_TRIAL_DECISIONS,
            trial_passed: 0,
            restart_rollback: None,
        };
        policies.resume_trial();
        Ok(policies)
    }

    /// At start: a policy still on trial after a clean stop goes on with its trial; after any
    /// other end of tmod, the previous policy serves again.
    fn resume_trial(&mut self) {
        if !self.state.on_trial {
            return;
        }
        if self.state.trial_stopped_cleanly {
            if let Err(e) = self.update_state(|s| s.trial_stopped_cleanly = false) {
                tracing::warn!("policy state not updated: {e}");
            }
            return;
        }
        let failed = self.current.record.version.clone();
        let reason = format!("rolled back: tmod ended before policy {failed} passed its health check");
        match self.rollback() {
            Ok(version) => {
                tracing::error!(%reason, restored = %version, "policy rolled back");
                self.restart_rollback = Some((version, reason));
            }
            Err(e) => tracing::error!(version = %failed, "policy on trial kept: {e}"),
        }
    }

    /// Sets how many decisions an adopted policy must make before the device commits to it
    /// (0: at once).
    pub fn set_trial_decisions(&mut self, decisions: u32) {
        self.trial_decisions = decisions;
    }

    /// The rollback done at start, if any (taken once, to report it).
    pub fn take_restart_rollback(&mut self) -> Option<(String, String)> {
        self.restart_rollback.take()
    }

    /// Whether the device has committed to the serving policy.
    pub fn committed(&self) -> bool {
        !self.state.on_trial
    }

    /// Counts a decision the serving policy made; once a policy on trial has made enough, the
    /// device commits to it (on disk). Returns the version committed to, when that happened.
    pub fn decision_succeeded(&mut self) -> Option<Result<String, String>> {
        if !self.state.on_trial {
            return None;
        }
        self.trial_passed += 1;
        if self.trial_passed < self.trial_decisions {
            return None;
        }
        Some(
            self.update_state(|s| (s.on_trial, s.trial_stopped_cleanly) = (false, false))
                .map(|()| self.current.record.version.clone()),
        )
    }

    /// Records a clean stop: a policy on trial goes on with its trial at the next start.
    pub fn note_clean_stop(&mut self) {
        if !self.state.on_trial {
            return;
        }
        if let Err(e) = self.update_state(|s| s.trial_stopped_cleanly = true) {
            tracing::warn!("policy state not updated at stop: {e}");
        }
    }

    /// Changes the stored state, on disk first: on an error nothing changes.
    fn update_state(&mut self, change: impl FnOnce(&mut StoreState)) -> Result<(), String> {
        let mut state = self.state.clone();
        change(&mut state);
        self.store.save_state(&state).map_err(|e| format!("storing the policy state: {e}"))?;
        self.state = state;
        Ok(())
    }

    pub fn decider(&mut self) -> &mut Decider {
        &mut self.decider
    }

    pub fn current(&self) -> &StoredPolicy {
        &self.current.record
    }

    pub fn previous(&self) -> Option<&StoredPolicy> {
        self.previous.as_ref().map(|p| &p.record)
    }

    /// The highest bundle sequence taken: bundles at or below it are refused.
    pub fn sequence_high_water(&self) -> u64 {
        self.state.sequence_high_water
    }

    /// Raises the mark to `sequence` (a bundle of the policy serving already, delivered under
    /// a newer sequence: a fleet rollback to it), on disk first.
    pub fn raise_sequence_high_water(&mut self, sequence: u64) -> Result<(), String> {
        if sequence <= self.state.sequence_high_water {
            return Ok(());
        }
        self.update_state(|s| s.sequence_high_water = sequence)
    }

    /// Serves `new` from now on; the current policy becomes the previous one and the mark
    /// rises to its bundle's sequence. Written to disk first: on an error nothing changes.
    pub fn adopt(&mut self, new: ServingPolicy) -> Result<(), String> {
        let decider =
            Decider::new(new.policy.clone(), self.exploration, None).map_err(|e| format!("session: {e}"))?;
        let old = std::mem::replace(&mut self.current, new);
        if let Err(e) = self.persist(&old, self.trial_decisions > 0) {
            self.current = old;
            return Err(e);
        }
        self.decider = decider;
        self.previous = Some(old);
        self.trial_passed = 0;
        Ok(())
    }

    /// Goes back to the previous policy (the current one failed); the current one becomes the
    /// previous. The mark stays, so the failed bundle is not taken again when its retained
    /// copy comes back. Returns the version now serving.
    pub fn rollback(&mut self) -> Result<String, String> {
        let Some(previous) = self.previous.take() else {
            return Err("no previous policy to go back to".into());
        };
        let decider = Decider::new(previous.policy.clone(), self.exploration, None)
            .map_err(|e| format!("session: {e}"))?;
        let old = std::mem::replace(&mut self.current, previous);
        if let Err(e) = self.persist(&old, false) {
            self.previous = Some(std::mem::replace(&mut self.current, old));
            return Err(e);
        }
        self.decider = decider;
        self.previous = Some(old);
        self.trial_passed = 0;
        Ok(self.current.record.version.clone())
    }

    /// Writes both policies' bytes and the state naming `self.current` (on trial or not) and
    /// `previous`, with the mark raised to the current policy's sequence.
    fn persist(&mut self, previous: &ServingPolicy, on_trial: bool) -> Result<(), String> {
        for p in [&self.current, previous] {
            self.store
                .save_onnx(&p.record.sha256, &p.bytes)
                .map_err(|e| format!("storing the policy: {e}"))?;
        }
        let mut state = self.state.clone();
        state.current = Some(self.current.record.clone());
        state.previous = Some(previous.record.clone());
        state.sequence_high_water = state.sequence_high_water.max(self.current.sequence);
        state.on_trial = on_trial;
        state.trial_stopped_cleanly = false;
        self.store.save_state(&state).map_err(|e| format!("storing the policy state: {e}"))?;
        self.state = state;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy_onnx::Schema;

    #[test]
    fn daemon_versions_compare_numerically() {
        assert!(!newer_than_this_daemon(""));
        assert!(!newer_than_this_daemon("0.0.1"));
        assert!(!newer_than_this_daemon(env!("CARGO_PKG_VERSION")));
        assert!(newer_than_this_daemon("99.0.0"));
        assert!(newer_than_this_daemon("0.10000"));
        assert!(newer_than_this_daemon("soon"));
    }

    fn manifest(onnx: &[u8]) -> PolicyManifest {
        PolicyManifest {
            version: "pushed-1".into(),
            // The default policy is a v2 policy.
            schema: SCHEMAS[1].into(),
            onnx_sha256: String::new(),
            onnx_size_bytes: 0,
            opset: None,
            training_data_sha256: None,
            min_daemon_version: "0.1.0".into(),
            created_unix_ms: 5,
            canary_percent: None,
            group: "kitchens".into(),
            devices: Vec::new(),
            sequence: 42,
            expires_unix_ms: u64::MAX,
        }
        .describe(onnx)
    }

    #[test]
    fn adopt_persists_and_rollback_restores_across_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let schema = Schema::new(3, 5);
        let options = LoadOptions { schema: schema.clone(), max_bytes: 1 << 20 };
        let mut policies = Policies::load(dir.path(), "", &options, Exploration::Greedy).expect("load");
        // Committed at once (the trial has its own test).
        policies.set_trial_decisions(0);
        let built_in = policies.current().clone();
        assert!(policies.previous().is_none());

        let onnx = policy_onnx::DEFAULT_POLICY.to_vec();
        let mut m = manifest(&onnx);
        let too_new = ServingPolicy::prepare(
            onnx.clone(),
            &PolicyManifest { min_daemon_version: "9.0.0".into(), ..m.clone() },
            &options,
        );
        assert!(too_new.unwrap_err().starts_with("daemon version"));
        let small = LoadOptions { schema: schema.clone(), max_bytes: 1000 };
        assert!(ServingPolicy::prepare(onnx.clone(), &m, &small).unwrap_err().starts_with("size"));
        let other_board = LoadOptions { schema: Schema::new(2, 5), max_bytes: 1 << 20 };
        assert!(ServingPolicy::prepare(onnx.clone(), &m, &other_board).unwrap_err().starts_with("schema"));
        // The bundle must name the contract its ONNX reads, and one this daemon serves.
        for wrong in ["v1", "v3"] {
            m.schema = wrong.into();
            assert!(ServingPolicy::prepare(onnx.clone(), &m, &options).unwrap_err().starts_with("schema"));
        }
        m.schema = SCHEMAS[1].into();

        assert_eq!(policies.sequence_high_water(), 0);
        policies.adopt(ServingPolicy::prepare(onnx, &m, &options).expect("prepare")).expect("adopt");
        assert_eq!((policies.current().version.as_str(), policies.sequence_high_water()), ("pushed-1", 42));
        let reopened = Policies::load(dir.path(), "", &options, Exploration::Greedy).expect("reload");
        assert_eq!((reopened.current().version.as_str(), reopened.sequence_high_water()), ("pushed-1", 42));
        assert_eq!(reopened.previous().map(|p| p.version.clone()), Some(built_in.version.clone()));

        // Going back (the policy failed) keeps the mark: the failed bundle is not taken again.
        assert_eq!(policies.rollback().expect("rollback"), built_in.version);
        let mut reopened = Policies::load(dir.path(), "", &options, Exploration::Greedy).expect("reload");
        assert_eq!(
            (reopened.current().version.as_str(), reopened.sequence_high_water()),
            (built_in.version.as_str(), 42)
        );
        // The mark only rises.
        reopened.raise_sequence_high_water(40).expect("raise");
        reopened.raise_sequence_high_water(50).expect("raise");
        let reopened = Policies::load(dir.path(), "", &options, Exploration::Greedy).expect("reload");
        assert_eq!(reopened.sequence_high_water(), 50);
    }

    #[test]
    fn a_policy_on_trial_commits_after_its_first_decisions_or_goes_back_when_tmod_dies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = LoadOptions { schema: Schema::new(3, 5), max_bytes: 1 << 20 };
        let load = || Policies::load(dir.path(), "", &options, Exploration::Greedy).expect("load");
        let onnx = policy_onnx::DEFAULT_POLICY.to_vec();
        let mut policies = load();
        policies.set_trial_decisions(2);
        let built_in = policies.current().version.clone();
        assert!(policies.committed());
        assert_eq!(policies.decision_succeeded(), None, "nothing is on trial");

        // tmod dies (crash, watchdog, power) while the pushed policy is on trial: the next start
        // serves the previous policy, says why, and keeps the mark so the bundle is not retaken.
        policies.adopt(ServingPolicy::prepare(onnx.clone(), &manifest(&onnx), &options).unwrap()).unwrap();
        assert!(!policies.committed());
        assert_eq!(policies.decision_succeeded(), None, "one decision of two");
        drop(policies);
        let mut policies = load();
        assert_eq!(policies.current().version, built_in);
        assert!(policies.committed());
        let (restored, reason) = policies.take_restart_rollback().expect("a rollback at start");
        assert_eq!(restored, built_in);
        assert!(reason.contains("pushed-1") && reason.contains("health check"), "{reason}");
        assert_eq!(policies.sequence_high_water(), 42);
        assert_eq!(load().current().version, built_in, "the rollback is on disk");

        // A clean stop carries the trial over; the trial's decisions then commit it, and a
        // later end of tmod (clean or not) keeps it.
        let m = PolicyManifest { version: "pushed-2".into(), sequence: 43, ..manifest(&onnx) };
        let mut policies = load();
        policies.set_trial_decisions(2);
        policies.adopt(ServingPolicy::prepare(onnx.clone(), &m, &options).unwrap()).unwrap();
        policies.note_clean_stop();
        drop(policies);
        let mut policies = load();
        policies.set_trial_decisions(2);
        assert_eq!((policies.current().version.as_str(), policies.committed()), ("pushed-2", false));
        assert!(policies.take_restart_rollback().is_none());
        assert_eq!(policies.decision_succeeded(), None);
        assert_eq!(policies.decision_succeeded(), Some(Ok("pushed-2".into())));
        assert!(policies.committed());
        assert_eq!(policies.decision_succeeded(), None, "committed once");
        drop(policies);
        let policies = load();
        assert_eq!((policies.current().version.as_str(), policies.committed()), ("pushed-2", true));
    }
}
