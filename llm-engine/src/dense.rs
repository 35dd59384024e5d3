//! Dense layers of small models that do not come as GGUF files (the task classifier's
//! sentence encoder) on the engine's kernels: the weights are quantized once to Q8_0, the
//! activations to 8 bits per call, and the products run at the CPU's best kernel level, as a
//! GGUF model's Q8_0 tensors do.
//!
//! For a question of a few tokens, an f32 matrix product reads four bytes per weight for a
//! handful of multiply-adds each: memory decides, and Q8_0 reads a little over one.
#![allow(unsafe_code)]

use candle_core::quantized::GgmlDType;
use candle_core::quantized::k_quants::{BlockQ8_0, GgmlType};

use crate::error::{EngineError, Result};
use crate::kernels::{Input, InputFormat, PackedRow, QMatrix, dot_unpacked};
use crate::pool::ComputePool;

/// A dense layer `y = W x + b` with `W` (`rows` x `cols`, row-major as PyTorch stores
/// `Linear.weight`) quantized to Q8_0.
#[derive(Debug)]
pub struct Q8Linear {
    rows: usize,
    cols: usize,
    weights: Weights,
    bias: Vec<f32>,
}

#[derive(Debug)]
enum Weights {
    /// The Q8_0 blocks, row after row, in words so that they are 4-byte aligned as the kernels
    /// require.
    Blocks(Vec<u32>),
    /// The rows unpacked once for the batch kernel (where the CPU has it), which computes the
    /// blocks' products to the bit for one token as for many.
    Unpacked(Vec<PackedRow>),
}

impl Q8Linear {
    /// Quantizes `weight` (`rows * cols` values, row-major); `cols` must be a multiple of 32.
    /// `bias` has `rows` values when given.
    pub fn quantize(weight: &[f32], rows: usize, cols: usize, bias: Option<&[f32]>) -> Result<Self> {
        let bad = |detail: String| EngineError::DenseShape(format!("{rows}x{cols}: {detail}"));
        if !cols.is_multiple_of(32) || cols == 0 {
            return Err(bad("the row length must be a positive multiple of 32".into()));
        }
        if weight.len() != rows * cols {
            return Err(bad(format!("{} weights", weight.len())));
        }
        let bias = match bias {
            Some(b) if b.len() != rows => return Err(bad(format!("{} bias values", b.len()))),
            Some(b) => b.to_vec(),
            None => vec![0.0; rows],
        };
        let words = q8_0_words(weight);
        let unpacked = Self::matrix(&words, rows, cols).map_err(bad)?.unpacked_rows();
        let weights = unpacked.map_or(Weights::Blocks(words), Weights::Unpacked);
        Ok(Self { rows, cols, weights, bias })
    }

    /// Output values per input row.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input values per row.
    pub fn cols(&self) -> usize {
        self.cols
    }

    fn matrix(words: &[u32], rows: usize, cols: usize) -> std::result::Result<QMatrix<'_>, String> {
        let bytes = rows * cols / 32 * GgmlDType::Q8_0.type_size();
        // SAFETY: `words` holds at least `bytes` initialised bytes (see `quantize`).
        let bytes = unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), bytes) };
        QMatrix::new(GgmlDType::Q8_0, rows, cols, bytes)
    }

    /// `out[t * rows + r] = W[r] . x[t] + b[r]` for the rows `x` holds (set by
    /// [`DenseInput::set`] with this layer's `cols`); `out` is resized to fit.
    pub fn forward(&self, x: &mut DenseInput, out: &mut Vec<f32>) {
        let (tokens, cols) = (x.input.tokens(), x.input.cols());
        assert_eq!(cols, self.cols, "input rows of {cols} values for a layer of {}", self.cols);
        out.clear();
        out.resize(tokens * self.rows, 0.0);
        match &self.weights {
            Weights::Unpacked(rows) => {
                x.input.prepare(InputFormat::Q8, &x.pool);
                dot_unpacked(rows, &x.input, tokens, out);
            }
            Weights::Blocks(words) => {
                let matrix = Self::matrix(words, self.rows, self.cols).expect("checked in quantize");
                x.input.prepare(matrix.input_format(), &x.pool);
                matrix.dot_tile(&x.input, tokens, 0..self.rows, out);
            }
        }
        for row in out.chunks_exact_mut(self.rows) {
            row.iter_mut().zip(&self.bias).for_each(|(y, b)| *y += b);
        }
    }
}

/// `weight` as Q8_0 blocks, in words (4-byte aligned).
fn q8_0_words(weight: &[f32]) -> Vec<u32> {
    let mut blocks = vec![BlockQ8_0::zeros(); weight.len() / 32];
    BlockQ8_0::from_float(weight, &mut blocks);
    let bytes = std::mem::size_of_val(blocks.as_slice());
    let mut words = vec![0u32; bytes.div_ceil(4)];
    // SAFETY: both buffers are plain bytes of at least `bytes` length and do not overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(blocks.as_ptr().cast::<u8>(), words.as_mut_ptr().cast::<u8>(), bytes)
    };
    words
}

/// The input rows of [`Q8Linear::forward`], quantized once per [`DenseInput::set`] for every
/// layer that takes them. Products run on the calling thread.
#[derive(Debug)]
pub struct DenseInput {
    input: Input,
    pool: ComputePool,
}

impl DenseInput {
    /// An empty input.
    pub fn new() -> Self {
        // One thread: the caller's. No helper thread is started, so this cannot fail.
        let pool = ComputePool::new(1).expect("a pool of the calling thread alone starts no thread");
        Self { input: Input::default(), pool }
    }

    /// Takes `tokens` rows of `cols` values (`values.len() == tokens * cols`).
    pub fn set(&mut self, values: &[f32], tokens: usize, cols: usize) {
        assert_eq!(values.len(), tokens * cols, "{tokens} rows of {cols} values");
        self.input.set(values, tokens, cols);
    }
}

impl Default for DenseInput {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::values;

    #[test]
    fn products_match_f32_within_8_bit_rounding() {
        let (rows, cols) = (70, 96);
        let weight = values(rows * cols, 1);
        let bias = values(rows, 2);
        let layer = Q8Linear::quantize(&weight, rows, cols, Some(&bias)).expect("quantizes");
        for tokens in [1, 3, 4, 9] {
            let x = values(tokens * cols, 3 + tokens as u32);
            let mut input = DenseInput::new();
            input.set(&x, tokens, cols);
            let mut out = Vec::new();
            layer.forward(&mut input, &mut out);
            assert_eq!(out.len(), tokens * rows);
            for t in 0..tokens {
                for r in 0..rows {
                    let exact: f32 = weight[r * cols..(r + 1) * cols]
                        .iter()
                        .zip(&x[t * cols..(t + 1) * cols])
                        .map(|(w, v)| w * v)
                        .sum::<f32>()
                        + bias[r];
                    // Two 8-bit roundings of values within [-1, 1]: about 1/127 of each term's
                    // scale, spread over 96 terms.
                    assert!(
                        (out[t * rows + r] - exact).abs() < 0.1,
                        "token {t} row {r}: {} vs {exact}",
                        out[t * rows + r]
                    );
                }
            }
        }
    }

    #[test]
    fn a_token_gives_the_same_bits_alone_and_in_a_batch() {
        let (rows, cols) = (33, 64);
        let layer = Q8Linear::quantize(&values(rows * cols, 5), rows, cols, None).expect("quantizes");
        let x = values(6 * cols, 6);
        let (mut input, mut batch, mut alone) = (DenseInput::new(), Vec::new(), Vec::new());
        input.set(&x, 6, cols);
        layer.forward(&mut input, &mut batch);
        input.set(&x[5 * cols..], 1, cols);
        layer.forward(&mut input, &mut alone);
        assert_eq!(&batch[5 * rows..], &alone[..]);
    }

    #[test]
    fn unpacked_rows_give_the_blocks_products_to_the_bit() {
        let (rows, cols) = (9, 128);
        let weight = values(rows * cols, 7);
        let unpacked = Q8Linear::quantize(&weight, rows, cols, None).expect("quantizes");
        let blocks = Q8Linear {
            weights: Weights::Blocks(q8_0_words(&weight)),
            ..Q8Linear::quantize(&weight, rows, cols, None).expect("quantizes")
        };
        for tokens in [1, 2, 5] {
            let x = values(tokens * cols, 8);
            let (mut input, mut a, mut b) = (DenseInput::new(), Vec::new(), Vec::new());
            input.set(&x, tokens, cols);
            unpacked.forward(&mut input, &mut a);
            blocks.forward(&mut input, &mut b);
            assert_eq!(a, b, "{tokens} tokens");
        }
    }

    #[test]
    fn bad_shapes_are_refused() {
        assert!(Q8Linear::quantize(&[0.0; 40], 1, 40, None).is_err(), "not a multiple of 32");
        assert!(Q8Linear::quantize(&[0.0; 64], 3, 32, None).is_err(), "wrong count");
        assert!(Q8Linear::quantize(&[0.0; 64], 2, 32, Some(&[0.0])).is_err(), "wrong bias");
    }
}
