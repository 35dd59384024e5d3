//! The sentence embedding: all-MiniLM-L6-v2 (a 6-layer BERT), mean-pooled over the tokens and
//! L2-normalised, as sentence-transformers computes it.
//!
//! The forward pass is written out here on the LLM engine's 8-bit kernels
//! ([`llm_engine::Q8Linear`]): the dense layers' weights are quantized to Q8_0 at load, the
//! activations to 8 bits per layer, and the products run at the CPU's best level (AVX-512
//! VNNI, AVX2, NEON dot products). A question is a few tokens, so an f32 product would mostly
//! read weights (42 MB of them per question); Q8_0 reads 11 MB. Embeddings stay within 1e-2
//! (cosine above 0.999) of the f32 model's: the test
//! `embedding_equals_sentence_transformers_reference` holds them to sentence-transformers'.
//!
//! One question runs on the calling thread: call it off async workers.

use std::path::{Path, PathBuf};

use llm_engine::{DenseInput, Q8Linear};
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;
use tokenizers::{Tokenizer, TruncationParams};

use crate::error::{ClassifierError, Result};

/// The embedding width of all-MiniLM-L6-v2.
pub const EMBEDDING_DIM: usize = 384;

/// Longest input in tokens (sentence-transformers' `max_seq_length` for this model); longer
/// questions are truncated, as sentence-transformers does.
pub const MAX_TOKENS: usize = 256;

/// The files of the model directory the embedder reads.
pub const MODEL_FILES: [&str; 3] = ["config.json", "tokenizer.json", "model.safetensors"];

/// The fields of the Hugging Face `config.json` the forward pass needs.
#[derive(Debug, Deserialize)]
struct Config {
    hidden_size: usize,
    intermediate_size: usize,
    num_attention_heads: usize,
    num_hidden_layers: usize,
    max_position_embeddings: usize,
    type_vocab_size: usize,
    vocab_size: usize,
    layer_norm_eps: f64,
    hidden_act: String,
}

/// A LayerNorm's scale and shift.
#[derive(Debug)]
struct Norm {
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl Norm {
    /// Normalises each row of `x` in place.
    fn apply(&self, x: &mut [f32], eps: f32) {
        let n = self.weight.len();
        for row in x.chunks_exact_mut(n) {
            let mean = row.iter().sum::<f32>() / n as f32;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n as f32;
            let inv = 1.0 / (var + eps).sqrt();
            for ((v, w), b) in row.iter_mut().zip(&self.weight).zip(&self.bias) {
                *v = (*v - mean) * inv * w + b;
            }
        }
    }
}

/// One encoder layer.
#[derive(Debug)]
struct Layer {
    /// Query, key and value in one product: rows 0..d, d..2d, 2d..3d.
    qkv: Q8Linear,
    attention_out: Q8Linear,
    attention_norm: Norm,
    intermediate: Q8Linear,
    output: Q8Linear,
    output_norm: Norm,
}

/// all-MiniLM-L6-v2 loaded from a model directory (`config.json`, `tokenizer.json`,
/// `model.safetensors`, as `tmoctl model fetch all-minilm-l6-v2` installs them).
pub struct Embedder {
    tokenizer: Tokenizer,
    /// `[vocab, d]`, `[positions, d]` and `[types, d]`, row-major.
    word_embeddings: Vec<f32>,
    position_embeddings: Vec<f32>,
    token_type_embeddings: Vec<f32>,
    embedding_norm: Norm,
    layers: Vec<Layer>,
    heads: usize,
    eps: f32,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder").field("dim", &EMBEDDING_DIM).field("layers", &self.layers.len()).finish()
    }
}

fn read(path: PathBuf) -> Result<(PathBuf, Vec<u8>)> {
    match std::fs::read(&path) {
        Ok(bytes) => Ok((path, bytes)),
        Err(source) => Err(ClassifierError::ModelFile { path, source }),
    }
}

/// The f32 tensors of a safetensors file, checked against the shapes the config implies.
struct Weights<'a> {
    file: SafeTensors<'a>,
}

impl Weights<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> std::result::Result<Vec<f32>, String> {
        let view = self.file.tensor(name).map_err(|e| format!("tensor {name}: {e}"))?;
        if view.dtype() != Dtype::F32 {
            return Err(format!("tensor {name} is {:?}, not F32", view.dtype()));
        }
        if view.shape() != shape {
            return Err(format!("tensor {name} has shape {:?}, expected {shape:?}", view.shape()));
        }
        Ok(view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    }

    fn norm(&self, prefix: &str, d: usize) -> std::result::Result<Norm, String> {
        Ok(Norm {
            weight: self.get(&format!("{prefix}.weight"), &[d])?,
            bias: self.get(&format!("{prefix}.bias"), &[d])?,
        })
    }

    /// The dense layers `names` stacked row-wise into one (they share their input).
    fn linear(&self, names: &[&str], rows: usize, cols: usize) -> std::result::Result<Q8Linear, String> {
        let (mut weight, mut bias) = (Vec::new(), Vec::new());
        for name in names {
            weight.extend(self.get(&format!("{name}.weight"), &[rows, cols])?);
            bias.extend(self.get(&format!("{name}.bias"), &[rows])?);
        }
        Q8Linear::quantize(&weight, rows * names.len(), cols, Some(&bias)).map_err(|e| e.to_string())
    }
}

impl Embedder {
    /// Loads the model from `model_dir`.
    pub fn load(model_dir: &Path) -> Result<Self> {
        let corrupt =
            |path: &Path, detail: String| ClassifierError::ModelCorrupt { path: path.to_path_buf(), detail };

        let (config_path, config_bytes) = read(model_dir.join("config.json"))?;
        let config: Config =
            serde_json::from_slice(&config_bytes).map_err(|e| corrupt(&config_path, e.to_string()))?;
        let d = config.hidden_size;
        if d != EMBEDDING_DIM {
            return Err(corrupt(
                &config_path,
                format!("hidden_size {d} where all-MiniLM-L6-v2 has {EMBEDDING_DIM}"),
            ));
        }
        if config.num_attention_heads == 0 || !d.is_multiple_of(config.num_attention_heads) {
            return Err(corrupt(&config_path, format!("{} heads for width {d}", config.num_attention_heads)));
        }
        if config.hidden_act != "gelu" {
            return Err(corrupt(
                &config_path,
                format!("activation {:?} (this BERT uses gelu)", config.hidden_act),
            ));
        }
        if config.max_position_embeddings < MAX_TOKENS || config.type_vocab_size == 0 {
            return Err(corrupt(
                &config_path,
                "fewer positions than the longest input, or no token types".into(),
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
        if tokenizer.get_vocab_size(true) > config.vocab_size {
            return Err(corrupt(
                &tokenizer_path,
                format!("more tokens than the model's {}", config.vocab_size),
            ));
        }

        let (weights_path, bytes) = read(model_dir.join("model.safetensors"))?;
        let file = SafeTensors::deserialize(&bytes).map_err(|e| corrupt(&weights_path, e.to_string()))?;
        let w = Weights { file };
        let ffn = config.intermediate_size;
        let load = move || -> std::result::Result<Embedder, String> {
            let layers = (0..config.num_hidden_layers)
                .map(|i| {
                    let p = format!("encoder.layer.{i}");
                    let s = format!("{p}.attention.self");
                    Ok(Layer {
                        qkv: w.linear(
                            &[&format!("{s}.query"), &format!("{s}.key"), &format!("{s}.value")],
                            d,
                            d,
                        )?,
                        attention_out: w.linear(&[&format!("{p}.attention.output.dense")], d, d)?,
                        attention_norm: w.norm(&format!("{p}.attention.output.LayerNorm"), d)?,
                        intermediate: w.linear(&[&format!("{p}.intermediate.dense")], ffn, d)?,
                        output: w.linear(&[&format!("{p}.output.dense")], d, ffn)?,
                        output_norm: w.norm(&format!("{p}.output.LayerNorm"), d)?,
                    })
                })
                .collect::<std::result::Result<Vec<_>, String>>()?;
            Ok(Embedder {
                tokenizer,
                word_embeddings: w.get("embeddings.word_embeddings.weight", &[config.vocab_size, d])?,
                position_embeddings: w
                    .get("embeddings.position_embeddings.weight", &[config.max_position_embeddings, d])?,
                token_type_embeddings: w
                    .get("embeddings.token_type_embeddings.weight", &[config.type_vocab_size, d])?,
                embedding_norm: w.norm("embeddings.LayerNorm", d)?,
                layers,
                heads: config.num_attention_heads,
                eps: config.layer_norm_eps as f32,
            })
        };
        load().map_err(|detail| corrupt(&weights_path, detail))
    }

    /// The unit-norm embedding of `text` ([`EMBEDDING_DIM`] values).
    pub fn embed(&self, text: &str) -> Result<Vec<f32>> {
        if text.trim().is_empty() {
            return Err(ClassifierError::EmptyQuestion);
        }
        let encoding =
            self.tokenizer.encode(text, true).map_err(|e| ClassifierError::Tokenize(e.to_string()))?;
        let hidden = self.forward(encoding.get_ids(), encoding.get_type_ids());
        let tokens = encoding.get_ids().len() as f32;
        let mut mean = vec![0f32; EMBEDDING_DIM];
        for row in hidden.chunks_exact(EMBEDDING_DIM) {
            mean.iter_mut().zip(row).for_each(|(m, v)| *m += v / tokens);
        }
        let norm = mean.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        Ok(mean.iter().map(|v| v / norm).collect())
    }

    /// The last hidden state, `[tokens, d]` row-major, of a sequence with no padding (every
    /// token attends to every token).
    fn forward(&self, ids: &[u32], type_ids: &[u32]) -> Vec<f32> {
        let d = EMBEDDING_DIM;
        let tokens = ids.len();
        let mut h = vec![0f32; tokens * d];
        for (t, row) in h.chunks_exact_mut(d).enumerate() {
            let word = &self.word_embeddings[ids[t] as usize * d..][..d];
            let position = &self.position_embeddings[t * d..][..d];
            let kind = &self.token_type_embeddings[type_ids[t] as usize * d..][..d];
            for (i, v) in row.iter_mut().enumerate() {
                *v = word[i] + position[i] + kind[i];
            }
        }
        self.embedding_norm.apply(&mut h, self.eps);

        let (mut input, mut qkv, mut context, mut x, mut ffn) =
            (DenseInput::new(), Vec::new(), vec![0f32; tokens * d], Vec::new(), Vec::new());
        let head_dim = d / self.heads;
        let scale = 1.0 / (head_dim as f32).sqrt();
        let mut scores = vec![0f32; tokens];
        for layer in &self.layers {
            input.set(&h, tokens, d);
            layer.qkv.forward(&mut input, &mut qkv);
            for head in 0..self.heads {
                let at = |t: usize, part: usize| &qkv[t * 3 * d + part * d + head * head_dim..][..head_dim];
                for t in 0..tokens {
                    let query = at(t, 0);
                    for (j, score) in scores.iter_mut().enumerate() {
                        *score = query.iter().zip(at(j, 1)).map(|(q, k)| q * k).sum::<f32>() * scale;
                    }
                    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut total = 0.0;
                    for s in &mut scores {
                        *s = (*s - max).exp();
                        total += *s;
                    }
                    let out = &mut context[t * d + head * head_dim..][..head_dim];
                    out.fill(0.0);
                    for (j, s) in scores.iter().enumerate() {
                        let p = s / total;
                        out.iter_mut().zip(at(j, 2)).for_each(|(o, v)| *o += p * v);
                    }
                }
            }
            input.set(&context, tokens, d);
            layer.attention_out.forward(&mut input, &mut x);
            x.iter_mut().zip(&h).for_each(|(x, h)| *x += h);
            layer.attention_norm.apply(&mut x, self.eps);
            std::mem::swap(&mut h, &mut x);

            input.set(&h, tokens, d);
            layer.intermediate.forward(&mut input, &mut ffn);
            ffn.iter_mut().for_each(|v| *v = gelu(*v));
            input.set(&ffn, tokens, layer.intermediate.rows());
            layer.output.forward(&mut input, &mut x);
            x.iter_mut().zip(&h).for_each(|(x, h)| *x += h);
            layer.output_norm.apply(&mut x, self.eps);
            std::mem::swap(&mut h, &mut x);
        }
        h
    }
}

/// BERT's GELU, `x * Phi(x)` with the error function.
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// The error function within 1.5e-7 (Abramowitz and Stegun 7.1.26): one exponential, no
/// branch but the sign, where libm's `erff` took a tenth of a question's time.
fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [0.254_829_6, -0.284_496_74, 1.421_413_8, -1.453_152_1, 1.061_405_4];
    let z = x.abs();
    let t = 1.0 / (1.0 + P * z);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    (1.0 - poly * (-z * z).exp()).copysign(x)
}

#[cfg(test)]
mod tests {
    use super::erf;

    #[test]
    fn erf_matches_its_values() {
        // erf to ten places.
        for (x, want) in [
            (0.0f32, 0.0f64),
            (0.1, 0.112_462_916_0),
            (0.5, 0.520_499_877_8),
            (1.0, 0.842_700_792_9),
            (-1.5, -0.966_105_146_5),
            (2.0, 0.995_322_265_0),
            (4.0, 0.999_999_984_6),
            (-9.0, -1.0),
        ] {
            assert!((f64::from(erf(x)) - want).abs() < 4e-7, "erf({x}) = {} not {want}", erf(x));
        }
    }
}
