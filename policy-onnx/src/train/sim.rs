//! The simulator of the TMO paper (arXiv 2502.11007, public code `liangqiyuan/TMO`), written
//! from its stated semantics:
//!
//! - A turn's logged response score is zeroed when the answer contains "sorry", "I don't have"
//!   or "can't" (case-sensitive, as the paper does).
//! - The response score of any (window, action) pair is predicted by k-nearest-neighbour
//!   regression (k = 5, Euclidean) over the training turns' logged windows (Z step vectors)
//!   followed by a 1 + X action code [cloud, m0 .. m(X-1)], each neighbour weighted by
//!   1 / (distance + 1e-6). The model is fitted on the training dialogues only; evaluation on
//!   other dialogues queries that same model (the paper passes the training environment's
//!   regressor to its test environment).
//! - Reward of a turn = w_r response + w_a assoc_norm[a] - w_l latency_norm[a] - w_u usage_norm[a].
//!   assoc_norm is the min-max normalisation, over all A actions, of each action's summed
//!   association scores (0 for local and for cloud text-only); latency_norm and usage_norm are
//!   min-max normalised over the X + 2 cost classes (local, cloud with 0..X modalities).
//! - Evaluation starts each dialogue with the full budgets and rebuilds each next observation
//!   from the agent's own action; budgets are not masked, a dialogue whose total latency or
//!   usage exceeds its budget is counted as over budget.

use std::sync::Arc;

use device_profiles::DeviceProfile;
use serde::Serialize;

use super::knn::KdTree;
use crate::m4a1::Dialogue;
use crate::schema::{Action, ClassCosts, ObservationVersion, Schema, TaskCategory, Turn};

/// Words that make the paper's simulator zero a logged answer's score.
pub const REFUSAL_MARKERS: [&str; 3] = ["sorry", "I don't have", "can't"];
/// Neighbours of the response model.
pub const NEIGHBOURS: usize = 5;
/// Added to each neighbour's distance before inverting it into a weight.
pub const DISTANCE_EPSILON: f64 = 1e-6;

/// Why the simulator cannot be built.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SimError {
    #[error("the profile has {profile} modalities, the dataset's dialogue {dialogue} has {data} views")]
    ModalityMismatch { profile: usize, data: usize, dialogue: u64 },
    #[error("dialogue {dialogue}, turn {turn}: association scores must be finite and >= 0")]
    BadAssociation { dialogue: u64, turn: usize },
    #[error("no training turns: the response model needs at least one")]
    NoTrainingData,
    #[error("the cost table does not separate its cost classes (all {0} are equal)")]
    FlatCosts(&'static str),
}

/// Weights of the reward's four terms (the paper's defaults: 1, 1/3, 1/3, 1/3).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RewardWeights {
    pub response: f64,
    pub association: f64,
    pub latency: f64,
    pub usage: f64,
}

impl Default for RewardWeights {
    fn default() -> Self {
        RewardWeights { response: 1.0, association: 1.0 / 3.0, latency: 1.0 / 3.0, usage: 1.0 / 3.0 }
    }
}

/// Per-action latency and usage, raw and normalised, and the dialogue budgets.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CostModel {
    /// Seconds of one call of action a.
    pub latency_secs: Vec<f64>,
    /// USD of one call of action a.
    pub usage_usd: Vec<f64>,
    /// Min-max normalised over the cost classes (local, cloud with 0..X modalities).
    pub latency_norm: Vec<f64>,
    pub usage_norm: Vec<f64>,
    pub budget_latency_secs: f64,
    pub budget_usage_usd: f64,
    /// The cost classes themselves (what a v2 observation carries).
    pub classes: ClassCosts,
}

impl CostModel {
    /// The cost model of `profile` for the actions of `schema`.
    pub fn new(profile: &DeviceProfile, schema: &Schema) -> Result<Self, SimError> {
        let budgets = (profile.budgets.latency_secs, profile.budgets.cost_usd);
        Self::from_classes(&ClassCosts::from_table(&profile.costs), budgets, schema)
    }

    /// The cost model of the class table `classes` (X + 2 classes) with `budgets` (seconds, USD).
    pub fn from_classes(
        classes: &ClassCosts,
        budgets: (f64, f64),
        schema: &Schema,
    ) -> Result<Self, SimError> {
        debug_assert_eq!(classes.len(), schema.cost_classes());
        let class_latency = &classes.latency_secs;
        let class_usage = &classes.usage_usd;
        let latency_norm_class = min_max(class_latency).ok_or(SimError::FlatCosts("latencies"))?;
        let usage_norm_class = min_max(class_usage).ok_or(SimError::FlatCosts("usages"))?;
        let class_of = |a: Action| match a {
            Action::Local => 0,
            Action::Cloud { modalities } => 1 + modalities.len(),
        };
        let classes_of: Vec<usize> = schema.actions().map(class_of).collect();
        Ok(CostModel {
            latency_secs: classes_of.iter().map(|&c| class_latency[c]).collect(),
            usage_usd: classes_of.iter().map(|&c| class_usage[c]).collect(),
            latency_norm: classes_of.iter().map(|&c| latency_norm_class[c]).collect(),
            usage_norm: classes_of.iter().map(|&c| usage_norm_class[c]).collect(),
            budget_latency_secs: budgets.0,
            budget_usage_usd: budgets.1,
            classes: classes.clone(),
        })
    }
}

/// `(x - min) / (max - min)`; `None` when every value is the same.
pub fn min_max(values: &[f64]) -> Option<Vec<f64>> {
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (hi > lo).then(|| values.iter().map(|v| (v - lo) / (hi - lo)).collect())
}

/// A dialogue as the simulator uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct Episode {
    pub id: u64,
    pub tasks: Vec<TaskCategory>,
    /// Per turn, per action: the summed association scores of the action's modalities.
    pub association: Vec<Vec<f64>>,
    /// Per turn, per action: `association` min-max normalised over the actions (all zero when
    /// the turn's scores are all zero).
    pub association_norm: Vec<Vec<f64>>,
    /// The logged turns (task and action) of the dataset.
    pub logged: Vec<Turn>,
    /// The logged scores, zeroed for refusals.
    pub scores: Vec<f64>,
}

impl Episode {
    pub fn from_dialogue(d: &Dialogue, schema: &Schema) -> Result<Self, SimError> {
        if d.image_paths.len() != schema.modalities() {
            return Err(SimError::ModalityMismatch {
                profile: schema.modalities(),
                data: d.image_paths.len(),
                dialogue: d.id,
            });
        }
        let mut association = Vec::with_capacity(d.interactions.len());
        let mut association_norm = Vec::with_capacity(d.interactions.len());
        for (turn, row) in d.association_score.iter().enumerate() {
            if row.iter().any(|v| !(v.is_finite() && *v >= 0.0)) {
                return Err(SimError::BadAssociation { dialogue: d.id, turn });
            }
            let per_action: Vec<f64> =
                schema.actions().map(|a| a.modalities().indices().map(|m| row[m]).sum()).collect();
            let norm = min_max(&per_action).unwrap_or_else(|| vec![0.0; per_action.len()]);
            association.push(per_action);
            association_norm.push(norm);
        }
        Ok(Episode {
            id: d.id,
            tasks: d.interactions.iter().map(|i| i.task_cat).collect(),
            association,
            association_norm,
            logged: d.interactions.iter().map(|i| i.turn()).collect(),
            scores: d.interactions.iter().map(|i| response_target(&i.answer, i.score)).collect(),
        })
    }

    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }
}

/// The paper's training target for a logged answer: its score, or 0 for a refusal.
pub fn response_target(answer: &str, score: f64) -> f64 {
    if REFUSAL_MARKERS.iter().any(|m| answer.contains(m)) { 0.0 } else { score }
}

/// Builds the episodes of `dialogues`.
pub fn episodes(dialogues: &[Dialogue], schema: &Schema) -> Result<Vec<Episode>, SimError> {
    dialogues.iter().map(|d| Episode::from_dialogue(d, schema)).collect()
}

/// The action code of the response model's features: [cloud, m0 .. m(X-1)].
pub fn action_code(action: Action, modalities: usize, out: &mut [f64]) {
    debug_assert_eq!(out.len(), modalities + 1);
    out[0] = if action.is_cloud() { 1.0 } else { 0.0 };
    for (i, v) in out[1..].iter_mut().enumerate() {
        *v = if action.modalities().contains(i) { 1.0 } else { 0.0 };
    }
}

/// Weighted k-nearest-neighbour regression of the response score on (window, action code).
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseModel {
    dim: usize,
    window_len: usize,
    /// The rows in the paper's order (lexicographic on the reversed columns): its neighbour
    /// search returns what scikit-learn's kd-tree returns on that order.
    tree: KdTree,
    targets: Vec<f64>,
    k: usize,
    /// `codes[a]`: the action code of action a.
    codes: Vec<Vec<f64>>,
}

impl ResponseModel {
    /// Fits the model on the logged turns of `episodes`.
    pub fn fit(episodes: &[Episode], schema: &Schema) -> Result<Self, SimError> {
        let window_len = schema.dialogue_len() - 2;
        let dim = window_len + schema.modalities() + 1;
        let mut rows: Vec<(Vec<f64>, f64)> = Vec::new();
        let mut obs = vec![0.0f32; schema.dialogue_len()];
        for e in episodes {
            for t in 0..e.len() {
                schema.encode_observation(&e.logged[..t], e.tasks[t], 0.0, 0.0, &mut obs);
                let mut row: Vec<f64> = obs[..window_len].iter().map(|&v| f64::from(v)).collect();
                row.resize(dim, 0.0);
                action_code(e.logged[t].action, schema.modalities(), &mut row[window_len..]);
                rows.push((row, e.scores[t]));
            }
        }
        if rows.is_empty() {
            return Err(SimError::NoTrainingData);
        }
        // numpy's lexsort(pairs.T): the last column is the primary key. A stable sort keeps the
        // dataset order among equal rows.
        rows.sort_by(|a, b| {
            a.0.iter()
                .rev()
                .zip(b.0.iter().rev())
                .map(|(x, y)| x.total_cmp(y))
                .find(|o| o.is_ne())
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        let codes = schema
            .actions()
            .map(|a| {
                let mut c = vec![0.0; schema.modalities() + 1];
                action_code(a, schema.modalities(), &mut c);
                c
            })
            .collect();
        Ok(ResponseModel {
            dim,
            window_len,
            tree: KdTree::new(rows.iter().flat_map(|r| r.0.iter().copied()).collect(), dim),
            targets: rows.iter().map(|r| r.1).collect(),
            k: NEIGHBOURS.min(rows.len()),
            codes,
        })
    }

    /// Number of training turns.
    pub fn len(&self) -> usize {
        self.targets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// The predicted response score of `action` (an action index) after the window of an
    /// observation (its first Z (X + 2) values).
    pub fn predict(&self, window: &[f32], action: usize) -> f64 {
        debug_assert!(window.len() >= self.window_len);
        let mut query = Vec::with_capacity(self.dim);
        query.extend(window[..self.window_len].iter().map(|&v| f64::from(v)));
        query.extend_from_slice(&self.codes[action]);
        let (mut num, mut den) = (0.0, 0.0);
        for (d2, row) in self.tree.nearest(&query, self.k) {
            let w = 1.0 / (d2.sqrt() + DISTANCE_EPSILON);
            num += w * self.targets[row];
            den += w;
        }
        num / den
    }
}

/// The simulator: response model, costs, reward weights and the contract's schema.
#[derive(Debug, Clone)]
pub struct Simulator {
    pub schema: Schema,
    pub costs: CostModel,
    /// Shared by the simulators of every cost table ([`Simulator::with_costs`]).
    pub response: Arc<ResponseModel>,
    pub weights: RewardWeights,
}

/// What one turn of an evaluation produced.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StepOutcome {
    pub response: f64,
    /// The action's summed association score (raw, as the paper reports it).
    pub association: f64,
    pub latency_secs: f64,
    pub usage_usd: f64,
    pub reward: f64,
}

impl Simulator {
    /// Fits the response model on `training` and takes the costs and budgets from `profile`.
    pub fn new(training: &[Episode], profile: &DeviceProfile, schema: Schema) -> Result<Self, SimError> {
        Ok(Simulator {
            costs: CostModel::new(profile, &schema)?,
            response: Arc::new(ResponseModel::fit(training, &schema)?),
            schema,
            weights: RewardWeights::default(),
        })
    }

    /// The same dialogues' response model under another cost table and budgets.
    pub fn with_costs(&self, costs: CostModel) -> Simulator {
        Simulator { costs, ..self.clone() }
    }

    /// The reward of `action` at a turn whose observation window is `window`, given that
    /// turn's normalised association scores (or their expectation) `association_norm`.
    pub fn reward(&self, response: f64, association_norm: f64, action: usize) -> f64 {
        let w = &self.weights;
        w.response * response + w.association * association_norm
            - w.latency * self.costs.latency_norm[action]
            - w.usage * self.costs.usage_norm[action]
    }

    /// Plays turn `turn` of `episode` with `action` after the window `window`.
    pub fn step(&self, episode: &Episode, turn: usize, window: &[f32], action: usize) -> StepOutcome {
        let response = self.response.predict(window, action);
        StepOutcome {
            response,
            association: episode.association[turn][action],
            latency_secs: self.costs.latency_secs[action],
            usage_usd: self.costs.usage_usd[action],
            reward: self.reward(response, episode.association_norm[turn][action], action),
        }
    }
}

/// A policy being evaluated: maps an observation to an action index.
pub trait Agent {
    /// The action for `observation`; `rng`-free agents ignore the dialogue boundaries.
    fn act(&mut self, observation: &[f32]) -> Result<usize, AgentError>;

    /// Which observation the agent reads (v2: the simulator's cost table follows the v1 part).
    fn observation_version(&self) -> ObservationVersion {
        ObservationVersion::V1
    }
}

/// Why an agent could not act.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Policy(#[from] crate::runtime::PolicyError),
    #[error("the agent chose action {action}, the schema has {count}")]
    OutOfRange { action: usize, count: usize },
}

/// The arg-max of `scores`, the first one on ties (numpy's `argmax`).
pub fn argmax(scores: &[f32]) -> usize {
    let mut best = 0;
    for (i, s) in scores.iter().enumerate() {
        if *s > scores[best] {
            best = i;
        }
    }
    best
}

/// One evaluated dialogue.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DialogueOutcome {
    pub id: u64,
    pub actions: Vec<usize>,
    /// Mean over turns.
    pub mean_reward: f64,
    pub mean_response: f64,
    pub mean_association: f64,
    pub total_latency_secs: f64,
    pub total_usage_usd: f64,
    pub over_latency_budget: bool,
    pub over_usage_budget: bool,
}

/// Plays `episode` with `agent`, rebuilding each observation from the agent's own actions.
pub fn rollout(
    sim: &Simulator,
    agent: &mut dyn Agent,
    episode: &Episode,
) -> Result<DialogueOutcome, AgentError> {
    let schema = &sim.schema.to_version(agent.observation_version());
    let mut obs = vec![0.0f32; schema.observation_len()];
    let mut turns: Vec<Turn> = Vec::with_capacity(episode.len());
    let (mut latency, mut usage) = (0.0, 0.0);
    let (mut reward, mut response, mut association) = (0.0, 0.0, 0.0);
    let mut actions = Vec::with_capacity(episode.len());
    for t in 0..episode.len() {
        schema.encode(
            &turns,
            episode.tasks[t],
            sim.costs.budget_latency_secs - latency,
            sim.costs.budget_usage_usd - usage,
            &sim.costs.classes,
            &mut obs,
        );
        let a = agent.act(&obs)?;
        let action =
            schema.action(a).ok_or(AgentError::OutOfRange { action: a, count: schema.action_count() })?;
        let step = sim.step(episode, t, &obs, a);
        latency += step.latency_secs;
        usage += step.usage_usd;
        reward += step.reward;
        response += step.response;
        association += step.association;
        actions.push(a);
        turns.push(Turn { task: episode.tasks[t], action });
    }
    let n = episode.len().max(1) as f64;
    Ok(DialogueOutcome {
        id: episode.id,
        actions,
        mean_reward: reward / n,
        mean_response: response / n,
        mean_association: association / n,
        total_latency_secs: latency,
        total_usage_usd: usage,
        over_latency_budget: latency > sim.costs.budget_latency_secs,
        over_usage_budget: usage > sim.costs.budget_usage_usd,
    })
}

/// Always the same action.
#[derive(Debug, Clone, Copy)]
pub struct FixedAgent(pub usize);

impl Agent for FixedAgent {
    fn act(&mut self, _: &[f32]) -> Result<usize, AgentError> {
        Ok(self.0)
    }
}

/// The paper's random baseline: local with probability 1/2, else a uniformly drawn cloud action.
#[derive(Debug)]
pub struct RandomAgent {
    rng: rand_chacha::ChaCha8Rng,
    actions: usize,
}

impl RandomAgent {
    pub fn new(actions: usize, seed: u64) -> Self {
        use rand::SeedableRng;
        RandomAgent { rng: rand_chacha::ChaCha8Rng::seed_from_u64(seed), actions }
    }
}

impl Agent for RandomAgent {
    fn act(&mut self, _: &[f32]) -> Result<usize, AgentError> {
        use rand::Rng;
        if self.actions == 1 || self.rng.random_bool(0.5) {
            Ok(0)
        } else {
            Ok(self.rng.random_range(1..self.actions))
        }
    }
}

/// Any ONNX policy of the contract, arg-max over all actions (the paper's deterministic predict).
#[derive(Debug)]
pub struct OnnxAgent {
    session: crate::runtime::PolicySession,
    scores: Vec<f32>,
    version: ObservationVersion,
}

impl OnnxAgent {
    pub fn new(policy: &crate::runtime::Policy) -> Result<Self, AgentError> {
        Ok(OnnxAgent {
            session: policy.session()?,
            scores: vec![0.0; policy.schema().action_count()],
            version: policy.version(),
        })
    }
}

impl Agent for OnnxAgent {
    fn act(&mut self, observation: &[f32]) -> Result<usize, AgentError> {
        self.session.scores_into(observation, &mut self.scores)?;
        Ok(argmax(&self.scores))
    }

    fn observation_version(&self) -> ObservationVersion {
        self.version
    }
}

/// A v2 network run with its Rust forward pass, arg-max over all actions.
#[derive(Debug)]
pub struct CostAwareAgent<'a>(pub &'a crate::cost_aware::CostAwarePolicy);

impl Agent for CostAwareAgent<'_> {
    fn act(&mut self, observation: &[f32]) -> Result<usize, AgentError> {
        Ok(argmax(&self.0.scores(observation)))
    }

    fn observation_version(&self) -> ObservationVersion {
        ObservationVersion::V2
    }
}

/// An [`crate::mlp::Mlp`] run with its Rust forward pass, arg-max over all actions.
#[derive(Debug)]
pub struct MlpAgent<'a>(pub &'a crate::mlp::Mlp);

impl Agent for MlpAgent<'_> {
    fn act(&mut self, observation: &[f32]) -> Result<usize, AgentError> {
        Ok(argmax(&self.0.forward(observation)))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::Path;

    pub(crate) fn train_dialogues() -> Vec<Dialogue> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/m4a1/m4a1-train.json");
        crate::m4a1::load(&path).unwrap()
    }

    pub(crate) fn tx2() -> DeviceProfile {
        DeviceProfile::builtin("jetson-tx2").unwrap()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn costs_normalise_over_the_cost_classes() {
        let c = CostModel::new(&tx2(), &Schema::default()).unwrap();
        // Latency classes: local 0.0114, cloud 6.46030, 4.76134, 6.24569, 6.98211.
        let span = 6.98211 - 0.0114;
        let expected =
            [0.0, (6.46030 - 0.0114) / span, (4.76134 - 0.0114) / span, (6.24569 - 0.0114) / span, 1.0];
        let class = [0, 1, 2, 2, 2, 3, 3, 3, 4];
        for (a, &k) in class.iter().enumerate() {
            assert!(close(c.latency_norm[a], expected[k]), "action {a}: {}", c.latency_norm[a]);
        }
        assert!(close(c.latency_norm[1], 0.925_142_489_072_131_9));
        let span = 0.01368 - 7.9e-9;
        assert!(close(c.usage_norm[2], (0.005 - 7.9e-9) / span));
        assert_eq!(c.usage_norm[0], 0.0);
        assert_eq!(c.usage_norm[8], 1.0);
        assert_eq!(c.latency_secs[5], 6.24569);
        assert_eq!(c.usage_usd[1], 0.00049);
    }

    #[test]
    fn refusals_score_zero() {
        assert_eq!(response_target("I'm sorry, I cannot see", 0.8), 0.0);
        assert_eq!(response_target("I can't tell", 0.8), 0.0);
        assert_eq!(response_target("I don't have access", 0.8), 0.0);
        // Case-sensitive, as the paper: "Sorry" at the start is not a marker.
        assert_eq!(response_target("Sorry! Here it is", 0.8), 0.8);
        assert_eq!(response_target("Slice the onions", 1.2), 1.2);
    }

    #[test]
    fn association_is_summed_and_normalised_over_actions() {
        let dialogues = train_dialogues();
        let d = dialogues.iter().find(|d| d.id == dialogues[0].id).unwrap();
        let e = Episode::from_dialogue(d, &Schema::default()).unwrap();
        let row = &d.association_score[0];
        let all = row[0] + row[1] + row[2];
        assert_eq!(e.association[0][0], 0.0);
        assert_eq!(e.association[0][1], 0.0);
        assert!(close(e.association[0][6], row[0] + row[2]));
        assert!(close(e.association[0][8], all));
        assert!(close(e.association_norm[0][3], row[1] / all));
        assert_eq!(e.association_norm[0][8], 1.0);
    }

    #[test]
    fn a_logged_turn_with_a_unique_window_predicts_its_own_score() {
        // An exact match weighs 1e6 against neighbours at distance >= 1.
        let schema = Schema::default();
        let eps = episodes(&train_dialogues(), &schema).unwrap();
        let model = ResponseModel::fit(&eps, &schema).unwrap();
        assert_eq!(model.len(), 287);
        let mut matched = 0;
        for e in &eps {
            for t in 0..e.len() {
                let obs = schema.observation(&e.logged[..t], e.tasks[t], 30.0, 0.05);
                let a = schema.action_index(e.logged[t].action).unwrap();
                let twins = eps
                    .iter()
                    .flat_map(|o| (0..o.len()).map(move |u| (o, u)))
                    .filter(|(o, u)| {
                        *u == t && o.tasks[..=t] == e.tasks[..=t] && o.logged[..=t] == e.logged[..=t]
                    })
                    .count();
                if twins == 1 {
                    assert!(
                        (model.predict(&obs, a) - e.scores[t]).abs() < 1e-4,
                        "dialogue {} turn {t}",
                        e.id
                    );
                    matched += 1;
                }
            }
        }
        assert!(matched > 150, "{matched}");
    }

    /// First turn of dialogue 1 (a Recommendation), every action: scikit-learn's values. Several
    /// training rows match some of these queries exactly, so the tie order decides the result.
    #[test]
    fn first_turn_predictions_match_scikit_learn() {
        let schema = Schema::default();
        let eps = episodes(&train_dialogues(), &schema).unwrap();
        let model = ResponseModel::fit(&eps, &schema).unwrap();
        assert_eq!(eps[0].id, 1);
        let obs = schema.observation(&[], eps[0].tasks[0], 30.0, 0.05);
        let expected = [
            0.7666666666666666,
            0.922122847842472,
            1.1876984126984127,
            0.8962664998276815,
            0.9464285515873512,
            1.0969047619047618,
            2.249994910739732,
            0.8221428571428571,
            1.0969047619047618,
        ];
        for (a, e) in expected.iter().enumerate() {
            assert!(
                (model.predict(&obs, a) - e).abs() < 1e-9,
                "action {a}: {} vs {e}",
                model.predict(&obs, a)
            );
        }
    }

    /// 160 queries with random action histories, answered by scikit-learn's kd-tree (the file
    /// says how they were made).
    #[test]
    fn random_histories_match_scikit_learn() {
        #[derive(serde::Deserialize)]
        struct Query {
            tasks: Vec<usize>,
            actions: Vec<usize>,
            action: usize,
            score: f64,
        }
        #[derive(serde::Deserialize)]
        struct File {
            queries: Vec<Query>,
        }
        let file: File = serde_json::from_str(include_str!("testdata/sklearn-knn-m4a1-train.json")).unwrap();
        let schema = Schema::default();
        let eps = episodes(&train_dialogues(), &schema).unwrap();
        let model = ResponseModel::fit(&eps, &schema).unwrap();
        assert_eq!(file.queries.len(), 160);
        for q in &file.queries {
            let task = |i: usize| TaskCategory::from_id(i).unwrap();
            let turns: Vec<Turn> = q
                .actions
                .iter()
                .zip(&q.tasks)
                .map(|(&a, &t)| Turn { task: task(t), action: schema.action(a).unwrap() })
                .collect();
            let obs = schema.observation(&turns, task(*q.tasks.last().unwrap()), 30.0, 0.05);
            let found = model.predict(&obs, q.action);
            assert!(
                (found - q.score).abs() < 1e-9,
                "{:?} {:?} {}: {found} vs {}",
                q.tasks,
                q.actions,
                q.action,
                q.score
            );
        }
    }

    #[test]
    fn rollout_sums_costs_and_flags_budgets() {
        let schema = Schema::default();
        let eps = episodes(&train_dialogues(), &schema).unwrap();
        let sim = Simulator::new(&eps, &tx2(), schema).unwrap();
        let five = eps.iter().find(|e| e.len() == 5).unwrap();
        // Five calls with all three views: 34.9 s and 0.0684 USD, over both budgets.
        let out = rollout(&sim, &mut FixedAgent(8), five).unwrap();
        assert!(close(out.total_latency_secs, 5.0 * 6.98211));
        assert!(close(out.total_usage_usd, 5.0 * 0.01368));
        assert!(out.over_latency_budget && out.over_usage_budget);
        // Five local turns: no association, no cost.
        let out = rollout(&sim, &mut FixedAgent(0), five).unwrap();
        assert!(!out.over_latency_budget && !out.over_usage_budget);
        assert_eq!(out.mean_association, 0.0);
        assert!(close(out.mean_reward, out.mean_response));
        // Two one-view calls fit.
        let two = eps.iter().find(|e| e.len() == 2).unwrap();
        let out = rollout(&sim, &mut FixedAgent(2), two).unwrap();
        assert!(close(out.total_latency_secs, 2.0 * 4.76134));
        assert!(!out.over_latency_budget && !out.over_usage_budget);
    }
}
