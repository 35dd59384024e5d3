//! Stage 7: what the turn cost. Latency from arrival to the last token; energy from the sensing
//! meter over that span (`measured`) or the class's watts times the latency (`estimated` on
//! boards without a meter); cost = energy x electricity price, plus the cloud's price. The
//! expected costs of the chosen action's class move, and the dialogue's budgets are spent.

use std::time::Instant;

use llm_engine::Conversation;
use policy_onnx::Turn;
use tmod_api::Budget;

use super::TurnRecord;
use super::produced::Produced;
use crate::dialogues::TurnStart;
use crate::estimates::CostEstimates;
use crate::service::Service;
use crate::util::lock;

/// What a turn cost, and what it left of the dialogue's budgets.
pub(super) struct Spent {
    pub latency_secs: f64,
    pub energy_j: f64,
    /// `measured` or `estimated`.
    pub energy_source: &'static str,
    pub cost_usd: f64,
    pub budget_left: Budget,
}

impl Service {
    /// Accounts for an answered turn and ends it: the dialogue's view becomes `conversation`.
    pub(super) fn account(
        &self,
        start: TurnStart,
        record: &TurnRecord,
        conversation: Conversation,
        produced: &Produced,
        received: Instant,
    ) -> Spent {
        let finished = Instant::now();
        let latency_secs = finished.duration_since(received).as_secs_f64();
        // Expected costs follow the chosen action, failures included: that is what choosing it costs.
        let action = record.action;
        let class = CostEstimates::class_of(action.is_cloud().then(|| action.modalities().len()));
        let (energy_j, energy_source) = self.energy(class, received, finished, latency_secs);
        let cost_usd = energy_j * self.usd_per_joule + produced.cloud_price_usd;
        if produced.finish == "cancelled" {
            // The client went away: the time says nothing of what the action costs.
        } else if class == 0 {
            lock(&self.estimates).record_local(latency_secs, cost_usd, energy_j, record.load);
        } else {
            lock(&self.estimates).record(class, latency_secs, cost_usd, energy_j);
        }
        let turn = Turn { task: record.task, action };
        let (left_latency, left_cost) =
            lock(&self.dialogues).finish_turn(start, turn, conversation, latency_secs, cost_usd, finished);
        let budget_left = Budget { latency_secs: left_latency, cost_usd: left_cost };
        Spent { latency_secs, energy_j, energy_source, cost_usd, budget_left }
    }

    /// The energy from `received` to `finished`: measured when the meter covered most of the
    /// span, else the action class's expected watts times the latency.
    fn energy(
        &self,
        class: usize,
        received: Instant,
        finished: Instant,
        latency_secs: f64,
    ) -> (f64, &'static str) {
        let measured = self
            .sensing
            .energy_between(received, finished)
            .ok()
            .filter(|span| span.span_secs > 0.0 && span.covered_secs >= 0.8 * span.span_secs);
        match measured {
            Some(span) => (span.joules, "measured"),
            None => {
                let expected = lock(&self.estimates).cost(class);
                let watts =
                    if expected.latency_secs > 0.0 { expected.energy_j / expected.latency_secs } else { 0.0 };
                (watts * latency_secs, "estimated")
            }
        }
    }
}
