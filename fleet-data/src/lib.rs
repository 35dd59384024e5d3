//! The fleet's outcome dataset: Hive-partitioned Parquet that data engines read.
//!
//! - [`schema`]: the documented columns, and outcome rows to and from Arrow record batches.
//! - [`writer`]: the collector's writer: each write group as new files, atomic and fsynced
//!   before the batches are acknowledged; no key set, so it starts at once and several
//!   collectors may share one dataset.
//! - `read` (feature `query`): the dataset on the DataFusion engine (a local directory or
//!   `s3://`), the latest version of each row, torn files set aside and reported.
//! - `report` (feature `query`): what a fleet manager looks at, per policy version and day.
//! - `compact` (feature `query`): a day's many small files as one file of its latest rows.
//! - [`convert`]: a JSON-lines dataset of earlier collectors into Parquet.

use std::fs::File;
use std::path::{Path, PathBuf};

#[cfg(feature = "query")]
pub mod compact;
pub mod convert;
#[cfg(feature = "query")]
pub mod read;
#[cfg(feature = "query")]
pub mod report;
pub mod schema;
pub mod writer;

pub use outcome_log::dataset::DatasetRecord;
#[cfg(feature = "query")]
pub use read::OutcomeStore;
pub use writer::{AppendSummary, DatasetWriter};

/// A file of the dataset that could not be read (or a line of a JSON-lines dataset), and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornFile {
    /// The file's location in the store.
    pub path: String,
    pub reason: String,
}

/// The records of the dataset's latest versions, with what was set aside.
#[derive(Debug, Clone, Default)]
pub struct LatestRecords {
    pub records: Vec<DatasetRecord>,
    /// Stored versions read (at least `records.len()`; more when rows were sent again).
    pub versions: u64,
    pub torn: Vec<TornFile>,
}

/// Maps an I/O error of `what` on `path` to [`DataError::Io`].
pub(crate) fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DataError {
    let path = path.to_owned();
    move |source| DataError::Io { what, path, source }
}

/// Makes the entries of `dir` (a file renamed or removed in it) durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), DataError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_error("syncing directory", dir))
}

#[cfg(feature = "query")]
impl From<datafusion::error::DataFusionError> for DataError {
    fn from(e: datafusion::error::DataFusionError) -> Self {
        DataError::Engine(e.to_string())
    }
}

/// Errors of the dataset, naming the file, row or query concerned.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file system operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The dataset path exists and is not a directory.
    #[error("the dataset path {0} is not a directory")]
    NotADirectory(PathBuf),
    /// The dataset's location cannot be used.
    #[error("dataset location: {0}")]
    Location(String),
    /// Writing a Parquet file failed.
    #[error("writing {path}: {message}")]
    Parquet { path: PathBuf, message: String },
    /// A row is not acceptable; nothing of the call was written.
    #[error(
        "row {index} of device {device_id:?} (dialogue {dialogue_id:?}, turn {turn}) is invalid: {reason}"
    )]
    InvalidRow { index: usize, device_id: String, dialogue_id: String, turn: u32, reason: String },
    /// Stored columns are not the dataset's.
    #[error("dataset schema: {0}")]
    Schema(String),
    /// A stored row does not read back as an outcome.
    #[error("dataset {0}")]
    Row(String),
    /// The engine failed.
    #[error("query engine: {0}")]
    Engine(String),
    /// Drawing a chart failed.
    #[error("chart {path}: {message}")]
    Chart { path: PathBuf, message: String },
}
