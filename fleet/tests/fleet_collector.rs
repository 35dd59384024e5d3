//! The collector against a real Mosquitto: acks, refusals, and each row read once (its latest
//! version) under resends, restarts and several collectors on one dataset.

mod support;

use std::time::Duration;

use fleet::{Collector, CollectorConfig, CollectorStats};
use outcome_log::dataset::TimeWindow;
use support::{DeviceClient, batch, latest, outcome};
use tmo_protocol::link::LinkConfig;
use tmo_protocol::testing::MosquittoBroker;
use tmo_protocol::{OutcomeKey, ShareGroup};

const T0: i64 = 1_790_000_000_000; // 2026-09-21T14:13:20Z
const DAY_MS: i64 = 86_400_000;
const WAIT: Duration = Duration::from_secs(10);

/// A collector taking rows of any day: these tests' rows were made on fixed days (T0).
async fn collector(broker: &MosquittoBroker, dir: &std::path::Path, client_id: &str) -> Collector {
    let settings = CollectorConfig {
        window: TimeWindow::UNBOUNDED,
        ..CollectorConfig::new(ShareGroup::new("collectors").unwrap(), dir)
    };
    collector_with(broker, settings, client_id).await
}

async fn collector_with(broker: &MosquittoBroker, settings: CollectorConfig, client_id: &str) -> Collector {
    let config = LinkConfig::new("127.0.0.1", broker.port(), client_id);
    let collector = Collector::start_with(&config, settings).await.expect("collector starts");
    assert!(collector.wait_connected(WAIT).await, "collector did not connect");
    collector
}

/// Waits until `check` holds for the collector's counters (they are updated after the ack is queued).
async fn stats_until(collector: &Collector, check: impl Fn(&CollectorStats) -> bool) -> CollectorStats {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let stats = collector.stats();
        if check(&stats) || std::time::Instant::now() > deadline {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_collector_acks_every_batch_and_readers_see_each_row_once_under_resends_and_restarts() {
    let broker = MosquittoBroker::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let c = collector(&broker, dir.path(), "collector-1").await;
    let mut device = DeviceClient::connect(broker.port(), "kitchen-1").await;

    let rows: Vec<_> = (0..5).map(|t| outcome("dlg-1", t, T0 + i64::from(t) * DAY_MS / 2)).collect();
    let first = batch("kitchen-1", 7, &rows);
    device.send(&first).await;
    let ack = device.next_ack(WAIT).await.expect("first ack");
    assert_eq!(ack.batch_id, 7);
    let keys: Vec<OutcomeKey> = first.rows.iter().map(|r| r.key.clone()).collect();
    assert_eq!(ack.accepted, keys);
    assert!(ack.rejected.is_empty());

    // The device did not see the ack (say) and sends the same batch again: written again (the
    // collector keeps no keys), acknowledged the same, read once.
    device.send(&first).await;
    let again = device.next_ack(WAIT).await.expect("second ack");
    assert_eq!(again, ack);
    let stats = stats_until(&c, |s| s.rows_written == 10).await;
    assert_eq!((stats.batches, stats.rows_written), (2, 10));
    let read = latest(dir.path()).await;
    assert!(read.torn.is_empty(), "{:?}", read.torn);
    assert_eq!((read.records.len(), read.versions), (5, 10));
    assert_eq!(read.records.iter().map(|r| r.outcome.clone()).collect::<Vec<_>>(), rows);
    assert!(read.records.iter().all(|r| r.device_id == "kitchen-1"));
    // Hive partitions by the rows' own day (two days here).
    assert!(dir.path().join("day=2026-09-21").is_dir());
    assert!(dir.path().join("day=2026-09-22").is_dir());

    // A rescored row (feedback after the upload) supersedes its first version.
    let mut rescored = rows[2].clone();
    rescored.score = Some(0.25);
    rescored.score_source = Some(outcome_log::ScoreSource::Feedback);
    device.send(&batch("kitchen-1", 8, std::slice::from_ref(&rescored))).await;
    assert_eq!(device.next_ack(WAIT).await.expect("ack of the rescored row").batch_id, 8);

    // A restarted collector starts without reading the dataset and goes on.
    let stats = c.shutdown(WAIT).await;
    assert_eq!(stats.acks_published, 3);
    let c = collector(&broker, dir.path(), "collector-2").await;
    let mut more = rows.clone();
    more.push(outcome("dlg-1", 5, T0 + 3 * DAY_MS));
    device.send(&batch("kitchen-1", 9, &more)).await;
    let ack = device.next_ack(WAIT).await.expect("ack after restart");
    assert_eq!((ack.batch_id, ack.accepted.len()), (9, 6));
    let stats = stats_until(&c, |s| s.batches == 1).await;
    assert_eq!(stats.rows_written, 6);
    let read = latest(dir.path()).await;
    assert_eq!((read.records.len(), read.versions), (6, 17));
    let mut expected = more.clone();
    expected[2] = rescored;
    assert_eq!(read.records.iter().map(|r| r.outcome.clone()).collect::<Vec<_>>(), expected);
    c.shutdown(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_collector_refuses_a_batch_whose_device_is_not_its_topics() {
    let broker = MosquittoBroker::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let c = collector(&broker, dir.path(), "collector").await;
    let mut victim = DeviceClient::connect(broker.port(), "victim").await;
    let mut intruder = DeviceClient::connect(broker.port(), "intruder").await;

    // The intruder publishes on its own topic a batch that claims to be the victim's.
    let forged = batch("victim", 1, &[outcome("d", 0, T0)]);
    intruder.send(&forged).await;
    let stats = stats_until(&c, |s| s.refused_batches == 1).await;
    assert_eq!(stats.refused_batches, 1);
    assert_eq!(stats.rows_written, 0);
    assert!(intruder.next_ack(Duration::from_millis(500)).await.is_none());
    assert!(victim.next_ack(Duration::from_millis(100)).await.is_none());
    assert!(latest(dir.path()).await.records.is_empty());

    // The collector goes on: the victim's own batch is stored.
    victim.send(&forged).await;
    assert_eq!(victim.next_ack(WAIT).await.expect("ack").accepted.len(), 1);
    c.shutdown(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_collector_survives_malformed_payloads() {
    let broker = MosquittoBroker::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let c = collector(&broker, dir.path(), "collector").await;
    let mut device = DeviceClient::connect(broker.port(), "dev-1").await;

    device.send_raw(b"garbage, not a frame").await;
    // A whole frame whose body is not CBOR of a batch.
    device.send_raw(b"TM\x01W\x83\x01\x03\xff\xff").await;
    // A frame with a body of another message kind (an ack where a batch belongs).
    device.send_raw(&[b"TM\x01W".as_slice(), &[0x83, 1, 4, 0xa0]].concat()).await;
    let stats = stats_until(&c, |s| s.malformed == 3).await;
    assert_eq!(stats.malformed, 3);
    assert!(device.next_ack(Duration::from_millis(300)).await.is_none());

    device.send(&batch("dev-1", 2, &[outcome("d", 0, T0), outcome("d", 1, T0)])).await;
    let ack = device.next_ack(WAIT).await.expect("ack after the junk");
    assert_eq!((ack.batch_id, ack.accepted.len()), (2, 2));
    let stats = c.shutdown(WAIT).await;
    assert_eq!((stats.batches, stats.rows_written, stats.malformed), (1, 2, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_collector_rejects_rows_that_are_not_turn_outcomes_in_the_ack() {
    let broker = MosquittoBroker::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let c = collector(&broker, dir.path(), "collector").await;
    let mut device = DeviceClient::connect(broker.port(), "dev-2").await;

    let mut b = batch(
        "dev-2",
        9,
        &[outcome("d", 0, T0), outcome("d", 1, T0), outcome("d", 2, T0), outcome("d", 3, T0)],
    );
    // Row 1: not a TurnOutcome at all.
    b.rows[1].row = serde_json::json!({"action": 8, "answer": "ok"});
    // Row 2: a TurnOutcome whose key says another turn.
    b.rows[2].key.turn = 20;
    // Row 3: a TurnOutcome breaking the outcome rules (propensity above 1).
    b.rows[3].row["propensity"] = serde_json::json!(1.5);
    device.send(&b).await;
    let ack = device.next_ack(WAIT).await.expect("ack");
    assert_eq!(ack.accepted, vec![OutcomeKey { dialogue_id: "d".into(), turn: 0 }]);
    assert_eq!(ack.rejected.len(), 3, "{:?}", ack.rejected);
    assert_eq!(ack.rejected[0].key.turn, 1);
    assert!(ack.rejected[0].reason.contains("not a turn outcome"), "{}", ack.rejected[0].reason);
    assert_eq!(ack.rejected[1].key.turn, 20);
    assert!(ack.rejected[1].reason.contains("disagrees"), "{}", ack.rejected[1].reason);
    assert!(ack.rejected[2].reason.contains("propensity"), "{}", ack.rejected[2].reason);
    let stats = c.shutdown(WAIT).await;
    assert_eq!((stats.rows_written, stats.rejected_rows), (1, 3));
    let read = latest(dir.path()).await;
    assert_eq!(read.records.len(), 1);
    assert_eq!(read.records[0].outcome.turn, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_collector_rejects_rows_made_outside_its_window_so_devices_cannot_pick_days() {
    let broker = MosquittoBroker::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The default window: rows up to 30 days old, one day ahead.
    let c = collector_with(
        &broker,
        CollectorConfig::new(ShareGroup::new("collectors").unwrap(), dir.path()),
        "c",
    )
    .await;
    let mut device = DeviceClient::connect(broker.port(), "dev-6").await;
    let now = outcome_log::now_ms();
    let rows = [
        outcome("d", 0, now),
        outcome("d", 1, now - 40 * DAY_MS),
        outcome("d", 2, 253_402_300_799_000), // 9999-12-31
        outcome("d", 3, now - 29 * DAY_MS),
    ];
    device.send(&batch("dev-6", 1, &rows)).await;
    let ack = device.next_ack(WAIT).await.expect("ack");
    assert_eq!(ack.accepted.iter().map(|k| k.turn).collect::<Vec<_>>(), vec![0, 3]);
    let mut rejected: Vec<_> = ack.rejected.iter().map(|r| (r.key.turn, r.reason.clone())).collect();
    rejected.sort();
    assert_eq!(rejected.len(), 2, "{rejected:?}");
    assert!(rejected[0].1.contains("made 40 days before it was received"), "{rejected:?}");
    assert!(rejected[1].1.contains("the device's clock is ahead"), "{rejected:?}");
    let stats = c.shutdown(WAIT).await;
    assert_eq!((stats.rows_written, stats.rejected_rows), (2, 2));
    let days: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    assert_eq!(days.len(), 2, "only the two days in the window: {days:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_collectors_in_one_share_group_split_the_batches_into_one_dataset() {
    let broker = MosquittoBroker::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let a = collector(&broker, dir.path(), "collector-a").await;
    let b = collector(&broker, dir.path(), "collector-b").await;
    let mut device = DeviceClient::connect(broker.port(), "dev-3").await;
    for id in 0..20u32 {
        device.send(&batch("dev-3", u64::from(id), &[outcome("d", id, T0)])).await;
    }
    let mut acked = 0;
    while acked < 20 {
        acked += device.next_ack(WAIT).await.expect("ack").accepted.len();
    }
    let (sa, sb) = (a.shutdown(WAIT).await, b.shutdown(WAIT).await);
    assert_eq!(sa.rows_written + sb.rows_written, 20);
    assert!(sa.rows_written > 0 && sb.rows_written > 0, "{sa:?} {sb:?}");
    let read = latest(dir.path()).await;
    assert_eq!((read.records.len(), read.versions), (20, 20));
    assert_eq!(read.records.iter().map(|r| r.outcome.turn).collect::<Vec<_>>(), (0..20).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_collectors_that_both_take_every_batch_write_one_dataset_read_once() {
    // Two collectors in different share groups both receive every batch (a migration, or a
    // misconfiguration): every row is written twice and still read once.
    let broker = MosquittoBroker::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let settings = |share: &str| CollectorConfig {
        window: TimeWindow::UNBOUNDED,
        ..CollectorConfig::new(ShareGroup::new(share).unwrap(), dir.path())
    };
    let a = collector_with(&broker, settings("group-a"), "collector-a").await;
    let b = collector_with(&broker, settings("group-b"), "collector-b").await;
    let mut device = DeviceClient::connect(broker.port(), "dev-5").await;
    let rows: Vec<_> = (0..8).map(|t| outcome("d", t, T0)).collect();
    device.send(&batch("dev-5", 1, &rows)).await;
    assert_eq!(device.next_ack(WAIT).await.expect("an ack").accepted.len(), 8);
    assert_eq!(stats_until(&a, |s| s.rows_written == 8).await.rows_written, 8);
    assert_eq!(stats_until(&b, |s| s.rows_written == 8).await.rows_written, 8);
    a.shutdown(WAIT).await;
    b.shutdown(WAIT).await;
    let read = latest(dir.path()).await;
    assert_eq!((read.records.len(), read.versions), (8, 16));
    assert_eq!(read.records.iter().map(|r| r.outcome.clone()).collect::<Vec<_>>(), rows);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_collector_refuses_chunked_frames_on_the_outcomes_topic() {
    let broker = MosquittoBroker::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let c = collector(&broker, dir.path(), "collector").await;
    let mut device = DeviceClient::connect(broker.port(), "dev-4").await;

    // Batches are single packets by design (each chunk could reach another collector of the
    // share group), so chunks on an outcomes topic are refused, each one, without storing.
    let chunked = batch("dev-4", 3, &[outcome("d", 0, T0), outcome("d", 1, T0)]);
    let body = tmo_protocol::CborMessage::to_cbor(&chunked).unwrap();
    let frames = tmo_protocol::split(&body, 400, 77).unwrap();
    assert!(frames.len() > 2);
    for frame in &frames {
        device.send_raw(frame).await;
    }
    let stats = stats_until(&c, |s| s.malformed == frames.len() as u64).await;
    assert_eq!((stats.malformed, stats.batches, stats.rows_written), (frames.len() as u64, 0, 0));
    assert!(device.next_ack(Duration::from_millis(300)).await.is_none());

    // The same batch as one packet is stored: nothing was lost.
    device.send(&chunked).await;
    let ack = device.next_ack(WAIT).await.expect("ack of the whole batch");
    assert_eq!((ack.batch_id, ack.accepted.len()), (3, 2));
    c.shutdown(WAIT).await;
    assert_eq!(latest(dir.path()).await.records.len(), 2);
}
