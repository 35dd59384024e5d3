//! The errors of the task classifier.

use std::path::PathBuf;

/// Everything that can go wrong loading the classifier or classifying a question.
#[derive(Debug, thiserror::Error)]
pub enum ClassifierError {
    /// A file of the embedding model directory is missing or unreadable.
    #[error(
        "cannot read model file {path}: {source} (install the model with `tmoctl model fetch all-minilm-l6-v2`)"
    )]
    ModelFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file of the embedding model directory is there but is not what it should be.
    #[error("model file {path} is corrupt: {detail}")]
    ModelCorrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The head file cannot be read.
    #[error("cannot read head file {path}: {source}")]
    HeadFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The head bytes are not a task-classifier head (or a damaged one).
    #[error("{source_name} is not a task-classifier head: {detail}")]
    NotAHead {
        /// The head file, or `<embedded head>` / `<head bytes>`.
        source_name: String,
        /// What is wrong.
        detail: String,
    },
    /// The head does not fit the embedding model or the task categories.
    #[error("head {source_name} has the wrong dimensions: {detail}")]
    HeadDims {
        /// The head file, or `<embedded head>` / `<head bytes>`.
        source_name: String,
        /// What does not fit.
        detail: String,
    },
    /// The question is empty or only white space.
    #[error("the question is empty")]
    EmptyQuestion,
    /// The tokenizer failed on a question.
    #[error("tokenizing the question failed: {0}")]
    Tokenize(String),
    /// Training data cannot train a head.
    #[error("cannot train a head: {0}")]
    Training(String),
}

/// Result with [`ClassifierError`].
pub type Result<T, E = ClassifierError> = std::result::Result<T, E>;
