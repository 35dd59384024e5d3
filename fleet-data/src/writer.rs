//! The collector's writer: each call's rows as new Parquet files, durable before it returns.
//!
//! Layout: `DIR/day=YYYY-MM-DD/part-<writer>-<received ms>-<seq>.parquet`, the UTC day of each
//! row's `created_at_ms` (Hive partitioning, which DuckDB, Spark, Trino and Polars read as the
//! column `day`). A file is written under a temporary name (`.part-...parquet.tmp`), fsynced,
//! renamed into place and its directory fsynced: readers see whole files or none, and the
//! collector acknowledges a batch only once this returned. The writer keeps no keys: a row
//! sent again is simply written again and readers keep its latest version (see
//! [`crate::read`]), so it starts at once whatever the dataset's size, and any number of
//! writers (each with its own name) may share one dataset.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use arrow::array::RecordBatch;
use outcome_log::TurnOutcome;
use outcome_log::dataset::{DatasetRecord, TimeWindow, utc_day};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use tracing::{debug, info, warn};

use crate::schema::{RowsBuilder, file_schema};
use crate::{DataError, io_error, sync_dir};

/// Name prefix of the dataset's files.
pub const FILE_PREFIX: &str = "part-";
/// Name suffix of the dataset's files.
pub const FILE_SUFFIX: &str = ".parquet";
/// Name suffix of a file being written (never read).
pub const TEMP_SUFFIX: &str = ".tmp";
/// Temporary files older than this are a crashed writer's and are removed at open.
const STALE_TEMP: Duration = Duration::from_secs(3600);
/// Most rows in one row group (a converted dataset's large days are split).
const ROW_GROUP_ROWS: usize = 256 * 1024;

/// The directory of a day's partition.
pub fn day_dir_name(day: &str) -> String {
    format!("day={day}")
}

/// Maps a Parquet error while writing `path` to [`DataError::Parquet`].
fn parquet_error(path: &Path) -> impl FnOnce(parquet::errors::ParquetError) -> DataError + '_ {
    move |e| DataError::Parquet { path: path.to_owned(), message: e.to_string() }
}

/// What one batch of an [`DatasetWriter::append_many`] call wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AppendSummary {
    /// Rows written (and durable).
    pub written: usize,
}

/// Writes outcome rows to a dataset directory as Parquet files.
#[derive(Debug)]
pub struct DatasetWriter {
    dir: PathBuf,
    name: String,
    window: TimeWindow,
    next_seq: u64,
    props: WriterProperties,
    day_dirs: HashSet<String>,
}

/// The writer's name as a file name part: letters, digits, `-` and `_`, at most 64 bytes.
fn file_name_part(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
        .take(64)
        .collect();
    if cleaned.is_empty() { "writer".into() } else { cleaned }
}

impl DatasetWriter {
    /// Opens (creating it) the dataset in `dir` for the writer `name` (the collector's MQTT
    /// client id; a random suffix keeps two writers of one name apart). Removes temporary
    /// files that crashed writers left more than an hour ago. Reads no data file.
    pub fn open(dir: impl AsRef<Path>, name: &str, window: TimeWindow) -> Result<Self, DataError> {
        let dir = dir.as_ref().to_owned();
        match std::fs::metadata(&dir) {
            Ok(meta) if !meta.is_dir() => return Err(DataError::NotADirectory(dir)),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(&dir).map_err(io_error("creating", &dir))?;
            }
            Err(e) => return Err(io_error("reading", &dir)(e)),
        }
        let removed = remove_stale_temp_files(&dir)?;
        if removed > 0 {
            warn!(removed, dir = %dir.display(), "removed temporary files of interrupted writes (never acknowledged)");
        }
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
            .build();
        let name = format!("{}-{:08x}", file_name_part(name), rand::random::<u32>());
        info!(dir = %dir.display(), writer = %name, "dataset writer open");
        Ok(Self { dir, name, window, next_seq: 0, props, day_dirs: HashSet::new() })
    }

    /// The dataset directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The window rows must fall in.
    pub fn window(&self) -> TimeWindow {
        self.window
    }

    /// The name in this writer's file names.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Writes the rows of several devices' batches received at `received_unix_ms`, one file
    /// per day they fall in, all durable when this returns. Every row is checked first
    /// (validation and the time window); nothing is written when one fails.
    pub fn append_many(
        &mut self,
        batches: &[(String, Vec<TurnOutcome>)],
        received_unix_ms: u64,
    ) -> Result<Vec<AppendSummary>, DataError> {
        let mut days: BTreeMap<String, RowsBuilder> = BTreeMap::new();
        for (device_id, rows) in batches {
            for (index, row) in rows.iter().enumerate() {
                let day = self.check(device_id, index, row, received_unix_ms)?;
                days.entry(day).or_default().push(device_id, received_unix_ms, row);
            }
        }
        self.write_days(days, received_unix_ms)?;
        Ok(batches.iter().map(|(_, rows)| AppendSummary { written: rows.len() }).collect())
    }

    /// Writes records as they are, each with its own time of receipt (a converted dataset).
    /// Checked as [`DatasetWriter::append_many`] checks rows, against each record's receipt.
    pub fn append_records(&mut self, records: &[DatasetRecord]) -> Result<usize, DataError> {
        let mut days: BTreeMap<String, RowsBuilder> = BTreeMap::new();
        let mut latest = 0;
        for (index, r) in records.iter().enumerate() {
            let day = self.check(&r.device_id, index, &r.outcome, r.received_unix_ms)?;
            days.entry(day).or_default().push(&r.device_id, r.received_unix_ms, &r.outcome);
            latest = latest.max(r.received_unix_ms);
        }
        self.write_days(days, latest)?;
        Ok(records.len())
    }

    /// The day of a row that may be written, or why not.
    fn check(
        &self,
        device_id: &str,
        index: usize,
        row: &TurnOutcome,
        received: u64,
    ) -> Result<String, DataError> {
        let invalid = |reason: String| DataError::InvalidRow {
            index,
            device_id: device_id.to_owned(),
            dialogue_id: row.dialogue_id.clone(),
            turn: row.turn,
            reason,
        };
        if device_id.is_empty() {
            return Err(invalid("empty device id".into()));
        }
        row.validate().map_err(|e| invalid(e.to_string()))?;
        self.window.check(row.created_at_ms, received).map_err(&invalid)?;
        utc_day(row.created_at_ms)
            .ok_or_else(|| invalid(format!("created_at_ms {} has no day", row.created_at_ms)))
    }

    fn write_days(&mut self, days: BTreeMap<String, RowsBuilder>, received: u64) -> Result<(), DataError> {
        let mut created_day_dir = false;
        let mut synced = Vec::new();
        for (day, mut rows) in days {
            let count = rows.len();
            let (mut file, created) = self.begin_file(&day, received)?;
            created_day_dir |= created;
            file.write(&rows.finish())?;
            let path = file.finish_unsynced_dir()?;
            debug!(file = %path.display(), rows = count, "dataset file written");
            synced.push(path.parent().map(Path::to_owned).unwrap_or_default());
        }
        for dir in &synced {
            sync_dir(dir)?;
        }
        if created_day_dir {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Starts a new file of `day` under its temporary name (with whether the day's directory
    /// had to be made).
    fn begin_file(&mut self, day: &str, received: u64) -> Result<(DayFile, bool), DataError> {
        let day_dir = self.dir.join(day_dir_name(day));
        let mut created = false;
        if !self.day_dirs.contains(day) {
            match std::fs::create_dir(&day_dir) {
                Ok(()) => created = true,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_error("creating", &day_dir)(e)),
            }
            self.day_dirs.insert(day.to_owned());
        }
        let stem = format!("{FILE_PREFIX}{}-{received:013}-{:06}", self.name, self.next_seq);
        self.next_seq += 1;
        let temp = day_dir.join(format!(".{stem}{FILE_SUFFIX}{TEMP_SUFFIX}"));
        let path = day_dir.join(format!("{stem}{FILE_SUFFIX}"));
        let file = File::create_new(&temp).map_err(io_error("creating", &temp))?;
        let writer = ArrowWriter::try_new(file, file_schema(), Some(self.props.clone()))
            .map_err(parquet_error(&temp))?;
        Ok((DayFile { writer: Some(writer), temp, path }, created))
    }

    /// A new file of `day` to which record batches of the file schema are written one after
    /// the other (a day compacted, say); it appears whole, durably, at [`DayFile::finish`], and
    /// not at all if dropped before.
    pub fn day_file(&mut self, day: &str) -> Result<DayFile, DataError> {
        let now = u64::try_from(outcome_log::now_ms()).unwrap_or(0);
        let (file, created) = self.begin_file(day, now)?;
        if created {
            sync_dir(&self.dir)?;
        }
        Ok(file)
    }
}

/// A dataset file being written under its temporary name.
#[derive(Debug)]
pub struct DayFile {
    writer: Option<ArrowWriter<File>>,
    temp: PathBuf,
    path: PathBuf,
}

impl DayFile {
    /// Appends a batch of the file schema (columns by position; a batch whose columns are
    /// nullable where the schema's are not is taken when it holds no nulls there).
    pub fn write(&mut self, batch: &RecordBatch) -> Result<(), DataError> {
        let batch = RecordBatch::try_new(file_schema(), batch.columns().to_vec())
            .map_err(|e| DataError::Schema(format!("a batch that is not of the file schema: {e}")))?;
        let writer = self.writer.as_mut().expect("a day file writes until it is finished");
        writer.write(&batch).map_err(parquet_error(&self.temp))
    }

    /// Closes, fsyncs and renames the file into place and fsyncs its directory; returns its path.
    pub fn finish(self) -> Result<PathBuf, DataError> {
        let path = self.finish_unsynced_dir()?;
        sync_dir(path.parent().unwrap_or(Path::new(".")))?;
        Ok(path)
    }

    /// [`DayFile::finish`] without the directory's fsync (the caller syncs it once for many).
    fn finish_unsynced_dir(mut self) -> Result<PathBuf, DataError> {
        let writer = self.writer.take().expect("finished once");
        let file = writer.into_inner().map_err(parquet_error(&self.temp))?;
        file.sync_all().map_err(io_error("syncing", &self.temp))?;
        std::fs::rename(&self.temp, &self.path).map_err(io_error("renaming into place", &self.path))?;
        Ok(self.path.clone())
    }
}

impl Drop for DayFile {
    fn drop(&mut self) {
        if self.writer.is_some() {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// Removes `.part-*.parquet.tmp` files older than an hour from the day directories.
fn remove_stale_temp_files(dir: &Path) -> Result<usize, DataError> {
    let mut removed = 0;
    let now = SystemTime::now();
    for entry in std::fs::read_dir(dir).map_err(io_error("listing", dir))? {
        let entry = entry.map_err(io_error("listing", dir))?;
        let day_dir = entry.path();
        if !entry.file_name().to_string_lossy().starts_with("day=") || !day_dir.is_dir() {
            continue;
        }
        for file in std::fs::read_dir(&day_dir).map_err(io_error("listing", &day_dir))? {
            let file = file.map_err(io_error("listing", &day_dir))?;
            let name = file.file_name().to_string_lossy().into_owned();
            if !(name.starts_with(&format!(".{FILE_PREFIX}")) && name.ends_with(TEMP_SUFFIX)) {
                continue;
            }
            let age =
                file.metadata().and_then(|m| m.modified()).ok().and_then(|t| now.duration_since(t).ok());
            if age.is_some_and(|a| a > STALE_TEMP) {
                std::fs::remove_file(file.path()).map_err(io_error("removing", &file.path()))?;
                removed += 1;
            }
        }
    }
    Ok(removed)
}
