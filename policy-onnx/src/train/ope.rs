//! Off-policy evaluation: the value of a target policy estimated from turns logged by another
//! (the logging policy, with its propensities), before anyone pushes the target to devices.
//!
//! What is estimated: the mean per-turn reward the target would have earned at the logged turns'
//! observations (a contextual-bandit estimate on the logged state distribution). The histories
//! and remaining budgets in those observations follow the logging policy; a sequential
//! (per-trajectory) importance weight would be a product over a dialogue's turns and, for a
//! greedy target, zero for almost every dialogue, so it is not used.
//!
//! Estimators, for logged turn i with action a_i, propensity mu_i and reward r_i, and the
//! target's probabilities pi(a | x_i), weight w_i = pi(a_i | x_i) / mu_i:
//! - logging: the mean logged reward;
//! - IPS: mean of w_i r_i (unbiased when every propensity is right and positive);
//! - SNIPS: sum w_i r_i / sum w_i (self-normalised: biased, much smaller variance);
//! - DR: mean of sum_a pi(a | x_i) q(x_i, a) + w_i (r_i - q(x_i, a_i)), with a reward model q
//!   fitted on other folds of dialogues than the turn's own ([`cross_fitted_rewards`]), so that
//!   the correction term is not zeroed by a model that memorised the turn.
//!
//! Confidence intervals: percentile bootstrap over dialogues (turns of one dialogue are
//! correlated through its history and budgets, so dialogues, not turns, are resampled), with a
//! fixed seed: the same data gives the same interval. The bootstrap also covers SNIPS, a ratio
//! for which the normal approximation needs the delta method.
//!
//! The reward of a logged turn is the trainer's ([`super::sim::Simulator::reward`]) computed
//! from what was logged ([`RewardScale::logged_reward`]); pure functions, no I/O.

use device_profiles::CostTable;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::sim::{CostModel, Episode, ResponseModel, RewardWeights, SimError, response_target};
use crate::runtime::{Policy, PolicyError};
use crate::schema::{ClassCosts, ObservationVersion, Schema};

/// Why an estimate cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum OpeError {
    #[error("no logged turns to evaluate on")]
    NoTurns,
    #[error("{what} has {found} rows for {turns} logged turns")]
    LengthMismatch { what: &'static str, found: usize, turns: usize },
    #[error("logged turn {turn}: {reason}")]
    BadTurn { turn: usize, reason: String },
    #[error("invalid evaluation setting: {0}")]
    Config(String),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("reward model: {0}")]
    RewardModel(#[from] SimError),
}

/// One logged turn as the estimators use it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoggedTurn {
    /// The dialogue (of its device) the turn belongs to: the bootstrap resamples these, the
    /// reward model is cross-fitted over them.
    pub group: usize,
    /// The observation the logging policy saw.
    pub observation: Vec<f32>,
    /// The logged action index.
    pub action: usize,
    /// Probability with which the logging policy chose `action`, in (0, 1].
    pub propensity: f64,
    /// The turn's reward ([`RewardScale::logged_reward`]).
    pub reward: f64,
    /// The logged latency and cost (the reward model's cost estimates per action come from them).
    pub latency_secs: f64,
    pub usage_usd: f64,
}

/// The trainer's reward, on logged latencies and costs: each normalised by the min-max of the
/// profile's cost classes, as [`CostModel`] normalises them (a logged turn that cost exactly its
/// class's table value gets exactly the simulator's reward; measured values outside the table's
/// range fall outside [0, 1] and are not clamped).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RewardScale {
    pub weights: RewardWeights,
    latency_min: f64,
    latency_span: f64,
    usage_min: f64,
    usage_span: f64,
}

impl RewardScale {
    /// The scale of `costs` (every cost class is some action's, so the min-max over the actions
    /// is the min-max over the classes).
    pub fn new(costs: &CostModel, weights: RewardWeights) -> Self {
        let (latency_min, latency_max) = bounds(&costs.latency_secs);
        let (usage_min, usage_max) = bounds(&costs.usage_usd);
        RewardScale {
            weights,
            latency_min,
            latency_span: (latency_max - latency_min).max(f64::MIN_POSITIVE),
            usage_min,
            usage_span: (usage_max - usage_min).max(f64::MIN_POSITIVE),
        }
    }

    /// Reward of a turn with response score `response`, normalised association
    /// `association_norm` and the given latency and cost.
    pub fn reward(&self, response: f64, association_norm: f64, latency_secs: f64, usage_usd: f64) -> f64 {
        let w = &self.weights;
        w.response * response + w.association * association_norm
            - w.latency * (latency_secs - self.latency_min) / self.latency_span
            - w.usage * (usage_usd - self.usage_min) / self.usage_span
    }

    /// Reward of a logged turn: its score (zeroed for a refusal, as the trainer does), no
    /// association term (devices do not measure it; the export writes 0), its logged latency and
    /// cost.
    pub fn logged_reward(&self, score: f64, answer: &str, latency_secs: f64, usage_usd: f64) -> f64 {
        self.reward(response_target(answer, score), 0.0, latency_secs, usage_usd)
    }
}

fn bounds(values: &[f64]) -> (f64, f64) {
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) }
}

/// The part of the device's mask that the observation determines: local always, a cloud action
/// when its expected latency and cost fit the remaining budgets (the v1 part's last two values).
/// The expected costs are the observation's own cost table when it is a v2 observation (what
/// the device expected then), else `costs`. Camera and broker availability are not in the
/// observation: every modality and the cloud are taken as available.
pub fn budget_mask(schema: &Schema, costs: &CostTable, observation: &[f32], out: &mut [bool]) {
    let d = schema.dialogue_len();
    let latency_left = f64::from(observation.get(d - 2).copied().unwrap_or(0.0));
    let usage_left = f64::from(observation.get(d - 1).copied().unwrap_or(0.0));
    let logged = logged_classes(schema, observation);
    for (flag, action) in out.iter_mut().zip(schema.actions()) {
        let class = ClassCosts::class_of(action);
        let (latency, usage) = match &logged {
            Some((l, u)) => (f64::from(l[class]), f64::from(u[class])),
            None if class == 0 => (costs.local.latency_secs, costs.local.cost_usd),
            None => (costs.cloud(class - 1).latency_secs, costs.cloud(class - 1).cost_usd),
        };
        *flag = class == 0 || (latency <= latency_left && usage <= usage_left);
    }
}

/// The class latencies and usages a v2 observation carries (`None` for a v1 one).
fn logged_classes<'o>(schema: &Schema, observation: &'o [f32]) -> Option<(&'o [f32], &'o [f32])> {
    let v2 = schema.to_version(ObservationVersion::V2);
    if observation.len() != v2.observation_len() {
        return None;
    }
    let costs = &observation[v2.dialogue_len()..];
    Some(costs.split_at(v2.cost_classes()))
}

/// The observation `schema`'s policy reads at a logged turn, into `out`: a v1 policy the v1
/// part; a v2 policy a v2 row as it is, and a v1 row completed with `costs`' classes (the
/// table it was logged under was not recorded; the profile's is the best guess).
pub fn target_observation(schema: &Schema, costs: &CostTable, logged: &[f32], out: &mut Vec<f32>) {
    out.clear();
    let d = schema.dialogue_len().min(logged.len());
    out.extend_from_slice(&logged[..d]);
    if schema.version() == ObservationVersion::V2 {
        match logged_classes(schema, logged) {
            Some((l, u)) => {
                out.extend_from_slice(l);
                out.extend_from_slice(u);
            }
            None => {
                let classes = ClassCosts::from_table(costs);
                out.extend(classes.latency_secs.iter().chain(&classes.usage_usd).map(|v| *v as f32));
            }
        }
    }
}

/// The arg-max of `scores` over the allowed actions, the first on ties (the decision's greedy
/// choice); 0 (local) when nothing is allowed.
pub fn masked_argmax(scores: &[f32], allowed: &[bool]) -> usize {
    let mut best: Option<usize> = None;
    for (i, (&s, &ok)) in scores.iter().zip(allowed).enumerate() {
        if ok && best.is_none_or(|b| s > scores[b]) {
            best = Some(i);
        }
    }
    best.unwrap_or(0)
}

/// The greedy action of `policy` (v1 or v2, whatever the rows' version: [`target_observation`])
/// at every logged turn: masked by [`budget_mask`] when `costs` is given, else the arg-max over
/// all actions. A v2 policy reading v1 rows needs `costs`; without it the paper's TX2/wired
/// table stands in.
pub fn greedy_actions(
    policy: &Policy,
    turns: &[LoggedTurn],
    costs: Option<&CostTable>,
) -> Result<Vec<usize>, OpeError> {
    let schema = policy.schema();
    let mut session = policy.session()?;
    let mut scores = vec![0.0f32; schema.action_count()];
    let mut allowed = vec![true; schema.action_count()];
    let mut observation = Vec::with_capacity(schema.observation_len());
    let fallback = device_profiles::DeviceProfile::builtin("jetson-tx2").map(|p| p.costs).ok();
    turns
        .iter()
        .map(|t| {
            if let Some(table) = costs.or(fallback.as_ref()) {
                target_observation(schema, table, &t.observation, &mut observation);
            } else {
                observation.clone_from(&t.observation);
            }
            session.scores_into(&observation, &mut scores)?;
            match costs {
                Some(costs) => budget_mask(schema, costs, &t.observation, &mut allowed),
                None => allowed.fill(true),
            }
            Ok(masked_argmax(&scores, &allowed))
        })
        .collect()
}

/// A deterministic target as action probabilities: 1 for the chosen action.
pub fn one_hot(actions: &[usize], action_count: usize) -> Vec<Vec<f64>> {
    actions.iter().map(|&a| (0..action_count).map(|i| if i == a { 1.0 } else { 0.0 }).collect()).collect()
}

/// The DR reward model: the trainer's response model (k-nearest-neighbour regression of the
/// score on the observation's window and the action) plus the mean logged latency and cost of
/// each action's cost class (the profile's table value for a class never logged).
#[derive(Debug, Clone)]
pub struct RewardModel {
    response: ResponseModel,
    scale: RewardScale,
    latency_secs: Vec<f64>,
    usage_usd: Vec<f64>,
}

impl RewardModel {
    /// Fits the response model on `episodes` and the cost estimates on `turns`.
    pub fn fit(
        episodes: &[Episode],
        turns: &[&LoggedTurn],
        schema: &Schema,
        costs: &CostModel,
        scale: RewardScale,
    ) -> Result<Self, OpeError> {
        let response = ResponseModel::fit(episodes, schema)?;
        let class = |a: usize| {
            schema.action(a).map_or(0, |x| if x.is_cloud() { 1 + x.modalities().len() } else { 0 })
        };
        let classes = schema.modalities() + 2;
        let mut sums = vec![(0.0, 0.0, 0usize); classes];
        for t in turns {
            let s = &mut sums[class(t.action).min(classes - 1)];
            s.0 += t.latency_secs;
            s.1 += t.usage_usd;
            s.2 += 1;
        }
        let per_action = |a: usize, table: f64, pick: fn(&(f64, f64, usize)) -> f64| {
            let s = &sums[class(a).min(classes - 1)];
            if s.2 == 0 { table } else { pick(s) / s.2 as f64 }
        };
        let count = schema.action_count();
        Ok(RewardModel {
            response,
            scale,
            latency_secs: (0..count).map(|a| per_action(a, costs.latency_secs[a], |s| s.0)).collect(),
            usage_usd: (0..count).map(|a| per_action(a, costs.usage_usd[a], |s| s.1)).collect(),
        })
    }

    /// Predicted reward of `action` at `observation`.
    pub fn predict(&self, observation: &[f32], action: usize) -> f64 {
        let response = self.response.predict(observation, action);
        self.scale.reward(response, 0.0, self.latency_secs[action], self.usage_usd[action])
    }
}

/// Rewards predicted for every action at every turn, each turn by a [`RewardModel`] fitted
/// without its own fold: dialogue group g is in fold g mod `folds`. `episodes` are the logged
/// dialogues the response model can be fitted on, each with its group. With one fold, or when
/// a fold's complement has no episode, the model is fitted on everything. Returns the
/// predictions and whether every turn was cross-fitted.
pub fn cross_fitted_rewards(
    turns: &[LoggedTurn],
    episodes: &[(usize, Episode)],
    schema: &Schema,
    costs: &CostModel,
    scale: RewardScale,
    folds: usize,
) -> Result<(Vec<Vec<f64>>, bool), OpeError> {
    if folds == 0 {
        return Err(OpeError::Config("folds must be at least 1".into()));
    }
    let mut out = vec![Vec::new(); turns.len()];
    let mut cross_fitted = true;
    for fold in 0..folds {
        let members: Vec<usize> = (0..turns.len()).filter(|&i| turns[i].group % folds == fold).collect();
        if members.is_empty() {
            continue;
        }
        let train_episodes: Vec<Episode> = episodes
            .iter()
            .filter(|(g, _)| folds == 1 || g % folds != fold)
            .map(|(_, e)| e.clone())
            .collect();
        let train_turns: Vec<&LoggedTurn> =
            turns.iter().filter(|t| folds == 1 || t.group % folds != fold).collect();
        let model = if train_episodes.is_empty() || folds == 1 {
            cross_fitted = false;
            let all: Vec<Episode> = episodes.iter().map(|(_, e)| e.clone()).collect();
            RewardModel::fit(&all, &turns.iter().collect::<Vec<_>>(), schema, costs, scale)?
        } else {
            RewardModel::fit(&train_episodes, &train_turns, schema, costs, scale)?
        };
        for i in members {
            out[i] = (0..schema.action_count()).map(|a| model.predict(&turns[i].observation, a)).collect();
        }
    }
    Ok((out, cross_fitted))
}

/// Settings of [`estimate`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct OpeConfig {
    /// Bootstrap resamples of the dialogues.
    pub bootstrap: usize,
    /// Seed of the bootstrap.
    pub seed: u64,
    /// Coverage of the intervals, e.g. 0.95.
    pub level: f64,
}

impl Default for OpeConfig {
    fn default() -> Self {
        OpeConfig { bootstrap: 2000, seed: 0, level: 0.95 }
    }
}

/// A point estimate and its bootstrap interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Interval {
    pub estimate: f64,
    pub low: f64,
    pub high: f64,
}

/// What [`estimate`] found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OpeEstimate {
    pub turns: usize,
    pub dialogues: usize,
    /// Mean logged reward: the logging policy's value.
    pub logging: Interval,
    pub ips: Interval,
    /// `None` when the target never gives a logged action a positive probability.
    pub snips: Option<Interval>,
    pub dr: Interval,
    /// DR of the target minus the logging policy's value (paired over the same resamples).
    pub dr_gain: Interval,
    /// Kish's effective sample size of the importance weights, (sum w)^2 / sum w^2.
    pub effective_sample_size: f64,
    /// Mean probability the target gives the logged action: for a greedy target, the share of
    /// logged turns where it agrees with the logged action.
    pub agreement: f64,
    pub max_weight: f64,
    pub config: OpeConfig,
}

/// Per-dialogue sums: turns, reward, weighted reward, weight, DR term.
#[derive(Debug, Clone, Copy, Default)]
struct Sums {
    n: f64,
    reward: f64,
    weighted: f64,
    weight: f64,
    dr: f64,
}

impl Sums {
    fn add(&mut self, o: &Sums) {
        self.n += o.n;
        self.reward += o.reward;
        self.weighted += o.weighted;
        self.weight += o.weight;
        self.dr += o.dr;
    }
}

/// Estimates the target's value from `turns`. `target[i][a]` is the probability that the
/// target takes action a at turn i; `rewards[i][a]` the reward model's prediction there (all
/// zeros make DR equal IPS).
pub fn estimate(
    turns: &[LoggedTurn],
    target: &[Vec<f64>],
    rewards: &[Vec<f64>],
    config: &OpeConfig,
) -> Result<OpeEstimate, OpeError> {
    if turns.is_empty() {
        return Err(OpeError::NoTurns);
    }
    if config.bootstrap == 0 || !(config.level > 0.0 && config.level < 1.0) {
        return Err(OpeError::Config(format!(
            "bootstrap {} must be >= 1 and level {} in (0, 1)",
            config.bootstrap, config.level
        )));
    }
    for (what, rows) in [("target", target.len()), ("reward model", rewards.len())] {
        if rows != turns.len() {
            return Err(OpeError::LengthMismatch { what, found: rows, turns: turns.len() });
        }
    }
    // Dialogue groups, in order of first turn.
    let mut group_index: std::collections::HashMap<usize, usize> = std::collections::HashMap::new();
    let mut groups: Vec<Sums> = Vec::new();
    let (mut sum_w, mut sum_w2, mut agreement, mut max_weight) = (0.0, 0.0, 0.0, 0.0f64);
    for (i, ((t, pi), q)) in turns.iter().zip(target).zip(rewards).enumerate() {
        let bad = |reason: String| OpeError::BadTurn { turn: i, reason };
        let actions = pi.len();
        if t.action >= actions || q.len() != actions {
            return Err(bad(format!(
                "action {} with {} target probabilities and {} predicted rewards",
                t.action,
                actions,
                q.len()
            )));
        }
        if !(t.propensity > 0.0 && t.propensity <= 1.0) {
            return Err(bad(format!("propensity {} is outside (0, 1]", t.propensity)));
        }
        if !t.reward.is_finite() || q.iter().any(|v| !v.is_finite()) {
            return Err(bad("reward or predicted reward is not finite".into()));
        }
        let total: f64 = pi.iter().sum();
        if pi.iter().any(|p| !p.is_finite() || *p < 0.0) || (total - 1.0).abs() > 1e-6 {
            return Err(bad(format!("target probabilities sum to {total}, not 1")));
        }
        let w = pi[t.action] / t.propensity;
        let direct: f64 = pi.iter().zip(q).map(|(p, v)| p * v).sum();
        let term = Sums {
            n: 1.0,
            reward: t.reward,
            weighted: w * t.reward,
            weight: w,
            dr: direct + w * (t.reward - q[t.action]),
        };
        let g = *group_index.entry(t.group).or_insert_with(|| {
            groups.push(Sums::default());
            groups.len() - 1
        });
        groups[g].add(&term);
        sum_w += w;
        sum_w2 += w * w;
        agreement += pi[t.action];
        max_weight = max_weight.max(w);
    }
    let mut total = Sums::default();
    groups.iter().for_each(|g| total.add(g));
    let point = values(&total);

    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut draws: Vec<[f64; 5]> = Vec::with_capacity(config.bootstrap);
    for _ in 0..config.bootstrap {
        let mut s = Sums::default();
        for _ in 0..groups.len() {
            s.add(&groups[rng.random_range(0..groups.len())]);
        }
        draws.push(values(&s));
    }
    let alpha = (1.0 - config.level) / 2.0;
    let interval = |k: usize| {
        let mut column: Vec<f64> = draws.iter().map(|d| d[k]).filter(|v| v.is_finite()).collect();
        column.sort_by(f64::total_cmp);
        Interval { estimate: point[k], low: quantile(&column, alpha), high: quantile(&column, 1.0 - alpha) }
    };
    let n = turns.len() as f64;
    Ok(OpeEstimate {
        turns: turns.len(),
        dialogues: groups.len(),
        logging: interval(0),
        ips: interval(1),
        snips: (total.weight > 0.0).then(|| interval(2)),
        dr: interval(3),
        dr_gain: interval(4),
        effective_sample_size: if sum_w2 > 0.0 { sum_w * sum_w / sum_w2 } else { 0.0 },
        agreement: agreement / n,
        max_weight,
        config: *config,
    })
}

/// [logging, IPS, SNIPS, DR, DR - logging] of summed terms (SNIPS is NaN without weight).
fn values(s: &Sums) -> [f64; 5] {
    let n = s.n.max(1.0);
    let snips = if s.weight > 0.0 { s.weighted / s.weight } else { f64::NAN };
    [s.reward / n, s.weighted / n, snips, s.dr / n, (s.dr - s.reward) / n]
}

/// Linear-interpolation quantile (numpy's default) of sorted values; NaN when empty.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        1 => sorted[0],
        len => {
            let pos = q.clamp(0.0, 1.0) * (len - 1) as f64;
            let lo = pos.floor() as usize;
            let hi = (lo + 1).min(len - 1);
            sorted[lo] + (pos - lo as f64) * (sorted[hi] - sorted[lo])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::LoadOptions;
    use crate::schema::{TaskCategory, Turn};
    use crate::train::sim::tests::{train_dialogues, tx2};
    use crate::train::sim::{Simulator, episodes};

    const ACTIONS: usize = 9;

    /// A bandit world: four contexts (the task id in the observation), nine actions, reward =
    /// `MEAN[x][a]` + uniform noise in [-0.5, 0.5]. Its true values are known exactly.
    const MEAN: [[f64; ACTIONS]; 4] = [
        [0.2, 0.1, 0.9, 0.3, 0.0, 0.4, 0.2, 0.1, 0.5],
        [0.6, 0.2, 0.1, 0.8, 0.3, 0.0, 0.1, 0.2, 0.4],
        [0.3, 0.7, 0.2, 0.1, 0.2, 0.3, 1.0, 0.0, 0.1],
        [0.9, 0.0, 0.3, 0.2, 0.4, 0.1, 0.0, 0.5, 0.2],
    ];
    /// The logging policy's greedy action per context, and its exploration.
    const LOGGING: [usize; 4] = [0, 0, 1, 0];
    const EPSILON: f64 = 0.3;
    /// The best action per context, and a worse policy.
    const BEST: [usize; 4] = [2, 3, 6, 0];
    const WORSE: [usize; 4] = [4, 5, 7, 1];

    fn context(t: &LoggedTurn) -> usize {
        t.observation[0] as usize
    }

    fn logging_probability(x: usize, a: usize) -> f64 {
        EPSILON / ACTIONS as f64 + if a == LOGGING[x] { 1.0 - EPSILON } else { 0.0 }
    }

    fn true_value(policy: &[usize; 4]) -> f64 {
        (0..4).map(|x| MEAN[x][policy[x]]).sum::<f64>() / 4.0
    }

    /// `dialogues` dialogues of three turns logged by the epsilon-greedy logging policy.
    fn logged(seed: u64, dialogues: usize) -> Vec<LoggedTurn> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut out = Vec::new();
        for group in 0..dialogues {
            for _ in 0..3 {
                let x = rng.random_range(0..4);
                let a = if rng.random::<f64>() < EPSILON { rng.random_range(0..ACTIONS) } else { LOGGING[x] };
                let reward = MEAN[x][a] + rng.random::<f64>() - 0.5;
                out.push(LoggedTurn {
                    group,
                    observation: vec![x as f32],
                    action: a,
                    propensity: logging_probability(x, a),
                    reward,
                    latency_secs: 0.0,
                    usage_usd: 0.0,
                });
            }
        }
        out
    }

    fn deterministic(turns: &[LoggedTurn], policy: &[usize; 4]) -> Vec<Vec<f64>> {
        one_hot(&turns.iter().map(|t| policy[context(t)]).collect::<Vec<_>>(), ACTIONS)
    }

    fn zeros(turns: &[LoggedTurn]) -> Vec<Vec<f64>> {
        vec![vec![0.0; ACTIONS]; turns.len()]
    }

    fn exact_model(turns: &[LoggedTurn]) -> Vec<Vec<f64>> {
        turns.iter().map(|t| MEAN[context(t)].to_vec()).collect()
    }

    #[test]
    fn the_logging_policy_as_target_gets_the_logged_mean() {
        let turns = logged(1, 200);
        let target: Vec<Vec<f64>> = turns
            .iter()
            .map(|t| (0..ACTIONS).map(|a| logging_probability(context(t), a)).collect())
            .collect();
        let e = estimate(&turns, &target, &zeros(&turns), &OpeConfig::default()).unwrap();
        let mean = turns.iter().map(|t| t.reward).sum::<f64>() / turns.len() as f64;
        assert!((e.logging.estimate - mean).abs() < 1e-12);
        assert!((e.ips.estimate - mean).abs() < 1e-9, "{} vs {mean}", e.ips.estimate);
        assert!((e.snips.unwrap().estimate - mean).abs() < 1e-9);
        // Every weight is 1: the effective sample size is the sample size.
        assert!((e.effective_sample_size - turns.len() as f64).abs() < 1e-6);
        assert!((e.max_weight - 1.0).abs() < 1e-12);
        assert_eq!((e.turns, e.dialogues), (600, 200));
        // And the logged mean is near the logging policy's true value.
        let truth = (0..4)
            .map(|x| (0..ACTIONS).map(|a| logging_probability(x, a) * MEAN[x][a]).sum::<f64>())
            .sum::<f64>()
            / 4.0;
        assert!(e.logging.low <= truth && truth <= e.logging.high, "{:?} vs {truth}", e.logging);
    }

    #[test]
    fn a_better_policy_gets_a_higher_estimate_than_a_worse_one_and_the_logging_policy() {
        let turns = logged(2, 1000);
        let config = OpeConfig::default();
        let model = exact_model(&turns);
        let best = estimate(&turns, &deterministic(&turns, &BEST), &model, &config).unwrap();
        let worse = estimate(&turns, &deterministic(&turns, &WORSE), &model, &config).unwrap();
        assert!(true_value(&BEST) > best.logging.estimate + 0.3);
        for (b, w) in [
            (best.ips.estimate, worse.ips.estimate),
            (best.snips.unwrap().estimate, worse.snips.unwrap().estimate),
            (best.dr.estimate, worse.dr.estimate),
        ] {
            assert!(b > w + 0.3 && b > best.logging.estimate + 0.2, "{b} vs {w}");
        }
        assert!(best.dr_gain.low > 0.0, "{:?}", best.dr_gain);
        assert!(worse.dr_gain.high < 0.0, "{:?}", worse.dr_gain);
        // The estimates are near the truth; DR with an exact reward model is the tightest.
        assert!((best.dr.estimate - true_value(&BEST)).abs() < 0.05, "{:?}", best.dr);
        assert!((best.snips.unwrap().estimate - true_value(&BEST)).abs() < 0.1);
        assert!(best.dr.high - best.dr.low < best.ips.high - best.ips.low);
        // The greedy target agrees with the logged action where it equals it.
        let agree = turns.iter().filter(|t| BEST[context(t)] == t.action).count() as f64 / turns.len() as f64;
        assert!((best.agreement - agree).abs() < 1e-12);
        assert!(best.effective_sample_size < turns.len() as f64 / 5.0);
    }

    /// 200 seeded data sets of 600 dialogues: each interval covers the true value about 95% of
    /// the time (0.92 to 0.95 here; the Monte Carlo error of 200 repetitions is about 0.015),
    /// and the DR interval with a biased reward model still does: the correction term removes
    /// the bias.
    #[test]
    fn intervals_cover_the_truth_in_a_seeded_simulation() {
        let truth = true_value(&BEST);
        let config = OpeConfig { bootstrap: 400, ..OpeConfig::default() };
        let reps = 200;
        let mut covered = [0usize; 4];
        for seed in 0..reps {
            let turns = logged(100 + seed, 600);
            let target = deterministic(&turns, &BEST);
            let biased: Vec<Vec<f64>> =
                turns.iter().map(|t| MEAN[context(t)].iter().map(|v| v + 0.3).collect()).collect();
            let plain = estimate(&turns, &target, &zeros(&turns), &OpeConfig { seed, ..config }).unwrap();
            let dr = estimate(&turns, &target, &biased, &OpeConfig { seed, ..config }).unwrap();
            for (k, i) in [plain.ips, plain.snips.unwrap(), plain.dr, dr.dr].iter().enumerate() {
                covered[k] += usize::from(i.low <= truth && truth <= i.high);
            }
        }
        for (name, c) in ["ips", "snips", "dr (no model)", "dr (biased model)"].iter().zip(covered) {
            let share = c as f64 / reps as f64;
            assert!((0.9..=0.99).contains(&share), "{name}: {share}");
        }
    }

    #[test]
    fn bad_input_is_a_typed_error() {
        let turns = logged(3, 5);
        let target = deterministic(&turns, &BEST);
        let config = OpeConfig::default();
        assert!(matches!(estimate(&[], &[], &[], &config), Err(OpeError::NoTurns)));
        assert!(matches!(
            estimate(&turns, &target[1..], &zeros(&turns), &config),
            Err(OpeError::LengthMismatch { what: "target", .. })
        ));
        let mut bad = turns.clone();
        bad[2].propensity = 0.0;
        assert!(matches!(
            estimate(&bad, &target, &zeros(&turns), &config),
            Err(OpeError::BadTurn { turn: 2, .. })
        ));
        let mut half = target.clone();
        half[0] = vec![0.5; ACTIONS];
        assert!(matches!(
            estimate(&turns, &half, &zeros(&turns), &config),
            Err(OpeError::BadTurn { turn: 0, .. })
        ));
        let mut outside = turns.clone();
        outside[1].action = ACTIONS;
        assert!(estimate(&outside, &target, &zeros(&turns), &config).is_err());
        assert!(matches!(
            estimate(&turns, &target, &zeros(&turns), &OpeConfig { level: 1.0, ..config }),
            Err(OpeError::Config(_))
        ));
        // A target that never takes a logged action: no SNIPS, IPS 0, zero effective sample.
        let never: Vec<Vec<f64>> = turns
            .iter()
            .map(|t| (0..ACTIONS).map(|a| f64::from(u8::from(a == (t.action + 1) % ACTIONS))).collect())
            .collect();
        let e = estimate(&turns, &never, &zeros(&turns), &config).unwrap();
        assert!(e.snips.is_none());
        assert_eq!((e.ips.estimate, e.effective_sample_size, e.agreement), (0.0, 0.0, 0.0));
    }

    /// The reward of a logged turn that cost its class's table values is the simulator's reward.
    #[test]
    fn logged_reward_is_the_simulators_reward() {
        let schema = Schema::default();
        let eps = episodes(&train_dialogues(), &schema).unwrap();
        let sim = Simulator::new(&eps, &tx2(), schema).unwrap();
        let scale = RewardScale::new(&sim.costs, sim.weights);
        for a in 0..ACTIONS {
            for (response, association) in [(0.0, 0.0), (0.8, 0.5), (1.7, 1.0)] {
                let ours =
                    scale.reward(response, association, sim.costs.latency_secs[a], sim.costs.usage_usd[a]);
                assert!((ours - sim.reward(response, association, a)).abs() < 1e-12, "action {a}");
            }
        }
        let (lat, usd) = (sim.costs.latency_secs[3], sim.costs.usage_usd[3]);
        assert_eq!(scale.logged_reward(0.9, "I'm sorry, I cannot see", lat, usd), sim.reward(0.0, 0.0, 3));
        assert!((scale.logged_reward(0.9, "Chop it", lat, usd) - sim.reward(0.9, 0.0, 3)).abs() < 1e-12);
        // A measured latency beyond the table costs more than the slowest class.
        assert!(scale.logged_reward(0.9, "ok", 20.0, usd) < sim.reward(0.9, 0.0, 8));
    }

    /// The logged M4A1 turns as OPE input: group = dialogue, reward from the logged score and
    /// costs; the reward model is cross-fitted over dialogues.
    fn m4a1_turns(schema: &Schema, scale: &RewardScale) -> (Vec<LoggedTurn>, Vec<(usize, Episode)>) {
        let dialogues = train_dialogues();
        let eps = episodes(&dialogues, schema).unwrap();
        let mut turns = Vec::new();
        for (g, d) in dialogues.iter().enumerate() {
            let mut history: Vec<Turn> = Vec::new();
            let (mut lat, mut usd) = (30.0, 0.05);
            for i in &d.interactions {
                let observation = schema.observation(&history, i.task_cat, lat, usd);
                turns.push(LoggedTurn {
                    group: g,
                    observation,
                    action: schema.action_index(i.logged_action()).unwrap(),
                    propensity: 1.0,
                    reward: scale.logged_reward(i.score, &i.answer, i.interaction_time, i.usage_cost),
                    latency_secs: i.interaction_time,
                    usage_usd: i.usage_cost,
                });
                lat -= i.interaction_time;
                usd -= i.usage_cost;
                history.push(i.turn());
            }
        }
        (turns, eps.into_iter().enumerate().collect())
    }

    #[test]
    fn the_reward_model_is_fitted_without_the_turns_own_dialogues() {
        let schema = Schema::default();
        let profile = tx2();
        let costs = CostModel::new(&profile, &schema).unwrap();
        let scale = RewardScale::new(&costs, RewardWeights::default());
        let (turns, eps) = m4a1_turns(&schema, &scale);
        let (in_sample, crossed) = cross_fitted_rewards(&turns, &eps, &schema, &costs, scale, 1).unwrap();
        assert!(!crossed);
        let (cross, crossed) = cross_fitted_rewards(&turns, &eps, &schema, &costs, scale, 5).unwrap();
        assert!(crossed);
        assert_eq!((cross.len(), cross[0].len()), (287, ACTIONS));
        assert!(cross.iter().flatten().all(|v| v.is_finite()));
        // In sample, the kNN all but reproduces most logged turns' rewards (exact window matches
        // weigh 1e6); cross-fitted, it cannot: the error is larger.
        let error = |q: &[Vec<f64>]| {
            turns.iter().zip(q).map(|(t, q)| (q[t.action] - t.reward).abs()).sum::<f64>() / turns.len() as f64
        };
        assert!(error(&in_sample) * 2.0 < error(&cross), "{} vs {}", error(&in_sample), error(&cross));
        // The whole estimate on real logged turns (logged greedily: propensity 1) is finite.
        let policy = Policy::from_bytes(crate::DEFAULT_POLICY, &LoadOptions::default()).unwrap();
        let actions = greedy_actions(&policy, &turns, Some(&profile.costs)).unwrap();
        let e = estimate(&turns, &one_hot(&actions, ACTIONS), &cross, &OpeConfig::default()).unwrap();
        for v in [e.logging, e.ips, e.dr, e.dr_gain] {
            assert!(v.estimate.is_finite() && v.low <= v.estimate && v.estimate <= v.high, "{v:?}");
        }
    }

    #[test]
    fn the_greedy_target_respects_the_budget_mask() {
        let schema = Schema::default();
        let profile = tx2();
        let policy = Policy::from_bytes(crate::DEFAULT_POLICY, &LoadOptions::default()).unwrap();
        let turn = |latency: f32, usage: f32| LoggedTurn {
            group: 0,
            observation: schema.observation(&[], TaskCategory::Query, latency.into(), usage.into()),
            action: 0,
            propensity: 1.0,
            reward: 0.0,
            latency_secs: 0.0,
            usage_usd: 0.0,
        };
        let turns = vec![turn(30.0, 0.05), turn(0.0, 0.0), turn(30.0, 0.0)];
        let masked = greedy_actions(&policy, &turns, Some(&profile.costs)).unwrap();
        let unmasked = greedy_actions(&policy, &turns, None).unwrap();
        // No budget left: only local is allowed.
        assert_eq!(masked[1], 0);
        assert_eq!(masked[2], 0);
        // The v2 default reads these v1 rows with the TX2 table (the profile's, and the fallback).
        let mut obs = Vec::new();
        for (t, a) in turns.iter().zip(&unmasked) {
            target_observation(policy.schema(), &profile.costs, &t.observation, &mut obs);
            assert_eq!(obs.len(), 37);
            assert_eq!(*a, crate::train::sim::argmax(&policy.scores(&obs).unwrap()));
        }
        // A v2 row keeps its own table for a v2 target and the mask; a v1 target reads its prefix.
        let mut classes = crate::schema::ClassCosts::from_table(&profile.costs);
        classes.latency_secs[4] = 40.0;
        let row = Schema::v2(3, 5).observation_with_costs(&[], TaskCategory::Query, 30.0, 0.05, &classes);
        target_observation(policy.schema(), &profile.costs, &row, &mut obs);
        assert_eq!(obs, row);
        target_observation(&schema, &profile.costs, &row, &mut obs);
        assert_eq!(obs, row[..27]);
        let mut allowed = vec![false; ACTIONS];
        budget_mask(&schema, &profile.costs, &row, &mut allowed);
        assert_eq!(allowed, [true, true, true, true, true, true, true, true, false], "3 views take 40 s");
        let mut allowed = vec![false; ACTIONS];
        budget_mask(&schema, &profile.costs, &turns[0].observation, &mut allowed);
        assert!(allowed[0] && allowed[masked[0]]);
        assert_eq!(masked_argmax(&[1.0, 3.0, 3.0], &[true, false, true]), 2);
        assert_eq!(masked_argmax(&[1.0, 3.0, 3.0], &[false, true, true]), 1);
    }
}
