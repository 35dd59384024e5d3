//! The sentence embedding: all-MiniLM-L6-v2 (a 6-layer BERT) on candle, mean-pooled over the
//! attention mask and L2-normalised, as sentence-transformers computes it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{Tokenizer, TruncationParams};

use crate::error::{ClassifierError, Result};

/// The embedding width of all-MiniLM-L6-v2.
pub const EMBEDDING_DIM: usize = 384;

/// Longest input in tokens (sentence-transformers' `max_seq_length` for this model); longer
/// questions are truncated, as sentence-transformers does.
pub const MAX_TOKENS: usize = 256;

/// The files of the model directory the embedder reads.
pub const MODEL_FILES: [&str; 3] = ["config.json", "tokenizer.json", "model.safetensors"];

/// The weights with every dense layer's `[out, in]` matrix stored column-major (the transpose
/// made contiguous, then viewed transposed back: same shape and values, other strides).
///
/// candle computes `x · Wᵀ` with the gemm crate, which turns a row-major destination around and
/// multiplies `W · xᵀ`: with `W` row-major it copies ("packs") the whole matrix on every call,
/// which for a question of a few tokens costs several times the arithmetic. Stored column-major,
/// `W` is used in place. The embedding tables stay row-major (they are indexed by row).
fn column_major_linear_weights(
    tensors: HashMap<String, Tensor>,
) -> candle_core::Result<HashMap<String, Tensor>> {
    tensors
        .into_iter()
        .map(|(name, tensor)| {
            let tensor = if tensor.rank() == 2 && !name.contains("embeddings") {
                tensor.t()?.contiguous()?.t()?
            } else {
                tensor
            };
            Ok((name, tensor))
        })
        .collect()
}

/// all-MiniLM-L6-v2 loaded from a model directory (`config.json`, `tokenizer.json`,
/// `model.safetensors`, as `tmoctl model fetch all-minilm-l6-v2` installs them).
pub struct Embedder {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder").field("dim", &EMBEDDING_DIM).field("device", &self.device).finish()
    }
}

fn read(path: PathBuf) -> Result<(PathBuf, Vec<u8>)> {
    match std::fs::read(&path) {
        Ok(bytes) => Ok((path, bytes)),
        Err(source) => Err(ClassifierError::ModelFile { path, source }),
    }
}

impl Embedder {
    /// Loads the model from `model_dir` onto the CPU.
    pub fn load(model_dir: &Path) -> Result<Self> {
        let device = Device::Cpu;
        let corrupt =
            |path: &Path, detail: String| ClassifierError::ModelCorrupt { path: path.to_path_buf(), detail };

        let (config_path, config_bytes) = read(model_dir.join("config.json"))?;
        let config: Config =
            serde_json::from_slice(&config_bytes).map_err(|e| corrupt(&config_path, e.to_string()))?;
        if config.hidden_size != EMBEDDING_DIM {
            return Err(corrupt(
                &config_path,
                format!("hidden_size {} where all-MiniLM-L6-v2 has {EMBEDDING_DIM}", config.hidden_size),
            ));
        }

        let (tokenizer_path, tokenizer_bytes) = read(model_dir.join("tokenizer.json"))?;
        let mut tokenizer =
            Tokenizer::from_bytes(&tokenizer_bytes).map_err(|e| corrupt(&tokenizer_path, e.to_string()))?;
        // The shipped tokenizer.json pads every input to 128 tokens and truncates at 128: one
        // question is embedded alone, without padding, truncated where sentence-transformers does.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams { max_length: MAX_TOKENS, ..TruncationParams::default() }))
            .map_err(|e| corrupt(&tokenizer_path, e.to_string()))?;

        let (weights_path, weights) = read(model_dir.join("model.safetensors"))?;
        let tensors = candle_core::safetensors::load_buffer(&weights, &device)
            .and_then(column_major_linear_weights)
            .map_err(|e| corrupt(&weights_path, e.to_string()))?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
        let model = BertModel::load(vb, &config).map_err(|e| corrupt(&weights_path, e.to_string()))?;
        Ok(Self { model, tokenizer, device })
    }

    /// The unit-norm embedding of `text` ([`EMBEDDING_DIM`] values).
    pub fn embed(&self, text: &str) -> Result<Vec<f32>> {
        if text.trim().is_empty() {
            return Err(ClassifierError::EmptyQuestion);
        }
        let encoding =
            self.tokenizer.encode(text, true).map_err(|e| ClassifierError::Tokenize(e.to_string()))?;
        let ids = encoding.get_ids();
        let mask = encoding.get_attention_mask();
        let len = ids.len();
        let input_ids = Tensor::from_slice(ids, (1, len), &self.device)?;
        let type_ids = Tensor::from_slice(encoding.get_type_ids(), (1, len), &self.device)?;
        let attention_mask = Tensor::from_slice(mask, (1, len), &self.device)?;
        let hidden = self.model.forward(&input_ids, &type_ids, Some(&attention_mask))?; // [1, len, dim]
        let weights = attention_mask.to_dtype(DType::F32)?.unsqueeze(2)?; // [1, len, 1]
        let summed = hidden.broadcast_mul(&weights)?.sum(1)?; // [1, dim]
        let count = weights.sum(1)?.clamp(1e-9f32, f32::MAX)?; // [1, 1]
        let mean = summed.broadcast_div(&count)?;
        let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12f32, f32::MAX)?;
        let unit = mean.broadcast_div(&norm)?;
        Ok(unit.squeeze(0)?.to_vec1::<f32>()?)
    }
}
