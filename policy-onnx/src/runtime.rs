//! Loading an ONNX policy with tract: validation against the contract, then scoring.
//!
//! A policy is accepted only when its bytes are a protobuf ONNX model no larger than the
//! configured limit, its one input is float32 `[N, observation_len]` and its one output float32
//! `[N, action_count]`, any manifest it carries names a schema this runtime serves, and its scores
//! on a fixed set of probe observations are all finite.
//!
//! The observation version is the policy's own: its manifest's `schema` (`tmo-obs-v1`,
//! `tmo-obs-v2`), or for a file without one (the paper's exports) its input width: Z (X + 2) + 2
//! is v1, that plus 2 (X + 2) is v2. The board gives X and Z ([`LoadOptions::schema`]). [`PolicySlot`] holds the serving policy and swaps in
//! a new one only after that new one has passed all of this.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::{Arc, RwLock};

use prost::Message;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tract_onnx::pb;
use tract_onnx::prelude::*;

use crate::export::MANIFEST_KEY;
use crate::schema::{ClassCosts, ObservationVersion, Schema, TaskCategory};

/// Default size limit of a policy file: the contract's MLPs are tens of kilobytes.
pub const DEFAULT_MAX_POLICY_BYTES: u64 = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("policy is {size} bytes, over the limit of {limit}")]
    TooLarge { size: u64, limit: u64 },
    #[error("not an ONNX model: {0}")]
    NotOnnx(String),
    #[error("input does not match schema {schema}: {reason}")]
    InputMismatch { schema: ObservationVersion, reason: String },
    #[error("output does not match schema {schema}: {reason}")]
    OutputMismatch { schema: ObservationVersion, reason: String },
    #[error(
        "the policy's manifest names schema `{found}`, this runtime serves `tmo-obs-v1` and `tmo-obs-v2`"
    )]
    SchemaMismatch { found: String },
    #[error("the policy's manifest is not valid JSON: {0}")]
    BadManifest(String),
    #[error("tract cannot prepare the model: {0}")]
    Unrunnable(String),
    #[error("the policy's scores are not finite on probe observation {probe}: {scores:?}")]
    NonFinite { probe: usize, scores: Vec<f32> },
    #[error("observation has {found} values, the schema needs {expected}")]
    ObservationLength { expected: usize, found: usize },
    #[error("policy run failed: {0}")]
    Run(String),
}

/// Limits and expectations applied when loading a policy.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The board's shape (X modalities, Z turns); the observation version is the policy's own.
    pub schema: Schema,
    pub max_bytes: u64,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { schema: Schema::default(), max_bytes: DEFAULT_MAX_POLICY_BYTES }
    }
}

/// What `tmoctl policy inspect` prints.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PolicyInfo {
    pub schema: String,
    pub input_name: String,
    /// Dimensions as written in the file: a number, or the name of a symbolic dimension.
    pub input_shape: Vec<String>,
    pub output_name: String,
    pub output_shape: Vec<String>,
    pub opset: Option<i64>,
    pub parameter_count: u64,
    pub size_bytes: u64,
    pub sha256: String,
    pub producer: String,
    /// The manifest the policy carries in its metadata, if any.
    pub manifest: Option<serde_json::Value>,
}

impl PolicyInfo {
    /// A short version string for logs and outcomes: the manifest's `version` if it has one,
    /// else the first 12 hex digits of the sha256.
    pub fn version(&self) -> String {
        self.manifest
            .as_ref()
            .and_then(|m| m.get("version"))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
            .unwrap_or_else(|| self.sha256[..12].to_owned())
    }
}

type Plan = Arc<TypedRunnableModel>;

/// A validated policy, ready to score observations. Cheap to share across threads; each thread
/// scores through its own [`PolicySession`].
#[derive(Debug)]
pub struct Policy {
    info: PolicyInfo,
    schema: Schema,
    plan: Plan,
}

impl Policy {
    /// Reads and validates a policy file; the size limit is checked before the file is read.
    pub fn from_file(path: &Path, options: &LoadOptions) -> Result<Self, PolicyError> {
        let io = |source| PolicyError::Io { path: path.display().to_string(), source };
        let size = std::fs::metadata(path).map_err(io)?.len();
        if size > options.max_bytes {
            return Err(PolicyError::TooLarge { size, limit: options.max_bytes });
        }
        let bytes = std::fs::read(path).map_err(io)?;
        Self::from_bytes(&bytes, options)
    }

    /// Validates policy bytes and prepares them to run.
    pub fn from_bytes(bytes: &[u8], options: &LoadOptions) -> Result<Self, PolicyError> {
        let size = bytes.len() as u64;
        if size > options.max_bytes {
            return Err(PolicyError::TooLarge { size, limit: options.max_bytes });
        }
        let proto = pb::ModelProto::decode(bytes).map_err(|e| PolicyError::NotOnnx(e.to_string()))?;
        let (info, schema) = describe(&proto, bytes, &options.schema)?;
        // tract is not expected to panic, but a hostile file must not take the daemon down.
        let plan = catch_unwind(AssertUnwindSafe(|| prepare(&proto, &schema)))
            .map_err(|_| PolicyError::Unrunnable("tract panicked while loading the model".into()))??;
        let policy = Policy { info, schema, plan };
        policy.probe()?;
        Ok(policy)
    }

    pub fn info(&self) -> &PolicyInfo {
        &self.info
    }

    /// The board's shape with this policy's observation version.
    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// Which observation this policy reads.
    pub fn version(&self) -> ObservationVersion {
        self.schema.version()
    }

    /// A scoring session: owns tract's per-run state, so one per thread.
    pub fn session(&self) -> Result<PolicySession, PolicyError> {
        let state = TypedSimpleState::new(&self.plan).map_err(|e| PolicyError::Run(e.to_string()))?;
        Ok(PolicySession {
            state,
            observation_len: self.schema.observation_len(),
            action_count: self.schema.action_count(),
        })
    }

    /// Scores one observation (allocates a session; use [`PolicySession`] on hot paths).
    pub fn scores(&self, observation: &[f32]) -> Result<Vec<f32>, PolicyError> {
        let mut out = vec![0.0; self.schema.action_count()];
        self.session()?.scores_into(observation, &mut out)?;
        Ok(out)
    }

    fn probe(&self) -> Result<(), PolicyError> {
        let mut session = self.session()?;
        let mut scores = vec![0.0; self.schema.action_count()];
        for (probe, obs) in probe_observations(&self.schema).iter().enumerate() {
            session.scores_into(obs, &mut scores)?;
            if scores.iter().any(|s| !s.is_finite()) {
                return Err(PolicyError::NonFinite { probe, scores });
            }
        }
        Ok(())
    }
}

/// Per-thread scoring state of a [`Policy`].
pub struct PolicySession {
    state: TypedSimpleState,
    observation_len: usize,
    action_count: usize,
}

impl std::fmt::Debug for PolicySession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicySession")
            .field("observation_len", &self.observation_len)
            .field("action_count", &self.action_count)
            .finish_non_exhaustive()
    }
}

impl PolicySession {
    /// Writes the action scores of `observation` into `out`.
    pub fn scores_into(&mut self, observation: &[f32], out: &mut [f32]) -> Result<(), PolicyError> {
        if observation.len() != self.observation_len {
            return Err(PolicyError::ObservationLength {
                expected: self.observation_len,
                found: observation.len(),
            });
        }
        debug_assert_eq!(out.len(), self.action_count);
        let input = Tensor::from_shape(&[1, self.observation_len], observation).map_err(run_error)?;
        // tract panics on some hostile graphs while running them (found by fuzzing: a Gather
        // whose constant indices are out of range indexes past its input): an error here, for
        // the probe of a pushed policy and for every turn, not a panic of tmod.
        let outputs = catch_unwind(AssertUnwindSafe(|| self.state.run(tvec!(input.into_tvalue()))))
            .map_err(|_| PolicyError::Run("tract panicked while running the policy".into()))?
            .map_err(run_error)?;
        let values = outputs[0].try_as_plain_ram().map_err(run_error)?;
        let values = values.as_slice::<f32>().map_err(run_error)?;
        if values.len() != self.action_count {
            return Err(PolicyError::Run(format!(
                "{} scores for {} actions",
                values.len(),
                self.action_count
            )));
        }
        out.copy_from_slice(values);
        Ok(())
    }
}

fn run_error(e: impl std::fmt::Display) -> PolicyError {
    PolicyError::Run(e.to_string())
}

/// Reads names, shapes, opset, parameters and manifest from the protobuf, checking the contract;
/// returns them with the board's shape at the policy's observation version.
fn describe(
    proto: &pb::ModelProto,
    bytes: &[u8],
    board: &Schema,
) -> Result<(PolicyInfo, Schema), PolicyError> {
    let graph = proto.graph.as_ref().ok_or_else(|| PolicyError::NotOnnx("the model has no graph".into()))?;
    if graph.node.is_empty() {
        return Err(PolicyError::NotOnnx("the graph has no nodes".into()));
    }
    let manifest = match proto.metadata_props.iter().find(|p| p.key == MANIFEST_KEY) {
        None => None,
        Some(p) => Some(
            serde_json::from_str::<serde_json::Value>(&p.value)
                .map_err(|e| PolicyError::BadManifest(e.to_string()))?,
        ),
    };
    let declared = match manifest.as_ref().and_then(|m| m.get("schema")) {
        None => None,
        Some(value) => Some(manifest_version(value)?),
    };
    let initialized: Vec<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs: Vec<&pb::ValueInfoProto> =
        graph.input.iter().filter(|i| !initialized.contains(&i.name.as_str())).collect();
    let version = declared.unwrap_or(ObservationVersion::V1);
    let [input] = inputs.as_slice() else {
        return Err(PolicyError::InputMismatch {
            schema: version,
            reason: format!("{} inputs, expected 1", inputs.len()),
        });
    };
    let [output] = graph.output.as_slice() else {
        return Err(PolicyError::OutputMismatch {
            schema: version,
            reason: format!("{} outputs, expected 1", graph.output.len()),
        });
    };
    // Without a manifest, the input width says which observation the file reads.
    let version = declared.unwrap_or_else(|| {
        let v2 = board.to_version(ObservationVersion::V2);
        if declared_width(input) == Some(v2.observation_len()) { ObservationVersion::V2 } else { version }
    });
    let schema = board.to_version(version);
    let input_shape = check_value(input, schema.observation_len())
        .map_err(|reason| PolicyError::InputMismatch { schema: version, reason })?;
    let output_shape = check_value(output, schema.action_count())
        .map_err(|reason| PolicyError::OutputMismatch { schema: version, reason })?;
    let opset =
        proto.opset_import.iter().find(|o| o.domain.is_empty() || o.domain == "ai.onnx").map(|o| o.version);
    let parameter_count =
        graph.initializer.iter().map(|t| t.dims.iter().map(|d| (*d).max(0) as u64).product::<u64>()).sum();
    let info = PolicyInfo {
        schema: version.tag().to_owned(),
        input_name: input.name.clone(),
        input_shape,
        output_name: output.name.clone(),
        output_shape,
        opset,
        parameter_count,
        size_bytes: bytes.len() as u64,
        sha256: hex::encode(Sha256::digest(bytes)),
        producer: format!("{} {}", proto.producer_name, proto.producer_version).trim().to_owned(),
        manifest,
    };
    Ok((info, schema))
}

/// The observation version a manifest's `schema` names: a tag (`"tmo-obs-v2"`) or a number (2).
fn manifest_version(value: &serde_json::Value) -> Result<ObservationVersion, PolicyError> {
    let version = match value {
        serde_json::Value::String(tag) => ObservationVersion::from_tag(tag),
        serde_json::Value::Number(n) => match n.as_u64() {
            Some(1) => Some(ObservationVersion::V1),
            Some(2) => Some(ObservationVersion::V2),
            _ => None,
        },
        _ => None,
    };
    version.ok_or_else(|| PolicyError::SchemaMismatch {
        found: value.as_str().map_or_else(|| value.to_string(), str::to_owned),
    })
}

/// The feature width an input declares (`[N, width]`), if it declares one.
fn declared_width(value: &pb::ValueInfoProto) -> Option<usize> {
    use pb::tensor_shape_proto::dimension::Value as Dim;
    let Some(pb::type_proto::Value::TensorType(tensor)) =
        value.r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        return None;
    };
    match tensor.shape.as_ref()?.dim.get(1)?.value {
        Some(Dim::DimValue(v)) => usize::try_from(v).ok(),
        _ => None,
    }
}

/// Checks a graph input or output is float32 `[N, features]` where it says so, returning its
/// dimensions as written.
fn check_value(value: &pb::ValueInfoProto, features: usize) -> Result<Vec<String>, String> {
    use pb::tensor_shape_proto::dimension::Value as Dim;
    let Some(pb::type_proto::Value::TensorType(tensor)) =
        value.r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        return Err(format!("`{}` is not a tensor", value.name));
    };
    if tensor.elem_type != pb::tensor_proto::DataType::Float as i32 {
        return Err(format!("`{}` has element type {}, expected float32 (1)", value.name, tensor.elem_type));
    }
    let Some(shape) = tensor.shape.as_ref() else {
        // No declared shape: the shapes tract infers are checked when the plan is built.
        return Ok(Vec::new());
    };
    let dims: Vec<String> = shape
        .dim
        .iter()
        .map(|d| match &d.value {
            Some(Dim::DimValue(v)) => v.to_string(),
            Some(Dim::DimParam(p)) => p.clone(),
            None => "?".to_owned(),
        })
        .collect();
    if dims.len() != 2 {
        return Err(format!("`{}` has shape [{}], expected [N, {features}]", value.name, dims.join(", ")));
    }
    if let Some(Dim::DimValue(v)) = &shape.dim[1].value
        && *v != features as i64
    {
        return Err(format!("`{}` has shape [{}], expected [N, {features}]", value.name, dims.join(", ")));
    }
    Ok(dims)
}

/// Builds tract's plan for a batch of one observation and checks the output shape it infers.
fn prepare(proto: &pb::ModelProto, schema: &Schema) -> Result<Plan, PolicyError> {
    let unrunnable = |e: TractError| PolicyError::Unrunnable(format!("{e:#}"));
    let model = tract_onnx::onnx().model_for_proto_model(proto).map_err(unrunnable)?;
    let model = model
        .with_input_fact(0, f32::fact([1, schema.observation_len()]).into())
        .map_err(unrunnable)?
        .into_optimized()
        .map_err(unrunnable)?;
    let fact = model.output_fact(0).map_err(unrunnable)?;
    let expected = [1, schema.action_count()];
    let concrete = fact.shape.as_concrete().map(<[usize]>::to_vec);
    if fact.datum_type != f32::datum_type() || concrete.as_deref() != Some(&expected[..]) {
        return Err(PolicyError::OutputMismatch {
            schema: schema.version(),
            reason: format!(
                "the graph computes {:?} {:?}, expected f32 {expected:?}",
                fact.datum_type, fact.shape
            ),
        });
    }
    model.into_runnable().map_err(unrunnable)
}

/// Cost tables of the probes: for v2 a fast link, a slow link and a board slower than its link;
/// for v1 (which does not read them) the first only.
pub fn probe_cost_tables(schema: &Schema) -> Vec<ClassCosts> {
    let classes = schema.cost_classes();
    let table = |local: f64, base: f64, per_attachment: f64| ClassCosts {
        latency_secs: (0..classes)
            .map(|c| if c == 0 { local } else { base + per_attachment * (c - 1) as f64 })
            .collect(),
        usage_usd: (0..classes)
            .map(|c| if c == 0 { 1e-8 } else { 0.00049 + 0.0045 * (c - 1) as f64 })
            .collect(),
    };
    let mut tables = vec![table(0.0114, 0.5, 0.6), table(0.0114, 16.6, 1.0), table(1.126, 0.5, 2.0)];
    if schema.version() == ObservationVersion::V1 {
        tables.truncate(1);
    }
    tables
}

/// Fixed observations every policy must score finitely: the first turn of each task with full,
/// half and exhausted budgets, and seeded random dialogues mid-way (for v2, under each of
/// [`probe_cost_tables`]).
pub fn probe_observations(schema: &Schema) -> Vec<Vec<f32>> {
    let tables = probe_cost_tables(schema);
    let mut probes = Vec::new();
    for task in TaskCategory::ALL {
        for (latency, cost) in [(30.0, 0.05), (15.0, 0.025), (0.0, 0.0)] {
            for costs in &tables {
                probes.push(schema.observation_with_costs(&[], task, latency, cost, costs));
            }
        }
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x7470_6f6c);
    for _ in 0..8 {
        let turns: Vec<crate::schema::Turn> = (0..rng.random_range(1..=schema.history()))
            .map(|_| crate::schema::Turn {
                task: TaskCategory::ALL[rng.random_range(0..4)],
                action: schema
                    .action(rng.random_range(0..schema.action_count()))
                    .unwrap_or(crate::Action::Local),
            })
            .collect();
        let task = TaskCategory::ALL[rng.random_range(0..4)];
        let (latency, cost) = (rng.random_range(0.0..30.0), rng.random_range(0.0..0.05));
        for costs in &tables {
            probes.push(schema.observation_with_costs(&turns, task, latency, cost, costs));
        }
    }
    probes
}

/// The serving policy of a process. A candidate replaces it only after it has loaded and
/// validated completely, so a rejected policy never replaces a working one.
#[derive(Debug)]
pub struct PolicySlot {
    current: RwLock<Arc<Policy>>,
}

impl PolicySlot {
    pub fn new(policy: Policy) -> Self {
        PolicySlot { current: RwLock::new(Arc::new(policy)) }
    }

    /// The serving policy.
    pub fn current(&self) -> Arc<Policy> {
        // A poisoned lock still holds a valid Arc: the swap below cannot leave it half-written.
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Validates `bytes` and, only if they pass, makes them the serving policy. Returns the
    /// policy it replaced.
    pub fn replace_with_bytes(
        &self,
        bytes: &[u8],
        options: &LoadOptions,
    ) -> Result<Arc<Policy>, PolicyError> {
        let candidate = Arc::new(Policy::from_bytes(bytes, options)?);
        Ok(self.replace(candidate))
    }

    /// Makes an already validated policy the serving one; returns the previous one.
    pub fn replace(&self, policy: Arc<Policy>) -> Arc<Policy> {
        let mut guard = self.current.write().unwrap_or_else(|e| e.into_inner());
        std::mem::replace(&mut *guard, policy)
    }
}
