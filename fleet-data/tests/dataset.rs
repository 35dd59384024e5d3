//! The Parquet dataset on disk: rows round trip with every field, the latest version of a row
//! wins, torn and foreign files are set aside and reported, writers start at once, a JSON-lines
//! dataset converts, and the report's figures are the rows'.

use std::path::Path;
use std::time::{Duration, SystemTime};

use fleet_data::report::ReportRow;
use fleet_data::{DataError, DatasetWriter, OutcomeStore};
use outcome_log::dataset::{DatasetRecord, TimeWindow};
use outcome_log::{CloudAttempt, ScoreSource, TurnOutcome};
use policy_onnx::schema::{Action, ClassCosts, ModalitySet, Schema, TaskCategory, Turn};

const T0: i64 = 1_790_000_000_000; // 2026-09-21T14:13:20Z
const DAY_MS: i64 = 86_400_000;

/// A v2 row (37 floats with the cost table) sent to the cloud with two views.
fn cloud_row(dialogue: &str, turn: u32, created_at_ms: i64) -> TurnOutcome {
    let schema = Schema::v2(3, 5);
    let costs = ClassCosts {
        latency_secs: vec![0.0114, 6.4603, 4.76134, 6.24569, 6.98211],
        usage_usd: vec![7.9e-9, 0.00049, 0.005, 0.00945, 0.01368],
    };
    let history = [Turn { task: TaskCategory::Query, action: Action::Local }];
    let action = Action::Cloud { modalities: ModalitySet::from_indices([0, 2]) };
    TurnOutcome {
        dialogue_id: dialogue.to_owned(),
        turn,
        question: format!("What is in the fridge? (turn {turn}) \u{1F955}"),
        task: TaskCategory::Recommendation,
        observation: schema.observation_with_costs(
            &history,
            TaskCategory::Recommendation,
            24.5,
            0.04,
            &costs,
        ),
        action_index: schema.action_index(action).unwrap() as u32,
        action,
        propensity: 0.85,
        policy_version: "2026-11-20.1".into(),
        policy_sha256: "ab".repeat(32),
        latency_secs: 6.2,
        energy_joules: Some(12.5),
        cost_usd: 0.000_945,
        prompt_tokens: 1210,
        generated_tokens: 48,
        answer: "Carrots, leeks and a piece of cheddar.".into(),
        score: Some(1.0),
        score_source: Some(ScoreSource::RefusalHeuristic),
        telemetry: serde_json::json!({"cpu_percent": 41.5, "temp_c": 52.0, "battery_percent": null}),
        route: None,
        cloud_attempt: Some(CloudAttempt {
            outcome: "answered".into(),
            detail: None,
            wait_secs: 5.9,
            deadline_secs: 24.0,
            request_bytes: 182_344,
            model: Some("gpt-4o-mini".into()),
            backend_latency_ms: Some(5_100),
            cost_usd: 0.000_945,
        }),
        created_at_ms,
        text_cut_bytes: 0,
        forced: false,
    }
}

/// A v1 row (27 floats) answered locally after the cloud failed: every optional field empty or
/// set the other way.
fn local_row(dialogue: &str, turn: u32, created_at_ms: i64) -> TurnOutcome {
    let schema = Schema::new(3, 5);
    TurnOutcome {
        dialogue_id: dialogue.to_owned(),
        turn,
        question: "Set a timer".into(),
        task: TaskCategory::AssistiveSystem,
        observation: schema.observation(&[], TaskCategory::AssistiveSystem, 30.0, 0.05),
        action_index: 0,
        action: Action::Local,
        propensity: 1.0,
        policy_version: "2026-11-27.2".into(),
        policy_sha256: "cd".repeat(32),
        latency_secs: 31.5,
        energy_joules: None,
        cost_usd: 1e-8,
        prompt_tokens: 30,
        generated_tokens: 12,
        answer: String::new(),
        score: None,
        score_source: None,
        telemetry: serde_json::Value::Null,
        route: Some("cloud chosen, unavailable, answered locally".into()),
        cloud_attempt: Some(CloudAttempt {
            outcome: "timeout".into(),
            detail: Some("no reply in 2 s".into()),
            wait_secs: 2.0,
            deadline_secs: 2.0,
            request_bytes: 900,
            model: None,
            backend_latency_ms: None,
            cost_usd: 0.0,
        }),
        created_at_ms,
        text_cut_bytes: 17,
        forced: true,
    }
}

fn writer(dir: &Path, name: &str) -> DatasetWriter {
    DatasetWriter::open(dir, name, TimeWindow::UNBOUNDED).unwrap()
}

fn received(created_at_ms: i64) -> u64 {
    created_at_ms as u64 + 60_000
}

async fn open(dir: &Path) -> OutcomeStore {
    OutcomeStore::open(dir.to_str().unwrap()).await.unwrap()
}

fn data_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for day in std::fs::read_dir(dir).unwrap().flatten() {
        if day.path().is_dir() {
            files.extend(day.path().read_dir().unwrap().flatten().map(|f| f.path()));
        }
    }
    files.sort();
    files
}

#[tokio::test]
async fn rows_round_trip_with_every_field_and_engines_read_the_budgets_and_cost_table() {
    let dir = tempfile::tempdir().unwrap();
    let rows =
        vec![cloud_row("d-1", 0, T0), local_row("d-1", 1, T0 + 1000), cloud_row("d-2", 0, T0 + DAY_MS)];
    let mut w = writer(dir.path(), "collector-1");
    let summary = w.append_many(&[("kitchen-1".into(), rows.clone())], received(T0)).unwrap();
    assert_eq!(summary[0].written, 3);
    // One file per day touched, under Hive partitions; nothing else.
    let files = data_files(dir.path());
    assert_eq!(files.len(), 2, "{files:?}");
    assert!(files[0].starts_with(dir.path().join("day=2026-09-21")), "{files:?}");
    assert!(files[1].starts_with(dir.path().join("day=2026-09-22")), "{files:?}");

    let store = open(dir.path()).await;
    assert!(store.torn_files().is_empty());
    let read = store.latest_records().await.unwrap();
    let expected: Vec<DatasetRecord> = rows
        .iter()
        .map(|o| DatasetRecord {
            device_id: "kitchen-1".into(),
            received_unix_ms: received(T0),
            outcome: o.clone(),
        })
        .collect();
    assert_eq!(read.records, expected);

    // The columns read out of the observation: budgets for v1 and v2, the cost table for v2.
    let batches = store
        .collect(
            "SELECT turn, day, budget_latency_secs, budget_usd, expected_latency_secs[2] AS cloud0, \
             expected_usd[5] AS cloud3_usd, expected_latency_secs IS NULL AS no_costs \
             FROM outcomes ORDER BY dialogue_id, turn",
        )
        .await
        .unwrap();
    let text = datafusion::arrow::util::pretty::pretty_format_batches(&batches).unwrap().to_string();
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("| ") && !l.contains("turn")).collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[0].contains("2026-09-21") && lines[0].contains("24.5") && lines[0].contains("6.4603"),
        "{text}"
    );
    assert!(lines[0].contains("0.01368") && lines[0].contains("false"), "{text}");
    assert!(lines[1].contains("| 30.0 ") && lines[1].contains("true"), "{text}");
    assert!(lines[2].contains("2026-09-22"), "{text}");
}

#[tokio::test]
async fn the_latest_version_of_a_row_wins_by_score_source_then_receipt() {
    let dir = tempfile::tempdir().unwrap();
    let base = cloud_row("d", 0, T0);
    let other = cloud_row("d", 1, T0);
    let version = |score: f64, source: ScoreSource| TurnOutcome {
        score: Some(score),
        score_source: Some(source),
        ..base.clone()
    };
    let device = |rows: Vec<TurnOutcome>| vec![("kitchen-1".to_string(), rows)];
    let mut a = writer(dir.path(), "collector-a");
    let mut b = writer(dir.path(), "collector-b");
    let t = received(T0);
    a.append_many(&device(vec![version(1.0, ScoreSource::RefusalHeuristic), other.clone()]), t).unwrap();
    // Sent again (no ack seen), by another collector: the same version twice.
    b.append_many(&device(vec![version(1.0, ScoreSource::RefusalHeuristic)]), t + 10).unwrap();
    // The judge scores it, then the user: feedback wins over the judge.
    a.append_many(&device(vec![version(0.6, ScoreSource::Judge)]), t + 20).unwrap();
    b.append_many(&device(vec![version(0.2, ScoreSource::Feedback)]), t + 30).unwrap();
    // A late redelivery of the first version (QoS 1 may deliver again) does not undo it.
    a.append_many(&device(vec![version(1.0, ScoreSource::RefusalHeuristic)]), t + 40).unwrap();
    // The same row of another device is another row.
    a.append_many(&[("kitchen-2".to_string(), vec![base.clone()])], t + 50).unwrap();

    let store = open(dir.path()).await;
    assert_eq!(store.version_count().await.unwrap(), 7);
    let read = store.latest_records().await.unwrap();
    let got: Vec<(&str, u32, Option<f64>)> =
        read.records.iter().map(|r| (r.device_id.as_str(), r.outcome.turn, r.outcome.score)).collect();
    assert_eq!(
        got,
        vec![("kitchen-1", 0, Some(0.2)), ("kitchen-1", 1, Some(1.0)), ("kitchen-2", 0, Some(1.0))]
    );
    assert_eq!(read.records[0].received_unix_ms, t + 30);

    // The user changes their mind: a later feedback wins over an earlier one.
    b.append_many(&device(vec![version(0.9, ScoreSource::Feedback)]), t + 60).unwrap();
    let read = open(dir.path()).await.latest_records().await.unwrap();
    assert_eq!(read.records[0].outcome.score, Some(0.9));
    assert_eq!(read.versions, 8);
}

#[tokio::test]
async fn torn_and_foreign_files_are_set_aside_and_reported_and_the_rest_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = writer(dir.path(), "c");
    w.append_many(&[("kitchen-1".into(), vec![cloud_row("d", 0, T0)])], received(T0)).unwrap();
    w.append_many(&[("kitchen-1".into(), vec![cloud_row("d", 1, T0)])], received(T0)).unwrap();
    let files = data_files(dir.path());
    let day = files[0].parent().unwrap().to_owned();
    // A file cut short (a copy stopped half way, damaged storage), an empty one, a Parquet file
    // of another table, and a writer's temporary file and a stray file, which are not data.
    let bytes = std::fs::read(&files[0]).unwrap();
    std::fs::write(day.join("part-cut.parquet"), &bytes[..bytes.len() / 2]).unwrap();
    std::fs::write(day.join("part-empty.parquet"), b"").unwrap();
    let foreign = datafusion::arrow::array::RecordBatch::try_from_iter([(
        "x",
        std::sync::Arc::new(datafusion::arrow::array::Int64Array::from(vec![1, 2])) as _,
    )])
    .unwrap();
    let file = std::fs::File::create(day.join("part-foreign.parquet")).unwrap();
    let mut foreign_writer =
        datafusion::parquet::arrow::ArrowWriter::try_new(file, foreign.schema(), None).unwrap();
    foreign_writer.write(&foreign).unwrap();
    foreign_writer.close().unwrap();
    std::fs::write(day.join(".part-x.parquet.tmp"), &bytes[..100]).unwrap();
    std::fs::write(dir.path().join("README.parquet"), b"not in a day partition").unwrap();

    let store = open(dir.path()).await;
    let mut torn: Vec<(String, String)> = store
        .torn_files()
        .iter()
        .map(|t| (Path::new(&t.path).file_name().unwrap().to_string_lossy().into_owned(), t.reason.clone()))
        .collect();
    torn.sort();
    assert_eq!(torn.len(), 3, "{torn:?}");
    assert_eq!(torn[0].0, "part-cut.parquet");
    assert!(torn[0].1.contains("not a whole Parquet file"), "{torn:?}");
    assert_eq!(torn[1].0, "part-empty.parquet");
    assert_eq!(torn[2].0, "part-foreign.parquet");
    assert!(torn[2].1.contains("no column \"device_id\""), "{torn:?}");
    let read = store.latest_records().await.unwrap();
    assert_eq!(read.records.iter().map(|r| r.outcome.turn).collect::<Vec<_>>(), vec![0, 1]);
    assert_eq!(read.torn.len(), 3);
}

#[tokio::test]
async fn a_writer_starts_without_reading_the_data_and_clears_only_stale_temporary_files() {
    let dir = tempfile::tempdir().unwrap();
    writer(dir.path(), "c").append_many(&[("k".into(), vec![cloud_row("d", 0, T0)])], received(T0)).unwrap();
    let day = dir.path().join("day=2026-09-21");
    let stale = day.join(".part-old.parquet.tmp");
    let fresh = day.join(".part-new.parquet.tmp");
    std::fs::write(&stale, b"half a file").unwrap();
    std::fs::write(&fresh, b"being written").unwrap();
    let two_hours_ago = SystemTime::now() - Duration::from_secs(7200);
    std::fs::File::options().write(true).open(&stale).unwrap().set_modified(two_hours_ago).unwrap();
    // A data file the writer cannot even read does not stop it: it never reads data.
    std::fs::write(day.join("part-garbage.parquet"), b"garbage").unwrap();

    let w = writer(dir.path(), "collector/1 with spaces");
    assert!(!stale.exists() && fresh.exists());
    assert!(w.name().starts_with("collector_1_with_spaces-"), "{}", w.name());
}

#[tokio::test]
async fn rows_outside_the_window_or_invalid_are_refused_and_nothing_of_the_call_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let now = outcome_log::now_ms();
    let mut w = DatasetWriter::open(dir.path(), "c", TimeWindow::days(30)).unwrap();
    let old = cloud_row("d", 1, now - 40 * DAY_MS);
    let err = w.append_many(&[("k".into(), vec![cloud_row("d", 0, now), old])], now as u64).unwrap_err();
    assert!(matches!(&err, DataError::InvalidRow { index: 1, .. }), "{err}");
    assert!(err.to_string().contains("40 days before"), "{err}");
    let mut bad = cloud_row("d", 0, now);
    bad.propensity = 0.0;
    let err = w.append_many(&[("k".into(), vec![bad])], now as u64).unwrap_err();
    assert!(err.to_string().contains("propensity"), "{err}");
    assert!(data_files(dir.path()).is_empty());
    w.append_many(&[("k".into(), vec![cloud_row("d", 0, now)])], now as u64).unwrap();
    assert_eq!(data_files(dir.path()).len(), 1);
}

#[tokio::test]
async fn a_json_lines_dataset_converts_with_the_same_latest_rows() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("jsonl");
    std::fs::create_dir_all(old.join("2026-09-21")).unwrap();
    let first = cloud_row("d", 0, T0);
    let rescored =
        TurnOutcome { score: Some(0.5), score_source: Some(ScoreSource::Feedback), ..first.clone() };
    let lines: String = [(1, &first), (2, &rescored), (3, &local_row("d", 1, T0))]
        .iter()
        .map(|(i, o)| {
            let record = DatasetRecord {
                device_id: "kitchen-1".into(),
                received_unix_ms: received(T0) + i,
                outcome: (*o).clone(),
            };
            format!("{}\n", serde_json::to_string(&record).unwrap())
        })
        .collect::<String>()
        + "{\"device_id\": \"kitchen-1\", \"recei"; // a torn last line
    std::fs::write(old.join("2026-09-21/kitchen-1.jsonl"), lines).unwrap();

    let new = dir.path().join("parquet");
    let conversion = fleet_data::convert::convert_json_lines(&old, &new).unwrap();
    // The JSON-lines reader keeps each row's last line: its latest version.
    assert_eq!((conversion.records, conversion.skipped.len()), (2, 1));
    let read = open(&new).await.latest_records().await.unwrap();
    assert_eq!(read.versions, 2);
    let got: Vec<_> = read.records.iter().map(|r| r.outcome.clone()).collect();
    assert_eq!(got, vec![rescored, local_row("d", 1, T0)]);
}

#[tokio::test]
async fn the_report_gives_each_policy_version_and_day_its_figures_and_charts() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = writer(dir.path(), "c");
    // Day 1, policy A: 4 cloud turns (latency 1, 2, 3, 4 s), one of them rescored.
    let mut a: Vec<TurnOutcome> =
        (0..4).map(|t| TurnOutcome { latency_secs: f64::from(t + 1), ..cloud_row("a", t, T0) }).collect();
    a[3] = text_only(a[3].clone());
    w.append_many(&[("k1".into(), a.clone())], received(T0)).unwrap();
    let mut rescored = a[0].clone();
    rescored.score = Some(0.0);
    rescored.score_source = Some(ScoreSource::Feedback);
    w.append_many(&[("k1".into(), vec![rescored])], received(T0) + 5).unwrap();
    // Day 2, policy B: 2 local turns on two devices, one over its budget, unscored.
    let b = local_row("b", 0, T0 + DAY_MS);
    let b_ok = TurnOutcome { latency_secs: 3.0, ..local_row("b", 1, T0 + DAY_MS) };
    w.append_many(&[("k1".into(), vec![b]), ("k2".into(), vec![b_ok])], received(T0 + DAY_MS)).unwrap();

    let store = open(dir.path()).await;
    let rows = fleet_data::report::report(&store).await.unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    let (ra, rb): (&ReportRow, &ReportRow) = (&rows[0], &rows[1]);
    assert_eq!(
        (ra.policy_version.as_str(), ra.day.as_str(), ra.turns, ra.devices),
        ("2026-11-20.1", "2026-09-21", 4, 1)
    );
    assert_eq!((ra.local_share, ra.cloud_text_share, ra.cloud_attach_share), (0.0, 0.25, 0.75));
    assert_eq!((ra.fallback_rate, ra.forced_share, ra.scored), (0.0, 0.0, 4));
    assert_eq!(ra.mean_score, Some(0.75));
    assert!((ra.latency_p50_secs - 2.5).abs() <= 0.5 && (ra.latency_p99_secs - 4.0).abs() < 0.05, "{ra:?}");
    assert!((ra.cost_total_usd - 4.0 * 0.000_945).abs() < 1e-12, "{ra:?}");
    assert_eq!(ra.budget_exhausted_share, Some(0.0));
    assert_eq!(
        (rb.policy_version.as_str(), rb.day.as_str(), rb.turns, rb.devices),
        ("2026-11-27.2", "2026-09-22", 2, 2)
    );
    assert_eq!((rb.local_share, rb.fallback_rate, rb.forced_share, rb.scored), (1.0, 1.0, 1.0, 0));
    assert_eq!(rb.mean_score, None);
    assert_eq!(rb.budget_exhausted_share, Some(0.5));

    let charts = dir.path().join("charts");
    let font = fleet_data::report::find_font(None).expect("a system font (fonts-dejavu-core)");
    let files = fleet_data::report::draw_charts(&rows, &charts, &font).unwrap();
    assert_eq!(files.len(), 6);
    for file in files {
        let bytes = std::fs::read(&file).unwrap();
        assert!(
            bytes.starts_with(b"\x89PNG") && bytes.len() > 5_000,
            "{}: {} bytes",
            file.display(),
            bytes.len()
        );
    }
}

/// The row as a cloud turn without attachments.
fn text_only(mut row: TurnOutcome) -> TurnOutcome {
    row.action = Action::Cloud { modalities: ModalitySet::EMPTY };
    row.action_index = Schema::v2(3, 5).action_index(row.action).unwrap() as u32;
    row
}

#[tokio::test]
async fn an_empty_or_missing_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let read = open(dir.path()).await.latest_records().await.unwrap();
    assert_eq!((read.records.len(), read.versions), (0, 0));
    assert!(fleet_data::report::report(&open(dir.path()).await).await.unwrap().is_empty());
    let missing = OutcomeStore::open(dir.path().join("nope").to_str().unwrap()).await.unwrap_err();
    assert!(missing.to_string().contains("nope"), "{missing}");
    let bad = OutcomeStore::open("ftp://host/x").await.unwrap_err();
    assert!(bad.to_string().contains("a local directory or an s3:// URL"), "{bad}");
}

#[tokio::test]
async fn compaction_leaves_one_file_a_day_with_the_same_latest_rows() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = writer(dir.path(), "a");
    let mut b = writer(dir.path(), "b");
    let t = received(T0);
    let rows: Vec<TurnOutcome> = (0..5).map(|turn| cloud_row("d", turn, T0)).collect();
    a.append_many(&[("k1".into(), rows[..3].to_vec())], t).unwrap();
    b.append_many(&[("k1".into(), rows.clone())], t + 1).unwrap(); // three sent again
    let rescored =
        TurnOutcome { score: Some(0.1), score_source: Some(ScoreSource::Feedback), ..rows[1].clone() };
    a.append_many(&[("k1".into(), vec![rescored.clone()])], t + 2).unwrap();
    // Another day with one file, and a torn file: both left as they are.
    a.append_many(&[("k2".into(), vec![local_row("e", 0, T0 + DAY_MS)])], t).unwrap();
    let torn = dir.path().join("day=2026-09-21/part-torn.parquet");
    std::fs::write(&torn, b"PAR1 cut short").unwrap();
    let before = open(dir.path()).await.latest_records().await.unwrap();

    let done = fleet_data::compact::compact(dir.path()).await.unwrap();
    assert_eq!(done.len(), 1, "{done:?}");
    assert_eq!(
        (done[0].day.as_str(), done[0].files, done[0].versions, done[0].rows),
        ("2026-09-21", 3, 9, 5)
    );
    let files = data_files(dir.path());
    assert_eq!(files.len(), 3, "the compacted file, the other day's, the torn one: {files:?}");
    assert!(torn.exists());
    let after = open(dir.path()).await.latest_records().await.unwrap();
    assert_eq!(after.records, before.records);
    assert_eq!(after.versions, 6);
    assert_eq!(after.records[1].outcome, rescored);
    // Nothing left to do.
    assert!(fleet_data::compact::compact(dir.path()).await.unwrap().is_empty());
}
