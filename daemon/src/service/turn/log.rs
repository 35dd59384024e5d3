//! Stage 8: the outcome row goes to the outcome writer and is durable before the `outcome`
//! event is sent (an acknowledged turn is never lost to a crash); then the status counters, the
//! uploader's and status publisher's wakeups, and the metrics.

use std::sync::atomic::Ordering;
use std::time::Instant;

use outcome_log::{CloudAttempt, ScoreSource, TurnOutcome};
use policy_onnx::train::sim::REFUSAL_MARKERS;
use tmod_api::{DecisionEvent, OutcomeEvent, Timings};

use super::account::Spent;
use super::produced::Produced;
use super::{TurnRecord, ms};
use crate::metrics::ActionLabel;
use crate::service::Service;
use crate::util::unix_ms_now;

/// A turn's score at the time it is logged, and where it came from.
pub(super) type Score = (Option<f64>, Option<ScoreSource>);

/// 0 for an answer that refuses (the refusal heuristic); otherwise no score yet.
pub(super) fn refusal_score(answer: &str) -> Score {
    let refusal = REFUSAL_MARKERS.iter().any(|m| answer.contains(m));
    if refusal { (Some(0.0), Some(ScoreSource::RefusalHeuristic)) } else { (None, None) }
}

impl Service {
    /// Appends the turn's outcome row and waits until it is durable; returns the milliseconds
    /// it took. A row that cannot be logged is reported, and the user still gets the answer.
    pub(super) async fn log(
        &self,
        decision: &DecisionEvent,
        record: TurnRecord,
        produced: &Produced,
        spent: &Spent,
        (score, score_source): Score,
        cloud_attempt: Option<CloudAttempt>,
    ) -> f64 {
        let outcome = TurnOutcome {
            dialogue_id: decision.dialogue_id.clone(),
            turn: decision.turn,
            question: record.question,
            task: record.task,
            observation: record.observation,
            action_index: decision.action_index,
            action: record.action,
            propensity: record.propensity,
            policy_version: decision.policy_version.clone(),
            policy_sha256: decision.policy_sha256.clone(),
            latency_secs: spent.latency_secs,
            energy_joules: (spent.energy_source == "measured").then_some(spent.energy_j),
            cost_usd: spent.cost_usd,
            prompt_tokens: produced.prompt_tokens,
            generated_tokens: produced.generated_tokens,
            answer: produced.text.clone(),
            score,
            score_source,
            telemetry: record.telemetry,
            route: (produced.route != decision.action).then(|| produced.route.to_owned()),
            cloud_attempt,
            created_at_ms: outcome_log::now_ms(),
            text_cut_bytes: 0,
            forced: record.forced,
        };
        let logging = Instant::now();
        let logged = self.outcomes.append(outcome).await;
        let log_ms = ms(logging.elapsed());
        if let Err(e) = logged {
            // The user still gets the answer; the loss is visible in the log and the metrics.
            tracing::error!(dialogue = %decision.dialogue_id, turn = decision.turn, "outcome not logged: {e}");
            self.metrics.reject(if e.is_out_of_space() { "outcome_log_full" } else { "outcome_log_error" });
        }
        log_ms
    }

    /// Counts the logged turn for the status topic, wakes the uploader and the status
    /// publisher, and updates the metrics.
    pub(super) fn count(
        &self,
        decision: &DecisionEvent,
        produced: &Produced,
        spent: &Spent,
        (score, _): Score,
        timings: &Timings,
    ) {
        let c = &self.counters;
        c.requests.fetch_add(1, Ordering::Relaxed);
        match produced.route {
            "cloud" => &c.cloud_answers,
            "local:cloud-fallback" => &c.cloud_fallbacks,
            _ => &c.local_answers,
        }
        .fetch_add(1, Ordering::Relaxed);
        c.energy_millijoules.fetch_add((spent.energy_j * 1e3) as u64, Ordering::Relaxed);
        c.last_outcome_ms.store(unix_ms_now(), Ordering::Relaxed);
        if let Some(score) = score {
            c.score(score);
            c.policy_score(&decision.policy_version, score);
        }
        let fell_back = produced.route == "local:cloud-fallback";
        if fell_back || produced.route == "cloud" {
            c.policy(&decision.policy_version, |p| {
                p.cloud_attempts += 1;
                p.cloud_fallbacks += u64::from(fell_back);
            });
        }
        self.upload_wakeup.notify_one();
        self.status_wakeup.notify_one();
        self.measure(decision, produced, spent, timings);
    }

    fn measure(&self, decision: &DecisionEvent, produced: &Produced, spent: &Spent, timings: &Timings) {
        let label = ActionLabel { action: decision.action.clone(), route: produced.route.to_owned() };
        let m = &self.metrics;
        m.requests.get_or_create(&label).inc();
        m.latency.get_or_create(&label).observe(spent.latency_secs);
        m.energy_j.get_or_create(&label).inc_by(spent.energy_j);
        m.cost_usd.get_or_create(&label).inc_by(spent.cost_usd);
        m.budget_left_latency.observe(spent.budget_left.latency_secs);
        m.budget_left_cost.observe(spent.budget_left.cost_usd);
        if produced.route != "cloud" {
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
    }
}

/// The `outcome` event the client receives last.
pub(super) fn outcome_event(
    decision: &DecisionEvent,
    produced: Produced,
    spent: &Spent,
    (score, score_source): Score,
    cloud_attempt: Option<CloudAttempt>,
    timings: Timings,
) -> OutcomeEvent {
    OutcomeEvent {
        dialogue_id: decision.dialogue_id.clone(),
        turn: decision.turn,
        answer: produced.text,
        latency_secs: spent.latency_secs,
        energy_j: spent.energy_j,
        energy_source: spent.energy_source.to_owned(),
        cost_usd: spent.cost_usd,
        route: produced.route.to_owned(),
        cloud_attempt: cloud_attempt.and_then(|a| serde_json::to_value(a).ok()),
        prompt_tokens: produced.prompt_tokens,
        generated_tokens: produced.generated_tokens,
        time_to_first_token_secs: produced.time_to_first_token.as_secs_f64(),
        decode_tokens_per_sec: produced.decode_tokens_per_sec,
        finish: produced.finish.to_owned(),
        budget_left: spent.budget_left,
        score,
        score_source: score_source.map(|s| s.as_str().to_owned()),
        timings,
    }
}
