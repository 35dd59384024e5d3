//! Staged rollouts that stop themselves: after a push, the fleet side reads the group's device
//! statuses and judges the new policy against abort rules (refusals, decision failures, cloud
//! fallback rate, mean score against the previous policy over enough answers). A rule broken
//! means the group goes back (`tmoctl fleet push --abort-*` signs the earlier push again).
//!
//! Figures come from each device's `policy_stats` (per policy version, since its daemon
//! started) and its last policy report; only reports made after the push count.

use std::fmt;

use tmo_protocol::{DeviceStatus, GroupName, PolicyStats};

use crate::status::FleetView;

/// When a rollout stops itself; a rule left `None` is not checked.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AbortRules {
    /// Devices that refused the bundle (a refusal for another canary share does not count).
    pub max_refusals: Option<u64>,
    /// Decisions the new policy failed, over the group.
    pub max_decision_failures: Option<u64>,
    /// Share of the new policy's cloud turns answered locally after all.
    pub max_fallback_rate: Option<f64>,
    /// Largest drop of the mean score from the previous policy's.
    pub max_score_drop: Option<f64>,
    /// Answers each policy needs scored (and cloud turns the new one needs) before the score
    /// and fallback rules judge.
    pub min_answers: u64,
}

impl AbortRules {
    /// Whether any rule is set.
    pub fn any(&self) -> bool {
        self.max_refusals.is_some()
            || self.max_decision_failures.is_some()
            || self.max_fallback_rate.is_some()
            || self.max_score_drop.is_some()
    }
}

/// One rollout: the policy pushed to a group, the one it replaces, and when.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    /// The group pushed to.
    pub group: GroupName,
    /// The version pushed.
    pub version: String,
    /// The version it replaces (the score baseline and what a rollback goes back to).
    pub previous: String,
    /// When the push went out (unix ms): earlier reports are not about it.
    pub pushed_unix_ms: u64,
    /// Its abort rules.
    pub rules: AbortRules,
}

/// What the group's statuses say of a rollout so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RolloutFigures {
    /// Devices of the group with a status.
    pub devices: u64,
    /// Of those, serving the new version.
    pub serving: u64,
    /// Of those, committed to it (its health check passed).
    pub committed: u64,
    /// Devices that refused it, with their reasons.
    pub refused: Vec<(String, String)>,
    /// Devices left out by the canary share.
    pub outside_canary: u64,
    /// Devices that went back from it by themselves (a failed decision, a tmod that died on trial).
    pub rolled_back: u64,
    /// The new policy's decisions and failures.
    pub decisions: u64,
    /// See [`PolicyStats::decision_failures`].
    pub decision_failures: u64,
    /// The new policy's cloud turns and their local fallbacks.
    pub cloud_attempts: u64,
    /// See [`PolicyStats::cloud_fallbacks`].
    pub cloud_fallbacks: u64,
    /// Scores of the new policy's answers: count and sum.
    pub scored: (u64, f64),
    /// Scores of the previous policy's answers: count and sum.
    pub previous_scored: (u64, f64),
}

impl RolloutFigures {
    /// The new policy's fallback rate, if it made cloud turns.
    pub fn fallback_rate(&self) -> Option<f64> {
        (self.cloud_attempts > 0).then(|| self.cloud_fallbacks as f64 / self.cloud_attempts as f64)
    }

    /// The new policy's mean score.
    pub fn mean_score(&self) -> Option<f64> {
        mean(self.scored)
    }

    /// The previous policy's mean score.
    pub fn previous_mean_score(&self) -> Option<f64> {
        mean(self.previous_scored)
    }
}

fn mean((n, sum): (u64, f64)) -> Option<f64> {
    (n > 0).then(|| sum / n as f64)
}

impl fmt::Display for RolloutFigures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let score = |m: Option<f64>, n: u64| m.map_or_else(|| "-".to_owned(), |m| format!("{m:.3} ({n})"));
        write!(
            f,
            "{} of {} devices serving ({} committed), {} refused, {} went back, {} outside the canary; \
             {} decisions, {} failed; {} cloud turns, {} fell back; mean score {} against {} before",
            self.serving,
            self.devices,
            self.committed,
            self.refused.len(),
            self.rolled_back,
            self.outside_canary,
            self.decisions,
            self.decision_failures,
            self.cloud_attempts,
            self.cloud_fallbacks,
            score(self.mean_score(), self.scored.0),
            score(self.previous_mean_score(), self.previous_scored.0),
        )
    }
}

impl Rollout {
    /// The figures over the group's devices in `view`.
    pub fn figures(&self, view: &FleetView) -> RolloutFigures {
        let mut figures = RolloutFigures::default();
        let statuses = view.devices().values().filter_map(|e| e.status.as_ref());
        for status in statuses.filter(|s| s.group.as_ref() == Some(&self.group)) {
            figures.devices += 1;
            self.add_device(status, &mut figures);
        }
        figures
    }

    fn add_device(&self, status: &DeviceStatus, figures: &mut RolloutFigures) {
        let stats = |version: &str| status.policy_stats.iter().find(|p| p.version == version);
        let new = stats(&self.version).cloned().unwrap_or_default();
        if status.policy_version.as_deref() == Some(self.version.as_str()) {
            figures.serving += 1;
            figures.committed += u64::from(new.committed);
        }
        let mut went_back = false;
        if let Some(report) = status.last_policy_update.as_ref().filter(|r| r.unix_ms >= self.pushed_unix_ms)
        {
            let reason = report.reason.as_deref().unwrap_or_default();
            if !report.accepted && report.version == self.version {
                if reason.starts_with("not in the ") {
                    figures.outside_canary += 1;
                } else {
                    figures.refused.push((status.device_id.to_string(), reason.to_owned()));
                }
            }
            // A device goes back by itself on a failed decision (reported with the version it
            // went back to) or at a start after dying with the policy on trial (naming it).
            went_back = report.accepted
                && reason.starts_with("rolled back")
                && (reason.contains(&self.version)
                    || status.previous_policy_version.as_deref() == Some(&self.version));
        }
        if went_back || new.decision_failures > 0 {
            figures.rolled_back += 1;
        }
        figures.decisions += new.decisions;
        figures.decision_failures += new.decision_failures.max(u64::from(went_back));
        figures.cloud_attempts += new.cloud_attempts;
        figures.cloud_fallbacks += new.cloud_fallbacks;
        add_scores(&mut figures.scored, &new);
        if let Some(previous) = stats(&self.previous) {
            add_scores(&mut figures.previous_scored, previous);
        }
    }

    /// The first abort rule `figures` break, as the reason to roll back.
    pub fn broken_rule(&self, figures: &RolloutFigures) -> Option<String> {
        let rules = &self.rules;
        let refusals = figures.refused.len() as u64;
        if let Some(max) = rules.max_refusals
            && refusals > max
        {
            let (device, reason) = &figures.refused[0];
            return Some(format!(
                "{refusals} devices refused it (at most {max} allowed); {device}: {reason}"
            ));
        }
        if let Some(max) = rules.max_decision_failures
            && figures.decision_failures > max
        {
            return Some(format!(
                "{} decisions failed (at most {max} allowed); {} devices went back by themselves",
                figures.decision_failures, figures.rolled_back
            ));
        }
        if let (Some(max), Some(rate)) = (rules.max_fallback_rate, figures.fallback_rate())
            && figures.cloud_attempts >= rules.min_answers.max(1)
            && rate > max
        {
            return Some(format!(
                "{} of {} cloud turns fell back to local answers ({:.1}%, at most {:.1}% allowed)",
                figures.cloud_fallbacks,
                figures.cloud_attempts,
                rate * 100.0,
                max * 100.0
            ));
        }
        if let (Some(max), Some(new), Some(before)) =
            (rules.max_score_drop, figures.mean_score(), figures.previous_mean_score())
            && figures.scored.0 >= rules.min_answers.max(1)
            && figures.previous_scored.0 >= rules.min_answers.max(1)
            && before - new > max
        {
            return Some(format!(
                "the mean score fell from {before:.3} ({} answers of {}) to {new:.3} ({} answers), more than {max}",
                figures.previous_scored.0, self.previous, figures.scored.0
            ));
        }
        None
    }
}

fn add_scores(into: &mut (u64, f64), stats: &PolicyStats) {
    into.0 += stats.scored;
    into.1 += stats.score_sum;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tmo_protocol::{JsonMessage, PolicyUpdateReport};

    fn status(
        device: &str,
        version: &str,
        stats: Vec<PolicyStats>,
        report: Option<PolicyUpdateReport>,
    ) -> Vec<u8> {
        DeviceStatus {
            v: 1,
            device_id: device.parse().unwrap(),
            online: true,
            daemon_version: "0.2.0".into(),
            group: Some(GroupName::new("kitchens").unwrap()),
            policy_version: Some(version.into()),
            previous_policy_version: Some("p1".into()),
            last_policy_update: report,
            counters: Default::default(),
            policy_stats: stats,
            updated_unix_ms: 100,
            extra: Default::default(),
        }
        .to_json()
        .unwrap()
    }

    fn stats(
        version: &str,
        decisions: u64,
        failures: u64,
        cloud: (u64, u64),
        scored: (u64, f64),
    ) -> PolicyStats {
        PolicyStats {
            version: version.into(),
            committed: decisions >= 3,
            decisions,
            decision_failures: failures,
            cloud_attempts: cloud.0,
            cloud_fallbacks: cloud.1,
            scored: scored.0,
            score_sum: scored.1,
        }
    }

    fn report(
        version: &str,
        accepted: bool,
        reason: Option<&str>,
        unix_ms: u64,
    ) -> Option<PolicyUpdateReport> {
        Some(PolicyUpdateReport {
            version: version.into(),
            accepted,
            reason: reason.map(Into::into),
            unix_ms,
        })
    }

    fn rollout(rules: AbortRules) -> Rollout {
        Rollout {
            group: GroupName::new("kitchens").unwrap(),
            version: "p2".into(),
            previous: "p1".into(),
            pushed_unix_ms: 50,
            rules,
        }
    }

    fn view(messages: &[(&str, Vec<u8>)]) -> FleetView {
        let mut view = FleetView::new();
        for (device, payload) in messages {
            view.apply(&format!("tmo/v1/dev/{device}/status"), payload).unwrap();
        }
        view
    }

    #[test]
    fn each_rule_stops_a_rollout_only_past_its_threshold_and_with_enough_answers() {
        let v = view(&[
            (
                "a",
                status(
                    "a",
                    "p2",
                    vec![stats("p2", 10, 0, (8, 5), (4, 1.0)), stats("p1", 50, 0, (9, 0), (6, 5.4))],
                    None,
                ),
            ),
            (
                "b",
                status(
                    "b",
                    "p1",
                    vec![stats("p1", 5, 0, (0, 0), (0, 0.0))],
                    report("p2", false, Some("schema: v3"), 60),
                ),
            ),
            ("c", status("c", "p1", vec![], report("p2", false, Some("not in the 50% canary share"), 60))),
            // A refusal from before this push is about another one.
            ("d", status("d", "p1", vec![], report("p2", false, Some("expired"), 10))),
            // Went back by itself after dying with p2 on trial.
            (
                "e",
                status(
                    "e",
                    "p1",
                    vec![],
                    report(
                        "p1",
                        true,
                        Some("rolled back: tmod ended before policy p2 passed its health check"),
                        70,
                    ),
                ),
            ),
        ]);
        let figures = rollout(AbortRules::default()).figures(&v);
        assert_eq!((figures.devices, figures.serving, figures.committed), (5, 1, 1));
        assert_eq!(figures.refused, vec![("b".to_owned(), "schema: v3".to_owned())]);
        assert_eq!((figures.outside_canary, figures.rolled_back, figures.decision_failures), (1, 1, 1));
        assert_eq!((figures.cloud_attempts, figures.cloud_fallbacks), (8, 5));
        assert_eq!(figures.mean_score(), Some(0.25));
        assert_eq!(figures.previous_mean_score(), Some(0.9));

        let broken = |rules| rollout(rules).broken_rule(&figures);
        assert_eq!(broken(AbortRules::default()), None);
        assert_eq!(broken(AbortRules { max_refusals: Some(1), ..Default::default() }), None);
        let why = broken(AbortRules { max_refusals: Some(0), ..Default::default() }).unwrap();
        assert!(why.contains("1 devices refused") && why.contains("schema: v3"), "{why}");
        assert!(
            broken(AbortRules { max_decision_failures: Some(0), ..Default::default() })
                .unwrap()
                .contains("1 decisions failed")
        );
        let fallback = AbortRules { max_fallback_rate: Some(0.5), min_answers: 8, ..Default::default() };
        assert!(broken(fallback.clone()).unwrap().contains("5 of 8 cloud turns"));
        assert_eq!(broken(AbortRules { min_answers: 9, ..fallback }), None, "too few cloud turns to judge");
        let score = AbortRules { max_score_drop: Some(0.2), min_answers: 4, ..Default::default() };
        let why = broken(score.clone()).unwrap();
        assert!(why.contains("from 0.900 (6 answers of p1) to 0.250 (4 answers)"), "{why}");
        assert_eq!(broken(AbortRules { min_answers: 5, ..score.clone() }), None, "too few answers to judge");
        assert_eq!(broken(AbortRules { max_score_drop: Some(0.7), ..score }), None);
    }

    #[test]
    fn other_groups_are_not_counted() {
        let mut other = DeviceStatus::from_json(
            &status("z", "p2", vec![stats("p2", 1, 1, (0, 0), (0, 0.0))], None),
            1 << 16,
        )
        .unwrap();
        other.group = Some(GroupName::new("labs").unwrap());
        let v = view(&[("z", other.to_json().unwrap())]);
        let figures = rollout(AbortRules::default()).figures(&v);
        assert_eq!((figures.devices, figures.decision_failures), (0, 0));
    }
}
