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
//! 3. **The budget rule**: a cloud action scores [`MASK_PENALTY`] lower for each remaining
//!    budget its class no longer fits with that local reserve. So the budgets hold by construction
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
use crate::mlp::{Activation, Dense, Mlp};
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
    #[error("the network's output layer has the activation {0:?}: the scores are its linear output")]
    OutputActivation(Activation),
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
        let output = mlp.layers().last().expect("an MLP has a layer").activation;
        if output != Activation::Identity {
            return Err(CostAwareError::OutputActivation(output));
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
    ///
    /// Laid out for tract's per-node cost: the observation's parts are picked by `Gather` (an
    /// index copy) rather than selection matrices, and both budgets travel together in a
    /// `[N, 1, 2, classes]` block (axis 2: latency, usage), so each step is one node for both;
    /// constants are full-shaped (tract's broadcasting ops cost about three times the
    /// element-wise ones); the budget rule's flags are extra inputs of the output layer.
    pub fn to_onnx(&self, options: &ExportOptions) -> Vec<u8> {
        let l = Layout::of(&self.schema);
        let mut g = GraphWriter::new();
        let x = options.input_name.clone();
        let gather =
            |g: &mut GraphWriter, name: &str, input: &str, dims: &[usize], indices: &[usize], axis: i64| {
                let indices: Vec<i64> = indices.iter().map(|&i| i as i64).collect();
                let indices = g.int_constant(name, dims, &indices);
                g.node("Gather", &[input, &indices], &[int_attribute("axis", axis)])
            };

        // Turns after this one, (max_turns - Z) - sum over the window of clamp(task, -1, 0), as a
        // [N, 1, 2, classes] block like the costs, so that the arithmetic below is element-wise.
        let tasks: Vec<usize> = (0..l.history).map(|s| l.task(s)).collect();
        let tasks = gather(&mut g, "select.tasks", &x, &[l.history], &tasks, 1);
        // Constants are full-shaped: tract runs a binary op on equal shapes faster than one that
        // broadcasts (Clip would become two broadcasting ops).
        let minus_one = g.constant("absent.low", &[1, l.history], &vec![-1.0; l.history]);
        let zero = g.constant("absent.high", &[1, l.history], &vec![0.0; l.history]);
        let absent = g.node("Max", &[&tasks, &minus_one], &[]);
        let absent = g.node("Min", &[&absent, &zero], &[]);
        let count =
            g.constant("later.count", &[l.history, 2 * l.classes], &vec![-1.0; 2 * l.history * l.classes]);
        let beyond = g.constant(
            "later.beyond_window",
            &[2 * l.classes],
            &vec![self.max_turns as f32 - l.history as f32; 2 * l.classes],
        );
        let mut later = g.node("Gemm", &[&absent, &count, &beyond], &[]);
        if self.max_turns < l.history {
            later = g.node("Relu", &[&later], &[]);
        }
        let shape = g.int_constant("shape.block", &[4], &[-1, 1, 2, l.classes as i64]);
        let later = g.node("Reshape", &[&later, &shape], &[]);

        // Per budget (latency, usage) and class: what is left, the local class's cost, the class's
        // cost.
        let block = [1, 2, l.classes];
        let per_budget =
            |latency: usize, usage: usize| [vec![latency; l.classes], vec![usage; l.classes]].concat();
        let left = per_budget(l.latency_left(), l.usage_left());
        let left = gather(&mut g, "select.budgets_left", &x, &block, &left, 1);
        let local = per_budget(l.class_latency(0), l.class_usage(0));
        let local = gather(&mut g, "select.local_costs", &x, &block, &local, 1);
        let costs: Vec<usize> = (0..l.classes)
            .map(|c| l.class_latency(c))
            .chain((0..l.classes).map(|c| l.class_usage(c)))
            .collect();
        let costs = gather(&mut g, "select.class_costs", &x, &block, &costs, 1);

        // What each budget has left after a local answer for every later turn.
        let reserve = g.node("Mul", &[&later, &local], &[]);
        let avail = g.node("Sub", &[&left, &reserve], &[]);

        // Min-max normalised over the classes.
        let lo = g.node("ReduceMin", &[&costs], &[axes_attribute(3), keepdims_attribute()]);
        let hi = g.node("ReduceMax", &[&costs], &[axes_attribute(3), keepdims_attribute()]);
        let span = g.node("Sub", &[&hi, &lo], &[]);
        let span_floor = g.constant("span_floor", &[1, 1, 2, 1], &[SPAN_FLOOR; 2]);
        let span = g.node("Max", &[&span, &span_floor], &[]);
        let shifted = g.node("Sub", &[&costs, &lo], &[]);
        let normalised = g.node("Div", &[&shifted, &span], &[]);

        // Calls each budget affords, per class (the local class's column has no weight).
        let full = |g: &mut GraphWriter, name: &str, value: f32| {
            g.constant(name, &[1, 1, 2, l.classes], &vec![value; 2 * l.classes])
        };
        let cost_floor = full(&mut g, "cost_floor", COST_FLOOR);
        let per_call = g.node("Max", &[&costs, &cost_floor], &[]);
        let calls = g.node("Div", &[&avail, &per_call], &[]);
        let no_calls = full(&mut g, "no_calls", 0.0);
        let calls = g.node("Max", &[&calls, &no_calls], &[]);
        let cap = full(&mut g, "max_affordable", MAX_AFFORDABLE);
        let affordable = g.node("Min", &[&calls, &cap], &[]);

        // [observation, per budget: normalised costs then affordable calls] into the MLP.
        let features = g.node("Concat", &[&normalised, &affordable], &[int_attribute("axis", 3)]);
        let features = g.node("Flatten", &[&features], &[int_attribute("axis", 1)]);
        let input = g.node("Concat", &[&x, &features], &[int_attribute("axis", 1)]);
        let (hidden_layers, output_layer) = self.layers_on_graph_features(&l);
        let mut hidden = input;
        for (i, layer) in hidden_layers.iter().enumerate() {
            hidden = g.dense(i, layer, &hidden, None);
        }

        // The budget rule: the budgets each class no longer fits (what is left below its cost
        // plus the margin), as 0/1 inputs of the output layer, whose weights take MASK_PENALTY
        // off the actions of that class for each (local actions none).
        let margins: Vec<f32> =
            [LATENCY_MARGIN_SECS, USAGE_MARGIN_USD].iter().flat_map(|&m| [m; 1].repeat(l.classes)).collect();
        let margins = g.constant("budget_rule.margins", &[1, 1, 2, l.classes], &margins);
        let needed = g.node("Add", &[&costs, &margins], &[]);
        let short = g.node("Less", &[&avail, &needed], &[]);
        let short =
            g.node("Cast", &[&short], &[int_attribute("to", pb::tensor_proto::DataType::Float as i64)]);
        let short = g.node("Flatten", &[&short], &[int_attribute("axis", 1)]);
        let joined = g.node("Concat", &[&hidden, &short], &[int_attribute("axis", 1)]);
        g.dense(self.mlp.layers().len() - 1, &output_layer, &joined, Some(&options.output_name));
        g.into_model(options, l.observation_len(), self.schema.action_count()).encode_to_vec()
    }

    /// The MLP as the graph runs it: the hidden layers, the first with its columns in the
    /// graph's feature order (the observation, then per budget the normalised costs of every
    /// class and the affordable calls of every class, the local class's affordable calls, not
    /// a network input, with zero weight); and the output layer taking, after the last hidden
    /// layer, which budgets each class no longer fits (`[latency of every class, usage of
    /// every class]`), each worth `-MASK_PENALTY` to the cloud actions of that class.
    fn layers_on_graph_features(&self, l: &Layout) -> (Vec<Dense>, Dense) {
        let observation = l.observation_len();
        let normalised = |budget: usize, class: usize| observation + budget * l.classes + class;
        let affordable = |budget: usize, class: usize| {
            (class > 0).then(|| observation + 2 * l.classes + budget * (l.modalities + 1) + class - 1)
        };
        let columns: Vec<Option<usize>> = (0..observation)
            .map(Some)
            .chain((0..2).flat_map(|b| {
                (0..l.classes)
                    .map(move |c| Some(normalised(b, c)))
                    .chain((0..l.classes).map(move |c| affordable(b, c)))
            }))
            .collect();
        let mut layers = self.mlp.layers().to_vec();
        let mut output = layers.pop().expect("an MLP has a layer");
        let reorder = |first: &mut Dense| {
            first.weights = first
                .weights
                .chunks_exact(first.inputs)
                .flat_map(|row| columns.iter().map(|c| c.map_or(0.0, |c| row[c])).collect::<Vec<_>>())
                .collect();
            first.inputs = columns.len();
        };
        match layers.first_mut() {
            Some(first) => reorder(first),
            None => reorder(&mut output),
        }

        let class_of: Vec<usize> = self.schema.actions().map(crate::schema::ClassCosts::class_of).collect();
        output.weights = output
            .weights
            .chunks_exact(output.inputs)
            .zip(&class_of)
            .flat_map(|(row, &action_class)| {
                let penalty = (0..2 * l.classes).map(move |lane| {
                    let class = lane % l.classes;
                    if class == action_class && class != 0 { -MASK_PENALTY } else { 0.0 }
                });
                row.iter().copied().chain(penalty).collect::<Vec<_>>()
            })
            .collect();
        output.inputs += 2 * l.classes;
        (layers, output)
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
/// dialogue may still have: `max_turns` less the turns in the window (task slots not -1), as the
/// graph computes it: `(max_turns - Z) - sum of clamp(task, -1, 0)`.
fn after_local_reserve(l: &Layout, max_turns: usize, o: &[f32]) -> (f32, f32) {
    let absent: f32 = (0..l.history).map(|s| o[l.task(s)].clamp(-1.0, 0.0)).sum();
    let later = (max_turns as f32 - l.history as f32 - absent).max(0.0);
    (o[l.latency_left()] - later * o[l.class_latency(0)], o[l.usage_left()] - later * o[l.class_usage(0)])
}

/// Lowers the score of a cloud action by [`MASK_PENALTY`] for each budget its class no longer
/// fits: what is left after the local reserve is below the class's cost plus the margin.
fn apply_budget_rule(schema: &Schema, max_turns: usize, observation: &[f32], scores: &mut [f32]) {
    let l = Layout::of(schema);
    let o = observation;
    let (avail_lat, avail_use) = after_local_reserve(&l, max_turns, o);
    let short = |avail: f32, cost: f32, margin: f32| avail < cost + margin;
    for (score, action) in scores.iter_mut().zip(schema.actions()) {
        let c = crate::schema::ClassCosts::class_of(action);
        if c == 0 {
            continue;
        }
        let budgets_short = u8::from(short(avail_lat, o[l.class_latency(c)], LATENCY_MARGIN_SECS))
            + u8::from(short(avail_use, o[l.class_usage(c)], USAGE_MARGIN_USD));
        *score -= MASK_PENALTY * f32::from(budgets_short);
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

fn axes_attribute(axis: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: "axes".into(),
        r#type: pb::attribute_proto::AttributeType::Ints as i32,
        ints: vec![axis],
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
