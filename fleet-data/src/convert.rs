//! A dataset of earlier collectors (JSON lines, `DIR/<YYYY-MM-DD>/<device>.jsonl`) into
//! Parquet: the latest version of each row (its last line) with its own time of receipt, so
//! that readers see the same rows before and after.

use std::path::Path;

use outcome_log::dataset::{TimeWindow, read_dataset};

use crate::{DataError, DatasetWriter, TornFile};

/// Records converted per Parquet file written.
const RECORDS_PER_CALL: usize = 1 << 20;

/// What a conversion did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Conversion {
    /// Records written (one per row: its latest version).
    pub records: usize,
    /// Lines of the JSON-lines dataset that were not records (torn or damaged), left out.
    pub skipped: Vec<TornFile>,
}

/// Converts the JSON-lines dataset in `from` into the Parquet dataset in `to`.
pub fn convert_json_lines(from: &Path, to: &Path) -> Result<Conversion, DataError> {
    let dataset =
        read_dataset(from).map_err(|e| DataError::Location(format!("reading {}: {e}", from.display())))?;
    let mut writer = DatasetWriter::open(to, "converted", TimeWindow::UNBOUNDED)?;
    for chunk in dataset.records.chunks(RECORDS_PER_CALL) {
        writer.append_records(chunk)?;
    }
    let skipped = dataset
        .skipped_lines
        .iter()
        .map(|s| TornFile { path: format!("{}:{}", s.path.display(), s.line), reason: s.reason.clone() })
        .collect();
    Ok(Conversion { records: dataset.records.len(), skipped })
}
