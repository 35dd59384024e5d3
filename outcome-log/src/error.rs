//! The errors of the outcome log.

use std::path::PathBuf;

use rusqlite::ErrorCode;

/// Everything that can go wrong with the outcome log, typed so that callers can tell a full
/// disk from a full log from bad input.
#[derive(Debug, thiserror::Error)]
pub enum OutcomeLogError {
    /// The file could not be opened or set up (permissions, missing directory, locked file).
    #[error("cannot open the outcome log {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    /// The file is not a SQLite database, or a database of something else.
    #[error("{path} is not an outcome log: {reason}")]
    NotAnOutcomeLog { path: PathBuf, reason: String },
    /// The file was written by a newer build with a schema this build does not know.
    #[error(
        "the outcome log {path} has schema version {found}, newer than version {supported} that this \
         build reads: run a newer tmod/tmoctl, or move the file away to start a new log"
    )]
    NewerSchema { path: PathBuf, found: i64, supported: i64 },
    /// `PRAGMA integrity_check` found problems.
    #[error("the outcome log failed its integrity check: {}", problems.join("; "))]
    Corrupt { problems: Vec<String> },
    /// The configuration cannot work (for example a size bound too small for one page).
    #[error("invalid outcome log configuration: {0}")]
    InvalidConfig(String),
    /// The outcome itself is malformed (a NaN latency, a propensity outside (0, 1], ...).
    #[error("invalid outcome for dialogue {dialogue:?} turn {turn}: {reason}")]
    InvalidOutcome { dialogue: String, turn: u32, reason: String },
    /// A row for this dialogue and turn exists already (rows are unique by dialogue and turn).
    #[error("turn {turn} of dialogue {dialogue:?} is already in the outcome log")]
    DuplicateTurn { dialogue: String, turn: u32 },
    /// `set_score` named a turn the log does not hold (never logged, or evicted after upload).
    #[error("no turn {turn} of dialogue {dialogue:?} in the outcome log")]
    UnknownTurn { dialogue: String, turn: u32 },
    /// A judge's score for a turn whose answer did not come from the cloud: a judge scores
    /// cloud answers only, so a publisher on the score topic cannot relabel local turns.
    #[error("turn {turn} of dialogue {dialogue:?} was not answered by the cloud: no judge score")]
    NotACloudAnswer { dialogue: String, turn: u32 },
    /// The size bound is reached and every row is still waiting for upload: the new row is
    /// refused (acknowledged rows are never evicted before they are uploaded).
    #[error(
        "the outcome log is full: {used_bytes} of {max_bytes} bytes used and all {pending_rows} rows \
         still wait for upload; the new row is refused until rows are uploaded or max_bytes is raised"
    )]
    LogFull { used_bytes: u64, max_bytes: u64, pending_rows: u64 },
    /// The file system is full (SQLITE_FULL): nothing of the failed transaction was written.
    #[error("disk full: the outcome log could not be written ({message}); free space on the device")]
    DiskFull { message: String },
    /// Any other SQLite failure.
    #[error("outcome log database error ({code:?}): {message}")]
    Sqlite { code: Option<ErrorCode>, message: String },
    /// A stored row does not decode (a file edited by hand, or damaged).
    #[error("row {id} of the outcome log is unreadable: {reason}")]
    CorruptRow { id: i64, reason: String },
    /// The writer thread is gone (shut down, or it could not start).
    #[error("the outcome writer has stopped")]
    WriterStopped,
    /// The log cannot be opened now (a read-only or full state directory, a missing mount):
    /// the writer retries; appended rows are held in memory meanwhile, up to a bound.
    #[error("the outcome log is unavailable ({reason}); {fate}")]
    Unavailable { reason: String, fate: &'static str },
    /// `try_append` found the writer's queue full.
    #[error("the outcome writer queue is full ({capacity} requests wait)")]
    QueueFull { capacity: usize },
    /// Writing an export failed.
    #[error("writing the M4A1 export: {0}")]
    Export(#[source] serde_json::Error),
}

impl From<rusqlite::Error> for OutcomeLogError {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(ErrorCode::DiskFull) => OutcomeLogError::DiskFull { message: e.to_string() },
            code => OutcomeLogError::Sqlite { code, message: e.to_string() },
        }
    }
}

impl OutcomeLogError {
    /// A copy of a transaction-wide failure, for each row of a batch that shared the transaction.
    pub(crate) fn for_batch_member(&self) -> OutcomeLogError {
        match self {
            OutcomeLogError::DiskFull { message } => OutcomeLogError::DiskFull { message: message.clone() },
            OutcomeLogError::Sqlite { code, message } => {
                OutcomeLogError::Sqlite { code: *code, message: message.clone() }
            }
            other => OutcomeLogError::Sqlite { code: None, message: other.to_string() },
        }
    }

    /// True for [`OutcomeLogError::DiskFull`] and [`OutcomeLogError::LogFull`]: the row was refused
    /// for lack of space, not for what it holds.
    pub fn is_out_of_space(&self) -> bool {
        matches!(self, OutcomeLogError::DiskFull { .. } | OutcomeLogError::LogFull { .. })
    }
}
