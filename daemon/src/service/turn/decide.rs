//! Stage 3: the observation is encoded and the serving policy decides, masked by the modalities
//! sensing has fresh, whether the cloud is reachable, the dialogue's remaining budgets and the
//! expected cost of each action class (`estimates.rs`). A policy that fails gives way to the
//! previous one at once.

use std::sync::Arc;

use policy_onnx::train::sim::argmax;
use policy_onnx::{Action, Availability, ClassCosts, Decision, DecisionRequest, ModalitySet, TaskCategory};
use sensing::TelemetrySnapshot;
use tmod_api::{CostClasses, DecisionEvent, ForcedRoute};

use super::TurnRecord;
use super::classify::Classified;
use crate::dialogues::TurnStart;
use crate::estimates::Load;
use crate::fleet::FleetHost;
use crate::service::{AskError, Service};
use crate::util::lock;

/// The policy's decision for a turn, and what the log keeps of it.
pub(super) struct Decided {
    pub decision: Decision,
    /// The arg-max of the policy's scores before the mask.
    preferred: usize,
    /// The policy preferred the cloud, which was unreachable.
    cloud_unavailable: bool,
    /// The v2 observation (the v1 part, then `costs`), whatever the policy's version: the log
    /// keeps each turn's condition, and a v1 policy read its first part.
    observation: Vec<f32>,
    /// The cost table the decision used: the device's expectation at that moment.
    costs: ClassCosts,
    policy_version: String,
    policy_sha256: String,
    policy_schema: &'static str,
    /// Sensing's telemetry when the decision was taken, and the load read from it.
    telemetry: Arc<TelemetrySnapshot>,
    load: Load,
    /// The app forced the route (`decision` is then the forced action, with propensity 1).
    forced: bool,
}

impl Decided {
    /// The route of a local answer: `local`, or `local:cloud-unavailable` when the policy
    /// preferred the cloud.
    pub fn local_route(&self) -> &'static str {
        if self.cloud_unavailable { "local:cloud-unavailable" } else { "local" }
    }

    pub fn into_record(self, question: String, task: TaskCategory) -> TurnRecord {
        TurnRecord {
            question,
            task,
            action: self.decision.action,
            observation: self.observation,
            propensity: self.decision.propensity,
            telemetry: serde_json::to_value(&*self.telemetry).unwrap_or(serde_json::Value::Null),
            load: self.load,
            forced: self.forced,
        }
    }
}

impl Service {
    /// Encodes the turn's observation and lets the serving policy choose the action.
    pub(super) fn encode_and_decide(
        &self,
        start: &TurnStart,
        task: TaskCategory,
        forced: Option<ForcedRoute>,
    ) -> Result<Decided, AskError> {
        let telemetry = self.sensing.telemetry();
        // Fresh modalities that the cloud's backend takes: a view a text-only backend refuses is
        // never attached (the mask leaves out the actions that would).
        let available = ModalitySet::from_indices(
            self.sensing
                .availability()
                .iter()
                .enumerate()
                .filter(|(i, ok)| **ok && self.cloud_takes(*i))
                .map(|(i, _)| i),
        );
        // The expected latency, cost and energy of each action class, as the device measures them
        // now (the board's load included): what the mask checks and what a v2 policy reads.
        let load = Load::from_telemetry(&telemetry);
        let costs = {
            let mut estimates = lock(&self.estimates);
            estimates.set_current_load(load);
            estimates.table().clone()
        };
        let availability = Availability {
            modalities: available,
            cloud_reachable: self.cloud_reachable(),
            remaining_latency_secs: start.remaining_latency_secs,
            remaining_cost_usd: start.remaining_cost_usd,
            costs: &costs,
        };
        let mut policies = lock(&self.policies);
        let request = DecisionRequest { history: &start.history, task, availability };
        let mut decided = policies.decider().decide(&request);
        if let Err(e) = &decided {
            // A policy that fails gives way to the previous one at once.
            let reason = format!("the policy failed: {e}");
            self.counters.policy(&policies.current().version, |p| p.decision_failures += 1);
            if let Ok(version) = policies.rollback() {
                tracing::error!(%reason, restored = %version, "policy rolled back");
                self.metrics.set_policy(&policies.current().version, &policies.current().sha256);
                self.report_policy_update(version, true, Some(format!("rolled back: {reason}")));
                decided = policies.decider().decide(&request);
            }
        }
        let decision = decided.map_err(|e| AskError::Internal(format!("decision: {e}")))?;
        self.counters.policy(&policies.current().version, |p| p.decisions += 1);
        match policies.decision_succeeded() {
            Some(Ok(version)) => {
                tracing::info!(%version, "policy committed: its first decisions succeeded");
                self.status_wakeup.notify_one();
            }
            Some(Err(e)) => {
                tracing::warn!("policy commit not stored (tried again at the next decision): {e}")
            }
            None => {}
        }
        let preferred = argmax(policies.decider().scores());
        let preferred_action = self.schema.action(preferred).unwrap_or(Action::Local);
        let decision = match forced {
            None => decision,
            Some(route) => {
                let decider = policies.decider();
                self.forced_decision(route, decider.scores(), decider.allowed())?
            }
        };
        let policy_schema = policies.decider().policy().version().tag();
        let classes = ClassCosts::from_table(&costs);
        let mut observation = policies.decider().observation()[..self.schema.dialogue_len()].to_vec();
        observation.extend(classes.latency_secs.iter().chain(&classes.usage_usd).map(|v| *v as f32));
        let current = policies.current();
        Ok(Decided {
            cloud_unavailable: forced.is_none() && preferred_action.is_cloud() && !decision.action.is_cloud(),
            decision,
            preferred,
            observation,
            costs: classes,
            policy_version: current.version.clone(),
            policy_sha256: current.sha256.clone(),
            policy_schema,
            telemetry,
            load,
            forced: forced.is_some(),
        })
    }

    /// The action an app forced: local, or the cloud action the policy scores highest among
    /// those the mask allows now (modalities fresh, the cloud reachable, within the budgets).
    fn forced_decision(
        &self,
        route: ForcedRoute,
        scores: &[f32],
        allowed: &[bool],
    ) -> Result<Decision, AskError> {
        let index = match route {
            ForcedRoute::Local => self.schema.action_index(Action::Local),
            ForcedRoute::Cloud => (0..scores.len())
                .filter(|i| allowed[*i] && self.schema.action(*i).is_some_and(|a| a.is_cloud()))
                .max_by(|a, b| scores[*a].total_cmp(&scores[*b])),
        };
        let Some((action_index, action)) = index.and_then(|i| Some((i, self.schema.action(i)?))) else {
            return Err(AskError::Unavailable(
                "the cloud cannot answer this turn now (out of reach, or over the dialogue's budgets)".into(),
            ));
        };
        Ok(Decision { action_index, action, propensity: 1.0 })
    }

    /// The `decision` event the client receives first.
    pub(super) fn decision_event(
        &self,
        dialogue_id: String,
        turn: u32,
        classified: &Classified,
        decided: &Decided,
    ) -> DecisionEvent {
        let decision = &decided.decision;
        let route = if decision.action.is_cloud() { "cloud" } else { decided.local_route() };
        DecisionEvent {
            dialogue_id,
            turn,
            task: classified.task.name().to_owned(),
            task_source: classified.source.to_owned(),
            task_probabilities: classified.probabilities.clone(),
            action_index: decision.action_index as u32,
            action: if decision.action.is_cloud() { "cloud" } else { "local" }.to_owned(),
            modalities: self.names(decision.action.modalities()),
            propensity: decision.propensity,
            preferred_action_index: decided.preferred as u32,
            forced: decided.forced,
            app_images_sent: 0,
            route: route.to_owned(),
            policy_version: decided.policy_version.clone(),
            policy_sha256: decided.policy_sha256.clone(),
            policy_schema: decided.policy_schema.to_owned(),
            expected_costs: CostClasses {
                latency_secs: decided.costs.latency_secs.clone(),
                usage_usd: decided.costs.usage_usd.clone(),
            },
        }
    }

    fn names(&self, set: ModalitySet) -> Vec<String> {
        set.indices().filter_map(|i| self.modality_names.get(i).cloned()).collect()
    }
}
