//! The durable outcome log of a device: one SQLite row per dialogue turn, in WAL mode.
//!
//! - [`OutcomeLog`]: the file (schema, size bound, scores, upload marks, stats, integrity check,
//!   M4A1 export).
//! - [`OutcomeWriter`]: the single writer thread with group commit; callers from any thread (or
//!   any async runtime) queue rows and are told when their row is durable.
//!
//! Durability: see [`Durability`]. A kill -9 at any moment loses at most the rows that were not
//! yet acknowledged, and never corrupts the file (SQLite's WAL commit protocol).
//!
//! - [`dataset`]: the fleet's collected dataset (JSON lines by day and device), written by the
//!   collector and read by the trainer.
//!
//! Does not depend on an async runtime.

pub mod dataset;
mod error;
mod export;
mod log;
mod outcome;
mod writer;

pub use error::OutcomeLogError;
pub use export::{
    DialogueRows, ExportRow, ExportSummary, M4a1ExportOptions, UnscoredTurns, group_dialogues,
    m4a1_dialogues, write_m4a1,
};
pub use log::{
    APPLICATION_ID, Durability, LogStats, MIN_MAX_BYTES, OutcomeLog, OutcomeLogConfig, SCHEMA_VERSION,
};
pub use outcome::{
    CloudAttempt, LoggedOutcome, MAX_DIALOGUE_ID_LEN, RowId, ScoreSource, ScoreUpdate, TurnOutcome, now_ms,
};
pub use writer::{AppendCallback, OutcomeWriter, Pending, WriterConfig};
