//! The decision: which actions are allowed now, and which one to take.
//!
//! Local is always allowed: it is the answer of last resort, when the cloud is down or the
//! budgets are spent. A cloud action is allowed when the cloud is reachable, every modality it
//! attaches is available, and its expected latency and cost (from the cost table) fit in what
//! remains of the dialogue's budgets. The choice is the arg-max of the policy's scores over the
//! allowed actions, or an exploratory draw whose probability (the propensity) is returned for
//! off-policy retraining.

use std::sync::Arc;

use device_profiles::CostTable;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::runtime::{Policy, PolicyError, PolicySession};
use crate::schema::{Action, ClassCosts, ModalitySet, Schema, TaskCategory, Turn};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecisionError {
    #[error("{found} scores for {expected} actions")]
    ScoreCount { expected: usize, found: usize },
    #[error("no action is allowed")]
    NothingAllowed,
    #[error("score of allowed action {action} is not finite ({score})")]
    NonFiniteScore { action: usize, score: f32 },
    #[error("invalid exploration setting: {0}")]
    BadExploration(String),
}

/// How the chosen action is drawn from the allowed ones.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Exploration {
    /// The arg-max; propensity 1.
    #[default]
    Greedy,
    /// The arg-max with probability 1 - epsilon, else uniform over the allowed actions.
    EpsilonGreedy { epsilon: f64 },
    /// Drawn with probability proportional to exp(score / temperature) over the allowed actions.
    Softmax { temperature: f64 },
}

impl Exploration {
    pub fn validate(self) -> Result<Self, DecisionError> {
        match self {
            Exploration::EpsilonGreedy { epsilon } if !(0.0..=1.0).contains(&epsilon) => {
                Err(DecisionError::BadExploration(format!("epsilon {epsilon} is not in [0, 1]")))
            }
            Exploration::Softmax { temperature } if !(temperature.is_finite() && temperature > 0.0) => {
                Err(DecisionError::BadExploration(format!("temperature {temperature} is not > 0")))
            }
            ok => Ok(ok),
        }
    }
}

/// What the mask needs to know about the device and the dialogue right now.
#[derive(Debug, Clone, Copy)]
pub struct Availability<'a> {
    /// Modalities that have a fresh capture.
    pub modalities: ModalitySet,
    /// Whether a cloud request can be sent (broker connected).
    pub cloud_reachable: bool,
    pub remaining_latency_secs: f64,
    pub remaining_cost_usd: f64,
    /// Expected latency and cost of each action class.
    pub costs: &'a CostTable,
}

/// Writes the allowed flag of every action of `schema` into `out`.
pub fn allowed_actions(schema: &Schema, availability: &Availability<'_>, out: &mut [bool]) {
    debug_assert_eq!(out.len(), schema.action_count());
    for (flag, action) in out.iter_mut().zip(schema.actions()) {
        *flag = match action {
            Action::Local => true,
            Action::Cloud { modalities } => {
                let expected = availability.costs.cloud(modalities.len());
                availability.cloud_reachable
                    && modalities.is_subset_of(availability.modalities)
                    && expected.latency_secs <= availability.remaining_latency_secs
                    && expected.cost_usd <= availability.remaining_cost_usd
            }
        };
    }
}

/// The chosen action index and the probability with which it was drawn.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Choice {
    pub action: usize,
    pub propensity: f64,
}

/// Chooses among the allowed actions by their scores.
pub fn choose(
    scores: &[f32],
    allowed: &[bool],
    exploration: Exploration,
    rng: &mut impl Rng,
) -> Result<Choice, DecisionError> {
    if scores.len() != allowed.len() {
        return Err(DecisionError::ScoreCount { expected: allowed.len(), found: scores.len() });
    }
    let mut best: Option<usize> = None;
    let mut count = 0usize;
    for (i, (&score, &ok)) in scores.iter().zip(allowed).enumerate() {
        if !ok {
            continue;
        }
        if !score.is_finite() {
            return Err(DecisionError::NonFiniteScore { action: i, score });
        }
        count += 1;
        if best.is_none_or(|b| score > scores[b]) {
            best = Some(i);
        }
    }
    let best = best.ok_or(DecisionError::NothingAllowed)?;
    match exploration.validate()? {
        Exploration::Greedy => Ok(Choice { action: best, propensity: 1.0 }),
        Exploration::EpsilonGreedy { epsilon } => {
            let uniform = epsilon / count as f64;
            let action = if rng.random::<f64>() < epsilon {
                nth_allowed(allowed, rng.random_range(0..count))
            } else {
                best
            };
            let propensity = uniform + if action == best { 1.0 - epsilon } else { 0.0 };
            Ok(Choice { action, propensity })
        }
        Exploration::Softmax { temperature } => {
            let top = scores[best] as f64;
            let weight = |i: usize| ((scores[i] as f64 - top) / temperature).exp();
            let total: f64 = (0..scores.len()).filter(|&i| allowed[i]).map(weight).sum();
            let mut target = rng.random::<f64>() * total;
            let mut action = best;
            for i in (0..scores.len()).filter(|&i| allowed[i]) {
                target -= weight(i);
                action = i;
                if target <= 0.0 {
                    break;
                }
            }
            Ok(Choice { action, propensity: weight(action) / total })
        }
    }
}

fn nth_allowed(allowed: &[bool], n: usize) -> usize {
    allowed.iter().enumerate().filter(|(_, ok)| **ok).nth(n).map_or(0, |(i, _)| i)
}

/// One turn's question to the decider.
#[derive(Debug, Clone, Copy)]
pub struct DecisionRequest<'a> {
    /// The dialogue's finished turns, oldest first.
    pub history: &'a [Turn],
    pub task: TaskCategory,
    pub availability: Availability<'a>,
}

/// The decider's answer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Decision {
    pub action_index: usize,
    pub action: Action,
    pub propensity: f64,
}

/// Encode, score, mask, choose: the whole decision for one turn, with its buffers reused from
/// turn to turn. One per thread. The observation follows the policy's version: a v2 policy also
/// reads the availability's cost table (the device's live estimates).
#[derive(Debug)]
pub struct Decider {
    policy: Arc<Policy>,
    session: PolicySession,
    exploration: Exploration,
    rng: ChaCha8Rng,
    observation: Vec<f32>,
    class_costs: ClassCosts,
    scores: Vec<f32>,
    allowed: Vec<bool>,
}

impl Decider {
    /// `seed` makes exploration reproducible; `None` seeds from the operating system.
    pub fn new(
        policy: Arc<Policy>,
        exploration: Exploration,
        seed: Option<u64>,
    ) -> Result<Self, DeciderError> {
        let exploration = exploration.validate()?;
        let schema = policy.schema();
        let (obs_len, actions) = (schema.observation_len(), schema.action_count());
        let classes = schema.cost_classes();
        let session = policy.session()?;
        Ok(Decider {
            session,
            exploration,
            rng: seed.map_or_else(ChaCha8Rng::from_os_rng, ChaCha8Rng::seed_from_u64),
            observation: vec![0.0; obs_len],
            class_costs: ClassCosts { latency_secs: vec![0.0; classes], usage_usd: vec![0.0; classes] },
            scores: vec![0.0; actions],
            allowed: vec![false; actions],
            policy,
        })
    }

    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    /// Serves `policy` from now on (the session is rebuilt, the observation follows the new
    /// policy's version; exploration and seed stay).
    pub fn set_policy(&mut self, policy: Arc<Policy>) -> Result<(), PolicyError> {
        self.session = policy.session()?;
        self.observation.resize(policy.schema().observation_len(), 0.0);
        self.policy = policy;
        Ok(())
    }

    /// Decides one turn. The observation, scores and mask stay readable until the next call.
    pub fn decide(&mut self, request: &DecisionRequest<'_>) -> Result<Decision, DeciderError> {
        let schema = self.policy.schema();
        let a = &request.availability;
        self.class_costs.set_from_table(a.costs);
        schema.encode(
            request.history,
            request.task,
            a.remaining_latency_secs,
            a.remaining_cost_usd,
            &self.class_costs,
            &mut self.observation,
        );
        self.session.scores_into(&self.observation, &mut self.scores)?;
        allowed_actions(schema, a, &mut self.allowed);
        let choice = choose(&self.scores, &self.allowed, self.exploration, &mut self.rng)?;
        let action = schema.action(choice.action).ok_or(DecisionError::NothingAllowed)?;
        Ok(Decision { action_index: choice.action, action, propensity: choice.propensity })
    }

    pub fn observation(&self) -> &[f32] {
        &self.observation
    }

    pub fn scores(&self) -> &[f32] {
        &self.scores
    }

    pub fn allowed(&self) -> &[bool] {
        &self.allowed
    }
}

/// Why a decision could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DeciderError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Decision(#[from] DecisionError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn costs() -> CostTable {
        device_profiles::DeviceProfile::builtin("jetson-tx2").unwrap().costs
    }

    fn availability(costs: &CostTable) -> Availability<'_> {
        Availability {
            modalities: ModalitySet::all(3),
            cloud_reachable: true,
            remaining_latency_secs: 30.0,
            remaining_cost_usd: 0.05,
            costs,
        }
    }

    #[test]
    fn mask_follows_availability_and_budgets() {
        let s = Schema::default();
        let costs = costs();
        let mut allowed = [false; 9];
        allowed_actions(&s, &availability(&costs), &mut allowed);
        assert_eq!(allowed, [true; 9]);

        allowed_actions(&s, &Availability { cloud_reachable: false, ..availability(&costs) }, &mut allowed);
        assert_eq!(allowed, [true, false, false, false, false, false, false, false, false]);

        // Camera view 1 missing: every subset holding m1 is masked (actions 3, 5, 7, 8).
        let views = ModalitySet::from_indices([0, 2]);
        allowed_actions(&s, &Availability { modalities: views, ..availability(&costs) }, &mut allowed);
        assert_eq!(allowed, [true, true, true, false, true, false, true, false, false]);

        // 0.01 USD left: two images cost 0.00945, three 0.01368.
        allowed_actions(&s, &Availability { remaining_cost_usd: 0.01, ..availability(&costs) }, &mut allowed);
        assert_eq!(allowed, [true, true, true, true, true, true, true, true, false]);

        // 5 s left: only one image (4.76 s) fits; text-only takes 6.46 s.
        allowed_actions(
            &s,
            &Availability { remaining_latency_secs: 5.0, ..availability(&costs) },
            &mut allowed,
        );
        assert_eq!(allowed, [true, false, true, true, true, false, false, false, false]);

        // Budgets spent: local still answers.
        let spent =
            Availability { remaining_latency_secs: 0.0, remaining_cost_usd: 0.0, ..availability(&costs) };
        allowed_actions(&s, &spent, &mut allowed);
        assert_eq!(allowed, [true, false, false, false, false, false, false, false, false]);
    }

    #[test]
    fn greedy_takes_the_allowed_argmax() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let scores = [0.1, 5.0, 0.3, 2.0];
        let c = choose(&scores, &[true; 4], Exploration::Greedy, &mut rng).unwrap();
        assert_eq!(c, Choice { action: 1, propensity: 1.0 });
        let c = choose(&scores, &[true, false, true, true], Exploration::Greedy, &mut rng).unwrap();
        assert_eq!(c.action, 3);
        assert_eq!(
            choose(&scores, &[false; 4], Exploration::Greedy, &mut rng),
            Err(DecisionError::NothingAllowed)
        );
        let bad = [0.0, f32::NAN, 1.0, 1.0];
        assert!(matches!(
            choose(&bad, &[true; 4], Exploration::Greedy, &mut rng),
            Err(DecisionError::NonFiniteScore { action: 1, .. })
        ));
        // A masked NaN does not matter.
        assert_eq!(
            choose(&bad, &[true, false, true, false], Exploration::Greedy, &mut rng).unwrap().action,
            2
        );
    }

    #[test]
    fn epsilon_greedy_propensities_match_frequencies() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let scores = [0.0, 3.0, 1.0, 2.0];
        let allowed = [true, true, false, true];
        let exploration = Exploration::EpsilonGreedy { epsilon: 0.3 };
        let n = 20_000;
        let mut counts = [0usize; 4];
        for _ in 0..n {
            let c = choose(&scores, &allowed, exploration, &mut rng).unwrap();
            counts[c.action] += 1;
            let expected = if c.action == 1 { 0.7 + 0.1 } else { 0.1 };
            assert!((c.propensity - expected).abs() < 1e-12, "{c:?}");
        }
        assert_eq!(counts[2], 0);
        assert!((counts[1] as f64 / n as f64 - 0.8).abs() < 0.02, "{counts:?}");
        assert!((counts[0] as f64 / n as f64 - 0.1).abs() < 0.02, "{counts:?}");
    }

    #[test]
    fn softmax_propensities_match_frequencies() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let scores = [1.0f32, 2.0, 0.0];
        let allowed = [true, true, true];
        let t = 0.5;
        let z: f64 = scores.iter().map(|s| (*s as f64 / t).exp()).sum();
        let p: Vec<f64> = scores.iter().map(|s| (*s as f64 / t).exp() / z).collect();
        let n = 20_000;
        let mut counts = [0usize; 3];
        for _ in 0..n {
            let c = choose(&scores, &allowed, Exploration::Softmax { temperature: t }, &mut rng).unwrap();
            assert!((c.propensity - p[c.action]).abs() < 1e-9);
            counts[c.action] += 1;
        }
        for i in 0..3 {
            assert!((counts[i] as f64 / n as f64 - p[i]).abs() < 0.02, "{counts:?} vs {p:?}");
        }
    }

    #[test]
    fn exploration_settings_are_checked() {
        assert!(Exploration::EpsilonGreedy { epsilon: 1.5 }.validate().is_err());
        assert!(Exploration::Softmax { temperature: 0.0 }.validate().is_err());
        assert!(Exploration::Softmax { temperature: f64::NAN }.validate().is_err());
        assert!(Exploration::EpsilonGreedy { epsilon: 0.05 }.validate().is_ok());
    }
}
