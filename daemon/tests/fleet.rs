//! End to end, the fleet loop: a real Mosquitto, three `tmod run` processes with their own device
//! ids in group `kitchens`, the outcome collector (the `fleet` crate, in this process) writing a
//! dataset, and signed policy bundles and commands published on the group's topics. Test names
//! hold `fleet` so that `cargo test --release --workspace -- fleet` selects them. They need
//! mosquitto and the models (as `scripts/test` installs them).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use policy_onnx::export::{ExportOptions, mlp_to_onnx};
use policy_onnx::mlp::{Activation, Dense, Mlp};
use policy_onnx::{Action, Schema};
use tmo_protocol::link::{Link, LinkConfig, LinkSetup, QoS, Subscription};
use tmo_protocol::testing::MosquittoBroker;
use tmo_protocol::{DeviceStatus, GroupName, JsonMessage, PolicyBundle, PolicyManifest, in_canary};
use tmod_api::{AskRequest, Client};

#[path = "support/daemon.rs"]
mod daemon;

use daemon::Daemon;

const WAIT: Duration = Duration::from_secs(90);
const DEVICES: [&str; 3] = ["kitchen-a", "kitchen-b", "kitchen-c"];

fn group() -> GroupName {
    "kitchens".parse().expect("group")
}

/// A real ONNX policy for the x86-dev board: `hidden` ReLU units (their size sets the file's),
/// a bias that prefers answering locally.
fn local_policy(hidden: usize, seed: f32) -> Vec<u8> {
    let schema = Schema::new(3, 5);
    let (inputs, outputs) = (schema.observation_len(), schema.action_count());
    let local = schema.action_index(Action::Local).expect("local");
    let mut bias = vec![-1.0f32; outputs];
    bias[local] = 4.0;
    let first = Dense {
        inputs,
        outputs: hidden,
        weights: (0..inputs * hidden).map(|i| ((i as f32 * 0.37 + seed).sin()) * 0.01).collect(),
        bias: vec![0.0; hidden],
        activation: Activation::Relu,
    };
    let second = Dense {
        inputs: hidden,
        outputs,
        weights: vec![0.001; hidden * outputs],
        bias,
        activation: Activation::Identity,
    };
    mlp_to_onnx(&Mlp::new(vec![first, second]).expect("mlp"), &ExportOptions::default())
}

/// A manifest for group `kitchens`, valid for an hour, with a sequence above every earlier
/// call's (as `tmoctl fleet push` numbers them).
fn manifest(version: &str, onnx: &[u8], canary: Option<u8>) -> PolicyManifest {
    static SEQUENCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let sequence = now_ms().max(SEQUENCE.load(std::sync::atomic::Ordering::SeqCst) + 1);
    SEQUENCE.store(sequence, std::sync::atomic::Ordering::SeqCst);
    PolicyManifest {
        version: version.into(),
        schema: "v1".into(),
        onnx_sha256: String::new(),
        onnx_size_bytes: 0,
        opset: None,
        training_data_sha256: None,
        min_daemon_version: "0.1.0".into(),
        created_unix_ms: now_ms(),
        canary_percent: canary,
        group: group().to_string(),
        devices: Vec::new(),
        sequence,
        expires_unix_ms: now_ms() + 3_600_000,
    }
    .describe(onnx)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Devices of `kitchens` on the broker at `port`, trusting `trusted`. They commit to a pushed
/// policy at once (`trial_decisions = 0`): the trial has its own test.
fn device_config(port: u16, trusted: &str) -> String {
    format!(
        "[model]\nmax_tokens = 8\n\
         [policy]\nmax_bytes = 65536\ntrial_decisions = 0\n\
         [mqtt]\nenabled = true\nhost = \"127.0.0.1\"\nport = {port}\nreconnect_initial_ms = 50\nreconnect_max_ms = 500\n\
         [fleet]\ngroup = \"kitchens\"\ntrusted_keys = [\"{trusted}\"]\nstatus_interval_secs = 1.0\nack_timeout_secs = 5.0\n"
    )
}

/// The fleet manager's view: retained statuses, and a publisher for bundles and commands.
struct Manager {
    link: Link,
    statuses: Arc<Mutex<HashMap<String, DeviceStatus>>>,
}

impl Manager {
    async fn start(port: u16) -> Manager {
        let mut link = Link::start(
            &LinkConfig::new("127.0.0.1", port, "fleet-manager"),
            LinkSetup {
                availability_topic: None,
                subscriptions: vec![Subscription::new("tmo/v1/dev/+/status", QoS::AtLeastOnce)],
            },
        )
        .expect("manager link");
        assert!(link.wait_connected(WAIT).await);
        let statuses = Arc::new(Mutex::new(HashMap::new()));
        let (_, closed) = tokio::sync::mpsc::channel(1);
        let mut incoming = std::mem::replace(&mut link.incoming, closed);
        let seen = statuses.clone();
        tokio::spawn(async move {
            while let Some(message) = incoming.recv().await {
                if let Ok(status) = DeviceStatus::from_json(&message.payload, 1 << 20) {
                    seen.lock().expect("lock").insert(status.device_id.to_string(), status);
                }
            }
        });
        Manager { link, statuses }
    }

    /// Publishes a bundle as `tmoctl fleet push` does (any bundle: broken ones too).
    async fn push(&self, bundle: &PolicyBundle) {
        fleet::publish_bundle(&self.link.publisher(), &group(), bundle, WAIT)
            .await
            .expect("bundle published");
    }

    /// Waits until `check` holds for the latest status of every device in `devices`.
    async fn wait_for(&self, devices: &[&str], what: &str, check: impl Fn(&DeviceStatus) -> bool) {
        let started = Instant::now();
        loop {
            {
                let statuses = self.statuses.lock().expect("lock");
                if devices.iter().all(|d| statuses.get(*d).is_some_and(&check)) {
                    return;
                }
                if started.elapsed() > WAIT {
                    panic!("{what}: not reached; statuses: {statuses:#?}");
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn policy_of(&self, device: &str) -> Option<String> {
        self.statuses.lock().expect("lock").get(device).and_then(|s| s.policy_version.clone())
    }
}

fn refused_with(status: &DeviceStatus, reason: &str) -> bool {
    status
        .last_policy_update
        .as_ref()
        .is_some_and(|u| !u.accepted && u.reason.as_deref().is_some_and(|r| r.contains(reason)))
}

/// The outcome collector (the `fleet` crate) writing into `dataset`, connected.
async fn start_collector(port: u16, dataset: &Path) -> fleet::collector::Collector {
    let collector = fleet::collector::Collector::start(
        &LinkConfig::new("127.0.0.1", port, "collector-1"),
        "collectors".parse().expect("share group"),
        dataset,
    )
    .await
    .expect("collector");
    assert!(collector.wait_connected(WAIT).await, "collector connects");
    collector
}

async fn ask(client: &Client) -> tmod_api::AskResponse {
    let mut request = AskRequest::new(None, "How long should I boil an egg?");
    request.stream = false;
    client.ask(&request, |_| {}).await.expect("ask")
}

/// The latest version of every row of the dataset, as `tmoctl outcomes export --format jsonl`
/// reads it (its query engine is a fleet manager's, not a dependency of tmod's tests).
async fn dataset_rows(dir: &Path) -> Vec<outcome_log::dataset::DatasetRecord> {
    let scratch = tempfile::tempdir().expect("tempdir");
    let out = scratch.path().join("rows.jsonl");
    let export = tmoctl()
        .args(["outcomes", "export", "--format", "jsonl", "--dataset"])
        .arg(dir)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("tmoctl runs");
    let stderr = String::from_utf8_lossy(&export.stderr);
    assert!(export.status.success() && !stderr.contains("set aside"), "{stderr}");
    let text = std::fs::read_to_string(&out).expect("the export");
    text.lines().map(|line| serde_json::from_str(line).expect("a dataset record")).collect()
}

/// Rows in the dataset: their (device, dialogue, turn) keys.
async fn dataset_keys(dir: &Path) -> Vec<(String, String, u32)> {
    let records = dataset_rows(dir).await;
    records.iter().map(|r| (r.device_id.clone(), r.outcome.dialogue_id.clone(), r.outcome.turn)).collect()
}

async fn wait_rows(dir: &Path, rows: usize) -> Vec<(String, String, u32)> {
    let started = Instant::now();
    loop {
        let keys = dataset_keys(dir).await;
        if keys.len() >= rows || started.elapsed() > WAIT {
            assert_eq!(keys.len(), rows, "{keys:?}");
            return keys;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_uploads_outcomes_and_pushes_verified_policies_to_a_group() {
    let mut broker = MosquittoBroker::start().expect("mosquitto (apt-get install mosquitto)");
    let port = broker.port();
    let key = SigningKey::from_bytes(&[7; 32]);
    let stranger = SigningKey::from_bytes(&[9; 32]);
    let trusted = hex::encode(key.verifying_key().to_bytes());

    let dataset = tempfile::tempdir().expect("tempdir");
    let collector = start_collector(port, dataset.path()).await;
    let manager = Manager::start(port).await;

    let states: Vec<tempfile::TempDir> =
        DEVICES.iter().map(|_| tempfile::tempdir().expect("tempdir")).collect();
    let config = device_config(port, &trusted);
    let mut daemons: Vec<Daemon> =
        DEVICES.iter().zip(&states).map(|(id, state)| Daemon::start_as(state.path(), id, &config)).collect();
    manager.wait_for(&DEVICES, "every device reports", |s| s.online && s.policy_version.is_some()).await;
    let built_in = manager.policy_of(DEVICES[0]).expect("version");

    // Outcomes: one turn per device reaches the collector once, and is marked uploaded.
    let mut first_dialogues = Vec::new();
    for daemon in &daemons {
        first_dialogues.push(ask(&daemon.client()).await.decision.dialogue_id);
    }
    let keys = wait_rows(dataset.path(), 3).await;
    let devices: HashSet<&str> = keys.iter().map(|k| k.0.as_str()).collect();
    assert_eq!(devices, DEVICES.into_iter().collect());
    manager.wait_for(&DEVICES, "uploads acknowledged", |s| s.counters.outcomes_uploaded == 1).await;

    // The user rates an answer after its upload: the row goes again and its new version wins.
    let feedback = tmod_api::FeedbackRequest { dialogue_id: first_dialogues[0].clone(), turn: 0, score: 0.8 };
    daemons[0].client().feedback(&feedback).await.expect("feedback");
    let started = Instant::now();
    loop {
        let dataset = dataset_rows(dataset.path()).await;
        let rated = dataset.iter().find(|r| r.outcome.dialogue_id == first_dialogues[0]).expect("row");
        if rated.outcome.score == Some(0.8) {
            assert_eq!(rated.outcome.score_source.map(|s| s.as_str()), Some("feedback"));
            assert_eq!(dataset.len(), 3);
            break;
        }
        assert!(
            started.elapsed() < WAIT,
            "the rated row did not reach the dataset: {:?}",
            rated.outcome.score
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Bad bundles are refused by every device, with the reason, and the old policy serves on.
    let good_onnx = local_policy(16, 1.0);
    let by_stranger =
        PolicyBundle::sign(&manifest("p-stranger", &good_onnx, None), good_onnx.clone(), &stranger)
            .expect("sign");
    let mut flipped =
        PolicyBundle::sign(&manifest("p-flipped", &good_onnx, None), good_onnx.clone(), &key).expect("sign");
    flipped.onnx[100] ^= 0x01;
    let other_schema = PolicyBundle::sign(
        &PolicyManifest { schema: "v2".into(), ..manifest("p-v2", &good_onnx, None) },
        good_onnx.clone(),
        &key,
    )
    .expect("sign");
    let big_onnx = local_policy(700, 2.0);
    assert!(big_onnx.len() > 65536, "{} bytes", big_onnx.len());
    let too_big = PolicyBundle::sign(&manifest("p-big", &big_onnx, None), big_onnx, &key).expect("sign");
    // Bundles made for another group, expired, or without their binding (an older tmoctl's).
    let bound = |version: &str, change: &dyn Fn(&mut PolicyManifest)| {
        let mut m = manifest(version, &good_onnx, None);
        change(&mut m);
        PolicyBundle::sign(&m, good_onnx.clone(), &key).expect("sign")
    };
    let other_group = bound("p-labs", &|m| m.group = "labs".into());
    let other_devices = bound("p-others", &|m| m.devices = vec!["kitchen-z".into()]);
    let expired = bound("p-expired", &|m| m.expires_unix_ms = now_ms() - 1);
    let unbound = bound("p-unbound", &|m| (m.group, m.sequence, m.expires_unix_ms) = (String::new(), 0, 0));
    for (bundle, reason) in [
        (&by_stranger, "not trusted"),
        (&flipped, "sha256"),
        (&other_schema, "schema"),
        (&too_big, "size"),
        (&other_group, "for group \"labs\""),
        (&other_devices, "named devices"),
        (&expired, "expired"),
        (&unbound, "names no group"),
    ] {
        manager.push(bundle).await;
        manager.wait_for(&DEVICES, reason, |s| refused_with(s, reason)).await;
        for device in DEVICES {
            assert_eq!(manager.policy_of(device).as_deref(), Some(built_in.as_str()), "{reason}");
        }
    }
    assert_eq!(ask(&daemons[0].client()).await.decision.policy_version, built_in);

    // A good bundle is adopted by all.
    let v1 =
        PolicyBundle::sign(&manifest("fleet-v1", &good_onnx, None), good_onnx.clone(), &key).expect("sign");
    manager.push(&v1).await;
    manager.wait_for(&DEVICES, "v1 adopted", |s| s.policy_version.as_deref() == Some("fleet-v1")).await;
    assert_eq!(ask(&daemons[1].client()).await.decision.policy_version, "fleet-v1");
    manager
        .wait_for(&DEVICES, "previous kept", |s| {
            s.previous_policy_version.as_deref() == Some(built_in.as_str())
        })
        .await;

    // A canary push reaches only its share of the group, chosen by device id.
    let v2_onnx = local_policy(16, 3.0);
    let version = (0..100)
        .map(|n| format!("fleet-v2-canary-{n}"))
        .find(|v| {
            let takers = DEVICES.iter().filter(|d| in_canary(&d.parse().expect("id"), v, 50)).count();
            takers == 1 || takers == 2
        })
        .expect("a version splitting the group");
    let takers: Vec<&str> =
        DEVICES.into_iter().filter(|d| in_canary(&d.parse().expect("id"), &version, 50)).collect();
    let others: Vec<&str> = DEVICES.into_iter().filter(|d| !takers.contains(d)).collect();
    let v2 =
        PolicyBundle::sign(&manifest(&version, &v2_onnx, Some(50)), v2_onnx.clone(), &key).expect("sign");
    manager.push(&v2).await;
    manager
        .wait_for(&takers, "canary adopted", |s| s.policy_version.as_deref() == Some(version.as_str()))
        .await;
    manager.wait_for(&others, "canary skipped", |s| refused_with(s, "canary")).await;
    for device in &others {
        assert_eq!(manager.policy_of(device).as_deref(), Some("fleet-v1"));
    }
    // Widening the canary (the same version pushed again for the whole group) reaches the
    // devices left out, while they stay online.
    let widened = PolicyBundle::sign(&manifest(&version, &v2_onnx, Some(100)), v2_onnx, &key).expect("sign");
    manager.push(&widened).await;
    manager
        .wait_for(&DEVICES, "widened canary adopted", |s| {
            s.policy_version.as_deref() == Some(version.as_str())
        })
        .await;

    // Rollback to v1, as `tmoctl fleet rollback` makes it: v1 signed again under a newer
    // sequence, replacing the retained bundle. Every device goes back, and stays back across a
    // restart (the retained bundle is the rollback).
    let rollback =
        PolicyBundle::sign(&manifest("fleet-v1", &good_onnx, None), good_onnx, &key).expect("sign");
    manager.push(&rollback).await;
    manager.wait_for(&DEVICES, "rolled back", |s| s.policy_version.as_deref() == Some("fleet-v1")).await;
    daemons[0].kill();
    daemons[0] = Daemon::start_as(states[0].path(), DEVICES[0], &config);
    assert_eq!(ask(&daemons[0].client()).await.decision.policy_version, "fleet-v1");
    // The bundle it replaced, published again (a replay by anyone who can publish on the
    // topic), is refused by every device, the restarted one too: the mark is on disk.
    manager.push(&widened).await;
    manager.wait_for(&DEVICES, "replay refused", |s| refused_with(s, "not above")).await;
    for device in DEVICES {
        assert_eq!(manager.policy_of(device).as_deref(), Some("fleet-v1"), "{device}");
    }
    assert_eq!(ask(&daemons[0].client()).await.decision.policy_version, "fleet-v1");

    // A device offline during a push takes the retained bundle when it comes back.
    let offline = DEVICES[2];
    daemons[2].kill();
    let v3_onnx = local_policy(16, 4.0);
    let v3 = PolicyBundle::sign(&manifest("fleet-v3", &v3_onnx, None), v3_onnx, &key).expect("sign");
    manager.push(&v3).await;
    manager.wait_for(&DEVICES[..2], "v3 adopted", |s| s.policy_version.as_deref() == Some("fleet-v3")).await;
    assert_eq!(manager.policy_of(offline).as_deref(), Some("fleet-v1"), "its last status, retained");
    daemons[2] = Daemon::start_as(states[2].path(), offline, &config);
    manager
        .wait_for(&[offline], "v3 adopted after reconnecting", |s| {
            s.policy_version.as_deref() == Some("fleet-v3")
        })
        .await;

    // Outcomes made while the broker is away wait in the log and drain once, in order.
    broker.stop();
    let mut asked = 0;
    for daemon in &daemons[..2] {
        ask(&daemon.client()).await;
        asked += 1;
    }
    broker.restart().expect("broker back");
    // 3 first turns, 4 checks of the serving policy, and the turns asked during the outage.
    let keys = wait_rows(dataset.path(), 3 + 4 + asked).await;
    assert!(keys.iter().all(|k| DEVICES.contains(&k.0.as_str())));
    let stats = collector.shutdown(Duration::from_secs(5)).await;
    // The rated row was written again (its new version); readers see each row once.
    assert!(stats.rows_written > keys.len() as u64, "{stats:?}");
    assert_eq!((stats.malformed, stats.rejected_rows), (0, 0), "{stats:?}");
}

/// `uploaded_at_ms` of a dialogue's first turn in a device's log.
fn uploaded_at(log: &Path, dialogue: &str) -> Option<i64> {
    let db = rusqlite::Connection::open(log).expect("log opens");
    db.busy_timeout(Duration::from_secs(5)).expect("busy timeout");
    db.query_row("SELECT uploaded_at_ms FROM outcomes WHERE dialogue_id = ?1 AND turn = 0", [dialogue], |r| {
        r.get(0)
    })
    .expect("row")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_rows_a_collector_refuses_are_set_aside_not_marked_uploaded() {
    let broker = MosquittoBroker::start().expect("mosquitto (apt-get install mosquitto)");
    let port = broker.port();
    let trusted = hex::encode(SigningKey::from_bytes(&[7; 32]).verifying_key().to_bytes());
    let manager = Manager::start(port).await;
    let state = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start_as(state.path(), DEVICES[0], &device_config(port, &trusted));
    let good = ask(&daemon.client()).await.decision.dialogue_id;
    let bad = ask(&daemon.client()).await.decision.dialogue_id;
    // No collector yet: both rows wait. One of them then breaks a rule the collector checks (a
    // newer collector's rule, a bit flip on the card): it will be refused.
    let log = state.path().join("outcomes.sqlite");
    {
        let db = rusqlite::Connection::open(&log).expect("log opens");
        db.busy_timeout(Duration::from_secs(5)).expect("busy timeout");
        let changed = db
            .execute("UPDATE outcomes SET propensity = 1.5 WHERE dialogue_id = ?1", [&bad])
            .expect("update");
        assert_eq!(changed, 1);
    }
    let dataset = tempfile::tempdir().expect("tempdir");
    let collector = start_collector(port, dataset.path()).await;
    let keys = wait_rows(dataset.path(), 1).await;
    assert_eq!(keys[0].1, good);
    let started = Instant::now();
    while uploaded_at(&log, &good).is_none() {
        assert!(started.elapsed() < WAIT, "the stored row was not marked uploaded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    manager
        .wait_for(&DEVICES[..1], "the refused row reported", |s| {
            s.counters.outcomes_uploaded == 1 && s.counters.outcomes_upload_refused == 1
        })
        .await;
    // The refused row is not marked uploaded (so never evicted as such), keeps the collector's
    // reason, and is not sent again and again.
    assert_eq!(uploaded_at(&log, &bad), None);
    let db = rusqlite::Connection::open(&log).expect("log opens");
    let reason: Option<String> = db
        .query_row("SELECT upload_refused FROM outcomes WHERE dialogue_id = ?1", [&bad], |r| r.get(0))
        .expect("reason");
    assert!(reason.as_deref().is_some_and(|r| r.contains("propensity")), "{reason:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stats = collector.shutdown(Duration::from_secs(5)).await;
    assert_eq!((stats.rows_written, stats.rejected_rows), (1, 1), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_an_oversized_row_goes_up_cut_and_never_blocks_the_rows_behind_it() {
    let broker = MosquittoBroker::start().expect("mosquitto (apt-get install mosquitto)");
    let port = broker.port();
    let trusted = hex::encode(SigningKey::from_bytes(&[7; 32]).verifying_key().to_bytes());
    let manager = Manager::start(port).await;
    let state = tempfile::tempdir().expect("tempdir");
    let config = device_config(port, &trusted).replace("[mqtt]\n", "[mqtt]\nmax_packet_bytes = 8192\n");
    let daemon = Daemon::start_as(state.path(), DEVICES[0], &config);
    let long = ask(&daemon.client()).await.decision.dialogue_id;
    let huge = ask(&daemon.client()).await.decision.dialogue_id;
    let normal = ask(&daemon.client()).await.decision.dialogue_id;
    // No collector yet: the rows wait. The oldest then holds a 50 kB answer (a long cloud
    // answer), the next a telemetry snapshot that alone is over the 8 kB packet.
    let log = state.path().join("outcomes.sqlite");
    let answer = "The egg wants nine minutes. ".repeat(2000);
    {
        let db = rusqlite::Connection::open(&log).expect("log opens");
        db.busy_timeout(Duration::from_secs(5)).expect("busy timeout");
        let set_answer = db
            .execute("UPDATE outcomes SET answer = ?2 WHERE dialogue_id = ?1", [&long, &answer])
            .expect("update");
        let telemetry = format!("{{\"cpu_percent\": 12.5, \"trace\": \"{}\"}}", "0".repeat(20_000));
        let set_telemetry = db
            .execute("UPDATE outcomes SET telemetry = ?2 WHERE dialogue_id = ?1", [&huge, &telemetry])
            .expect("update");
        assert_eq!((set_answer, set_telemetry), (1, 1));
    }
    let dataset = tempfile::tempdir().expect("tempdir");
    let collector = start_collector(port, dataset.path()).await;
    wait_rows(dataset.path(), 2).await;
    manager
        .wait_for(&DEVICES[..1], "two rows uploaded, one set aside", |s| {
            s.counters.outcomes_uploaded == 2 && s.counters.outcomes_upload_refused == 1
        })
        .await;
    let stored = dataset_rows(dataset.path()).await;
    let row = |dialogue: &str| stored.iter().find(|r| r.outcome.dialogue_id == dialogue).map(|r| &r.outcome);
    let cut = row(long.as_str()).expect("the long row went up");
    assert!(cut.text_cut_bytes > 0 && cut.answer.len() < 8192, "{} bytes kept", cut.answer.len());
    assert!(answer.starts_with(&cut.answer));
    assert_eq!(cut.answer.len() as u64 + cut.text_cut_bytes, answer.len() as u64, "only the answer was cut");
    assert_eq!(row(normal.as_str()).expect("the row behind went up").text_cut_bytes, 0);
    assert!(row(huge.as_str()).is_none());
    // The device keeps the whole answer, and the reason for the row it could not send.
    let db = rusqlite::Connection::open(&log).expect("log opens");
    db.busy_timeout(Duration::from_secs(5)).expect("busy timeout");
    let kept: i64 = db
        .query_row("SELECT length(answer) FROM outcomes WHERE dialogue_id = ?1", [&long], |r| r.get(0))
        .expect("row");
    assert_eq!(kept as usize, answer.len());
    assert!(uploaded_at(&log, &long).is_some() && uploaded_at(&log, &huge).is_none());
    let reason: Option<String> = db
        .query_row("SELECT upload_refused FROM outcomes WHERE dialogue_id = ?1", [&huge], |r| r.get(0))
        .expect("reason");
    assert!(reason.as_deref().is_some_and(|r| r.contains("one upload packet carries")), "{reason:?}");
    let stats = collector.shutdown(Duration::from_secs(5)).await;
    assert_eq!((stats.rows_written, stats.rejected_rows), (2, 0), "{stats:?}");
}

/// `tmoctl` next to the `tmod` under test (a workspace test build makes both).
fn tmoctl() -> std::process::Command {
    let path = Path::new(env!("CARGO_BIN_EXE_tmod")).with_file_name("tmoctl");
    assert!(path.exists(), "{} is missing: build the workspace (cargo test --workspace)", path.display());
    let mut command = std::process::Command::new(path);
    command.env_remove("TMO_MQTT_PASSWORD").stdin(std::process::Stdio::null());
    command
}

/// Asks a turn of a new dialogue and scores its answer as the user would.
async fn ask_and_score(client: &Client, score: f64) -> String {
    let asked = ask(client).await;
    let feedback =
        tmod_api::FeedbackRequest { dialogue_id: asked.decision.dialogue_id.clone(), turn: 0, score };
    client.feedback(&feedback).await.expect("feedback");
    asked.decision.policy_version
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_a_staged_rollout_stops_itself_and_a_policy_on_trial_goes_back_when_tmod_dies() {
    let broker = MosquittoBroker::start().expect("mosquitto (apt-get install mosquitto)");
    let port = broker.port();
    let work = tempfile::tempdir().expect("tempdir");
    let key = work.path().join("fleet.key");
    let out = tmoctl().args(["fleet", "keygen", "--out"]).arg(&key).output().expect("tmoctl keygen");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let trusted = std::fs::read_to_string(work.path().join("fleet.key.pub")).expect("public key");
    let manager = Manager::start(port).await;
    // Two devices that commit to a policy after two decisions.
    let devices = &DEVICES[..2];
    let config = device_config(port, trusted.trim()).replace("trial_decisions = 0", "trial_decisions = 2");
    let states: Vec<tempfile::TempDir> =
        devices.iter().map(|_| tempfile::tempdir().expect("tempdir")).collect();
    let mut daemons: Vec<Daemon> =
        devices.iter().zip(&states).map(|(id, state)| Daemon::start_as(state.path(), id, &config)).collect();
    let push_with_history = |version: &str, seed: f32, history: &str, abort: &[&str]| {
        let policy = work.path().join(format!("{version}.onnx"));
        std::fs::write(&policy, local_policy(16, seed)).expect("policy file");
        let mut command = tmoctl();
        command
            .args(["fleet", "push", "--broker", &format!("127.0.0.1:{port}"), "--group", "kitchens"])
            .args(["--version", version, "--key"])
            .arg(&key)
            .arg("--policy")
            .arg(&policy)
            .arg("--history")
            .arg(work.path().join(history))
            .args(abort);
        command
    };
    let push = |version: &str, seed: f32, abort: &[&str]| push_with_history(version, seed, "pushes", abort);
    let serving =
        |version: &'static str| move |s: &DeviceStatus| s.policy_version.as_deref() == Some(version);

    // The policy the group runs well: every answer scored 1.
    let out = push("roll-good", 1.0, &[]).output().expect("tmoctl push");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    manager.wait_for(devices, "roll-good adopted", serving("roll-good")).await;
    for daemon in &daemons {
        for _ in 0..3 {
            assert_eq!(ask_and_score(&daemon.client(), 1.0).await, "roll-good");
        }
    }
    manager
        .wait_for(devices, "roll-good committed and scored", |s| {
            s.policy_stats.first().is_some_and(|p| p.version == "roll-good" && p.committed && p.scored == 3)
        })
        .await;

    // A staged rollout of a policy whose answers users score 0: the push watches the group and,
    // once both policies have 4 scored answers, rolls the group back by itself and says why.
    let rules = ["--abort-score-drop", "0.3", "--abort-decision-failures", "0", "--min-answers", "4"];
    let watching = push("roll-bad", 2.0, &rules)
        .args(["--watch-secs", "120"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("tmoctl push --abort-*");
    manager.wait_for(devices, "roll-bad adopted", serving("roll-bad")).await;
    let on_trial = manager.statuses.lock().expect("lock")[devices[0]].policy_stats[0].clone();
    assert_eq!((on_trial.version.as_str(), on_trial.committed), ("roll-bad", false));
    for daemon in &daemons {
        for _ in 0..2 {
            assert_eq!(ask_and_score(&daemon.client(), 0.0).await, "roll-bad");
        }
    }
    let out =
        tokio::task::spawn_blocking(move || watching.wait_with_output()).await.expect("join").expect("wait");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("the mean score fell from 1.000 (6 answers of roll-good) to 0.000 (4 answers)"),
        "{stdout}"
    );
    assert!(stdout.contains("rollback: pushed policy roll-good"), "{stdout}");
    assert!(stderr.contains("rolled back to roll-good"), "{stderr}");
    manager.wait_for(devices, "rolled back by the fleet", serving("roll-good")).await;

    // A rule that needs an earlier push to go back to is refused before anything goes out.
    let out = push_with_history("roll-first", 3.0, "empty-history", &rules).output().expect("tmoctl push");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("need an earlier push"), "{out:?}");
    assert!(
        manager
            .statuses
            .lock()
            .expect("lock")
            .values()
            .all(|s| s.policy_version.as_deref() == Some("roll-good"))
    );

    // The device commits to a policy only after its health check: killed (as a crash or the
    // watchdog would) before its first two decisions, it starts again on the previous policy,
    // says why, and does not take the retained bundle again.
    let out = push("roll-trial", 4.0, &[]).output().expect("tmoctl push");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    manager.wait_for(devices, "roll-trial adopted", serving("roll-trial")).await;
    assert_eq!(ask(&daemons[1].client()).await.decision.policy_version, "roll-trial");
    daemons[0].kill();
    daemons[0] = Daemon::start_as(states[0].path(), devices[0], &config);
    manager
        .wait_for(&devices[..1], "went back at start", |s| {
            s.policy_version.as_deref() == Some("roll-good")
                && s.last_policy_update.as_ref().is_some_and(|u| {
                    u.reason.as_deref().is_some_and(|r| r.contains("roll-trial passed its health check"))
                })
        })
        .await;
    assert_eq!(ask(&daemons[0].client()).await.decision.policy_version, "roll-good");
    // The other device commits after its second decision.
    assert_eq!(ask(&daemons[1].client()).await.decision.policy_version, "roll-trial");
    manager
        .wait_for(&devices[1..], "roll-trial committed", |s| {
            s.policy_stats.first().is_some_and(|p| p.version == "roll-trial" && p.committed)
        })
        .await;
}
