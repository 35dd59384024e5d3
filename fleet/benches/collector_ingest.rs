//! Collector ingest rate through a real Mosquitto on loopback, and the dataset's startup scan.
//!
//! `cargo bench -p fleet --bench collector_ingest`
//!
//! 1. Ingest: `FLEET_BENCH_DEVICES` devices (default 4), each an MQTT client of its own,
//!    send `FLEET_BENCH_BATCHES` batches (default 100) of `FLEET_BENCH_ROWS` realistic rows
//!    (default 200, ~1.3 KB of JSON each) with up to `FLEET_BENCH_WINDOW` unacknowledged
//!    batches in flight (default 4). The figure is rows durably written (fdatasync) and
//!    acknowledged per second, from the first publish to the last ack. Repeated
//!    `FLEET_BENCH_ROUNDS` times (default 3), each into a fresh dataset directory under
//!    `FLEET_BENCH_DIR` (default the system's temporary directory: make sure it is a real
//!    disk, not tmpfs, or fsync costs nothing).
//! 2. Start-up and read: `FLEET_BENCH_SCAN_ROWS` rows (default 1,000,000) written straight
//!    through the dataset writer (10,000 rows a call, over 10 days), then the time a writer
//!    takes to open on that dataset (it reads none of it), and the time the DataFusion reader
//!    takes to open it and count the latest version of every row. `FLEET_BENCH_KEEP=1` keeps
//!    that dataset (its directory is printed) for other readers.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use fleet::{Collector, CollectorStats};
use fleet_data::{DatasetWriter, OutcomeStore};
use outcome_log::dataset::TimeWindow;
use support::{DeviceClient, batch, outcome};
use tmo_protocol::ShareGroup;
use tmo_protocol::link::LinkConfig;
use tmo_protocol::testing::MosquittoBroker;

/// Rows are made ten days ago (and up to nine days later): inside the collector's window.
fn t0() -> i64 {
    outcome_log::now_ms() - 10 * 86_400_000
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn bench_dir() -> std::path::PathBuf {
    std::env::var_os("FLEET_BENCH_DIR").map(Into::into).unwrap_or_else(std::env::temp_dir)
}

/// The device's batches, encoded before the clock starts: devices encode on their own boards,
/// and the figure is the collector's.
fn device_bodies(device: &str, batches: usize, rows: usize) -> Vec<Vec<u8>> {
    let t0 = t0();
    (0..batches)
        .map(|b| {
            let dialogue = format!("{device}-dlg-{b}");
            let outcomes: Vec<_> = (0..rows as u32).map(|t| outcome(&dialogue, t, t0)).collect();
            tmo_protocol::codec::CborMessage::to_cbor(&batch(device, b as u64, &outcomes))
                .expect("batch encodes")
        })
        .collect()
}

async fn device_run(port: u16, device: String, bodies: Vec<Vec<u8>>, window: usize) -> usize {
    let mut client = DeviceClient::connect(port, &device).await;
    let mut in_flight = VecDeque::new();
    let mut acked_rows = 0;
    for (b, body) in bodies.iter().enumerate() {
        client.send_body(body).await;
        in_flight.push_back(b);
        while in_flight.len() >= window {
            let ack = client.next_ack(Duration::from_secs(60)).await.expect("ack within a minute");
            acked_rows += ack.accepted.len();
            in_flight.retain(|id| *id as u64 != ack.batch_id);
        }
    }
    while !in_flight.is_empty() {
        let ack = client.next_ack(Duration::from_secs(60)).await.expect("ack within a minute");
        acked_rows += ack.accepted.len();
        in_flight.retain(|id| *id as u64 != ack.batch_id);
    }
    client.link.shutdown(Duration::from_secs(2)).await;
    acked_rows
}

async fn ingest_round(broker: &MosquittoBroker, round: usize) -> (f64, CollectorStats, Duration) {
    let devices = env_usize("FLEET_BENCH_DEVICES", 4);
    let batches = env_usize("FLEET_BENCH_BATCHES", 100);
    let rows = env_usize("FLEET_BENCH_ROWS", 200);
    let window = env_usize("FLEET_BENCH_WINDOW", 4).max(1);
    let dir = tempfile::tempdir_in(bench_dir()).expect("bench directory");
    let mut config = LinkConfig::new("127.0.0.1", broker.port(), format!("collector-{round}"));
    config.max_packet_bytes = 1 << 20;
    let collector =
        Collector::start(&config, ShareGroup::new("collectors").unwrap(), dir.path()).await.unwrap();
    assert!(collector.wait_connected(Duration::from_secs(10)).await);
    let bodies: Vec<(String, Vec<Vec<u8>>)> = (0..devices)
        .map(|d| {
            let device = format!("r{round}-dev-{d}");
            let bodies = device_bodies(&device, batches, rows);
            (device, bodies)
        })
        .collect();
    let started = Instant::now();
    let tasks: Vec<_> = bodies
        .into_iter()
        .map(|(device, bodies)| tokio::spawn(device_run(broker.port(), device, bodies, window)))
        .collect();
    let mut acked = 0;
    for t in tasks {
        acked += t.await.expect("device task");
    }
    let elapsed = started.elapsed();
    let stats = collector.shutdown(Duration::from_secs(10)).await;
    assert_eq!(acked, devices * batches * rows);
    assert_eq!(stats.rows_written as usize, acked);
    (acked as f64 / elapsed.as_secs_f64(), stats, elapsed)
}

fn scan_bench(runtime: &tokio::runtime::Runtime) {
    let total = env_usize("FLEET_BENCH_SCAN_ROWS", 1_000_000);
    if total == 0 {
        return;
    }
    let dir = tempfile::tempdir_in(bench_dir()).expect("bench directory").keep();
    // Kept, with FLEET_BENCH_KEEP, for other readers (`tmoctl outcomes report`, DuckDB).
    let dir = DropDir(dir, std::env::var_os("FLEET_BENCH_KEEP").is_none());
    let mut writer = DatasetWriter::open(dir.path(), "bench", TimeWindow::UNBOUNDED).unwrap();
    let t0 = t0();
    let started = Instant::now();
    let per_call = 10_000;
    let devices = 100;
    let mut written = 0;
    let mut call = 0;
    while written < total {
        let n = per_call.min(total - written);
        let device = format!("dev-{}", call % devices);
        // Rows spread over 10 days.
        let rows: Vec<_> = (0..n as u32)
            .map(|t| outcome(&format!("c{call}"), t, t0 + i64::from(t % 10) * 86_400_000))
            .collect();
        let summary = writer.append_many(&[(device, rows)], outcome_log::now_ms() as u64).unwrap();
        written += summary[0].written;
        call += 1;
    }
    let write_secs = started.elapsed().as_secs_f64();
    drop(writer);
    let bytes: u64 = walk_bytes(dir.path());
    let started = Instant::now();
    let writer = DatasetWriter::open(dir.path(), "bench-2", TimeWindow::UNBOUNDED).unwrap();
    let open_secs = started.elapsed().as_secs_f64();
    drop(writer);
    let started = Instant::now();
    let (store, latest) = runtime.block_on(async {
        let store = OutcomeStore::open(dir.path().to_str().unwrap()).await.unwrap();
        let latest = store.latest_count().await.unwrap();
        (store, latest)
    });
    let read_secs = started.elapsed().as_secs_f64();
    assert_eq!(latest as usize, total);
    println!(
        "dataset: {total} rows, {:.0} MB of Parquet in {} files; written directly {:.1} s = {:.0} rows/s; \
         a writer opens on it in {:.1} ms; the reader opens it and counts the latest rows in {:.2} s = {:.0} rows/s",
        bytes as f64 / 1e6,
        store.files(),
        write_secs,
        total as f64 / write_secs,
        open_secs * 1e3,
        read_secs,
        total as f64 / read_secs
    );
}

/// A dataset directory, removed when dropped unless kept.
struct DropDir(std::path::PathBuf, bool);

impl DropDir {
    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for DropDir {
    fn drop(&mut self) {
        if self.1 {
            let _ = std::fs::remove_dir_all(&self.0);
        } else {
            println!("dataset kept in {}", self.0.display());
        }
    }
}

fn walk_bytes(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = entry.metadata().unwrap();
        total += if meta.is_dir() { walk_bytes(&entry.path()) } else { meta.len() };
    }
    total
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let broker = MosquittoBroker::start().expect("mosquitto");
    let rounds = env_usize("FLEET_BENCH_ROUNDS", 3);
    println!(
        "collector ingest: {} devices x {} batches x {} rows, window {}, dataset under {}",
        env_usize("FLEET_BENCH_DEVICES", 4),
        env_usize("FLEET_BENCH_BATCHES", 100),
        env_usize("FLEET_BENCH_ROWS", 200),
        env_usize("FLEET_BENCH_WINDOW", 4),
        bench_dir().display()
    );
    for round in 0..rounds {
        let (rate, stats, elapsed) = runtime.block_on(ingest_round(&broker, round));
        println!(
            "round {round}: {rate:.0} rows/s durably written and acked ({} rows in {:.2} s; {} batches in {} \
             fsync groups, {:.1} batches per group; {} acks; dropped {})",
            stats.rows_written,
            elapsed.as_secs_f64(),
            stats.batches,
            stats.write_groups,
            stats.batches as f64 / stats.write_groups.max(1) as f64,
            stats.acks_published,
            stats.dropped_queue_full,
        );
    }
    scan_bench(&runtime);
}
