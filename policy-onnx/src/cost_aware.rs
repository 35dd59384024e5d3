//! The v2 policy network: a contract v2 observation in, action scores out, in three parts that
//! the exported ONNX graph holds as one:
//!
//! 1. **Cost features**, computed from the observation: each cost class's latency and usage
//!    min-max normalised over the classes (the reward's own cost terms), and how many calls of
//!    each cloud class the remaining budgets still afford once a local answer is kept for every
//!    turn the dialogue may still have, clamped to [0, [`MAX_AFFORDABLE`]]. They are what makes one
//!    network hold across links and boards: the raw table differs by orders of magnitude between
//!    a 4G link and a wired one, these do not.
//! 2. **An MLP** on [observation, features]: the planner's action values, distilled.
//! 3. **The budget rule**: a cloud action whose class no longer fits either remaining budget,
//!    with that local reserve, scores [`MASK_PENALTY`] lower. So the budgets hold by construction
//!    on any cost table, not only where the regression is accurate.
//!
//! The turns still possible are `max_turns` less the turns in the observation's window (slots
//! whose task id is not the -1 padding): `max_turns` is the longest training dialogue.
//! [`CostAwarePolicy::scores`] is the same computation in Rust (training and tests); the
//! export test holds the two together.

use prost::Message;
use serde::Serialize;
use tract_onnx::pb;

use crate::export::{ExportOptions, GraphWriter};
use crate::mlp::Mlp;
use crate::schema::{ObservationVersion, Schema};

/// Largest number of calls of one class the affordability features count.
pub const MAX_AFFORDABLE: f32 = 6.0;
/// How much lower an action that breaks the budget rule scores.
pub const MASK_PENALTY: f32 = 1000.0;
/// Slack below which an action counts as not fitting: seconds, then USD (the observation is f32,
/// the budgets are summed in f64).
pub const LATENCY_MARGIN_SECS: f32 = 1e-4;
pub const USAGE_MARGIN_USD: f32 = 1e-9;
/// Floors of the divisions (a zero-cost class, a flat table).
const SPAN_FLOOR: f32 = 1e-12;
const COST_FLOOR: f32 = 1e-12;

/// Where a v2 observation's parts are, for a schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    modalities: usize,
    history: usize,
    step: usize,
    classes: usize,
    dialogue: usize,
}

impl Layout {
    fn of(schema: &Schema) -> Self {
        Layout {
            modalities: schema.modalities(),
            history: schema.history(),
            step: schema.step_len(),
            classes: schema.cost_classes(),
            dialogue: schema.dialogue_len(),
        }
    }
    fn task(&self, slot: usize) -> usize {
        slot * self.step + self.step - 1
    }
    fn latency_left(&self) -> usize {
        self.dialogue - 2
    }
    fn usage_left(&self) -> usize {
        self.dialogue - 1
    }
    fn class_latency(&self, class: usize) -> usize {
        self.dialogue + class
    }
    fn class_usage(&self, class: usize) -> usize {
        self.dialogue + self.classes + class
    }
    fn observation_len(&self) -> usize {
        self.dialogue + 2 * self.classes
    }
    /// Normalised latency and usage per class, then affordable calls per cloud class by latency
    /// and by usage.
    fn feature_len(&self) -> usize {
        2 * self.classes + 2 * (self.modalities + 1)
    }
}

/// A trained v2 policy: cost features, MLP, budget rule.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CostAwarePolicy {
    #[serde(skip)]
    schema: Schema,
    pub mlp: Mlp,
    /// Longest dialogue the budget rule keeps a local answer for.
    pub max_turns: usize,
}

/// Why a network does not fit the contract.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CostAwareError {
    #[error("the network takes {found} inputs, a v2 observation with its features is {expected}")]
    Inputs { expected: usize, found: usize },
    #[error("the network has {found} outputs for {expected} actions")]
    Outputs { expected: usize, found: usize },
}

impl CostAwarePolicy {
    /// `schema` gives X and Z (its version is taken as v2).
    pub fn new(schema: &Schema, mlp: Mlp, max_turns: usize) -> Result<Self, CostAwareError> {
        let schema = schema.to_version(ObservationVersion::V2);
        let expected = network_inputs(&schema);
        if mlp.inputs() != expected {
            return Err(CostAwareError::Inputs { expected, found: mlp.inputs() });
        }
        if mlp.outputs() != schema.action_count() {
            return Err(CostAwareError::Outputs { expected: schema.action_count(), found: mlp.outputs() });
        }
        Ok(CostAwarePolicy { schema, mlp, max_turns })
    }

    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// The action scores of a v2 observation.
    pub fn scores(&self, observation: &[f32]) -> Vec<f32> {
        let input = network_input(&self.schema, self.max_turns, observation);
        let mut scores = self.mlp.forward(&input);
        apply_budget_rule(&self.schema, self.max_turns, observation, &mut scores);
        scores
    }

    /// The policy as contract v2 ONNX (one input `[N, 37]`, one output `[N, 9]` for X = 3).
    pub fn to_onnx(&self, options: &ExportOptions) -> Vec<u8> {
        let l = Layout::of(&self.schema);
        let mut g = GraphWriter::new();
        let x = options.input_name.clone();
        let n = l.observation_len();
        // Column selections of the observation, as constant matrices.
        let select = |g: &mut GraphWriter, name: &str, columns: &[usize]| {
            let mut m = vec![0.0f32; n * columns.len()];
            for (j, &c) in columns.iter().enumerate() {
                m[c * columns.len() + j] = 1.0;
            }
            let m = g.constant(name, &[n, columns.len()], &m);
            g.node("MatMul", &[&x, &m], &[])
        };
        let tasks: Vec<usize> = (0..l.history).map(|s| l.task(s)).collect();
        let tasks = select(&mut g, "select.tasks", &tasks);
        let latency_left = select(&mut g, "select.latency_left", &[l.latency_left()]);
        let usage_left = select(&mut g, "select.usage_left", &[l.usage_left()]);
        let class_latency: Vec<usize> = (0..l.classes).map(|c| l.class_latency(c)).collect();
        let class_usage: Vec<usize> = (0..l.classes).map(|c| l.class_usage(c)).collect();
        let lat = select(&mut g, "select.class_latency", &class_latency);
        let use_ = select(&mut g, "select.class_usage", &class_usage);
        let local_lat = select(&mut g, "select.local_latency", &[l.class_latency(0)]);
        let local_use = select(&mut g, "select.local_usage", &[l.class_usage(0)]);
        let cloud_lat = select(&mut g, "select.cloud_latency", &class_latency[1..]);
        let cloud_use = select(&mut g, "select.cloud_usage", &class_usage[1..]);

        // Turns in the window: 1 - relu(1 - relu(task + 1)) is 1 for a task id >= 0, 0 for -1.
        let one = g.scalar("one", 1.0);
        let shifted = g.node("Add", &[&tasks, &one], &[]);
        let r = g.node("Relu", &[&shifted], &[]);
        let r = g.node("Sub", &[&one, &r], &[]);
        let r = g.node("Relu", &[&r], &[]);
        let present = g.node("Sub", &[&one, &r], &[]);
        let ones = g.constant("sum.turns", &[l.history, 1], &vec![1.0; l.history]);
        let turns = g.node("MatMul", &[&present, &ones], &[]);
        let max_turns = g.scalar("max_turns", self.max_turns as f32);
        let later = g.node("Sub", &[&max_turns, &turns], &[]);
        let later = g.node("Relu", &[&later], &[]);

        // Min-max normalised class costs.
        let normalised = |g: &mut GraphWriter, v: &str, what: &str| {
            let lo = g.node("ReduceMin", &[v], &[axes_attribute(), keepdims_attribute()]);
            let hi = g.node("ReduceMax", &[v], &[axes_attribute(), keepdims_attribute()]);
            let span = g.node("Sub", &[&hi, &lo], &[]);
            let floor = g.scalar(&format!("{what}.span_floor"), SPAN_FLOOR);
            let span = g.node("Max", &[&span, &floor], &[]);
            let shifted = g.node("Sub", &[v, &lo], &[]);
            g.node("Div", &[&shifted, &span], &[])
        };
        let lat_norm = normalised(&mut g, &lat, "latency");
        let use_norm = normalised(&mut g, &use_, "usage");

        // What each budget has left after a local answer for every later turn.
        let reserve = g.node("Mul", &[&later, &local_lat], &[]);
        let avail_lat = g.node("Sub", &[&latency_left, &reserve], &[]);
        let reserve = g.node("Mul", &[&later, &local_use], &[]);
        let avail_use = g.node("Sub", &[&usage_left, &reserve], &[]);
        let zero = g.scalar("zero", 0.0);
        let cap = g.scalar("max_affordable", MAX_AFFORDABLE);
        let affordable = |g: &mut GraphWriter, avail: &str, per_call: &str, what: &str| {
            let floor = g.scalar(&format!("{what}.cost_floor"), COST_FLOOR);
            let per_call = g.node("Max", &[per_call, &floor], &[]);
            let calls = g.node("Div", &[avail, &per_call], &[]);
            let calls = g.node("Max", &[&calls, &zero], &[]);
            g.node("Min", &[&calls, &cap], &[])
        };
        let afford_lat = affordable(&mut g, &avail_lat, &cloud_lat, "latency");
        let afford_use = affordable(&mut g, &avail_use, &cloud_use, "usage");
        let features = g.node(
            "Concat",
            &[&x, &lat_norm, &use_norm, &afford_lat, &afford_use],
            &[int_attribute("axis", 1)],
        );
        let values = g.mlp(&self.mlp, &features, None);

        // The budget rule: slack of each action's class in each budget, below its margin is out.
        let actions = self.schema.action_count();
        let class_of: Vec<usize> = self.schema.actions().map(crate::schema::ClassCosts::class_of).collect();
        let per_action = |g: &mut GraphWriter, name: &str, class_index: &dyn Fn(usize) -> usize| {
            let mut m = vec![0.0f32; n * actions];
            for (a, &c) in class_of.iter().enumerate() {
                m[class_index(c) * actions + a] = 1.0;
            }
            let m = g.constant(name, &[n, actions], &m);
            g.node("MatMul", &[&x, &m], &[])
        };
        let action_lat = per_action(&mut g, "select.action_latency", &|c| l.class_latency(c));
        let action_use = per_action(&mut g, "select.action_usage", &|c| l.class_usage(c));
        let out_of_budget = |g: &mut GraphWriter, avail: &str, cost: &str, margin: f32, what: &str| {
            let slack = g.node("Sub", &[avail, cost], &[]);
            let margin = g.scalar(&format!("{what}.margin"), margin);
            let short = g.node("Less", &[&slack, &margin], &[]);
            g.node("Cast", &[&short], &[int_attribute("to", pb::tensor_proto::DataType::Float as i64)])
        };
        let short_lat = out_of_budget(&mut g, &avail_lat, &action_lat, LATENCY_MARGIN_SECS, "latency");
        let short_use = out_of_budget(&mut g, &avail_use, &action_use, USAGE_MARGIN_USD, "usage");
        let short = g.node("Max", &[&short_lat, &short_use], &[]);
        let penalty: Vec<f32> = class_of.iter().map(|&c| if c == 0 { 0.0 } else { MASK_PENALTY }).collect();
        let penalty = g.constant("budget_rule.penalty", &[actions], &penalty);
        let penalty = g.node("Mul", &[&short, &penalty], &[]);
        g.named_node("Sub", &[&values, &penalty], &[], &options.output_name);
        g.into_model(options, n, actions).encode_to_vec()
    }
}

/// Inputs of the MLP: the observation and its cost features.
pub fn network_inputs(schema: &Schema) -> usize {
    let l = Layout::of(&schema.to_version(ObservationVersion::V2));
    l.observation_len() + l.feature_len()
}

/// The MLP's input for a v2 observation: the observation, then its cost features.
///
/// # Panics
/// If `observation` is not a v2 observation of `schema`'s shape.
pub fn network_input(schema: &Schema, max_turns: usize, observation: &[f32]) -> Vec<f32> {
    let l = Layout::of(schema);
    assert_eq!(observation.len(), l.observation_len(), "a v2 observation");
    let o = observation;
    let mut out = Vec::with_capacity(l.observation_len() + l.feature_len());
    out.extend_from_slice(o);
    for first in [l.class_latency(0), l.class_usage(0)] {
        let v = &o[first..first + l.classes];
        let lo = v.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let span = (hi - lo).max(SPAN_FLOOR);
        out.extend(v.iter().map(|c| (c - lo) / span));
    }
    let (avail_lat, avail_use) = after_local_reserve(&l, max_turns, o);
    for (avail, first) in [(avail_lat, l.class_latency(1)), (avail_use, l.class_usage(1))] {
        out.extend(
            o[first..first + l.modalities + 1]
                .iter()
                .map(|c| (avail / c.max(COST_FLOOR)).clamp(0.0, MAX_AFFORDABLE)),
        );
    }
    out
}

/// What each budget has left (seconds, USD) once a local answer is kept for every turn the
/// dialogue may still have: `max_turns` less the turns in the window (task slots not -1), the
/// graph's `1 - relu(1 - relu(task + 1))` per slot.
fn after_local_reserve(l: &Layout, max_turns: usize, o: &[f32]) -> (f32, f32) {
    let present = |t: f32| 1.0 - (1.0 - (t + 1.0).max(0.0)).max(0.0);
    let turns: f32 = (0..l.history).map(|s| present(o[l.task(s)])).sum();
    let later = (max_turns as f32 - turns).max(0.0);
    (o[l.latency_left()] - later * o[l.class_latency(0)], o[l.usage_left()] - later * o[l.class_usage(0)])
}

/// Lowers the scores of the cloud actions whose class no longer fits the budgets.
fn apply_budget_rule(schema: &Schema, max_turns: usize, observation: &[f32], scores: &mut [f32]) {
    let l = Layout::of(schema);
    let o = observation;
    let (avail_lat, avail_use) = after_local_reserve(&l, max_turns, o);
    for (score, action) in scores.iter_mut().zip(schema.actions()) {
        let c = crate::schema::ClassCosts::class_of(action);
        if c == 0 {
            continue;
        }
        let short = avail_lat - o[l.class_latency(c)] < LATENCY_MARGIN_SECS
            || avail_use - o[l.class_usage(c)] < USAGE_MARGIN_USD;
        if short {
            *score -= MASK_PENALTY;
        }
    }
}

fn int_attribute(name: &str, value: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i: value,
        ..Default::default()
    }
}

fn axes_attribute() -> pb::AttributeProto {
    pb::AttributeProto {
        name: "axes".into(),
        r#type: pb::attribute_proto::AttributeType::Ints as i32,
        ints: vec![1],
        ..Default::default()
    }
}

fn keepdims_attribute() -> pb::AttributeProto {
    int_attribute("keepdims", 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mlp::Mlp;
    use crate::runtime::{LoadOptions, Policy};
    use crate::schema::{Action, ClassCosts, ModalitySet, TaskCategory, Turn};
    use rand::{Rng, SeedableRng};

    fn wired() -> ClassCosts {
        ClassCosts {
            latency_secs: vec![0.0114, 6.4603, 4.76134, 6.24569, 6.98211],
            usage_usd: vec![7.9e-9, 0.00049, 0.005, 0.00945, 0.01368],
        }
    }

    fn random_policy(seed: u64) -> CostAwarePolicy {
        let schema = Schema::v2(3, 5);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mlp = Mlp::random(
            network_inputs(&schema),
            &[16],
            schema.action_count(),
            crate::mlp::Activation::Relu,
            &mut rng,
        );
        CostAwarePolicy::new(&schema, mlp, 5).unwrap()
    }

    #[test]
    fn features_of_the_design_example() {
        let schema = Schema::v2(3, 5);
        let obs = schema.observation_with_costs(&[], TaskCategory::Query, 30.0, 0.05, &wired());
        let input = network_input(&schema, 5, &obs);
        assert_eq!(input.len(), 37 + 10 + 8);
        assert_eq!(&input[..37], &obs[..]);
        // Latency normalised over [0.0114, 6.98211].
        let span = 6.98211f32 - 0.0114;
        assert_eq!(input[37], 0.0);
        assert!((input[38] - (6.4603 - 0.0114) / span).abs() < 1e-6);
        assert_eq!(input[41], 1.0);
        assert_eq!(input[42], 0.0);
        assert_eq!(input[46], 1.0);
        // First turn of up to five: four local answers kept, 30 - 4 x 0.0114 s left: four calls
        // of text only (6.46 s), six (the cap) of one view, four of two, four of three.
        let left = 30.0f32 - 4.0 * 0.0114;
        assert_eq!(input[47], (left / 6.4603).min(6.0));
        assert_eq!(input[48], 6.0);
        assert!((input[47] - 4.6363).abs() < 1e-3);
        // Usage: 0.05 less four local answers over 0.00049 is over the cap; 0.05 / 0.01368 = 3.65.
        assert_eq!(input[51], 6.0);
        assert!((input[54] - 3.655).abs() < 1e-3);
    }

    #[test]
    fn the_budget_rule_keeps_a_local_answer_for_every_later_turn() {
        let schema = Schema::v2(3, 5);
        let p = random_policy(3);
        let cloud_all = schema.action_index(Action::Cloud { modalities: ModalitySet::all(3) }).unwrap();
        // Third turn (two before), so two later turns keep 2 x 0.0114 s: 7.0 s left fits three
        // views (6.98211 + 0.0228 = 7.005 > 7.0 does not), 7.01 s does.
        let history = [
            Turn { task: TaskCategory::Query, action: Action::Local },
            Turn { task: TaskCategory::Query, action: Action::Local },
        ];
        for (left, fits) in [(7.0, false), (7.01, true)] {
            let obs = schema.observation_with_costs(&history, TaskCategory::Query, left, 0.05, &wired());
            let raw = p.mlp.forward(&network_input(&schema, 5, &obs));
            let scores = p.scores(&obs);
            assert_eq!(scores[0], raw[0], "local is never masked");
            assert_eq!(scores[cloud_all] == raw[cloud_all], fits, "{left} s left");
        }
    }

    /// The exported graph computes what the Rust forward pass does, on random observations and
    /// cost tables, budgets around the rule's edge included.
    #[test]
    fn onnx_export_matches_the_rust_forward_pass() {
        let p = random_policy(11);
        let bytes = p.to_onnx(&ExportOptions::default());
        let policy = Policy::from_bytes(&bytes, &LoadOptions::default()).unwrap();
        assert_eq!(policy.version(), ObservationVersion::V2);
        assert_eq!(policy.schema().observation_len(), 37);
        let schema = p.schema().clone();
        let mut session = policy.session().unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let mut scores = vec![0.0; 9];
        let mut masked = 0;
        for _ in 0..500 {
            let turns: Vec<Turn> = (0..rng.random_range(0..6))
                .map(|_| Turn {
                    task: TaskCategory::ALL[rng.random_range(0..4)],
                    action: schema.action(rng.random_range(0..9)).unwrap(),
                })
                .collect();
            let scale = rng.random_range(0.05..4.0);
            let costs = ClassCosts {
                latency_secs: wired().latency_secs.iter().map(|v| v * scale).collect(),
                usage_usd: wired().usage_usd.iter().map(|v| v * rng.random_range(0.3..3.0)).collect(),
            };
            let task = TaskCategory::ALL[rng.random_range(0..4)];
            let obs = schema.observation_with_costs(
                &turns,
                task,
                rng.random_range(0.0..35.0),
                rng.random_range(0.0..0.06),
                &costs,
            );
            session.scores_into(&obs, &mut scores).unwrap();
            let rust = p.scores(&obs);
            for (a, b) in scores.iter().zip(&rust) {
                assert!((a - b).abs() < 1e-3, "{scores:?} vs {rust:?}");
            }
            masked += rust.iter().filter(|s| **s < -MASK_PENALTY / 2.0).count();
        }
        assert!(masked > 100, "the budget rule was exercised: {masked}");
    }

    #[test]
    fn shapes_are_checked() {
        let schema = Schema::v2(3, 5);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let wrong = Mlp::random(37, &[8], 9, crate::mlp::Activation::Relu, &mut rng);
        assert_eq!(
            CostAwarePolicy::new(&schema, wrong, 5).unwrap_err(),
            CostAwareError::Inputs { expected: 55, found: 37 }
        );
    }
}
