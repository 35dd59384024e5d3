//! The dataset's Arrow schema, and outcome rows to and from record batches.
//!
//! One Parquet row per received version of an outcome row. Every field of a
//! [`TurnOutcome`] has a column (the cloud attempt's fields flattened as `cloud_*`, the action
//! as its kind and modality bit mask, the telemetry as its JSON text), with the device and the
//! time of receipt, and four columns read out of the observation so that data engines need not
//! slice it: the remaining budgets the policy saw and the cost table it was given (contract
//! v2). Integers are signed 64-bit, which every engine reads (Spark has no unsigned types).
//! The partition column `day` (`YYYY-MM-DD`, the UTC day of `created_at_ms`) is in the path,
//! not in the files.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanBuilder, Float32Builder, Float64Builder, Int64Builder, ListBuilder,
    RecordBatch, StringArray, StringBuilder,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Float32Type, Float64Type, Int64Type, Schema, SchemaRef};
use outcome_log::dataset::DatasetRecord;
use outcome_log::{CloudAttempt, ScoreSource, TurnOutcome};
use policy_onnx::schema::{Action, ModalitySet, TaskCategory};

use crate::DataError;

/// Turns of history in an observation (the contracts' Z).
const HISTORY: usize = 5;

fn list_of_f32() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::Float32, true)))
}

/// The columns of every file, in order (without the partition column `day`).
pub fn file_schema() -> SchemaRef {
    use DataType::{Boolean, Float64, Int64, Utf8};
    let f = |name: &str, data_type: DataType, nullable: bool| Field::new(name, data_type, nullable);
    Arc::new(Schema::new(vec![
        f("device_id", Utf8, false),
        f("dialogue_id", Utf8, false),
        f("turn", Int64, false),
        f("received_unix_ms", Int64, false),
        f("created_at_ms", Int64, false),
        f("question", Utf8, false),
        f("task", Utf8, false),
        f("observation", list_of_f32(), false),
        f("action_index", Int64, false),
        f("action_kind", Utf8, false),
        f("action_modalities", Int64, false),
        f("propensity", Float64, false),
        f("policy_version", Utf8, false),
        f("policy_sha256", Utf8, false),
        f("latency_secs", Float64, false),
        f("energy_joules", Float64, true),
        f("cost_usd", Float64, false),
        f("prompt_tokens", Int64, false),
        f("generated_tokens", Int64, false),
        f("answer", Utf8, false),
        f("score", Float64, true),
        f("score_source", Utf8, true),
        f("telemetry", Utf8, false),
        f("route", Utf8, true),
        f("cloud_outcome", Utf8, true),
        f("cloud_detail", Utf8, true),
        f("cloud_wait_secs", Float64, true),
        f("cloud_deadline_secs", Float64, true),
        f("cloud_request_bytes", Int64, true),
        f("cloud_model", Utf8, true),
        f("cloud_backend_latency_ms", Int64, true),
        f("cloud_cost_usd", Float64, true),
        f("text_cut_bytes", Int64, false),
        f("forced", Boolean, false),
        f("budget_latency_secs", Float64, true),
        f("budget_usd", Float64, true),
        f("expected_latency_secs", list_of_f32(), true),
        f("expected_usd", list_of_f32(), true),
    ]))
}

/// What an observation holds besides the history: the remaining budgets (latency s, USD) and,
/// for a v2 observation, the cost table (expected latency and usage of each cost class).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ObservationParts<'a> {
    pub budgets: Option<(f32, f32)>,
    pub costs: Option<(&'a [f32], &'a [f32])>,
}

/// Splits an observation by its width (history Z = 5): `7 X + 16` floats is a v2 observation
/// of X modalities, `5 X + 12` a v1 one. Daemons from 0.2.0 on log v2 observations only, so a
/// width that fits both (37: v2 with 3 modalities or v1 with 5) is read as v2.
pub fn observation_parts(observation: &[f32]) -> ObservationParts<'_> {
    let n = observation.len();
    let split = |modalities: usize| (HISTORY * (modalities + 2), modalities + 2);
    if n >= 23 && (n - 16).is_multiple_of(7) {
        let (history, classes) = split((n - 16) / 7);
        let costs = &observation[history + 2..];
        return ObservationParts {
            budgets: Some((observation[history], observation[history + 1])),
            costs: Some((&costs[..classes], &costs[classes..])),
        };
    }
    if n >= 17 && (n - 12).is_multiple_of(5) {
        let (history, _) = split((n - 12) / 5);
        return ObservationParts {
            budgets: Some((observation[history], observation[history + 1])),
            costs: None,
        };
    }
    ObservationParts { budgets: None, costs: None }
}

fn as_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Builds record batches of the file schema, one row at a time.
#[derive(Debug)]
pub struct RowsBuilder {
    device_id: StringBuilder,
    dialogue_id: StringBuilder,
    turn: Int64Builder,
    received_unix_ms: Int64Builder,
    created_at_ms: Int64Builder,
    question: StringBuilder,
    task: StringBuilder,
    observation: ListBuilder<Float32Builder>,
    action_index: Int64Builder,
    action_kind: StringBuilder,
    action_modalities: Int64Builder,
    propensity: Float64Builder,
    policy_version: StringBuilder,
    policy_sha256: StringBuilder,
    latency_secs: Float64Builder,
    energy_joules: Float64Builder,
    cost_usd: Float64Builder,
    prompt_tokens: Int64Builder,
    generated_tokens: Int64Builder,
    answer: StringBuilder,
    score: Float64Builder,
    score_source: StringBuilder,
    telemetry: StringBuilder,
    route: StringBuilder,
    cloud_outcome: StringBuilder,
    cloud_detail: StringBuilder,
    cloud_wait_secs: Float64Builder,
    cloud_deadline_secs: Float64Builder,
    cloud_request_bytes: Int64Builder,
    cloud_model: StringBuilder,
    cloud_backend_latency_ms: Int64Builder,
    cloud_cost_usd: Float64Builder,
    text_cut_bytes: Int64Builder,
    forced: BooleanBuilder,
    budget_latency_secs: Float64Builder,
    budget_usd: Float64Builder,
    expected_latency_secs: ListBuilder<Float32Builder>,
    expected_usd: ListBuilder<Float32Builder>,
    rows: usize,
}

impl Default for RowsBuilder {
    fn default() -> Self {
        Self::new()
    }
}

fn append_list(list: &mut ListBuilder<Float32Builder>, values: Option<&[f32]>) {
    match values {
        Some(values) => {
            list.values().append_slice(values);
            list.append(true);
        }
        None => list.append(false),
    }
}

impl RowsBuilder {
    pub fn new() -> Self {
        let s = StringBuilder::new;
        let i = Int64Builder::new;
        let x = Float64Builder::new;
        let l = || ListBuilder::new(Float32Builder::new());
        Self {
            device_id: s(),
            dialogue_id: s(),
            turn: i(),
            received_unix_ms: i(),
            created_at_ms: i(),
            question: s(),
            task: s(),
            observation: l(),
            action_index: i(),
            action_kind: s(),
            action_modalities: i(),
            propensity: x(),
            policy_version: s(),
            policy_sha256: s(),
            latency_secs: x(),
            energy_joules: x(),
            cost_usd: x(),
            prompt_tokens: i(),
            generated_tokens: i(),
            answer: s(),
            score: x(),
            score_source: s(),
            telemetry: s(),
            route: s(),
            cloud_outcome: s(),
            cloud_detail: s(),
            cloud_wait_secs: x(),
            cloud_deadline_secs: x(),
            cloud_request_bytes: i(),
            cloud_model: s(),
            cloud_backend_latency_ms: i(),
            cloud_cost_usd: x(),
            text_cut_bytes: i(),
            forced: BooleanBuilder::new(),
            budget_latency_secs: x(),
            budget_usd: x(),
            expected_latency_secs: l(),
            expected_usd: l(),
            rows: 0,
        }
    }

    /// Rows appended since the last [`RowsBuilder::finish`].
    pub fn len(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Appends one received version of a row.
    pub fn push(&mut self, device_id: &str, received_unix_ms: u64, o: &TurnOutcome) {
        self.device_id.append_value(device_id);
        self.dialogue_id.append_value(&o.dialogue_id);
        self.turn.append_value(i64::from(o.turn));
        self.received_unix_ms.append_value(as_i64(received_unix_ms));
        self.created_at_ms.append_value(o.created_at_ms);
        self.question.append_value(&o.question);
        self.task.append_value(o.task.name());
        append_list(&mut self.observation, Some(&o.observation));
        self.action_index.append_value(i64::from(o.action_index));
        self.action_kind.append_value(if o.action.is_cloud() { "cloud" } else { "local" });
        self.action_modalities.append_value(i64::from(o.action.modalities().0));
        self.propensity.append_value(o.propensity);
        self.policy_version.append_value(&o.policy_version);
        self.policy_sha256.append_value(&o.policy_sha256);
        self.latency_secs.append_value(o.latency_secs);
        self.energy_joules.append_option(o.energy_joules);
        self.cost_usd.append_value(o.cost_usd);
        self.prompt_tokens.append_value(i64::from(o.prompt_tokens));
        self.generated_tokens.append_value(i64::from(o.generated_tokens));
        self.answer.append_value(&o.answer);
        self.score.append_option(o.score);
        self.score_source.append_option(o.score_source.map(ScoreSource::as_str));
        self.telemetry.append_value(o.telemetry.to_string());
        self.route.append_option(o.route.as_deref());
        let cloud = o.cloud_attempt.as_ref();
        self.cloud_outcome.append_option(cloud.map(|c| c.outcome.as_str()));
        self.cloud_detail.append_option(cloud.and_then(|c| c.detail.as_deref()));
        self.cloud_wait_secs.append_option(cloud.map(|c| c.wait_secs));
        self.cloud_deadline_secs.append_option(cloud.map(|c| c.deadline_secs));
        self.cloud_request_bytes.append_option(cloud.map(|c| as_i64(c.request_bytes)));
        self.cloud_model.append_option(cloud.and_then(|c| c.model.as_deref()));
        self.cloud_backend_latency_ms.append_option(cloud.and_then(|c| c.backend_latency_ms).map(i64::from));
        self.cloud_cost_usd.append_option(cloud.map(|c| c.cost_usd));
        self.text_cut_bytes.append_value(as_i64(o.text_cut_bytes));
        self.forced.append_value(o.forced);
        let parts = observation_parts(&o.observation);
        self.budget_latency_secs.append_option(parts.budgets.map(|b| f64::from(b.0)));
        self.budget_usd.append_option(parts.budgets.map(|b| f64::from(b.1)));
        append_list(&mut self.expected_latency_secs, parts.costs.map(|c| c.0));
        append_list(&mut self.expected_usd, parts.costs.map(|c| c.1));
        self.rows += 1;
    }

    /// The rows appended so far as one batch; the builder is empty again.
    pub fn finish(&mut self) -> RecordBatch {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.device_id.finish()),
            Arc::new(self.dialogue_id.finish()),
            Arc::new(self.turn.finish()),
            Arc::new(self.received_unix_ms.finish()),
            Arc::new(self.created_at_ms.finish()),
            Arc::new(self.question.finish()),
            Arc::new(self.task.finish()),
            Arc::new(self.observation.finish()),
            Arc::new(self.action_index.finish()),
            Arc::new(self.action_kind.finish()),
            Arc::new(self.action_modalities.finish()),
            Arc::new(self.propensity.finish()),
            Arc::new(self.policy_version.finish()),
            Arc::new(self.policy_sha256.finish()),
            Arc::new(self.latency_secs.finish()),
            Arc::new(self.energy_joules.finish()),
            Arc::new(self.cost_usd.finish()),
            Arc::new(self.prompt_tokens.finish()),
            Arc::new(self.generated_tokens.finish()),
            Arc::new(self.answer.finish()),
            Arc::new(self.score.finish()),
            Arc::new(self.score_source.finish()),
            Arc::new(self.telemetry.finish()),
            Arc::new(self.route.finish()),
            Arc::new(self.cloud_outcome.finish()),
            Arc::new(self.cloud_detail.finish()),
            Arc::new(self.cloud_wait_secs.finish()),
            Arc::new(self.cloud_deadline_secs.finish()),
            Arc::new(self.cloud_request_bytes.finish()),
            Arc::new(self.cloud_model.finish()),
            Arc::new(self.cloud_backend_latency_ms.finish()),
            Arc::new(self.cloud_cost_usd.finish()),
            Arc::new(self.text_cut_bytes.finish()),
            Arc::new(self.forced.finish()),
            Arc::new(self.budget_latency_secs.finish()),
            Arc::new(self.budget_usd.finish()),
            Arc::new(self.expected_latency_secs.finish()),
            Arc::new(self.expected_usd.finish()),
        ];
        self.rows = 0;
        RecordBatch::try_new(file_schema(), columns).expect("the builders follow the file schema")
    }
}

/// The columns of a batch read back (rows, the report's figures), by name and in the types
/// wanted. Engines may hand strings back as views or large strings; they are cast to plain
/// strings first.
pub(crate) struct Columns<'a> {
    batch: &'a RecordBatch,
}

impl<'a> Columns<'a> {
    pub(crate) fn new(batch: &'a RecordBatch) -> Self {
        Self { batch }
    }

    fn get(&self, name: &str) -> Result<&ArrayRef, DataError> {
        self.batch.column_by_name(name).ok_or_else(|| DataError::Schema(format!("no column {name:?}")))
    }

    pub(crate) fn strings(&self, name: &str) -> Result<StringArray, DataError> {
        let column = cast(self.get(name)?, &DataType::Utf8)
            .map_err(|e| DataError::Schema(format!("column {name:?} is not text: {e}")))?;
        Ok(column.as_string::<i32>().clone())
    }

    pub(crate) fn ints(&self, name: &str) -> Result<Vec<Option<i64>>, DataError> {
        let column = cast(self.get(name)?, &DataType::Int64)
            .map_err(|e| DataError::Schema(format!("column {name:?} is not an integer: {e}")))?;
        Ok(column.as_primitive::<Int64Type>().iter().collect())
    }

    pub(crate) fn floats(&self, name: &str) -> Result<Vec<Option<f64>>, DataError> {
        let column = cast(self.get(name)?, &DataType::Float64)
            .map_err(|e| DataError::Schema(format!("column {name:?} is not a number: {e}")))?;
        Ok(column.as_primitive::<Float64Type>().iter().collect())
    }

    fn bools(&self, name: &str) -> Result<Vec<Option<bool>>, DataError> {
        let column = cast(self.get(name)?, &DataType::Boolean)
            .map_err(|e| DataError::Schema(format!("column {name:?} is not a boolean: {e}")))?;
        Ok(column.as_boolean().iter().collect())
    }

    fn float_lists(&self, name: &str) -> Result<Vec<Option<Vec<f32>>>, DataError> {
        let column = cast(self.get(name)?, &list_of_f32())
            .map_err(|e| DataError::Schema(format!("column {name:?} is not a list of numbers: {e}")))?;
        Ok(column
            .as_list::<i32>()
            .iter()
            .map(|item| {
                item.map(|values| {
                    values.as_primitive::<Float32Type>().iter().map(|v| v.unwrap_or(f32::NAN)).collect()
                })
            })
            .collect())
    }
}

/// The rows of a batch of the file schema (any subset of rows, in any column order) as records.
/// A row whose stored values are not an outcome (a task, action or score source unknown to
/// this version, a required value missing) is an error naming the row.
pub fn records_from_batch(batch: &RecordBatch) -> Result<Vec<DatasetRecord>, DataError> {
    let c = Columns::new(batch);
    let device_id = c.strings("device_id")?;
    let dialogue_id = c.strings("dialogue_id")?;
    let turn = c.ints("turn")?;
    let received = c.ints("received_unix_ms")?;
    let created = c.ints("created_at_ms")?;
    let question = c.strings("question")?;
    let task = c.strings("task")?;
    let observation = c.float_lists("observation")?;
    let action_index = c.ints("action_index")?;
    let action_kind = c.strings("action_kind")?;
    let action_modalities = c.ints("action_modalities")?;
    let propensity = c.floats("propensity")?;
    let policy_version = c.strings("policy_version")?;
    let policy_sha256 = c.strings("policy_sha256")?;
    let latency = c.floats("latency_secs")?;
    let energy = c.floats("energy_joules")?;
    let cost = c.floats("cost_usd")?;
    let prompt_tokens = c.ints("prompt_tokens")?;
    let generated_tokens = c.ints("generated_tokens")?;
    let answer = c.strings("answer")?;
    let score = c.floats("score")?;
    let score_source = c.strings("score_source")?;
    let telemetry = c.strings("telemetry")?;
    let route = c.strings("route")?;
    let cloud_outcome = c.strings("cloud_outcome")?;
    let cloud_detail = c.strings("cloud_detail")?;
    let cloud_wait = c.floats("cloud_wait_secs")?;
    let cloud_deadline = c.floats("cloud_deadline_secs")?;
    let cloud_bytes = c.ints("cloud_request_bytes")?;
    let cloud_model = c.strings("cloud_model")?;
    let cloud_backend = c.ints("cloud_backend_latency_ms")?;
    let cloud_cost = c.floats("cloud_cost_usd")?;
    let text_cut = c.ints("text_cut_bytes")?;
    let forced = c.bools("forced")?;

    let text = |a: &StringArray, i: usize| (!a.is_null(i)).then(|| a.value(i).to_owned());
    let mut records = Vec::with_capacity(batch.num_rows());
    for i in 0..batch.num_rows() {
        let fail = |what: String| {
            DataError::Row(format!(
                "row of device {:?}, dialogue {:?}, turn {:?}: {what}",
                text(&device_id, i).unwrap_or_default(),
                text(&dialogue_id, i).unwrap_or_default(),
                turn[i]
            ))
        };
        let need_text = |a: &StringArray, name: &str| text(a, i).ok_or_else(|| fail(format!("no {name}")));
        let need_int = |v: &[Option<i64>], name: &str| v[i].ok_or_else(|| fail(format!("no {name}")));
        let need_u32 = |v: &[Option<i64>], name: &str| {
            need_int(v, name)
                .and_then(|n| u32::try_from(n).map_err(|_| fail(format!("{name} {n} is out of range"))))
        };
        let need_u64 = |v: &[Option<i64>], name: &str| {
            need_int(v, name)
                .and_then(|n| u64::try_from(n).map_err(|_| fail(format!("{name} {n} is negative"))))
        };
        let need_float = |v: &[Option<f64>], name: &str| v[i].ok_or_else(|| fail(format!("no {name}")));

        let task_name = need_text(&task, "task")?;
        let task =
            TaskCategory::from_name(&task_name).ok_or_else(|| fail(format!("unknown task {task_name:?}")))?;
        let modalities = ModalitySet(need_u32(&action_modalities, "action_modalities")?);
        let action = match need_text(&action_kind, "action_kind")?.as_str() {
            "local" => Action::Local,
            "cloud" => Action::Cloud { modalities },
            other => return Err(fail(format!("unknown action kind {other:?}"))),
        };
        let score_source = match text(&score_source, i) {
            Some(name) => Some(name.parse::<ScoreSource>().map_err(fail)?),
            None => None,
        };
        let telemetry_text = need_text(&telemetry, "telemetry")?;
        let telemetry =
            serde_json::from_str(&telemetry_text).map_err(|e| fail(format!("telemetry is not JSON: {e}")))?;
        let cloud_attempt = match text(&cloud_outcome, i) {
            Some(outcome) => Some(CloudAttempt {
                outcome,
                detail: text(&cloud_detail, i),
                wait_secs: need_float(&cloud_wait, "cloud_wait_secs")?,
                deadline_secs: need_float(&cloud_deadline, "cloud_deadline_secs")?,
                request_bytes: need_u64(&cloud_bytes, "cloud_request_bytes")?,
                model: text(&cloud_model, i),
                backend_latency_ms: cloud_backend[i]
                    .map(|ms| {
                        u32::try_from(ms)
                            .map_err(|_| fail(format!("backend latency {ms} ms is out of range")))
                    })
                    .transpose()?,
                cost_usd: need_float(&cloud_cost, "cloud_cost_usd")?,
            }),
            None => None,
        };
        let outcome = TurnOutcome {
            dialogue_id: need_text(&dialogue_id, "dialogue_id")?,
            turn: need_u32(&turn, "turn")?,
            question: need_text(&question, "question")?,
            task,
            observation: observation[i].clone().ok_or_else(|| fail("no observation".into()))?,
            action_index: need_u32(&action_index, "action_index")?,
            action,
            propensity: need_float(&propensity, "propensity")?,
            policy_version: need_text(&policy_version, "policy_version")?,
            policy_sha256: need_text(&policy_sha256, "policy_sha256")?,
            latency_secs: need_float(&latency, "latency_secs")?,
            energy_joules: energy[i],
            cost_usd: need_float(&cost, "cost_usd")?,
            prompt_tokens: need_u32(&prompt_tokens, "prompt_tokens")?,
            generated_tokens: need_u32(&generated_tokens, "generated_tokens")?,
            answer: need_text(&answer, "answer")?,
            score: score[i],
            score_source,
            telemetry,
            route: text(&route, i),
            cloud_attempt,
            created_at_ms: need_int(&created, "created_at_ms")?,
            text_cut_bytes: need_u64(&text_cut, "text_cut_bytes")?,
            forced: forced[i].ok_or_else(|| fail("no forced".into()))?,
        };
        records.push(DatasetRecord {
            device_id: need_text(&device_id, "device_id")?,
            received_unix_ms: need_u64(&received, "received_unix_ms")?,
            outcome,
        });
    }
    Ok(records)
}
