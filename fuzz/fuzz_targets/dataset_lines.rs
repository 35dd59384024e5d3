//! The line reader of earlier collectors' JSON-lines datasets (`tmoctl outcomes convert` reads
//! them): a device's day file holding the input is read by `read_dataset`, which must never
//! fail on its content; then a real row is appended on a line of its own and must be read.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use outcome_log::dataset::{DatasetRecord, read_dataset};

const DEVICE: &str = "kitchen-a";
const DAY: &str = "2026-09-22";
/// 2026-09-22T12:00:00Z.
const NOON_MS: i64 = 1_790_078_400_000;

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| tmo_edge_fuzz::scratch_dir("dataset"))
}

fuzz_target!(|bytes: &[u8]| {
    let dir = dir();
    let day = dir.join(DAY);
    let _ = std::fs::remove_dir_all(&day);
    std::fs::create_dir_all(&day).expect("day directory");
    let file = day.join(format!("{DEVICE}.jsonl"));
    std::fs::write(&file, bytes).expect("writing the day file");

    let dataset = read_dataset(dir).expect("reading a dataset of one file");
    assert!(dataset.records.iter().all(|r| r.device_id == DEVICE));

    let record = DatasetRecord {
        device_id: DEVICE.into(),
        received_unix_ms: 1,
        outcome: tmo_edge_fuzz::sample_row("fuzz-appended", 3, NOON_MS),
    };
    let mut appended = bytes.to_vec();
    appended.push(b'\n');
    appended.extend(serde_json::to_vec(&record).expect("a record as JSON"));
    appended.push(b'\n');
    std::fs::write(&file, &appended).expect("appending a line");
    let dataset = read_dataset(dir).expect("reading again");
    assert!(
        dataset.records.iter().any(|r| r.outcome.dialogue_id == "fuzz-appended" && r.outcome.turn == 3),
        "the appended row is not read back"
    );
});
