//! The task category of a question, predicted on the device.
//!
//! A question is embedded with all-MiniLM-L6-v2 (a BERT forward pass on the LLM engine's 8-bit
//! kernels, see [`embed`]; mean pooling, then L2 normalisation, as sentence-transformers does), and a small head (multinomial
//! logistic regression on the 384-d embedding, trained by `tmoctl classifier train`) gives the
//! probability of each [`TaskCategory`]. The model directory comes from
//! `tmoctl model fetch all-minilm-l6-v2`; the default head ships in the crate
//! ([`DEFAULT_HEAD`], `heads/m4a1-tasks.safetensors`, made by `heads/make-head.sh`).
//!
//! Inference runs on the calling thread alone; call it off async workers.

pub mod embed;
pub mod error;
pub mod head;
pub mod train;

use std::path::Path;

pub use embed::{EMBEDDING_DIM, Embedder};
pub use error::{ClassifierError, Result};
pub use head::{CLASSES, Head, HeadInfo, TrainingInfo};
pub use policy_onnx::TaskCategory;

/// The shipped head, trained on the questions of `../shared/data/m4a1/m4a1-train.json` and the
/// supplementary set [`train::SUPPLEMENTARY_QUESTIONS`] by `heads/make-head.sh`.
pub const DEFAULT_HEAD: &[u8] = include_bytes!("../heads/m4a1-tasks.safetensors");

/// The name of [`DEFAULT_HEAD`] in errors and logs.
pub const DEFAULT_HEAD_NAME: &str = "<embedded head heads/m4a1-tasks.safetensors>";

/// The prediction for one question.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Classification {
    /// The most probable category.
    pub task: TaskCategory,
    /// The probability of each category, in [`TaskCategory::ALL`] order.
    pub probabilities: [f32; CLASSES],
}

/// The embedding model and a head. `Send + Sync`: share one behind an `Arc`.
#[derive(Debug)]
pub struct TaskClassifier {
    embedder: Embedder,
    head: Head,
}

impl TaskClassifier {
    /// Loads the model directory and a head file.
    pub fn load(model_dir: &Path, head: &Path) -> Result<Self> {
        let bytes = std::fs::read(head)
            .map_err(|source| ClassifierError::HeadFile { path: head.to_path_buf(), source })?;
        let head = Head::from_bytes(&bytes, &head.display().to_string())?;
        Ok(Self { embedder: Embedder::load(model_dir)?, head })
    }

    /// Loads the model directory with a head given as bytes (e.g. [`DEFAULT_HEAD`]).
    pub fn from_parts(model_dir: &Path, head_bytes: &[u8]) -> Result<Self> {
        let name = if head_bytes == DEFAULT_HEAD { DEFAULT_HEAD_NAME } else { "<head bytes>" };
        let head = Head::from_bytes(head_bytes, name)?;
        Ok(Self { embedder: Embedder::load(model_dir)?, head })
    }

    /// Loads the model directory with the shipped head.
    pub fn with_default_head(model_dir: &Path) -> Result<Self> {
        Self::from_parts(model_dir, DEFAULT_HEAD)
    }

    /// A classifier from an already loaded embedder and head.
    pub fn new(embedder: Embedder, head: Head) -> Self {
        Self { embedder, head }
    }

    /// The category of a question, with the probability of each.
    pub fn classify(&self, question: &str) -> Result<Classification> {
        let embedding = self.embedder.embed(question)?;
        Ok(self.classify_embedding(&embedding))
    }

    /// The category of an embedding computed by [`TaskClassifier::embed`].
    pub fn classify_embedding(&self, embedding: &[f32]) -> Classification {
        let probabilities = self.head.probabilities(embedding);
        let best =
            (0..CLASSES).fold(0, |best, c| if probabilities[c] > probabilities[best] { c } else { best });
        Classification { task: TaskCategory::ALL[best], probabilities }
    }

    /// The unit-norm sentence embedding of `text` ([`EMBEDDING_DIM`] values).
    pub fn embed(&self, text: &str) -> Result<Vec<f32>> {
        self.embedder.embed(text)
    }

    /// The embedder.
    pub fn embedder(&self) -> &Embedder {
        &self.embedder
    }

    /// The head.
    pub fn head(&self) -> &Head {
        &self.head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifier_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<TaskClassifier>();
    }

    #[test]
    fn shipped_head_reads() {
        let head = Head::from_bytes(DEFAULT_HEAD, DEFAULT_HEAD_NAME).expect("shipped head reads");
        assert_eq!(head.info().dim, EMBEDDING_DIM);
    }
}
