//! The head: multinomial logistic regression from the 384-d embedding to the four task
//! categories, and its file format.
//!
//! # File format
//! A [safetensors](https://huggingface.co/docs/safetensors) file with two float32 tensors,
//! `weight` `[4, 384]` (one row per category, in [`TaskCategory::ALL`] order) and `bias` `[4]`,
//! and one metadata entry, `tmo.task_head`, a JSON object ([`HeadInfo`]): the format name
//! `tmo-task-head` and version, the embedding model and width, the category names in row order,
//! `weights_sha256` (sha256 of the little-endian bytes of `weight` then `bias`, checked at load),
//! and how the head was trained. One metadata key and fixed field order keep the file
//! byte-for-byte reproducible.

use std::collections::HashMap;

use policy_onnx::TaskCategory;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::embed::EMBEDDING_DIM;
use crate::error::{ClassifierError, Result};

/// The number of task categories.
pub const CLASSES: usize = TaskCategory::ALL.len();

/// The format name in a head's metadata.
pub const HEAD_FORMAT: &str = "tmo-task-head";
/// The format version this crate writes and reads.
pub const HEAD_VERSION: u32 = 1;
/// The metadata key holding [`HeadInfo`].
pub const METADATA_KEY: &str = "tmo.task_head";
/// The embedding model the head expects.
pub const EMBEDDING_MODEL: &str = "all-MiniLM-L6-v2";

/// How a head was trained (kept in the file for provenance).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingInfo {
    /// The training method.
    pub method: String,
    /// Full-batch gradient steps.
    pub epochs: u32,
    /// Gradient step size.
    pub learning_rate: f64,
    /// L2 penalty on the weights.
    pub l2: f64,
    /// Whether the loss weighted each category by the inverse of its frequency.
    pub class_balanced: bool,
    /// Training examples (questions, with repeats).
    pub examples: usize,
    /// Distinct question texts among them.
    pub distinct_questions: usize,
    /// Examples per category, in [`TaskCategory::ALL`] order.
    pub class_counts: [usize; CLASSES],
    /// sha256 of the training data file, when trained from one.
    pub data_sha256: Option<String>,
    /// sha256 of the supplementary question set (JSON Lines), when trained with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supplementary_sha256: Option<String>,
    /// sha256 of the training embeddings' little-endian f32 bytes, in example order: equal
    /// embeddings (same model, same CPU kernels) give a byte-identical head.
    pub embeddings_sha256: String,
    /// Mean training loss (cross-entropy plus penalty) after the last step.
    pub final_loss: f64,
}

/// The metadata of a head file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadInfo {
    /// Always [`HEAD_FORMAT`].
    pub format: String,
    /// Always [`HEAD_VERSION`].
    pub version: u32,
    /// The embedding model ([`EMBEDDING_MODEL`]).
    pub embedding: String,
    /// The embedding width ([`EMBEDDING_DIM`]).
    pub dim: usize,
    /// Category names in row order.
    pub classes: Vec<String>,
    /// sha256 of the weight then bias bytes (f32 little-endian).
    pub weights_sha256: String,
    /// How it was trained.
    pub training: TrainingInfo,
}

/// A loaded head: `logits = weight · embedding + bias`, probabilities by softmax.
#[derive(Debug, Clone, PartialEq)]
pub struct Head {
    /// Row-major `[CLASSES, EMBEDDING_DIM]`.
    weight: Vec<f32>,
    bias: [f32; CLASSES],
    info: HeadInfo,
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn weights_digest(weight: &[f32], bias: &[f32]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(f32_bytes(weight));
    hasher.update(f32_bytes(bias));
    hex::encode(hasher.finalize())
}

fn class_names() -> Vec<String> {
    TaskCategory::ALL.iter().map(|c| c.name().to_string()).collect()
}

impl Head {
    /// A head from trained parameters (`weight` row-major `[CLASSES, EMBEDDING_DIM]`).
    pub fn new(weight: Vec<f32>, bias: [f32; CLASSES], training: TrainingInfo) -> Result<Self> {
        if weight.len() != CLASSES * EMBEDDING_DIM {
            return Err(ClassifierError::Training(format!(
                "weight has {} values, expected {CLASSES} x {EMBEDDING_DIM}",
                weight.len()
            )));
        }
        let info = HeadInfo {
            format: HEAD_FORMAT.to_string(),
            version: HEAD_VERSION,
            embedding: EMBEDDING_MODEL.to_string(),
            dim: EMBEDDING_DIM,
            classes: class_names(),
            weights_sha256: weights_digest(&weight, &bias),
            training,
        };
        Ok(Self { weight, bias, info })
    }

    /// The head's metadata.
    pub fn info(&self) -> &HeadInfo {
        &self.info
    }

    /// The category logits of a unit-norm embedding.
    pub fn logits(&self, embedding: &[f32]) -> [f32; CLASSES] {
        let mut logits = self.bias;
        for (row, logit) in self.weight.chunks_exact(EMBEDDING_DIM).zip(logits.iter_mut()) {
            *logit += row.iter().zip(embedding).map(|(w, x)| w * x).sum::<f32>();
        }
        logits
    }

    /// The category probabilities of an embedding (softmax of [`Head::logits`]).
    pub fn probabilities(&self, embedding: &[f32]) -> [f32; CLASSES] {
        softmax(self.logits(embedding))
    }

    /// The head as a safetensors file (see the module documentation).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let weight = f32_bytes(&self.weight);
        let bias = f32_bytes(&self.bias);
        let serialize_error = |e: safetensors::SafeTensorError| ClassifierError::Training(e.to_string());
        let views = [
            (
                "weight",
                TensorView::new(Dtype::F32, vec![CLASSES, EMBEDDING_DIM], &weight)
                    .map_err(serialize_error)?,
            ),
            ("bias", TensorView::new(Dtype::F32, vec![CLASSES], &bias).map_err(serialize_error)?),
        ];
        let info = serde_json::to_string(&self.info).map_err(|e| ClassifierError::Training(e.to_string()))?;
        let metadata = HashMap::from([(METADATA_KEY.to_string(), info)]);
        safetensors::serialize(views, Some(metadata)).map_err(serialize_error)
    }

    /// Reads a head; `source_name` names the bytes in errors.
    pub fn from_bytes(bytes: &[u8], source_name: &str) -> Result<Self> {
        let not_a_head =
            |detail: String| ClassifierError::NotAHead { source_name: source_name.to_string(), detail };
        let dims =
            |detail: String| ClassifierError::HeadDims { source_name: source_name.to_string(), detail };

        let (_, metadata) =
            SafeTensors::read_metadata(bytes).map_err(|e| not_a_head(format!("not safetensors ({e})")))?;
        let info_json = metadata
            .metadata()
            .as_ref()
            .and_then(|m| m.get(METADATA_KEY))
            .ok_or_else(|| not_a_head(format!("no `{METADATA_KEY}` metadata")))?;
        let info: HeadInfo = serde_json::from_str(info_json)
            .map_err(|e| not_a_head(format!("bad `{METADATA_KEY}` metadata: {e}")))?;
        if info.format != HEAD_FORMAT || info.version != HEAD_VERSION {
            return Err(not_a_head(format!(
                "format {} v{}, expected {HEAD_FORMAT} v{HEAD_VERSION}",
                info.format, info.version
            )));
        }
        if info.embedding != EMBEDDING_MODEL || info.dim != EMBEDDING_DIM {
            return Err(dims(format!(
                "made for {} ({}-d), this classifier embeds with {EMBEDDING_MODEL} ({EMBEDDING_DIM}-d)",
                info.embedding, info.dim
            )));
        }
        if info.classes != class_names() {
            return Err(dims(format!("categories {:?}, expected {:?}", info.classes, class_names())));
        }
        let tensors =
            SafeTensors::deserialize(bytes).map_err(|e| not_a_head(format!("not safetensors ({e})")))?;
        let read = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
            let view = tensors.tensor(name).map_err(|_| not_a_head(format!("no `{name}` tensor")))?;
            if view.dtype() != Dtype::F32 {
                return Err(dims(format!("`{name}` is {:?}, expected F32", view.dtype())));
            }
            if view.shape() != shape {
                return Err(dims(format!("`{name}` has shape {:?}, expected {shape:?}", view.shape())));
            }
            Ok(view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
        };
        let weight = read("weight", &[CLASSES, EMBEDDING_DIM])?;
        let bias_values = read("bias", &[CLASSES])?;
        let mut bias = [0f32; CLASSES];
        bias.copy_from_slice(&bias_values);
        let digest = weights_digest(&weight, &bias);
        if digest != info.weights_sha256 {
            return Err(not_a_head(format!(
                "weights sha256 {digest} does not match the recorded {} (damaged file)",
                info.weights_sha256
            )));
        }
        if weight.iter().chain(&bias).any(|v| !v.is_finite()) {
            return Err(not_a_head("weights are not all finite".to_string()));
        }
        Ok(Self { weight, bias, info })
    }
}

/// Softmax of logits, stable.
pub fn softmax(logits: [f32; CLASSES]) -> [f32; CLASSES] {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp = logits.map(|l| (l - max).exp());
    let total: f32 = exp.iter().sum();
    exp.map(|e| e / total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> TrainingInfo {
        TrainingInfo {
            method: "test".into(),
            epochs: 0,
            learning_rate: 0.0,
            l2: 0.0,
            class_balanced: false,
            examples: 0,
            distinct_questions: 0,
            class_counts: [0; CLASSES],
            data_sha256: None,
            supplementary_sha256: None,
            embeddings_sha256: String::new(),
            final_loss: 0.0,
        }
    }

    fn head() -> Head {
        let weight = (0..CLASSES * EMBEDDING_DIM).map(|i| (i % 7) as f32 * 0.25 - 0.5).collect();
        Head::new(weight, [0.1, -0.2, 0.3, -0.4], info()).expect("head")
    }

    #[test]
    fn round_trips_through_bytes() {
        let head = head();
        let bytes = head.to_bytes().expect("bytes");
        assert_eq!(Head::from_bytes(&bytes, "test").expect("reads"), head);
        assert_eq!(head.to_bytes().expect("bytes again"), bytes, "serialisation is deterministic");
    }

    #[test]
    fn garbage_is_not_a_head() {
        let error = Head::from_bytes(b"hello, world", "garbage.bin").expect_err("garbage");
        assert!(matches!(error, ClassifierError::NotAHead { .. }), "{error}");
        assert!(error.to_string().contains("garbage.bin"), "{error}");
    }

    #[test]
    fn safetensors_without_metadata_is_not_a_head() {
        let data = f32_bytes(&[0.0; 4]);
        let view = TensorView::new(Dtype::F32, vec![4], &data).expect("view");
        let bytes = safetensors::serialize([("bias", view)], None).expect("serialize");
        let error = Head::from_bytes(&bytes, "plain.safetensors").expect_err("no metadata");
        assert!(error.to_string().contains("no `tmo.task_head` metadata"), "{error}");
    }

    #[test]
    fn wrong_width_is_a_dims_error() {
        let head = head();
        let mut info = head.info().clone();
        info.dim = 768;
        let weight = f32_bytes(&head.weight);
        let bias = f32_bytes(&head.bias);
        let views = [
            ("weight", TensorView::new(Dtype::F32, vec![CLASSES, EMBEDDING_DIM], &weight).expect("view")),
            ("bias", TensorView::new(Dtype::F32, vec![CLASSES], &bias).expect("view")),
        ];
        let metadata =
            HashMap::from([(METADATA_KEY.to_string(), serde_json::to_string(&info).expect("json"))]);
        let bytes = safetensors::serialize(views, Some(metadata)).expect("serialize");
        let error = Head::from_bytes(&bytes, "wide.safetensors").expect_err("768-d");
        assert!(matches!(error, ClassifierError::HeadDims { .. }), "{error}");
    }

    #[test]
    fn flipped_weight_byte_fails_the_checksum() {
        let mut bytes = head().to_bytes().expect("bytes");
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        let error = Head::from_bytes(&bytes, "damaged").expect_err("damaged");
        assert!(error.to_string().contains("damaged file"), "{error}");
    }

    #[test]
    fn probabilities_sum_to_one() {
        let embedding = vec![1.0 / (EMBEDDING_DIM as f32).sqrt(); EMBEDDING_DIM];
        let p = head().probabilities(&embedding);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }
}
