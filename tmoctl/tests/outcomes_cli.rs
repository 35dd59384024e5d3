//! The fleet's dataset end to end, as processes: `tmoctl fleet collect` against a real Mosquitto,
//! killed with SIGKILL between writing a batch and acknowledging it, then restarted; the device
//! sends again; `tmoctl outcomes report` reads each row once, DuckDB reads the same files and
//! agrees, and the same dataset in an S3-compatible store (moto's server on loopback) reports
//! the same through `s3://`.

#[path = "../../fleet/tests/support/mod.rs"]
mod support;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use outcome_log::{ScoreSource, TurnOutcome};
use policy_onnx::schema::Action;
use support::{DeviceClient, batch, outcome};
use tmo_protocol::testing::MosquittoBroker;

const T0: i64 = 1_790_000_000_000; // 2026-09-21T14:13:20Z
const DAY_MS: i64 = 86_400_000;
const WAIT: Duration = Duration::from_secs(30);

fn tmoctl() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tmoctl"));
    command.env_remove("TMO_MQTT_PASSWORD").env_remove("FAILPOINTS").stdin(Stdio::null());
    command
}

fn checked(o: Output) -> String {
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// A child process killed (SIGKILL) when dropped, so nothing outlives a failed test.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn collect(port: u16, dir: &Path, fail_points: Option<&str>) -> Running {
    let mut command = tmoctl();
    command
        .args([
            "fleet",
            "collect",
            "--broker",
            &format!("127.0.0.1:{port}"),
            "--max-age-days",
            "3650",
            "--out",
        ])
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(fail_points) = fail_points {
        command.env("FAILPOINTS", fail_points);
    }
    Running(command.spawn().expect("tmoctl fleet collect starts"))
}

fn data_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|days| {
            days.flatten()
                .filter_map(|d| d.path().read_dir().ok())
                .flat_map(|files| files.flatten())
                .filter(|f| f.file_name().to_string_lossy().ends_with(".parquet"))
                .count()
        })
        .unwrap_or(0)
}

/// 24 rows of 3 dialogues over two days and two policy versions, a third of them local.
fn rows() -> Vec<TurnOutcome> {
    (0..24u32)
        .map(|i| {
            let mut o = outcome(&format!("dlg-{}", i / 8), i % 8, T0 + i64::from(i / 12) * DAY_MS);
            o.policy_version = if i % 2 == 0 { "2026-11-20.1" } else { "2026-11-27.2" }.into();
            o.latency_secs = 1.0 + f64::from(i) / 4.0;
            o.score = Some(f64::from(i % 5) / 4.0);
            if i % 3 == 0 {
                o.action = Action::Local;
                o.action_index = 0;
                o.cloud_attempt = None;
                o.cost_usd = 1e-8;
            }
            o
        })
        .collect()
}

fn report_json(dataset: &str, envs: &[(&str, String)]) -> serde_json::Value {
    let mut command = tmoctl();
    command.args(["outcomes", "report", "--json", "--dataset", dataset]);
    for (k, v) in envs {
        command.env(k, v);
    }
    serde_json::from_str(&checked(command.output().unwrap())).expect("report JSON")
}

fn python(script: &str, args: &[&str]) -> String {
    checked(Command::new("python3").arg("-c").arg(script).args(args).output().expect("python3 runs"))
}

/// DuckDB's own reading of the dataset: the latest version of each row by the documented rule,
/// then per policy version and day: turns, mean score, local share, total cost; and the
/// versions stored.
const DUCKDB: &str = r#"
import duckdb, json, sys
files = sys.argv[1] + "/*/*.parquet"
con = duckdb.connect()
latest = f"""SELECT * FROM read_parquet('{files}', hive_partitioning = true)
  QUALIFY row_number() OVER (PARTITION BY device_id, dialogue_id, turn ORDER BY
    CASE score_source WHEN 'feedback' THEN 3 WHEN 'judge' THEN 2 WHEN 'refusal_heuristic' THEN 1 ELSE 0 END DESC,
    received_unix_ms DESC) = 1"""
rows = con.execute(f"""SELECT policy_version, CAST(day AS VARCHAR), count(*), avg(score),
  avg(CASE WHEN action_kind = 'local' THEN 1.0 ELSE 0.0 END), sum(cost_usd)
  FROM ({latest}) GROUP BY ALL ORDER BY 1, 2""").fetchall()
versions = con.execute(f"SELECT count(*) FROM read_parquet('{files}')").fetchone()[0]
print(json.dumps({"rows": rows, "versions": versions}))
"#;

/// Runs moto's S3 server on a free loopback port until dropped.
struct S3Server {
    _process: Running,
    url: String,
}

impl S3Server {
    fn start() -> S3Server {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let process = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server (pip install 'moto[server]', as scripts/setup does)");
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < WAIT, "moto_server did not listen on {port}");
            std::thread::sleep(Duration::from_millis(100));
        }
        S3Server { _process: Running(process), url: format!("http://127.0.0.1:{port}") }
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT", self.url.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }
}

const UPLOAD: &str = r#"
import boto3, os, sys
url, bucket, prefix, root = sys.argv[1:5]
s3 = boto3.client("s3", endpoint_url=url, aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1")
s3.create_bucket(Bucket=bucket)
for directory, _, files in os.walk(root):
    for name in files:
        path = os.path.join(directory, name)
        s3.upload_file(path, bucket, prefix + "/" + os.path.relpath(path, root))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_survive_a_collector_killed_before_its_ack_and_read_alike_in_tmoctl_duckdb_and_s3() {
    let broker = MosquittoBroker::start().expect("mosquitto");
    let dir = tempfile::tempdir().unwrap();
    let data: PathBuf = dir.path().join("dataset");
    let rows = rows();
    let first = batch("kitchen-1", 1, &rows[..16]);

    // The first collector writes the batch durably, then stops before acknowledging it (a fail
    // point sleeps there) and is killed with SIGKILL.
    let mut killed = collect(broker.port(), &data, Some("collector-after-write=sleep(60000)"));
    let mut device = DeviceClient::connect(broker.port(), "kitchen-1").await;
    let started = Instant::now();
    while data_files(&data) == 0 {
        assert!(started.elapsed() < WAIT, "the collector wrote nothing");
        device.send(&first).await; // until the collector has subscribed
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    killed.0.kill().unwrap();
    killed.0.wait().unwrap();
    assert!(device.next_ack(Duration::from_millis(300)).await.is_none(), "acknowledged before the kill");

    // The device sends it again to the restarted collector, which acknowledges it, then the
    // rest and a rescored row.
    let mut collector = collect(broker.port(), &data, None);
    let started = Instant::now();
    loop {
        assert!(started.elapsed() < WAIT, "the restarted collector never acknowledged");
        device.send(&first).await;
        if let Some(ack) = device.next_ack(Duration::from_secs(2)).await {
            assert_eq!((ack.batch_id, ack.accepted.len()), (1, 16));
            break;
        }
    }
    let mut rescored = rows[4].clone();
    rescored.score = Some(0.0);
    rescored.score_source = Some(ScoreSource::Feedback);
    let mut rest = rows[16..].to_vec();
    rest.push(rescored.clone());
    device.send(&batch("kitchen-1", 2, &rest)).await;
    // (Acks of the first batch's resends may come first.)
    let second = loop {
        let ack = device.next_ack(WAIT).await.expect("ack of the second batch");
        if ack.batch_id == 2 {
            break ack;
        }
    };
    assert_eq!(second.accepted.len(), 9);
    let pid = collector.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let started = Instant::now();
    while collector.0.try_wait().unwrap().is_none() {
        assert!(started.elapsed() < WAIT, "the collector did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(collector);

    // tmoctl: every row once, its latest version.
    let report = report_json(data.to_str().unwrap(), &[]);
    let report = report.as_array().expect("rows");
    let turns: u64 = report.iter().map(|r| r["turns"].as_u64().unwrap()).sum();
    assert_eq!(turns, 24, "{report:?}");
    assert_eq!(report.len(), 4, "two versions on two days: {report:?}");

    // DuckDB reads the same files (Hive partitions) and agrees.
    let duck: serde_json::Value = serde_json::from_str(&python(DUCKDB, &[data.to_str().unwrap()])).unwrap();
    let versions = duck["versions"].as_u64().unwrap();
    assert!(versions >= 16 + 16 + 9, "the killed collector's file and the resent batch: {versions}");
    let duck_rows = duck["rows"].as_array().unwrap();
    assert_eq!(duck_rows.len(), report.len());
    for (ours, theirs) in report.iter().zip(duck_rows) {
        assert_eq!(ours["policy_version"], theirs[0]);
        assert_eq!(ours["day"], theirs[1]);
        assert_eq!(ours["turns"], theirs[2]);
        let close = |a: &serde_json::Value, b: &serde_json::Value| {
            (a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < 1e-9
        };
        assert!(close(&ours["mean_score"], &theirs[3]), "{ours} {theirs}");
        assert!(close(&ours["local_share"], &theirs[4]), "{ours} {theirs}");
        assert!(close(&ours["cost_total_usd"], &theirs[5]), "{ours} {theirs}");
    }
    // The rescored row's new score is in its group's mean.
    let expected_mean: f64 = {
        let group: Vec<f64> = rows
            .iter()
            .filter(|o| {
                o.policy_version == rescored.policy_version && o.created_at_ms == rescored.created_at_ms
            })
            .map(|o| {
                if o.turn == rescored.turn && o.dialogue_id == rescored.dialogue_id {
                    0.0
                } else {
                    o.score.unwrap()
                }
            })
            .collect();
        group.iter().sum::<f64>() / group.len() as f64
    };
    let group = report
        .iter()
        .find(|r| r["policy_version"] == rescored.policy_version.as_str() && r["day"] == "2026-09-21");
    assert!((group.unwrap()["mean_score"].as_f64().unwrap() - expected_mean).abs() < 1e-9);

    // The same files in an S3-compatible store: the same report, and the export reads them too.
    let s3 = S3Server::start();
    python(UPLOAD, &[&s3.url, "fleet", "outcomes/v1", data.to_str().unwrap()]);
    let from_s3 = report_json("s3://fleet/outcomes/v1", &s3.env());
    assert_eq!(from_s3.as_array().unwrap(), report);
    let exported = dir.path().join("m4a1.json");
    let mut export = tmoctl();
    export
        .args(["outcomes", "export", "--dataset", "s3://fleet/outcomes/v1", "--unscored-as-zero", "--out"])
        .arg(&exported);
    for (k, v) in s3.env() {
        export.env(k, v);
    }
    checked(export.output().unwrap());
    let dialogues: serde_json::Value = serde_json::from_slice(&std::fs::read(&exported).unwrap()).unwrap();
    assert_eq!(dialogues.as_array().unwrap().len(), 3);
}

#[test]
fn outcomes_report_draws_charts_and_refuses_bad_locations_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("dataset");
    let mut writer =
        fleet_data::DatasetWriter::open(&data, "t", outcome_log::dataset::TimeWindow::UNBOUNDED).unwrap();
    writer.append_many(&[("kitchen-1".into(), rows())], T0 as u64 + 2 * DAY_MS as u64).unwrap();
    let charts = dir.path().join("charts");
    let table = checked(
        tmoctl()
            .args([
                "outcomes",
                "report",
                "--dataset",
                data.to_str().unwrap(),
                "--charts",
                charts.to_str().unwrap(),
            ])
            .output()
            .unwrap(),
    );
    assert!(
        table.contains("2026-11-20.1") && table.contains("2026-09-22") && table.contains("over budget"),
        "{table}"
    );
    assert_eq!(std::fs::read_dir(&charts).unwrap().count(), 6);

    // The same rows again (resent): two files a day, compacted to one, the report unchanged.
    writer.append_many(&[("kitchen-1".into(), rows())], T0 as u64 + 3 * DAY_MS as u64).unwrap();
    let compacted = checked(
        tmoctl().args(["outcomes", "compact", "--dataset", data.to_str().unwrap()]).output().unwrap(),
    );
    assert!(compacted.contains("2026-09-21: 2 files (24 versions) -> 12 rows"), "{compacted}");
    let again =
        checked(tmoctl().args(["outcomes", "report", "--dataset", data.to_str().unwrap()]).output().unwrap());
    assert_eq!(again, table);

    let missing =
        tmoctl().args(["outcomes", "report", "--dataset", "/nonexistent/dataset"]).output().unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/dataset"));
    let no_font = tmoctl()
        .args(["outcomes", "report", "--dataset", data.to_str().unwrap(), "--charts"])
        .arg(&charts)
        .args(["--font", "/nonexistent/font.ttf"])
        .output()
        .unwrap();
    assert!(!no_font.status.success());
    assert!(
        String::from_utf8_lossy(&no_font.stderr).contains("font"),
        "{}",
        String::from_utf8_lossy(&no_font.stderr)
    );
}
