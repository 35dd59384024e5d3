//! The collected dataset's line reader: a device's day file holding the input is read by
//! `read_dataset` and scanned (and cut after its last good line) by `DatasetWriter::open`; then
//! a real row is appended and must be readable.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use outcome_log::TurnOutcome;
use outcome_log::dataset::{DatasetWriter, TimeWindow, read_dataset};

const DEVICE: &str = "kitchen-a";
const DAY: &str = "2026-09-22";
/// 2026-09-22T12:00:00Z.
const NOON_MS: i64 = 1_790_078_400_000;

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| tmo_edge_fuzz::scratch_dir("dataset"))
}

fn row() -> TurnOutcome {
    tmo_edge_fuzz::sample_row("fuzz-appended", 3, NOON_MS)
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

    // No time window: the file is of a fixed day, which the writer must scan.
    let mut writer = DatasetWriter::open_with(dir, TimeWindow::UNBOUNDED).expect("opening the dataset");
    let after_open = std::fs::read(&file).expect("the day file");
    assert!(after_open.is_empty() || after_open.ends_with(b"\n"), "an unfinished tail was left");
    assert!(bytes.starts_with(&after_open), "opening changed more than the tail");
    let summary = writer.append(DEVICE, vec![row()], 1).expect("appending a valid row");
    drop(writer);

    let dataset = read_dataset(dir).expect("reading again");
    let incomplete = dataset.skipped_lines.iter().any(|s| s.reason.starts_with("incomplete"));
    assert!(!incomplete, "{:?}", dataset.skipped_lines);
    if summary.written == 1 {
        assert!(
            dataset
                .records
                .iter()
                .any(|r| r.outcome.dialogue_id == "fuzz-appended" && r.outcome.turn == row().turn),
            "the appended row is not read back"
        );
    }
});
