//! Outcome log write speed with durability (`synchronous = FULL`, every acknowledged row fsynced).
//!
//! - `single_row_append_durable`: latency of one row appended and waited for, alone.
//! - `sustained/closed_loop_N_threads`: N threads each append a row and wait for it to be durable
//!   before the next, as request handlers do; rows/s is the figure to read.
//! - `sustained/pipelined_N_threads`: N threads queue rows without waiting, then wait for all.
//!
//! Rows are realistic: a 27-float observation, a 200-character answer, a telemetry JSON object.
//! Run: `cargo bench -p outcome-log --bench write`.

#[path = "../tests/support/load_rows.rs"]
mod load_rows;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use outcome_log::{OutcomeLog, OutcomeLogConfig, OutcomeWriter, TurnOutcome, WriterConfig};

/// A fresh writer on a file in a temporary directory (kept alive by the returned guard).
fn writer() -> (tempfile::TempDir, Arc<OutcomeWriter>) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = OutcomeLogConfig { max_bytes: 4 << 30, ..OutcomeLogConfig::default() };
    let log = OutcomeLog::open(dir.path().join("bench.db"), config).expect("open the log");
    let writer = OutcomeWriter::spawn(log, WriterConfig::default()).expect("start the writer");
    (dir, Arc::new(writer))
}

/// A row with a key never used before in this process.
fn next_row(counter: &AtomicU64) -> TurnOutcome {
    let n = counter.fetch_add(1, Ordering::Relaxed);
    load_rows::row(&format!("bench-{}", n / 8), (n % 8) as u32)
}

fn run_threads(
    writer: &Arc<OutcomeWriter>,
    counter: &Arc<AtomicU64>,
    rows: u64,
    threads: u64,
    pipelined: bool,
) -> Duration {
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let writer = Arc::clone(writer);
            let counter = Arc::clone(counter);
            let share = rows / threads + u64::from(t < rows % threads);
            std::thread::spawn(move || {
                if pipelined {
                    let pending: Vec<_> = (0..share).map(|_| writer.append(next_row(&counter))).collect();
                    for p in pending {
                        p.wait().expect("row committed");
                    }
                } else {
                    for _ in 0..share {
                        writer.append_durable(next_row(&counter)).expect("row committed");
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("bench thread");
    }
    start.elapsed()
}

fn bench_write(c: &mut Criterion) {
    let counter = Arc::new(AtomicU64::new(0));
    {
        let (_dir, writer) = writer();
        let mut group = c.benchmark_group("outcome_log");
        group.throughput(Throughput::Elements(1));
        group.bench_function("single_row_append_durable", |b| {
            b.iter(|| writer.append_durable(next_row(&counter)).expect("row committed"))
        });
        group.finish();
    }
    let mut group = c.benchmark_group("sustained");
    group.sample_size(20).measurement_time(Duration::from_secs(10)).throughput(Throughput::Elements(1));
    for (threads, pipelined) in [(4, false), (16, false), (64, false), (4, true)] {
        let name = if pipelined {
            format!("pipelined_{threads}_threads")
        } else {
            format!("closed_loop_{threads}_threads")
        };
        let (_dir, writer) = writer();
        group.bench_function(name, |b| {
            b.iter_custom(|rows| run_threads(&writer, &counter, rows, threads, pipelined))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_write);
criterion_main!(benches);
