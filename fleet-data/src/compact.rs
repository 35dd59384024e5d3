//! Compaction: a day's files as one file of its rows' latest versions.
//!
//! A collector writes a file per write group, so a quiet fleet leaves many small files a day.
//! `compact` rewrites each day that has more than one file as one file holding the latest
//! version of each of its rows (found as every reader finds them), durable before the day's old
//! files are removed; only the files listed when it started are removed, so collectors may go on
//! writing into the same days. A reader that listed a removed file before fails and reads again.
//! Local directories only.

use std::path::{Path, PathBuf};

use futures::StreamExt;
use outcome_log::dataset::TimeWindow;

use crate::{DataError, DatasetWriter, OutcomeStore, io_error, sync_dir};

/// What compaction did to one day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DayCompaction {
    pub day: String,
    /// Files replaced.
    pub files: usize,
    /// Versions they held.
    pub versions: u64,
    /// Rows written (their latest versions).
    pub rows: u64,
    /// The new file.
    pub file: PathBuf,
}

/// Compacts every day of the dataset in `dir` that has more than one file; files set aside as
/// torn are left where they are.
pub async fn compact(dir: &Path) -> Result<Vec<DayCompaction>, DataError> {
    let location =
        dir.to_str().ok_or_else(|| DataError::Location(format!("{} is not UTF-8", dir.display())))?;
    let store = OutcomeStore::open(location).await?;
    let mut writer = DatasetWriter::open(dir, "compacted", TimeWindow::UNBOUNDED)?;
    let days: Vec<(String, Vec<PathBuf>)> = store
        .day_files()
        .filter(|(_, files)| files.len() > 1)
        .map(|(day, files)| (day.to_owned(), files))
        .collect();
    let mut done = Vec::new();
    for (day, files) in days {
        store.select_day(&day).await?;
        let versions = crate::read::count(&store.collect("SELECT count(*) FROM day_versions").await?)?;
        let mut out = writer.day_file(&day)?;
        let mut rows = 0;
        let mut stream = store
            .stream("SELECT * EXCLUDE (day) FROM day_outcomes ORDER BY device_id, dialogue_id, turn")
            .await?;
        while let Some(batch) = stream.next().await {
            let batch = batch?;
            rows += batch.num_rows() as u64;
            out.write(&batch)?;
        }
        let file = out.finish()?;
        for old in &files {
            std::fs::remove_file(old).map_err(io_error("removing a compacted file", old))?;
        }
        if let Some(parent) = file.parent() {
            sync_dir(parent)?;
        }
        done.push(DayCompaction { day, files: files.len(), versions, rows, file });
    }
    Ok(done)
}
