//! The collected dataset: outcome rows of the whole fleet as JSON lines, partitioned by day.
//!
//! Layout: `DIR/<YYYY-MM-DD>/<device_id>.jsonl`, the UTC day of the outcome's `created_at_ms`;
//! one [`DatasetRecord`] per line:
//! `{"device_id": "...", "received_unix_ms": <u64>, "outcome": <TurnOutcome>}`.
//!
//! - Nothing is duplicated: a row is identified by (device id, dialogue id, turn). The
//!   [`DatasetWriter`] rebuilds the set of stored keys by scanning the directory when it opens
//!   and skips rows it already holds (they count as duplicates, and the collector acknowledges
//!   them again). A row always lands in the file of its own day, so a resent row meets its
//!   first copy in the key set.
//! - Bounded by a [`TimeWindow`] around receipt: a row whose own time is more than 30 days
//!   before its receipt (or a day after it) is refused, so devices cannot pick partitions at
//!   will (any day up to year 9999 before), and the writer scans and holds the keys of the
//!   window's days only: its memory and its start-up follow the window, not the dataset's age.
//! - Durable on return: [`DatasetWriter::append_many`] writes every touched file, `fdatasync`s
//!   each once, and `fsync`s the directories in which it created a day directory or a file,
//!   before it returns; the collector acknowledges only after that.
//! - Torn lines: a crash (kill -9 or power loss) in the middle of a write leaves an incomplete
//!   last line. [`read_dataset`] skips and reports it; [`DatasetWriter::open`] (and the writer
//!   when it first opens a file) truncates the file after its last good line, so later appends
//!   start on a fresh line. Those rows were never acknowledged, so their devices send them again.
//!
//! Does not depend on an async runtime.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{ScoreSource, TurnOutcome};

/// File name suffix of a device's file in a day directory.
pub const FILE_SUFFIX: &str = ".jsonl";

/// Longest device id accepted as a file name stem, in bytes (file names end at 255 bytes).
pub const MAX_DEVICE_ID_BYTES: usize = 200;

/// The lock file at the top of a dataset directory: one writer at a time.
pub const LOCK_FILE: &str = ".writer.lock";

/// Open file handles kept between appends; beyond it the cache is emptied.
const MAX_OPEN_FILES: usize = 512;

/// One line of the dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetRecord {
    /// The device that logged the row (also the file's name).
    pub device_id: String,
    /// When the collector received it, unix milliseconds.
    pub received_unix_ms: u64,
    /// The row as the device logged it.
    pub outcome: TurnOutcome,
}

/// The same line, borrowed, for writing.
#[derive(Serialize)]
struct RecordRef<'a> {
    device_id: &'a str,
    received_unix_ms: u64,
    outcome: &'a TurnOutcome,
}

/// What the writer needs from a line to know its key (the rest is skipped unparsed into types).
#[derive(Deserialize)]
struct KeyLine {
    device_id: String,
    outcome: KeyOutcome,
}

#[derive(Deserialize)]
struct KeyOutcome {
    dialogue_id: String,
    turn: u32,
    #[serde(default)]
    score: Option<f64>,
    #[serde(default)]
    score_source: Option<ScoreSource>,
}

/// A stored row's score, as the version of the row the dataset holds: a row sent again with
/// another score (feedback or a judge after the upload) is written again and supersedes it.
type StoredScore = Option<(u64, Option<ScoreSource>)>;

fn stored_score(score: Option<f64>, source: Option<ScoreSource>) -> StoredScore {
    score.map(|s| (s.to_bits(), source))
}

/// Errors of the dataset, naming the file (and line) concerned.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// A file system operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done ("creating", "writing", "syncing", ...).
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
    /// Another writer (another collector process) has the dataset open.
    #[error(
        "the dataset {0} is in use by another writer (its lock file {LOCK_FILE} is held): one collector per \
         directory"
    )]
    Locked(PathBuf),
    /// The device id cannot be a file name.
    #[error("device id {device_id:?} cannot name a dataset file: {reason}")]
    InvalidDeviceId {
        /// The refused id.
        device_id: String,
        /// Why.
        reason: String,
    },
    /// A row is not acceptable (it would not read back); nothing of the call was written.
    #[error(
        "row {index} of device {device_id:?} (dialogue {dialogue_id:?}, turn {turn}) is invalid: {reason}"
    )]
    InvalidRow {
        /// The device.
        device_id: String,
        /// Position of the row in its batch, from 0.
        index: usize,
        /// The row's dialogue.
        dialogue_id: String,
        /// The row's turn.
        turn: u32,
        /// Why.
        reason: String,
    },
    /// A row could not be encoded as JSON.
    #[error("encoding a row of device {device_id:?} as JSON: {source}")]
    Encode {
        /// The device.
        device_id: String,
        /// The error.
        #[source]
        source: serde_json::Error,
    },
}

fn io_error<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> DatasetError + 'a {
    move |source| DatasetError::Io { what, path: path.to_path_buf(), source }
}

/// A line that [`read_dataset`] (or the writer's scan) did not take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedLine {
    /// The file.
    pub path: PathBuf,
    /// 1-based line number.
    pub line: u64,
    /// Why it was skipped.
    pub reason: String,
}

/// What [`DatasetWriter::append`] did with a batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AppendSummary {
    /// Rows written (and now durable).
    pub written: usize,
    /// Rows already in the dataset (or twice in the call), not written again.
    pub duplicates: usize,
    /// Rows already in the dataset with another score, written again: the later line
    /// supersedes the earlier one for readers (counted in `written` too).
    pub rescored: usize,
}

/// What [`DatasetWriter::open`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// Files scanned.
    pub files: usize,
    /// Day directories before the window, not scanned (no row can be written there).
    pub days_before_window: usize,
    /// Rows (keys) found.
    pub rows: usize,
    /// Files whose unfinished tail (a torn or unreadable end) was cut, with the bytes cut.
    pub truncated: Vec<(PathBuf, u64)>,
    /// Unreadable lines followed by good ones, left in place (their keys are unknown).
    pub skipped_lines: Vec<SkippedLine>,
}

const DAY_MS: u64 = 24 * 3600 * 1000;

/// One device's stored keys of a day: (dialogue id, turn) -> the stored version's score.
type DeviceKeys = HashMap<(String, u32), StoredScore>;

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

    /// The first day rows received at `now_unix_ms` may be filed under.
    fn first_day(&self, now_unix_ms: u64) -> String {
        let first = now_unix_ms.saturating_sub(self.max_age_ms);
        utc_day(i64::try_from(first).unwrap_or(i64::MAX)).unwrap_or_default()
    }
}

/// Appends outcome rows to a dataset directory, each row once. One writer per directory.
#[derive(Debug)]
pub struct DatasetWriter {
    dir: PathBuf,
    window: TimeWindow,
    /// Stored keys of the window's days: day -> device id -> (dialogue id, turn) -> the stored
    /// version's score.
    keys: BTreeMap<String, HashMap<String, DeviceKeys>>,
    rows: usize,
    /// Day directories known to exist.
    day_dirs: HashSet<String>,
    /// Directories in which an entry was created and not yet made durable by an fsync.
    unsynced_dirs: BTreeSet<PathBuf>,
    files: HashMap<PathBuf, File>,
    report: OpenReport,
    /// Holds the directory's lock while the writer lives.
    _lock: File,
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

fn is_day_name(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter().enumerate().all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
}

/// Checks that `device_id` can be a file name stem.
pub fn check_device_id(device_id: &str) -> Result<(), DatasetError> {
    let reason = if device_id.is_empty() {
        Some("it is empty".to_owned())
    } else if device_id.len() > MAX_DEVICE_ID_BYTES {
        Some(format!("it is {} bytes, longer than {MAX_DEVICE_ID_BYTES}", device_id.len()))
    } else if device_id.contains(['/', '\0']) {
        Some("it contains '/' or a NUL byte".to_owned())
    } else {
        None
    };
    match reason {
        Some(reason) => Err(DatasetError::InvalidDeviceId { device_id: device_id.to_owned(), reason }),
        None => Ok(()),
    }
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

impl DatasetWriter {
    /// [`DatasetWriter::open_with`] the default [`TimeWindow`].
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, DatasetError> {
        Self::open_with(dir, TimeWindow::default())
    }

    /// Opens (creating it if needed) the dataset in `dir`: scans the files of the window's days
    /// for their keys, cuts unfinished tails left by a crash. Scanning parses every line's key:
    /// about 2 s for a million rows (1.3 GB) on a 2-core VM (bench `collector_ingest` of the
    /// `fleet` crate). Refuses with [`DatasetError::Locked`] while another writer has the
    /// directory open.
    pub fn open_with(dir: impl AsRef<Path>, window: TimeWindow) -> Result<Self, DatasetError> {
        let dir = dir.as_ref().to_path_buf();
        match std::fs::metadata(&dir) {
            Ok(m) if !m.is_dir() => return Err(DatasetError::NotADirectory(dir)),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {
                std::fs::create_dir_all(&dir).map_err(io_error("creating", &dir))?;
                if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                    sync_dir(parent)?;
                }
            }
            Err(e) => return Err(DatasetError::Io { what: "reading", path: dir, source: e }),
        }
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_error("opening", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(DatasetError::Locked(dir)),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(DatasetError::Io { what: "locking", path: lock_path, source: e });
            }
        }
        let mut writer = Self {
            _lock: lock,
            dir,
            window,
            keys: BTreeMap::new(),
            rows: 0,
            day_dirs: HashSet::new(),
            unsynced_dirs: BTreeSet::new(),
            files: HashMap::new(),
            report: OpenReport::default(),
        };
        let started = std::time::Instant::now();
        let first_day = window.first_day(crate::now_ms().max(0) as u64);
        let mut before_window = BTreeSet::new();
        for (day, path, device) in dataset_files(&writer.dir)? {
            if day < first_day {
                before_window.insert(day);
                continue;
            }
            writer.scan_file(&path, &day, &device)?;
            writer.day_dirs.insert(day);
        }
        writer.report.days_before_window = before_window.len();
        info!(
            dir = %writer.dir.display(),
            files = writer.report.files,
            rows = writer.report.rows,
            truncated = writer.report.truncated.len(),
            skipped_lines = writer.report.skipped_lines.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "dataset opened"
        );
        Ok(writer)
    }

    /// Reads the keys of one file; cuts everything after its last good line.
    fn scan_file(&mut self, path: &Path, day: &str, device: &str) -> Result<(), DatasetError> {
        let mut good_end = 0u64;
        let mut bad: Vec<(SkippedLine, u64)> = Vec::new();
        let mut keys: Vec<((String, u32), StoredScore)> = Vec::new();
        let (len, _) =
            for_each_line(path, |line_no, line, end| match serde_json::from_slice::<KeyLine>(line) {
                Ok(k) if k.device_id == device => {
                    let score = stored_score(k.outcome.score, k.outcome.score_source);
                    keys.push(((k.outcome.dialogue_id, k.outcome.turn), score));
                    good_end = end;
                }
                Ok(k) => bad.push((
                    SkippedLine {
                        path: path.to_path_buf(),
                        line: line_no,
                        reason: format!("device id {:?} in the file of device {device:?}", k.device_id),
                    },
                    end,
                )),
                Err(e) => bad.push((
                    SkippedLine { path: path.to_path_buf(), line: line_no, reason: e.to_string() },
                    end,
                )),
            })?;
        self.report.files += 1;
        if len > good_end {
            // The tail after the last good line was never acknowledged: every ack follows an
            // fsync of all the lines before it.
            let file = OpenOptions::new().write(true).open(path).map_err(io_error("opening", path))?;
            file.set_len(good_end).map_err(io_error("truncating", path))?;
            file.sync_all().map_err(io_error("syncing", path))?;
            warn!(path = %path.display(), cut_bytes = len - good_end, "unfinished tail of a dataset file cut");
            self.report.truncated.push((path.to_path_buf(), len - good_end));
            // Lines after the last good one were cut with it.
            bad.retain(|(_, end)| *end <= good_end);
        }
        for (s, _) in &bad {
            warn!(path = %s.path.display(), line = s.line, reason = %s.reason, "unreadable dataset line left in place");
        }
        self.report.skipped_lines.extend(bad.into_iter().map(|(s, _)| s));
        let set = self.keys.entry(day.to_owned()).or_default().entry(device.to_owned()).or_default();
        for (key, score) in keys {
            // Lines are in write order: the last version of a row wins.
            if set.insert(key, score).is_none() {
                self.rows += 1;
                self.report.rows += 1;
            }
        }
        Ok(())
    }

    /// The dataset directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What [`DatasetWriter::open`] found.
    pub fn open_report(&self) -> &OpenReport {
        &self.report
    }

    /// Rows of the window's days in the dataset (distinct keys).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The window rows must be made in, around their receipt.
    pub fn window(&self) -> TimeWindow {
        self.window
    }

    /// Whether the row (device, dialogue, turn) is stored under one of the window's days.
    pub fn contains(&self, device_id: &str, dialogue_id: &str, turn: u32) -> bool {
        let key = (dialogue_id.to_owned(), turn);
        self.keys.values().any(|day| day.get(device_id).is_some_and(|set| set.contains_key(&key)))
    }

    /// Forgets the keys and handles of the days before the window at `now_unix_ms`.
    fn leave_days_before(&mut self, now_unix_ms: u64) {
        let first_day = self.window.first_day(now_unix_ms);
        let kept = self.keys.split_off(first_day.as_str());
        let gone = std::mem::replace(&mut self.keys, kept);
        if gone.is_empty() {
            return;
        }
        self.rows -= gone.values().flat_map(|day| day.values()).map(DeviceKeys::len).sum::<usize>();
        self.day_dirs.retain(|day| day.as_str() >= first_day.as_str());
        let dir = &self.dir;
        self.files.retain(|path, _| {
            path.strip_prefix(dir)
                .ok()
                .and_then(|p| p.components().next())
                .is_some_and(|day| day.as_os_str().to_string_lossy().as_ref() >= first_day.as_str())
        });
    }

    /// Appends the rows of one device; durable on return. See [`DatasetWriter::append_many`].
    pub fn append(
        &mut self,
        device_id: &str,
        rows: Vec<TurnOutcome>,
        received_unix_ms: u64,
    ) -> Result<AppendSummary, DatasetError> {
        let mut summaries = self.append_many(vec![(device_id.to_owned(), rows)], received_unix_ms)?;
        Ok(summaries.pop().unwrap_or_default())
    }

    /// Appends several batches (device id, rows) at once, with one fdatasync per touched file:
    /// the collector's way to share the cost of durability between batches that arrived
    /// together. Rows already stored, or repeated in the call, are counted as duplicates and
    /// not written. Every row is checked first ([`TurnOutcome::validate`], and its time against
    /// the [`TimeWindow`] of `received_unix_ms`): on an invalid row or device id nothing is
    /// written. On an I/O error nothing is recorded as stored (rows
    /// that did reach a file are found by the next scan, or written again: a file cut back to
    /// its length before the failed write).
    pub fn append_many(
        &mut self,
        batches: Vec<(String, Vec<TurnOutcome>)>,
        received_unix_ms: u64,
    ) -> Result<Vec<AppendSummary>, DatasetError> {
        let mut days = Vec::with_capacity(batches.len());
        for (device_id, rows) in &batches {
            check_device_id(device_id)?;
            let mut row_days = Vec::with_capacity(rows.len());
            for (index, row) in rows.iter().enumerate() {
                let invalid = |reason: String| DatasetError::InvalidRow {
                    device_id: device_id.clone(),
                    index,
                    dialogue_id: row.dialogue_id.clone(),
                    turn: row.turn,
                    reason,
                };
                row.validate().map_err(|e| invalid(e.to_string()))?;
                self.window.check(row.created_at_ms, received_unix_ms).map_err(invalid)?;
                let day = utc_day(row.created_at_ms).ok_or_else(|| {
                    invalid(format!("created_at_ms {} is past year 9999", row.created_at_ms))
                })?;
                row_days.push(day);
            }
            days.push(row_days);
        }

        let mut summaries = Vec::with_capacity(batches.len());
        self.leave_days_before(received_unix_ms);
        let mut new_keys: HashMap<(&str, &str, &str, u32), StoredScore> = HashMap::new();
        let mut by_file: BTreeMap<(&str, &str), Vec<u8>> = BTreeMap::new();
        for ((device_id, rows), row_days) in batches.iter().zip(&days) {
            let mut summary = AppendSummary::default();
            for (row, day) in rows.iter().zip(row_days) {
                let key = (day.as_str(), device_id.as_str(), row.dialogue_id.as_str(), row.turn);
                let score = stored_score(row.score, row.score_source);
                let stored = match new_keys.get(&key) {
                    Some(s) => Some(*s),
                    None => self
                        .keys
                        .get(day.as_str())
                        .and_then(|d| d.get(device_id.as_str()))
                        .and_then(|set| set.get(&(row.dialogue_id.clone(), row.turn)).copied()),
                };
                match stored {
                    Some(s) if s == score => {
                        summary.duplicates += 1;
                        continue;
                    }
                    Some(_) => summary.rescored += 1,
                    None => {}
                }
                new_keys.insert(key, score);
                let buf = by_file.entry((day.as_str(), device_id.as_str())).or_default();
                let record = RecordRef { device_id, received_unix_ms, outcome: row };
                serde_json::to_writer(&mut *buf, &record)
                    .map_err(|source| DatasetError::Encode { device_id: device_id.clone(), source })?;
                buf.push(b'\n');
                summary.written += 1;
            }
            summaries.push(summary);
        }

        for ((day, device_id), bytes) in &by_file {
            let path = self.ensure_file(day, device_id)?;
            self.write_durably(&path, bytes)?;
        }
        self.sync_dirs()?;

        for ((day, device_id, dialogue_id, turn), score) in new_keys {
            let set = self.keys.entry(day.to_owned()).or_default().entry(device_id.to_owned()).or_default();
            if set.insert((dialogue_id.to_owned(), turn), score).is_none() {
                self.rows += 1;
            }
        }
        Ok(summaries)
    }

    /// The path of the device's file of `day`, creating the day directory and opening (or
    /// creating) the file if needed; a file opened for the first time gets its tail repaired.
    fn ensure_file(&mut self, day: &str, device_id: &str) -> Result<PathBuf, DatasetError> {
        let day_dir = self.dir.join(day);
        if !self.day_dirs.contains(day) {
            match std::fs::create_dir(&day_dir) {
                Ok(()) => {
                    self.unsynced_dirs.insert(self.dir.clone());
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => return Err(DatasetError::Io { what: "creating", path: day_dir, source: e }),
            }
            self.day_dirs.insert(day.to_owned());
        }
        let path = day_dir.join(format!("{device_id}{FILE_SUFFIX}"));
        if self.files.contains_key(&path) {
            return Ok(path);
        }
        if self.files.len() >= MAX_OPEN_FILES {
            self.files.clear();
        }
        let file = match OpenOptions::new().append(true).create_new(true).open(&path) {
            Ok(f) => {
                self.unsynced_dirs.insert(day_dir);
                f
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                let f = OpenOptions::new().append(true).open(&path).map_err(io_error("opening", &path))?;
                repair_tail(&path, &f)?;
                f
            }
            Err(e) => return Err(DatasetError::Io { what: "creating", path, source: e }),
        };
        self.files.insert(path.clone(), file);
        Ok(path)
    }

    /// Appends `bytes` (whole lines) and fdatasyncs; on failure cuts the file back.
    fn write_durably(&mut self, path: &Path, bytes: &[u8]) -> Result<(), DatasetError> {
        let Some(file) = self.files.get_mut(path) else {
            return Err(DatasetError::Io {
                what: "writing",
                path: path.to_path_buf(),
                source: std::io::Error::other("file handle missing"),
            });
        };
        let before = file.metadata().map_err(io_error("reading the length of", path))?.len();
        let written = file.write_all(bytes).map_err(io_error("writing", path));
        let synced = written.and_then(|()| file.sync_data().map_err(io_error("syncing", path)));
        if let Err(e) = synced {
            if let Err(cut) = file.set_len(before) {
                warn!(path = %path.display(), error = %cut, "could not cut a failed write back");
            }
            self.files.remove(path);
            return Err(e);
        }
        Ok(())
    }

    fn sync_dirs(&mut self) -> Result<(), DatasetError> {
        while let Some(dir) = self.unsynced_dirs.first().cloned() {
            sync_dir(&dir)?;
            self.unsynced_dirs.remove(&dir);
        }
        Ok(())
    }
}

/// Cuts a file opened for appending back to its last newline (a torn line from a crash).
fn repair_tail(path: &Path, file: &File) -> Result<(), DatasetError> {
    use std::io::{Read, Seek, SeekFrom};
    let len = file.metadata().map_err(io_error("reading the length of", path))?.len();
    if len == 0 {
        return Ok(());
    }
    let mut reader = File::open(path).map_err(io_error("opening", path))?;
    let mut last = [0u8; 1];
    reader.seek(SeekFrom::Start(len - 1)).map_err(io_error("seeking in", path))?;
    reader.read_exact(&mut last).map_err(io_error("reading", path))?;
    if last[0] == b'\n' {
        return Ok(());
    }
    // Find the last newline, reading backwards in blocks.
    let mut end = len;
    let mut keep = 0u64;
    let mut block = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(block.len() as u64);
        let n = (end - start) as usize;
        reader.seek(SeekFrom::Start(start)).map_err(io_error("seeking in", path))?;
        reader.read_exact(&mut block[..n]).map_err(io_error("reading", path))?;
        if let Some(i) = block[..n].iter().rposition(|b| *b == b'\n') {
            keep = start + i as u64 + 1;
            break;
        }
        end = start;
    }
    file.set_len(keep).map_err(io_error("truncating", path))?;
    file.sync_all().map_err(io_error("syncing", path))?;
    warn!(path = %path.display(), cut_bytes = len - keep, "torn last line of a dataset file cut");
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), DatasetError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_error("syncing the directory", dir))
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

    const DAY_MS: i64 = 86_400_000;

    /// The writer with no time window: these rows were made on fixed days.
    fn open(dir: &Path) -> Result<DatasetWriter, DatasetError> {
        DatasetWriter::open_with(dir, TimeWindow::UNBOUNDED)
    }

    fn at(dialogue: &str, turn: u32, created_at_ms: i64) -> TurnOutcome {
        TurnOutcome { created_at_ms, ..sample(dialogue, turn) }
    }

    #[test]
    fn utc_days_are_calendar_days() {
        assert_eq!(utc_day(0).as_deref(), Some("1970-01-01"));
        assert_eq!(utc_day(DAY_MS - 1).as_deref(), Some("1970-01-01"));
        assert_eq!(utc_day(DAY_MS).as_deref(), Some("1970-01-02"));
        // 2024-02-29T23:59:59.999Z, then the next millisecond.
        assert_eq!(utc_day(1_709_251_199_999).as_deref(), Some("2024-02-29"));
        assert_eq!(utc_day(1_709_251_200_000).as_deref(), Some("2024-03-01"));
        assert_eq!(utc_day(i64::MAX), None);
        assert!(is_day_name("2026-11-24"));
        assert!(!is_day_name("2026-11-2x") && !is_day_name("README") && !is_day_name("2026_11_24"));
    }

    #[test]
    fn rows_land_in_the_file_of_their_day_and_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = open(dir.path()).unwrap();
        let t0 = 1_790_000_000_000; // 2026-09-21
        let rows = vec![at("d1", 0, t0), at("d1", 1, t0 + DAY_MS), at("d2", 0, t0)];
        assert_eq!(
            w.append("dev-b", rows, 42).unwrap(),
            AppendSummary { written: 3, duplicates: 0, rescored: 0 }
        );
        assert_eq!(w.append("dev-a", vec![at("d9", 0, t0)], 43).unwrap().written, 1);
        assert!(dir.path().join("2026-09-21/dev-b.jsonl").is_file());
        assert!(dir.path().join("2026-09-22/dev-b.jsonl").is_file());
        assert!(dir.path().join("2026-09-21/dev-a.jsonl").is_file());
        let text = std::fs::read_to_string(dir.path().join("2026-09-22/dev-b.jsonl")).unwrap();
        assert_eq!(text.lines().count(), 1);
        let line: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(line["device_id"], "dev-b");
        assert_eq!(line["received_unix_ms"], 42);
        assert_eq!(line["outcome"]["dialogue_id"], "d1");

        let ds = read_dataset(dir.path()).unwrap();
        assert!(ds.skipped_lines.is_empty());
        let order: Vec<(&str, &str, u32)> = ds
            .records
            .iter()
            .map(|r| (r.device_id.as_str(), r.outcome.dialogue_id.as_str(), r.outcome.turn))
            .collect();
        // Day 1: dev-a before dev-b (file name order), lines in order; then day 2.
        assert_eq!(
            order,
            vec![("dev-a", "d9", 0), ("dev-b", "d1", 0), ("dev-b", "d2", 0), ("dev-b", "d1", 1)]
        );
        assert_eq!(ds.records[1].outcome, at("d1", 0, t0));
    }

    #[test]
    fn duplicates_are_skipped_within_a_call_across_calls_and_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = open(dir.path()).unwrap();
        let s = w.append("dev", vec![sample("d", 0), sample("d", 1), sample("d", 0)], 1).unwrap();
        assert_eq!(s, AppendSummary { written: 2, duplicates: 1, rescored: 0 });
        assert_eq!(
            w.append("dev", vec![sample("d", 1), sample("d", 2)], 2).unwrap(),
            AppendSummary { written: 1, duplicates: 1, rescored: 0 }
        );
        // Another device may use the same dialogue id and turn.
        assert_eq!(w.append("other", vec![sample("d", 0)], 2).unwrap().written, 1);
        drop(w);

        let mut w = open(dir.path()).unwrap();
        assert_eq!(w.rows(), 4);
        assert!(w.contains("dev", "d", 2) && !w.contains("dev", "d", 3));
        let summaries = w
            .append_many(
                vec![
                    ("dev".into(), vec![sample("d", 0), sample("d", 3)]),
                    ("other".into(), vec![sample("d", 0)]),
                ],
                3,
            )
            .unwrap();
        assert_eq!(
            summaries,
            vec![
                AppendSummary { written: 1, duplicates: 1, rescored: 0 },
                AppendSummary { written: 0, duplicates: 1, rescored: 0 }
            ]
        );
        let ds = read_dataset(dir.path()).unwrap();
        assert_eq!(ds.records.len(), 5);
        let mut keys: Vec<_> = ds
            .records
            .iter()
            .map(|r| (r.device_id.clone(), r.outcome.dialogue_id.clone(), r.outcome.turn))
            .collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), 5);
    }

    #[test]
    fn a_row_sent_again_with_a_new_score_supersedes_the_stored_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = open(dir.path()).unwrap();
        w.append("dev", vec![sample("d", 0), sample("d", 1)], 1).unwrap();
        // The user rated turn 0 after its upload: the device sends the row again.
        let rated =
            TurnOutcome { score: Some(0.9), score_source: Some(ScoreSource::Feedback), ..sample("d", 0) };
        assert_eq!(
            w.append("dev", vec![rated.clone(), sample("d", 1)], 2).unwrap(),
            AppendSummary { written: 1, duplicates: 1, rescored: 1 }
        );
        // Sent once more (an ack lost): a duplicate, also after reopening.
        assert_eq!(w.append("dev", vec![rated.clone()], 3).unwrap().duplicates, 1);
        drop(w);
        let mut w = open(dir.path()).unwrap();
        assert_eq!(w.rows(), 2);
        assert_eq!(w.append("dev", vec![rated.clone()], 4).unwrap().duplicates, 1);
        let ds = read_dataset(dir.path()).unwrap();
        let turns: Vec<_> = ds.records.iter().map(|r| (r.outcome.turn, r.outcome.score)).collect();
        assert_eq!(turns, [(0, Some(0.9)), (1, None)], "the last version, in the first one's place");
    }

    #[test]
    fn a_torn_last_line_is_reported_by_the_reader_and_cut_by_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = open(dir.path()).unwrap();
        w.append("dev", vec![sample("d", 0), sample("d", 1)], 1).unwrap();
        drop(w);
        let day = utc_day(sample("d", 0).created_at_ms).unwrap();
        let path = dir.path().join(&day).join("dev.jsonl");
        let whole = std::fs::read(&path).unwrap();
        // A crash in the middle of writing a third line.
        let third = serde_json::to_vec(&RecordRef {
            device_id: "dev",
            received_unix_ms: 2,
            outcome: &sample("d", 2),
        })
        .unwrap();
        let mut torn = whole.clone();
        torn.extend_from_slice(&third[..third.len() / 2]);
        std::fs::write(&path, &torn).unwrap();

        let ds = read_dataset(dir.path()).unwrap();
        assert_eq!(ds.records.len(), 2);
        assert_eq!(ds.skipped_lines.len(), 1);
        assert_eq!(ds.skipped_lines[0].line, 3);
        assert!(ds.skipped_lines[0].reason.contains("incomplete final line"), "{:?}", ds.skipped_lines);

        let mut w = open(dir.path()).unwrap();
        assert_eq!(w.open_report().truncated, vec![(path.clone(), (third.len() / 2) as u64)]);
        assert_eq!(std::fs::read(&path).unwrap(), whole);
        // The row that was being written when the crash came is not stored: its device resends it.
        assert_eq!(
            w.append("dev", vec![sample("d", 2), sample("d", 1)], 3).unwrap(),
            AppendSummary { written: 1, duplicates: 1, rescored: 0 }
        );
        let ds = read_dataset(dir.path()).unwrap();
        assert!(ds.skipped_lines.is_empty(), "{:?}", ds.skipped_lines);
        assert_eq!(ds.records.iter().map(|r| r.outcome.turn).collect::<Vec<_>>(), vec![0, 1, 2]);
    }

    #[test]
    fn a_torn_file_met_by_a_running_writer_is_repaired_before_appending() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = open(dir.path()).unwrap();
        // A file that another writer left torn after this one opened (not scanned).
        let day = utc_day(sample("d", 0).created_at_ms).unwrap();
        std::fs::create_dir_all(dir.path().join(&day)).unwrap();
        let path = dir.path().join(&day).join("late.jsonl");
        std::fs::write(&path, b"{\"device_id\":\"late\",\"recei").unwrap();
        w.append("late", vec![sample("d", 0)], 1).unwrap();
        let ds = read_dataset(dir.path()).unwrap();
        assert!(ds.skipped_lines.is_empty(), "{:?}", ds.skipped_lines);
        assert_eq!(ds.records.len(), 1);
    }

    #[test]
    fn damaged_lines_in_the_middle_are_reported_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = open(dir.path()).unwrap();
        w.append("dev", vec![sample("d", 0)], 1).unwrap();
        drop(w);
        let day = utc_day(sample("d", 0).created_at_ms).unwrap();
        let path = dir.path().join(&day).join("dev.jsonl");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(b"not json\n");
        let good = std::fs::read(&path).unwrap();
        let second = String::from_utf8(good).unwrap().replace("\"turn\":0", "\"turn\":1");
        bytes.extend_from_slice(second.as_bytes());
        std::fs::write(&path, &bytes).unwrap();

        let ds = read_dataset(dir.path()).unwrap();
        assert_eq!(ds.records.len(), 2);
        assert_eq!(ds.skipped_lines.len(), 1);
        assert_eq!((ds.skipped_lines[0].path.clone(), ds.skipped_lines[0].line), (path.clone(), 2));
        let w = open(dir.path()).unwrap();
        assert_eq!(w.rows(), 2);
        assert!(w.open_report().truncated.is_empty());
        assert_eq!(w.open_report().skipped_lines.len(), 1);
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
    }

    #[test]
    fn bad_input_is_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = open(dir.path()).unwrap();
        for bad in ["", "a/b", "nul\0"] {
            assert!(matches!(
                w.append(bad, vec![sample("d", 0)], 1),
                Err(DatasetError::InvalidDeviceId { .. })
            ));
        }
        let mut nan = sample("d", 1);
        nan.latency_secs = f64::NAN;
        let err = w.append("dev", vec![sample("d", 0), nan], 1).unwrap_err();
        assert!(matches!(err, DatasetError::InvalidRow { index: 1, turn: 1, .. }), "{err}");
        assert!(err.to_string().contains("latency_secs"), "{err}");
        assert_eq!(w.rows(), 0);
        assert!(read_dataset(dir.path()).unwrap().records.is_empty());

        let file = dir.path().join("plain-file");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(open(&file), Err(DatasetError::NotADirectory(_))));
        assert!(matches!(read_dataset(&file), Err(DatasetError::NotADirectory(_))));
        assert!(matches!(read_dataset(dir.path().join("missing")), Err(DatasetError::Io { .. })));
    }

    #[test]
    fn one_writer_per_directory() {
        let dir = tempfile::tempdir().unwrap();
        let first = open(dir.path()).unwrap();
        assert!(matches!(open(dir.path()), Err(DatasetError::Locked(_))));
        drop(first);
        open(dir.path()).unwrap();
    }

    #[test]
    fn foreign_entries_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("README"), b"notes").unwrap();
        std::fs::create_dir(dir.path().join("scratch")).unwrap();
        let mut w = open(dir.path()).unwrap();
        w.append("dev", vec![sample("d", 0)], 1).unwrap();
        let day = utc_day(sample("d", 0).created_at_ms).unwrap();
        std::fs::write(dir.path().join(&day).join("notes.txt"), b"x").unwrap();
        assert_eq!(read_dataset(dir.path()).unwrap().records.len(), 1);
        drop(w);
        assert_eq!(open(dir.path()).unwrap().rows(), 1);
    }

    #[test]
    fn rows_outside_the_window_are_refused_and_old_days_are_neither_scanned_nor_held() {
        let dir = tempfile::tempdir().unwrap();
        let now = crate::now_ms();
        // An old day written while it was in the window (an import, or a collector long ago).
        let old = at("old", 0, now - 40 * DAY_MS);
        open(dir.path()).unwrap().append("dev", vec![old.clone()], (now - 40 * DAY_MS) as u64).unwrap();

        let mut w = DatasetWriter::open(dir.path()).unwrap();
        assert_eq!((w.open_report().days_before_window, w.open_report().files, w.rows()), (1, 0, 0));
        let received = now as u64;
        for (row, reason) in [
            (at("late", 0, now - 31 * DAY_MS), "made 31 days before it was received"),
            (at("ahead", 0, now + 2 * DAY_MS), "made 48 hours after it was received"),
            (at("far", 0, 253_402_300_799_000), "the device's clock is ahead"),
        ] {
            let err = w.append("dev", vec![row], received).unwrap_err();
            assert!(err.to_string().contains(reason), "{err}");
        }
        let fresh = at("fresh", 0, now - DAY_MS);
        assert_eq!(w.append("dev", vec![fresh.clone(), at("now", 0, now)], received).unwrap().written, 2);
        assert_eq!(w.rows(), 2);
        assert!(w.contains("dev", "fresh", 0));
        // Thirty days on, yesterday's keys leave the window with their day.
        let later = received + 30 * DAY_MS as u64;
        assert_eq!(w.append("dev", vec![at("later", 0, later as i64)], later).unwrap().written, 1);
        assert!(!w.contains("dev", "fresh", 0));
        assert_eq!(w.rows(), 2, "the row of now and the later one");
        // Readers see every day.
        drop(w);
        assert_eq!(read_dataset(dir.path()).unwrap().records.len(), 4);
    }
}
