//! Datasets of earlier collectors: outcome rows as JSON lines, partitioned by day, and the
//! time window and record shared with the Parquet dataset that replaced them (`fleet-data`).
//!
//! Layout: `DIR/<YYYY-MM-DD>/<device_id>.jsonl`, the UTC day of the outcome's `created_at_ms`;
//! one [`DatasetRecord`] per line:
//! `{"device_id": "...", "received_unix_ms": <u64>, "outcome": <TurnOutcome>}`. A row sent again
//! with a new score was appended as a new line, and the last line of a row is its version.
//! [`read_dataset`] reads such a directory (for `tmoctl outcomes convert`): lines that are not
//! records (a torn last line after a crash, damage) are skipped and reported, never fatal.
//!
//! Does not depend on an async runtime.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::TurnOutcome;

/// File name suffix of a device's file in a day directory.
pub const FILE_SUFFIX: &str = ".jsonl";

/// One line of the dataset: a received version of a row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetRecord {
    /// The device that logged the row.
    pub device_id: String,
    /// When the collector received it, unix milliseconds.
    pub received_unix_ms: u64,
    /// The row as the device logged it.
    pub outcome: TurnOutcome,
}

/// Errors reading a dataset, naming the file (and line) concerned.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// A file system operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done ("listing", "opening", ...).
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Reading a line failed (an I/O error, not a malformed line: those are skipped and reported).
    #[error("reading line {line} of {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The dataset path exists and is not a directory.
    #[error("the dataset path {0} is not a directory")]
    NotADirectory(PathBuf),
}

fn io_error<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> DatasetError + 'a {
    move |source| DatasetError::Io { what, path: path.to_path_buf(), source }
}

/// A line that [`read_dataset`] did not take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedLine {
    /// The file.
    pub path: PathBuf,
    /// 1-based line number.
    pub line: u64,
    /// Why it was skipped.
    pub reason: String,
}

const DAY_MS: u64 = 24 * 3600 * 1000;

/// How far a row's own time (`created_at_ms`, which picks its day) may be from its receipt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeWindow {
    /// Longest time before the receipt, ms.
    pub max_age_ms: u64,
    /// Longest time after the receipt (a device's clock ahead), ms.
    pub max_ahead_ms: u64,
}

impl Default for TimeWindow {
    /// 30 days back, one day ahead.
    fn default() -> Self {
        Self { max_age_ms: 30 * DAY_MS, max_ahead_ms: DAY_MS }
    }
}

impl TimeWindow {
    /// Every day: for importing a dataset of any age (and tests with fixed times).
    pub const UNBOUNDED: Self = Self { max_age_ms: u64::MAX, max_ahead_ms: u64::MAX };

    /// A window of `days` back and one day ahead.
    pub fn days(days: u32) -> Self {
        Self { max_age_ms: u64::from(days) * DAY_MS, ..Self::default() }
    }

    /// Whether a row made at `created_at_ms` may be filed when received at `received_unix_ms`.
    pub fn check(&self, created_at_ms: i64, received_unix_ms: u64) -> Result<(), String> {
        let received = i128::from(received_unix_ms);
        let created = i128::from(created_at_ms);
        if created < received - i128::from(self.max_age_ms) {
            return Err(format!(
                "made {} days before it was received; the dataset takes rows up to {} days old",
                (received - created) / i128::from(DAY_MS),
                self.max_age_ms / DAY_MS
            ));
        }
        if created > received + i128::from(self.max_ahead_ms) {
            return Err(format!(
                "made {} hours after it was received (the device's clock is ahead); at most {} hours are taken",
                (created - received) / 3_600_000,
                self.max_ahead_ms / 3_600_000
            ));
        }
        Ok(())
    }
}

/// The UTC day (`YYYY-MM-DD`) of a unix time in milliseconds.
pub fn utc_day(unix_ms: i64) -> Option<String> {
    let time = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ms) * 1_000_000).ok()?;
    let year = time.year();
    if !(0..=9999).contains(&year) {
        return None;
    }
    Some(format!("{year:04}-{:02}-{:02}", u8::from(time.month()), time.day()))
}

/// Whether `name` is a day's name, `YYYY-MM-DD`.
pub fn is_day_name(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter().enumerate().all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
}

/// The day directories of `dir` in order, then each one's device files in name order.
fn dataset_files(dir: &Path) -> Result<Vec<(String, PathBuf, String)>, DatasetError> {
    let mut days = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_error("listing", dir))? {
        let entry = entry.map_err(io_error("listing", dir))?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else { continue };
        if is_day_name(&name) && entry.path().is_dir() {
            days.push(name);
        }
    }
    days.sort();
    let mut files = Vec::new();
    for day in days {
        let day_dir = dir.join(&day);
        let mut in_day = Vec::new();
        for entry in std::fs::read_dir(&day_dir).map_err(io_error("listing", &day_dir))? {
            let entry = entry.map_err(io_error("listing", &day_dir))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else { continue };
            if let Some(device) = name.strip_suffix(FILE_SUFFIX)
                && !device.is_empty()
                && entry.path().is_file()
            {
                in_day.push((name.clone(), device.to_owned()));
            }
        }
        in_day.sort();
        files.extend(in_day.into_iter().map(|(name, device)| (day.clone(), day_dir.join(name), device)));
    }
    Ok(files)
}

/// Reads `path` line by line: `on_line(line_no, bytes)` for every complete line (without its
/// newline). Returns the file's length and whether its last line is incomplete (no newline).
fn for_each_line(path: &Path, mut on_line: impl FnMut(u64, &[u8], u64)) -> Result<(u64, bool), DatasetError> {
    let file = File::open(path).map_err(io_error("opening", path))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut buf = Vec::with_capacity(4096);
    let mut offset = 0u64;
    let mut line_no = 0u64;
    loop {
        buf.clear();
        line_no += 1;
        let n = reader.read_until(b'\n', &mut buf).map_err(|source| DatasetError::Read {
            path: path.to_path_buf(),
            line: line_no,
            source,
        })?;
        if n == 0 {
            return Ok((offset, false));
        }
        if buf.last() != Some(&b'\n') {
            return Ok((offset + n as u64, true));
        }
        offset += n as u64;
        on_line(line_no, &buf[..n - 1], offset);
    }
}

/// A dataset read back: its records in (day, file name, line) order and the lines skipped.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Dataset {
    /// The records.
    pub records: Vec<DatasetRecord>,
    /// Lines that are not records (an incomplete final line while a write is in progress or
    /// after a crash, or damage), with the reason.
    pub skipped_lines: Vec<SkippedLine>,
}

/// Reads every record of the dataset in `dir`, in (day, file name, line) order. Lines that are
/// not records are skipped and reported, never fatal; I/O errors are.
pub fn read_dataset(dir: impl AsRef<Path>) -> Result<Dataset, DatasetError> {
    let dir = dir.as_ref();
    match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => return Err(DatasetError::NotADirectory(dir.to_path_buf())),
        Ok(_) => {}
        Err(e) => return Err(DatasetError::Io { what: "reading", path: dir.to_path_buf(), source: e }),
    }
    let mut dataset = Dataset::default();
    for (_day, path, device) in dataset_files(dir)? {
        let mut lines = 0u64;
        let (_, incomplete) = for_each_line(&path, |line_no, line, _| {
            lines = line_no;
            match serde_json::from_slice::<DatasetRecord>(line) {
                Ok(r) if r.device_id == device => dataset.records.push(r),
                Ok(r) => dataset.skipped_lines.push(SkippedLine {
                    path: path.clone(),
                    line: line_no,
                    reason: format!("device id {:?} in the file of device {device:?}", r.device_id),
                }),
                Err(e) => dataset.skipped_lines.push(SkippedLine {
                    path: path.clone(),
                    line: line_no,
                    reason: format!("not a dataset record: {e}"),
                }),
            }
        })?;
        if incomplete {
            dataset.skipped_lines.push(SkippedLine {
                path: path.clone(),
                line: lines + 1,
                reason: "incomplete final line (no newline): a write in progress, or torn by a crash".into(),
            });
        }
    }
    // A row sent again with a new score was appended after its first version: keep the last
    // version, in the place of the first.
    let mut first_index: HashMap<(String, String, u32), usize> = HashMap::new();
    let mut records: Vec<DatasetRecord> = Vec::with_capacity(dataset.records.len());
    for record in std::mem::take(&mut dataset.records) {
        let key = (record.device_id.clone(), record.outcome.dialogue_id.clone(), record.outcome.turn);
        match first_index.get(&key) {
            Some(&i) => records[i] = record,
            None => {
                first_index.insert(key, records.len());
                records.push(record);
            }
        }
    }
    dataset.records = records;
    Ok(dataset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::tests::sample;

    const DAY: i64 = DAY_MS as i64;

    fn line(device: &str, received: u64, outcome: &TurnOutcome) -> Vec<u8> {
        let record =
            DatasetRecord { device_id: device.into(), received_unix_ms: received, outcome: outcome.clone() };
        let mut bytes = serde_json::to_vec(&record).unwrap();
        bytes.push(b'\n');
        bytes
    }

    /// Writes `lines` as the file of `device` on the day of `sample`'s rows; returns its path.
    fn write_file(dir: &Path, device: &str, lines: &[Vec<u8>]) -> PathBuf {
        let day = dir.join(utc_day(sample("d", 0).created_at_ms).unwrap());
        std::fs::create_dir_all(&day).unwrap();
        let path = day.join(format!("{device}{FILE_SUFFIX}"));
        std::fs::write(&path, lines.concat()).unwrap();
        path
    }

    #[test]
    fn utc_days_are_calendar_days() {
        assert_eq!(utc_day(0).as_deref(), Some("1970-01-01"));
        assert_eq!(utc_day(DAY - 1).as_deref(), Some("1970-01-01"));
        assert_eq!(utc_day(DAY).as_deref(), Some("1970-01-02"));
        // 2024-02-29T23:59:59.999Z, then the next millisecond.
        assert_eq!(utc_day(1_709_251_199_999).as_deref(), Some("2024-02-29"));
        assert_eq!(utc_day(1_709_251_200_000).as_deref(), Some("2024-03-01"));
        assert_eq!(utc_day(i64::MAX), None);
        assert!(is_day_name("2026-11-24"));
        assert!(!is_day_name("2026-11-2x") && !is_day_name("README") && !is_day_name("2026_11_24"));
    }

    #[test]
    fn records_read_back_in_order_with_the_last_version_of_a_row_in_its_first_place() {
        let dir = tempfile::tempdir().unwrap();
        let rescored = TurnOutcome {
            score: Some(0.5),
            score_source: Some(crate::ScoreSource::Feedback),
            ..sample("d", 0)
        };
        write_file(
            dir.path(),
            "dev",
            &[line("dev", 1, &sample("d", 0)), line("dev", 2, &sample("d", 1)), line("dev", 3, &rescored)],
        );
        let ds = read_dataset(dir.path()).unwrap();
        assert!(ds.skipped_lines.is_empty());
        let got: Vec<_> = ds.records.iter().map(|r| (r.outcome.turn, r.received_unix_ms)).collect();
        assert_eq!(got, vec![(0, 3), (1, 2)]);
        assert_eq!(ds.records[0].outcome, rescored);
    }

    #[test]
    fn a_torn_last_line_and_damaged_lines_are_reported_and_the_rest_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let third = line("dev", 3, &sample("d", 2));
        let path = write_file(
            dir.path(),
            "dev",
            &[
                line("dev", 1, &sample("d", 0)),
                b"not json\n".to_vec(),
                line("other", 2, &sample("d", 1)),
                third[..third.len() / 2].to_vec(),
            ],
        );
        let ds = read_dataset(dir.path()).unwrap();
        assert_eq!(ds.records.len(), 1);
        let skipped: Vec<_> = ds.skipped_lines.iter().map(|s| (s.path.clone(), s.line)).collect();
        assert_eq!(skipped, vec![(path.clone(), 2), (path.clone(), 3), (path, 4)]);
        assert!(ds.skipped_lines[1].reason.contains("in the file of device"), "{:?}", ds.skipped_lines);
        assert!(ds.skipped_lines[2].reason.contains("incomplete final line"), "{:?}", ds.skipped_lines);
    }

    #[test]
    fn foreign_entries_are_ignored_and_a_missing_or_plain_path_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("README"), b"notes").unwrap();
        std::fs::create_dir(dir.path().join("scratch")).unwrap();
        let path = write_file(dir.path(), "dev", &[line("dev", 1, &sample("d", 0))]);
        std::fs::write(path.with_file_name("notes.txt"), b"x").unwrap();
        assert_eq!(read_dataset(dir.path()).unwrap().records.len(), 1);
        assert!(matches!(read_dataset(dir.path().join("README")), Err(DatasetError::NotADirectory(_))));
        assert!(matches!(read_dataset(dir.path().join("missing")), Err(DatasetError::Io { .. })));
    }

    #[test]
    fn the_window_refuses_rows_made_long_before_or_after_their_receipt() {
        let now = 1_790_000_000_000i64;
        let window = TimeWindow::default();
        assert!(window.check(now - 29 * DAY, now as u64).is_ok());
        assert!(window.check(now + DAY / 2, now as u64).is_ok());
        let old = window.check(now - 31 * DAY, now as u64).unwrap_err();
        assert!(old.contains("made 31 days before it was received"), "{old}");
        let ahead = window.check(now + 2 * DAY, now as u64).unwrap_err();
        assert!(ahead.contains("made 48 hours after it was received"), "{ahead}");
        assert!(
            window
                .check(253_402_300_799_000, now as u64)
                .unwrap_err()
                .contains("the device's clock is ahead")
        );
        assert!(TimeWindow::UNBOUNDED.check(0, u64::MAX).is_ok());
        assert_eq!(TimeWindow::days(3).max_age_ms, 3 * DAY_MS);
    }
}
