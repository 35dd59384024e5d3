//! Quantized matrix-vector products over GGUF weights in place (memory-mapped, never copied).
//!
//! Activations are quantized once per input row to the 8-bit format each weight type's dot
//! product takes (as llama.cpp does). Q4_1, Q5_0 and Q8_0 weights have kernels of ours on
//! every CPU, Q4_K and Q6_K on AVX-512; they take `Q8Row`s: blocks of 32 signed bytes,
//! contiguous, with each block's scale and scale times sum as f32 beside them. They run at the
//! best level the CPU has: AVX-512 VNNI (two blocks per instruction), AVX-VNNI, AVX2, NEON
//! with SDOT, or portable code. The other types go through candle's block dot products, with
//! candle's activation blocks (Q8_0 for Q4_0, Q8_1 for Q5_1, Q8_K for the K-quants off
//! AVX-512).
#![allow(unsafe_code)]

use std::ops::Range;

use candle_core::quantized::GgmlDType;
use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K, BlockQ8_0,
    BlockQ8_1, BlockQ8K, GgmlType,
};
use half::f16;
use half::slice::HalfFloatSliceExt;

/// Q4_1 weights: `x = q * d + m`, nibbles 0..15 (low halves first).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Q4_1 {
    d: f16,
    m: f16,
    qs: [u8; 16],
}

/// Q5_0 weights: `x = (q - 16) * d`, the fifth bits in `qh`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Q5_0 {
    d: f16,
    qh: [u8; 4],
    qs: [u8; 16],
}

/// Q4_K weights: 256 values in eight sub-blocks of 32, `x = d * sc * q - dmin * m` with 6-bit
/// `sc` and `m` packed in `scales`, and the nibbles in four runs of 32 bytes (low halves for
/// sub-block 2i, high halves for 2i + 1).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Q4K {
    d: f16,
    dmin: f16,
    scales: [u8; 12],
    qs: [u8; 128],
}

impl Q4K {
    /// Per sub-block, `[d * sc, -dmin * m]`: the form of Q4_1's scale and offset.
    fn scale_offsets(&self) -> [[f32; 2]; 8] {
        let (d, dmin, sm) = (self.d.to_f32(), self.dmin.to_f32(), self.scales_and_mins());
        std::array::from_fn(|j| [d * f32::from(sm[2 * j]), -(dmin * f32::from(sm[2 * j + 1]))])
    }

    /// The 6-bit `sc` and `m` of the eight sub-blocks, as `[sc0, m0, sc1, m1, ...]`.
    #[inline(always)]
    fn scales_and_mins(&self) -> [u8; 16] {
        let s = &self.scales;
        let mut out = [0u8; 16];
        for j in 0..4 {
            out[2 * j] = s[j] & 63;
            out[2 * j + 1] = s[j + 4] & 63;
        }
        for j in 4..8 {
            out[2 * j] = (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4);
            out[2 * j + 1] = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        }
        out
    }
}

/// Q6_K weights: 256 values `x = d * sc * (q - 32)` with a signed 8-bit `sc` per 16 values
/// and 6-bit `q`: low four bits in `ql`, high two in `qh` (see `values`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Q6K {
    ql: [u8; 128],
    qh: [u8; 64],
    scales: [i8; 16],
    d: f16,
}

impl Q6K {
    /// The 256 values `q - 32` in order. Per half of 128: values `l`, `l + 32`, `l + 64` and
    /// `l + 96` take the low nibble of `ql[l]`, of `ql[l + 32]`, the high nibble of `ql[l]`,
    /// of `ql[l + 32]`, and bits 0-1, 2-3, 4-5, 6-7 of `qh[l]` (l < 32) above them.
    fn values(&self) -> [i8; 256] {
        let mut out = [0i8; 256];
        for half in 0..2 {
            let (ql, qh) = (&self.ql[64 * half..64 * half + 64], &self.qh[32 * half..32 * half + 32]);
            let out = &mut out[128 * half..128 * half + 128];
            for l in 0..32 {
                let high = |shift: u32| ((qh[l] >> shift) & 3) << 4;
                out[l] = ((ql[l] & 0x0f) | high(0)) as i8 - 32;
                out[l + 32] = ((ql[l + 32] & 0x0f) | high(2)) as i8 - 32;
                out[l + 64] = ((ql[l] >> 4) | high(4)) as i8 - 32;
                out[l + 96] = ((ql[l + 32] >> 4) | high(6)) as i8 - 32;
            }
        }
        out
    }
}

/// Q8_0 weights and activations (candle's Q4_0 products): `x = q * d`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Q8_0 {
    d: f16,
    qs: [i8; 32],
}

/// Q8_1 activations (candle's Q5_1 products): Q8_0 with `s = d * sum(q)`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Q8_1 {
    d: f16,
    s: f16,
    qs: [i8; 32],
}

/// One token's activations for the kernels of ours: `qs` its values quantized by blocks of
/// 32, and per block `[d, d * sum(q)]` (the scale, and the scale times the values' sum for
/// the offset of Q4_1 weights).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Q8Row<'a> {
    qs: &'a [i8],
    scales: &'a [[f32; 2]],
}

impl Q8Row<'_> {
    /// Block `b`'s 32 values.
    #[inline(always)]
    fn block(&self, b: usize) -> &[i8; 32] {
        self.qs[b * 32..b * 32 + 32].try_into().expect("32 values per block")
    }
}

// Layout-identical to candle's blocks, which the SIMD dot products of candle take.
const _: () = assert!(std::mem::size_of::<Q4_1>() == std::mem::size_of::<BlockQ4_1>());
const _: () = assert!(std::mem::size_of::<Q8_0>() == std::mem::size_of::<BlockQ8_0>());
const _: () = assert!(std::mem::size_of::<Q4K>() == std::mem::size_of::<BlockQ4K>());
const _: () = assert!(std::mem::size_of::<Q6K>() == std::mem::size_of::<BlockQ6K>());
const _: () = assert!(std::mem::size_of::<Q8_1>() == std::mem::size_of::<BlockQ8_1>());
const _: () = assert!(std::mem::align_of::<Q8_0>() == std::mem::align_of::<BlockQ8_0>());
const _: () = assert!(std::mem::align_of::<Q8_1>() == std::mem::align_of::<BlockQ8_1>());

/// The weight types the kernels take.
pub(crate) fn supported(dtype: GgmlDType) -> bool {
    matches!(
        dtype,
        GgmlDType::F32
            | GgmlDType::F16
            | GgmlDType::Q4_0
            | GgmlDType::Q4_1
            | GgmlDType::Q5_0
            | GgmlDType::Q5_1
            | GgmlDType::Q8_0
            | GgmlDType::Q2K
            | GgmlDType::Q3K
            | GgmlDType::Q4K
            | GgmlDType::Q5K
            | GgmlDType::Q6K
    )
}

/// A weight matrix of `rows` x `cols` in a GGUF type, borrowed from the mapped file.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QMatrix<'a> {
    pub dtype: GgmlDType,
    pub rows: usize,
    pub cols: usize,
    pub bytes: &'a [u8],
}

impl<'a> QMatrix<'a> {
    fn row_bytes(&self) -> usize {
        self.cols / self.dtype.block_size() * self.dtype.type_size()
    }

    /// Checks the size, the row length against the block size, and the alignment the block
    /// types need.
    pub fn new(dtype: GgmlDType, rows: usize, cols: usize, bytes: &'a [u8]) -> Result<Self, String> {
        if !supported(dtype) {
            return Err(format!("weight type {dtype:?} is not supported"));
        }
        if !cols.is_multiple_of(dtype.block_size()) {
            return Err(format!(
                "row length {cols} is not a multiple of {dtype:?}'s block {}",
                dtype.block_size()
            ));
        }
        let matrix = Self { dtype, rows, cols, bytes };
        if bytes.len() != rows * matrix.row_bytes() {
            return Err(format!("{} bytes for {rows}x{cols} {dtype:?}", bytes.len()));
        }
        if !(bytes.as_ptr() as usize).is_multiple_of(4) {
            return Err("tensor data not aligned to 4 bytes".into());
        }
        Ok(matrix)
    }

    /// Row `row` as f32 (an embedding lookup).
    pub fn row_to_f32(&self, row: usize, out: &mut [f32]) {
        let bytes = &self.bytes[row * self.row_bytes()..(row + 1) * self.row_bytes()];
        match self.dtype {
            GgmlDType::F32 => to_float::<f32>(bytes, out),
            GgmlDType::F16 => to_float::<f16>(bytes, out),
            GgmlDType::Q4_0 => to_float::<BlockQ4_0>(bytes, out),
            GgmlDType::Q4_1 => to_float::<BlockQ4_1>(bytes, out),
            GgmlDType::Q5_0 => to_float::<BlockQ5_0>(bytes, out),
            GgmlDType::Q5_1 => to_float::<BlockQ5_1>(bytes, out),
            GgmlDType::Q8_0 => to_float::<BlockQ8_0>(bytes, out),
            GgmlDType::Q2K => to_float::<BlockQ2K>(bytes, out),
            GgmlDType::Q3K => to_float::<BlockQ3K>(bytes, out),
            GgmlDType::Q4K => to_float::<BlockQ4K>(bytes, out),
            GgmlDType::Q5K => to_float::<BlockQ5K>(bytes, out),
            GgmlDType::Q6K => to_float::<BlockQ6K>(bytes, out),
            other => unreachable!("checked in QMatrix::new: {other:?}"),
        }
    }

    /// The activation format this matrix's products take (the packed path's included).
    pub fn input_format(&self) -> InputFormat {
        match self.dtype {
            GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q8_0 => InputFormat::Q8,
            GgmlDType::Q4K if q4_k_kernel().is_some() => InputFormat::Q8,
            GgmlDType::Q6K if q6_k_kernel().is_some() => InputFormat::Q8,
            GgmlDType::Q4_0 => InputFormat::Q8_0,
            GgmlDType::Q5_1 => InputFormat::Q8_1,
            GgmlDType::F32 | GgmlDType::F16 => InputFormat::F32,
            _ => InputFormat::Q8K,
        }
    }

    /// `out[t * rows.len() + i] = row(rows.start + i) . input(t)` for the first `tokens` input
    /// rows: each weight row is read once for all of them, and Q4_1/Q5_0 blocks are unpacked
    /// once for four tokens.
    pub fn dot_tile(&self, x: &Input, tokens: usize, rows: Range<usize>, out: &mut [f32]) {
        if self.packs(tokens)
            && let Some(kernel) = packed_kernel()
        {
            return self.packed_tile(kernel, x, tokens, rows, out);
        }
        let rb = self.row_bytes();
        let w = &self.bytes[rows.start * rb..rows.end * rb];
        let n = self.cols;
        match self.dtype {
            GgmlDType::Q4_1 => own_tile(cast(w), tokens, out, x, q4_1_kernel(), Some(q4_1_x4_kernel())),
            GgmlDType::Q5_0 => own_tile(cast(w), tokens, out, x, q5_0_kernel(), Some(q5_0_x4_kernel())),
            GgmlDType::Q8_0 => own_tile(cast(w), tokens, out, x, q8_0_kernel(), Some(q8_0_x4_kernel())),
            GgmlDType::Q4_0 => candle_tile::<BlockQ4_0>(n, w, rb, tokens, out, |t| cast(x.q8_0(t))),
            GgmlDType::Q5_1 => candle_tile::<BlockQ5_1>(n, w, rb, tokens, out, |t| cast(x.q8_1(t))),
            GgmlDType::Q2K => candle_tile::<BlockQ2K>(n, w, rb, tokens, out, |t| x.q8k(t)),
            GgmlDType::Q3K => candle_tile::<BlockQ3K>(n, w, rb, tokens, out, |t| x.q8k(t)),
            GgmlDType::Q4K => match q4_k_kernel() {
                Some(rows) => own_tile(cast(w), tokens, out, x, rows, None),
                None => candle_tile::<BlockQ4K>(n, w, rb, tokens, out, |t| x.q8k(t)),
            },
            GgmlDType::Q5K => candle_tile::<BlockQ5K>(n, w, rb, tokens, out, |t| x.q8k(t)),
            GgmlDType::Q6K => match q6_k_kernel() {
                Some(rows) => own_tile(cast(w), tokens, out, x, rows, None),
                None => candle_tile::<BlockQ6K>(n, w, rb, tokens, out, |t| x.q8k(t)),
            },
            GgmlDType::F32 => {
                let one = |row: &[u8], t: usize| dot_f32(cast(row), x.f32(t));
                tile(w, rb, tokens, out, one, |row, t| std::array::from_fn(|j| one(row, t + j)));
            }
            GgmlDType::F16 => {
                let one = |row: &[u8], t: usize| {
                    let row: &[f16] = cast(row);
                    row.iter().zip(x.f32(t)).map(|(w, x)| w.to_f32() * x).sum()
                };
                tile(w, rb, tokens, out, one, |row, t| std::array::from_fn(|j| one(row, t + j)));
            }
            other => unreachable!("checked in QMatrix::new: {other:?}"),
        }
    }
}

/// Batches of at least this many tokens take the packed path (where the CPU has it).
const PACKED_MIN_TOKENS: usize = 4;

/// Two weight rows against every token, in the packed form (see `PackedRow`):
/// `out[t] = [row 0 . x[t], row 1 . x[t]]`.
type PackedKernel = fn(w: [&PackedRow; 2], x: &[Q8Row<'_>], out: &mut [[f32; 2]]);

/// A weight row for the packed path: per block of 32, 8-bit values `q` with the value being
/// `scale * q + offset`.
#[derive(Debug, Default)]
pub(crate) struct PackedRow {
    q: Vec<i8>,
    /// Per block, `[scale, offset]`.
    scale_offset: Vec<[f32; 2]>,
    /// Q6_K only (empty otherwise): per block, per lane, the integer scale of its values.
    lane_scales: Vec<[i32; 8]>,
}

/// Decodes a row of blocks into the packed path's values; false for a type it does not take.
type UnpackKernel = fn(GgmlDType, &[u8], &mut [i8]) -> bool;

fn unpack_kernel() -> Option<UnpackKernel> {
    #[cfg(target_arch = "x86_64")]
    return x86::kernels().map(|k| k.unpack);
    #[allow(unreachable_code)]
    None
}

fn packed_kernel() -> Option<PackedKernel> {
    #[cfg(target_arch = "x86_64")]
    return x86::kernels().and_then(|k| k.packed);
    #[allow(unreachable_code)]
    None
}

impl QMatrix<'_> {
    /// Whether products with `tokens` input rows take the packed path: batches, on VNNI
    /// CPUs, for the types whose one-token kernels are ours (Q4_1, Q5_0, Q8_0, and Q4_K and
    /// Q6_K at the AVX-512 level), because the packed path then computes bit for bit what they
    /// compute. A prompt's last token, alone in the next call once the rest is cached, must
    /// give the same logits as in the batch.
    fn packs(&self, tokens: usize) -> bool {
        let ours = match self.dtype {
            GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q8_0 => true,
            GgmlDType::Q4K => q4_k_kernel().is_some(),
            GgmlDType::Q6K => q6_k_kernel().is_some(),
            _ => false,
        };
        tokens >= PACKED_MIN_TOKENS && ours && packed_kernel().is_some()
    }

    /// The batch path on VNNI CPUs: each weight row is unpacked once into 8-bit values with
    /// their block scales (and offsets), and multiplied two rows by four tokens with u8 x i8 dot
    /// products: activations plus 128 are unsigned, and 128 x the weights' sum per lane,
    /// subtracted, makes up for it.
    fn packed_tile(
        &self,
        kernel: PackedKernel,
        x: &Input,
        tokens: usize,
        rows: Range<usize>,
        out: &mut [f32],
    ) {
        let mut packed = [PackedRow::default(), PackedRow::default()];
        let mut products = PairProducts::new(x, tokens);
        for pair in row_pairs(rows.len()) {
            for (k, &r) in pair.iter().enumerate() {
                self.pack_row(rows.start + r, &mut packed[k]);
            }
            products.run(kernel, [&packed[0], &packed[1]], pair, rows.len(), out);
        }
    }

    /// Every row in the packed form, for a matrix multiplied many times by batches (the
    /// rows are then unpacked once, not at every product); `None` where the packed path does
    /// not take this type on this CPU.
    pub fn unpacked_rows(&self) -> Option<Vec<PackedRow>> {
        if !self.packs(PACKED_MIN_TOKENS) {
            return None;
        }
        Some(
            (0..self.rows)
                .map(|r| {
                    let mut row = PackedRow::default();
                    self.pack_row(r, &mut row);
                    row
                })
                .collect(),
        )
    }

    /// Row `row` in the packed form, exactly: per block of 32, `scale * q + offset` with small
    /// integer `q` (Q6_K: with an integer scale per lane too).
    fn pack_row(&self, row: usize, out: &mut PackedRow) {
        let (cols, blocks) = (self.cols, self.cols / 32);
        out.q.resize(cols, 0);
        out.scale_offset.resize(blocks, [0.0; 2]);
        out.lane_scales.clear();
        let rb = self.row_bytes();
        let bytes = &self.bytes[row * rb..(row + 1) * rb];
        // The values in SIMD where the kernels' level has it.
        if !unpack_kernel().is_some_and(|unpack| unpack(self.dtype, bytes, &mut out.q)) {
            portable_values(self.dtype, bytes, &mut out.q);
        }
        match self.dtype {
            GgmlDType::Q8_0 => {
                for (b, w) in cast::<u8, Q8_0>(bytes).iter().enumerate() {
                    out.scale_offset[b] = [w.d.to_f32(), 0.0];
                }
            }
            GgmlDType::Q4_1 => {
                for (b, w) in cast::<u8, Q4_1>(bytes).iter().enumerate() {
                    out.scale_offset[b] = [w.d.to_f32(), w.m.to_f32()];
                }
            }
            GgmlDType::Q5_0 => {
                for (b, w) in cast::<u8, Q5_0>(bytes).iter().enumerate() {
                    out.scale_offset[b] = [w.d.to_f32(), 0.0];
                }
            }
            GgmlDType::Q4K => {
                for (i, w) in cast::<u8, Q4K>(bytes).iter().enumerate() {
                    out.scale_offset[i * 8..i * 8 + 8].copy_from_slice(&w.scale_offsets());
                }
            }
            GgmlDType::Q6K => {
                out.lane_scales.resize(blocks, [0; 8]);
                for (i, w) in cast::<u8, Q6K>(bytes).iter().enumerate() {
                    for b in 0..8 {
                        out.scale_offset[i * 8 + b] = [w.d.to_f32(), 0.0];
                        out.lane_scales[i * 8 + b] =
                            std::array::from_fn(|lane| i32::from(w.scales[2 * b + lane / 4]));
                    }
                }
            }
            other => unreachable!("`packs` admits Q4_1, Q5_0, Q8_0, Q4_K and Q6_K only, not {other:?}"),
        }
    }
}

/// The rows `0..n` in pairs; an odd last row is paired with itself.
fn row_pairs(n: usize) -> impl Iterator<Item = [usize; 2]> {
    (0..n).step_by(2).map(move |i| [i, (i + 1).min(n - 1)])
}

/// The packed kernel's products of one pair of rows with every token, and where they go.
struct PairProducts<'a> {
    xs: Vec<Q8Row<'a>>,
    products: Vec<[f32; 2]>,
}

impl<'a> PairProducts<'a> {
    fn new(x: &'a Input, tokens: usize) -> Self {
        Self { xs: (0..tokens).map(|t| x.q8(t)).collect(), products: vec![[0f32; 2]; tokens] }
    }

    /// `out[t * n + r] = row r . x[t]` for both rows `pair` of `n` (the second results of a
    /// row paired with itself are dropped).
    fn run(&mut self, kernel: PackedKernel, w: [&PackedRow; 2], pair: [usize; 2], n: usize, out: &mut [f32]) {
        kernel(w, &self.xs, &mut self.products);
        for (t, [first, second]) in self.products.iter().enumerate() {
            out[t * n + pair[0]] = *first;
            if pair[1] != pair[0] {
                out[t * n + pair[1]] = *second;
            }
        }
    }
}

/// [`QMatrix::dot_tile`] over all the rows of a matrix whose rows [`QMatrix::unpacked_rows`]
/// made (the same numbers, for any number of tokens).
pub(crate) fn dot_unpacked(rows: &[PackedRow], x: &Input, tokens: usize, out: &mut [f32]) {
    let kernel = packed_kernel().expect("rows are unpacked only where the packed kernel runs");
    let mut products = PairProducts::new(x, tokens);
    for pair in row_pairs(rows.len()) {
        products.run(kernel, [&rows[pair[0]], &rows[pair[1]]], pair, rows.len(), out);
    }
}

/// The integer values `q` of a row of blocks of `dtype` (one of the packed types), in order.
fn portable_values(dtype: GgmlDType, bytes: &[u8], q: &mut [i8]) {
    match dtype {
        GgmlDType::Q8_0 => {
            for (b, w) in cast::<u8, Q8_0>(bytes).iter().enumerate() {
                q[b * 32..b * 32 + 32].copy_from_slice(&w.qs);
            }
        }
        GgmlDType::Q4_1 => {
            for (b, w) in cast::<u8, Q4_1>(bytes).iter().enumerate() {
                let q = &mut q[b * 32..b * 32 + 32];
                for j in 0..16 {
                    q[j] = (w.qs[j] & 0x0f) as i8;
                    q[j + 16] = (w.qs[j] >> 4) as i8;
                }
            }
        }
        GgmlDType::Q5_0 => {
            for (b, w) in cast::<u8, Q5_0>(bytes).iter().enumerate() {
                let high = fifth_bits(w.qh);
                let q = &mut q[b * 32..b * 32 + 32];
                for j in 0..16 {
                    q[j] = ((w.qs[j] & 0x0f) | high[j]) as i8 - 16;
                    q[j + 16] = ((w.qs[j] >> 4) | high[j + 16]) as i8 - 16;
                }
            }
        }
        GgmlDType::Q4K => {
            for (i, w) in cast::<u8, Q4K>(bytes).iter().enumerate() {
                let q = &mut q[i * 256..i * 256 + 256];
                for run in 0..4 {
                    for l in 0..32 {
                        q[run * 64 + l] = (w.qs[run * 32 + l] & 0x0f) as i8;
                        q[run * 64 + 32 + l] = (w.qs[run * 32 + l] >> 4) as i8;
                    }
                }
            }
        }
        GgmlDType::Q6K => {
            for (i, w) in cast::<u8, Q6K>(bytes).iter().enumerate() {
                q[i * 256..i * 256 + 256].copy_from_slice(&w.values());
            }
        }
        other => unreachable!("`packs` admits Q4_1, Q5_0, Q8_0, Q4_K and Q6_K only, not {other:?}"),
    }
}

/// `dot_tile` with kernels of ours: `four` (when there is one) for groups of four tokens row by
/// row, and `rows` for the other tokens, over all the rows in one call.
fn own_tile<B>(
    w: &[B],
    tokens: usize,
    out: &mut [f32],
    x: &Input,
    rows: RowsKernel<B>,
    four: Option<FourKernel<B>>,
) {
    let n = out.len() / tokens;
    let mut t = 0;
    if let Some(four) = four {
        let blocks = w.len() / n;
        while t + 4 <= tokens {
            let xs = std::array::from_fn(|j| x.q8(t + j));
            for (i, row) in w.chunks_exact(blocks).enumerate() {
                for (j, v) in four(row, xs).into_iter().enumerate() {
                    out[(t + j) * n + i] = v;
                }
            }
            t += 4;
        }
    }
    for t in t..tokens {
        rows(w, x.q8(t), &mut out[t * n..(t + 1) * n]);
    }
}

/// The row-major walk of `dot_tile`: `four` for groups of four tokens, `one` for the rest.
fn tile(
    w: &[u8],
    rb: usize,
    tokens: usize,
    out: &mut [f32],
    one: impl Fn(&[u8], usize) -> f32,
    four: impl Fn(&[u8], usize) -> [f32; 4],
) {
    let rows = w.len() / rb;
    for (i, row) in w.chunks_exact(rb).enumerate() {
        let mut t = 0;
        while t + 4 <= tokens {
            for (j, v) in four(row, t).into_iter().enumerate() {
                out[(t + j) * rows + i] = v;
            }
            t += 4;
        }
        for t in t..tokens {
            out[t * rows + i] = one(row, t);
        }
    }
}

fn candle_tile<'a, T: GgmlType>(
    n: usize,
    w: &[u8],
    rb: usize,
    tokens: usize,
    out: &mut [f32],
    x: impl Fn(usize) -> &'a [T::VecDotType],
) where
    T::VecDotType: 'a,
{
    let one = |row: &[u8], t: usize| candle_dot::<T>(n, cast(row), x(t));
    tile(w, rb, tokens, out, one, |row, t| std::array::from_fn(|j| one(row, t + j)));
}

fn candle_dot<T: GgmlType>(n: usize, w: &[T], x: &[T::VecDotType]) -> f32 {
    // candle's NEON dot products issue SDOT whatever the build's features: an ARMv8.0 build
    // (no dotprod) takes its portable ones.
    #[cfg(all(target_arch = "aarch64", not(target_feature = "dotprod")))]
    return T::vec_dot_unopt(n, w, x);
    #[cfg(not(all(target_arch = "aarch64", not(target_feature = "dotprod"))))]
    T::vec_dot(n, w, x)
}

fn to_float<T: GgmlType>(bytes: &[u8], out: &mut [f32]) {
    T::to_float(cast(bytes), out);
}

fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if x86::kernels().is_some() {
        // SAFETY: AVX2, FMA and F16C are there (`kernels()` is Some only then).
        return unsafe { float_simd::dot_avx2(a, b) };
    }
    #[cfg(target_arch = "aarch64")]
    return float_simd::dot_neon(a, b);
    // Eight lanes so the compiler vectorises the sum.
    #[allow(unreachable_code)]
    let mut acc = [0f32; 8];
    let (ac, ar) = a.split_at(a.len() / 8 * 8);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + ar.iter().zip(br).map(|(x, y)| x * y).sum::<f32>()
}

/// `x += y` (the residual additions). Explicit SIMD, as everything on the forward pass:
/// release builds optimise for size, and LLVM does not vectorise loops at that level.
pub(crate) fn add_assign(x: &mut [f32], y: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if x86::kernels().is_some() {
        // SAFETY: AVX2, FMA and F16C are there (`kernels()` is Some only then).
        return unsafe { float_simd::add_avx2(x, y) };
    }
    #[cfg(target_arch = "aarch64")]
    return float_simd::add_neon(x, y);
    #[allow(unreachable_code)]
    x.iter_mut().zip(y).for_each(|(x, y)| *x += y);
}

/// RMS norm of each `weight.len()`-long row of `x`, in place: `x * weight / sqrt(mean(x^2) +
/// eps)`.
pub(crate) fn rms_norm_rows(x: &mut [f32], weight: &[f32], eps: f32) {
    let n = weight.len();
    for row in x.chunks_exact_mut(n) {
        let mean = dot_f32(row, row) / n as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        #[cfg(target_arch = "x86_64")]
        if x86::kernels().is_some() {
            // SAFETY: AVX2, FMA and F16C are there (`kernels()` is Some only then).
            unsafe { float_simd::scale_avx2(row, weight, scale) };
            continue;
        }
        #[cfg(target_arch = "aarch64")]
        {
            float_simd::scale_neon(row, weight, scale);
            continue;
        }
        #[allow(unreachable_code)]
        row.iter_mut().zip(weight).for_each(|(v, w)| *v = *v * scale * w);
    }
}

/// `a . b` with `b` in f16 (attention scores over the cached keys), off x86: f16 converted a
/// chunk at a time, then `dot_f32`.
fn dot_f16(a: &[f32], b: &[f16]) -> f32 {
    let mut buffer = [0f32; F16_CHUNK];
    let mut sum = 0f32;
    for (a, b) in a.chunks(F16_CHUNK).zip(b.chunks(F16_CHUNK)) {
        let buffer = &mut buffer[..b.len()];
        b.convert_to_f32_slice(buffer);
        sum += dot_f32(a, buffer);
    }
    sum
}

/// `y += a * x` with `x` in f16 (attention's weighted sum of the cached values), off x86.
fn axpy_f16(y: &mut [f32], a: f32, x: &[f16]) {
    let mut buffer = [0f32; F16_CHUNK];
    for (y, x) in y.chunks_mut(F16_CHUNK).zip(x.chunks(F16_CHUNK)) {
        let buffer = &mut buffer[..x.len()];
        x.convert_to_f32_slice(buffer);
        axpy_f32(y, a, buffer);
    }
}

/// One kv head's cached rows: key (value) `j` is `keys[j * stride + offset..]`
/// (`values[...]`), as long as the query.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KvHead<'a> {
    pub keys: &'a [f16],
    pub values: &'a [f16],
    pub stride: usize,
    pub offset: usize,
}

/// One query head's attention over cached rows `rows`: `out = sum_j softmax_j(scale q . k_j)
/// v_j`. One call per head and token, the loops inside (a call per key cost as much as its
/// dot product), and the exponentials in SIMD.
pub(crate) fn attend(query: &[f32], kv: KvHead<'_>, rows: Range<usize>, scale: f32, out: &mut [f32]) {
    assert_eq!(query.len(), out.len());
    let dim = query.len();
    assert!(
        rows.is_empty() || (rows.end - 1) * kv.stride + kv.offset + dim <= kv.keys.len().min(kv.values.len())
    );
    #[cfg(target_arch = "x86_64")]
    if x86::kernels().is_some() {
        // SAFETY: AVX2, FMA and F16C are there (`kernels()` is Some only then).
        return unsafe { float_simd::attend_avx2(query, kv, rows, scale, out) };
    }
    attend_portable(query, kv, rows, scale, out);
}

/// `attend` off x86 (NEON for the dot products and axpys on aarch64).
fn attend_portable(query: &[f32], kv: KvHead<'_>, rows: Range<usize>, scale: f32, out: &mut [f32]) {
    let dim = query.len();
    let row = |j: usize| j * kv.stride + kv.offset..j * kv.stride + kv.offset + dim;
    let mut scores: Vec<f32> = rows.clone().map(|j| dot_f16(query, &kv.keys[row(j)]) * scale).collect();
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
    let mut sum = 0f32;
    for v in &mut scores {
        *v = (*v - max).exp();
        sum += *v;
    }
    out.fill(0.0);
    for (j, w) in rows.zip(&scores) {
        axpy_f16(out, w / sum, &kv.values[row(j)]);
    }
}

/// `gate[i] = silu(gate[i]) * up[i]` (the llama family's FFN): `g / (1 + exp(-g))`.
pub(crate) fn silu_mul(gate: &mut [f32], up: &[f32]) {
    gated(gate, up, false);
}

/// `gate[i] = gelu(gate[i]) * up[i]` with GELU's tanh approximation (Gemma's
/// `gelu_pytorch_tanh`), as `g / (1 + exp(-2 sqrt(2 / pi) (g + 0.044715 g^3)))`, which is
/// `0.5 g (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3)))`.
pub(crate) fn gelu_mul(gate: &mut [f32], up: &[f32]) {
    gated(gate, up, true);
}

/// `-2 sqrt(2 / pi)`.
const GELU_SCALE: f32 = -1.595_769;
const GELU_CUBIC: f32 = 0.044_715;

fn gated(gate: &mut [f32], up: &[f32], gelu: bool) {
    // SAFETY: AVX2, FMA and F16C are there (`kernels()` is Some only then).
    #[cfg(target_arch = "x86_64")]
    let done = if x86::kernels().is_some() { unsafe { float_simd::gated_avx2(gate, up, gelu) } } else { 0 };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    for (g, u) in gate[done..].iter_mut().zip(&up[done..]) {
        let z = if gelu { GELU_SCALE * (*g + GELU_CUBIC * *g * *g * *g) } else { -*g };
        *g = *g / (1.0 + z.exp()) * u;
    }
}

/// Values converted from f16 at a time off x86 (`half` converts slices with the CPU's own
/// instructions where it has them).
const F16_CHUNK: usize = 64;

fn axpy_f32(y: &mut [f32], a: f32, x: &[f32]) {
    #[cfg(target_arch = "aarch64")]
    return float_simd::axpy_neon(y, a, x);
    #[allow(unreachable_code)]
    y.iter_mut().zip(x).for_each(|(y, x)| *y += a * x);
}

mod float_simd {
    #[cfg(target_arch = "x86_64")]
    use half::f16;
    #[cfg(target_arch = "x86_64")]
    use std::arch::x86_64::*;

    /// Eight f16 from `x[i..i + 8]` as f32.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn load_f16(x: &[f16], i: usize) -> __m256 {
        assert!(i + 8 <= x.len());
        // SAFETY: eight f16 inside `x` (asserted).
        _mm256_cvtph_ps(unsafe { _mm_loadu_si128(x.as_ptr().add(i).cast()) })
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn load(x: &[f32], i: usize) -> __m256 {
        assert!(i + 8 <= x.len());
        // SAFETY: eight floats inside `x` (asserted).
        unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) }
    }

    /// `$name(a, b)`: the dot product of f32 `a` with `b` of `$elem` (eight loaded as f32 by
    /// `$load`), in two accumulators, the last values in scalar (`$to_f32` of an element `$y`).
    macro_rules! dot_kernel {
        ($name:ident, $elem:ty, $load:ident, |$y:ident| $to_f32:expr) => {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma,f16c")]
            pub(super) fn $name(a: &[f32], b: &[$elem]) -> f32 {
                let n = a.len().min(b.len());
                let (mut even, mut odd) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                let mut i = 0;
                while i + 16 <= n {
                    even = _mm256_fmadd_ps(load(a, i), $load(b, i), even);
                    odd = _mm256_fmadd_ps(load(a, i + 8), $load(b, i + 8), odd);
                    i += 16;
                }
                if i + 8 <= n {
                    even = _mm256_fmadd_ps(load(a, i), $load(b, i), even);
                    i += 8;
                }
                hsum(_mm256_add_ps(even, odd))
                    + a[i..n].iter().zip(&b[i..n]).map(|(x, $y)| x * $to_f32).sum::<f32>()
            }
        };
    }

    dot_kernel!(dot_avx2, f32, load, |y| *y);
    dot_kernel!(dot_f16_avx2, f16, load_f16, |y| y.to_f32());

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn add_avx2(x: &mut [f32], y: &[f32]) {
        let n = x.len().min(y.len());
        let mut i = 0;
        while i + 8 <= n {
            let sum = _mm256_add_ps(load(x, i), load(y, i));
            // SAFETY: i + 8 <= n, inside `x`.
            unsafe { _mm256_storeu_ps(x.as_mut_ptr().add(i), sum) };
            i += 8;
        }
        x[i..n].iter_mut().zip(&y[i..n]).for_each(|(x, y)| *x += y);
    }

    /// `x[i] = x[i] * scale * w[i]`, the products in that order as the portable loop.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn scale_avx2(x: &mut [f32], w: &[f32], scale: f32) {
        let n = x.len().min(w.len());
        let s = _mm256_set1_ps(scale);
        let mut i = 0;
        while i + 8 <= n {
            let v = _mm256_mul_ps(_mm256_mul_ps(load(x, i), s), load(w, i));
            // SAFETY: i + 8 <= n, inside `x`.
            unsafe { _mm256_storeu_ps(x.as_mut_ptr().add(i), v) };
            i += 8;
        }
        x[i..n].iter_mut().zip(&w[i..n]).for_each(|(v, w)| *v = *v * scale * w);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// `gated` over whole groups of eight; returns how many values it did.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn gated_avx2(gate: &mut [f32], up: &[f32], gelu: bool) -> usize {
        let n = gate.len().min(up.len()) / 8 * 8;
        let mut i = 0;
        while i < n {
            let g = load(gate, i);
            let z = if gelu {
                let cubic = _mm256_mul_ps(_mm256_mul_ps(g, g), _mm256_set1_ps(super::GELU_CUBIC));
                _mm256_mul_ps(_mm256_set1_ps(super::GELU_SCALE), _mm256_fmadd_ps(cubic, g, g))
            } else {
                _mm256_sub_ps(_mm256_setzero_ps(), g)
            };
            let denominator = _mm256_add_ps(_mm256_set1_ps(1.0), exp_avx2(z));
            let value = _mm256_mul_ps(_mm256_div_ps(g, denominator), load(up, i));
            // SAFETY: i + 8 <= n, inside `gate`.
            unsafe { _mm256_storeu_ps(gate.as_mut_ptr().add(i), value) };
            i += 8;
        }
        n
    }

    /// `quantize_block` of 32 values into `q`, and their sum.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn quantize_avx2(x: &[f32], q: &mut [i8; 32]) -> (f32, i32) {
        let v = [load(x, 0), load(x, 8), load(x, 16), load(x, 24)];
        let magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let mut max = _mm256_setzero_ps();
        for v in v {
            max = _mm256_max_ps(max, _mm256_and_ps(v, magnitude));
        }
        let max = _mm_max_ps(_mm256_castps256_ps128(max), _mm256_extractf128_ps::<1>(max));
        let max = _mm_max_ps(max, _mm_movehl_ps(max, max));
        let amax = _mm_cvtss_f32(_mm_max_ss(max, _mm_movehdup_ps(max)));
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
        // Rounding half away from zero, as `quantize_block`: + 0.5 with the value's sign, cut.
        let sign = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MIN));
        let half = _mm256_set1_ps(0.5);
        let mut ints = [_mm256_setzero_si256(); 4];
        for (int, v) in ints.iter_mut().zip(v) {
            let scaled = _mm256_mul_ps(v, id);
            let rounded = _mm256_add_ps(scaled, _mm256_or_ps(_mm256_and_ps(scaled, sign), half));
            *int = _mm256_cvttps_epi32(rounded);
        }
        let sum = _mm256_add_epi32(_mm256_add_epi32(ints[0], ints[1]), _mm256_add_epi32(ints[2], ints[3]));
        let sum = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256::<1>(sum));
        let sum = _mm_add_epi32(sum, _mm_shuffle_epi32::<0b01_00_11_10>(sum));
        let sum = _mm_cvtsi128_si32(_mm_add_epi32(sum, _mm_shuffle_epi32::<0b10_11_00_01>(sum)));
        // i32 -> i16 -> i8 pack within 128-bit lanes; the permutation puts them in order.
        let words = [_mm256_packs_epi32(ints[0], ints[1]), _mm256_packs_epi32(ints[2], ints[3])];
        let bytes = _mm256_packs_epi16(words[0], words[1]);
        let ordered = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        // SAFETY: 32 writable bytes.
        unsafe { _mm256_storeu_si256(q.as_mut_ptr().cast(), ordered) };
        (d, sum)
    }

    /// `exp` of eight floats (Cephes' `expf`: within 2 ulp of the true value for inputs in
    /// -87.3..88.3, clamped outside).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn exp_avx2(x: __m256) -> __m256 {
        let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3)), _mm256_set1_ps(88.3));
        // x = n ln 2 + r, |r| <= ln 2 / 2, with ln 2 in two parts for an exact product.
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut y = _mm256_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5e-1] {
            y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
        }
        let y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0)));
        let two_n = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
        _mm256_mul_ps(y, _mm256_castsi256_ps(two_n))
    }

    /// `attend` (see there), with the dot products, axpys and exp of this module inlined.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn attend_avx2(
        query: &[f32],
        kv: super::KvHead<'_>,
        rows: std::ops::Range<usize>,
        scale: f32,
        out: &mut [f32],
    ) {
        let dim = query.len();
        let mut scores = Vec::with_capacity(rows.len());
        let mut max = f32::NEG_INFINITY;
        for j in rows.clone() {
            let at = j * kv.stride + kv.offset;
            let score = dot_f16_avx2(query, &kv.keys[at..at + dim]) * scale;
            max = max.max(score);
            scores.push(score);
        }
        let sum = exp_shifted_avx2(&mut scores, max);
        for w in &mut scores {
            *w /= sum;
        }
        // The weighted sum 64 values at a time in registers (the rest through `axpy_f16_avx2`):
        // the same multiply-adds in the same order as an axpy per row, without loading and
        // storing `out` for every row.
        let mut c = 0;
        while c + 64 <= dim {
            let mut acc = [_mm256_setzero_ps(); 8];
            for (j, w) in rows.clone().zip(&scores) {
                let at = j * kv.stride + kv.offset + c;
                let (w, v) = (_mm256_set1_ps(*w), &kv.values[at..at + 64]);
                for (k, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm256_fmadd_ps(w, load_f16(v, 8 * k), *acc);
                }
            }
            for (k, acc) in acc.into_iter().enumerate() {
                let o: &mut [f32; 8] = (&mut out[c + 8 * k..c + 8 * k + 8]).try_into().expect("eight");
                // SAFETY: eight writable floats.
                unsafe { _mm256_storeu_ps(o.as_mut_ptr(), acc) };
            }
            c += 64;
        }
        if c < dim {
            out[c..].fill(0.0);
            for (j, w) in rows.zip(&scores) {
                let at = j * kv.stride + kv.offset;
                axpy_f16_avx2(&mut out[c..], *w, &kv.values[at + c..at + dim]);
            }
        }
    }

    /// `x[i] = exp(x[i] - max)` for every `i` (all in SIMD, a last partial vector too), and
    /// their sum.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn exp_shifted_avx2(x: &mut [f32], max: f32) -> f32 {
        let (n, shift) = (x.len(), _mm256_set1_ps(max));
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            let e = exp_avx2(_mm256_sub_ps(load(x, i), shift));
            // SAFETY: i + 8 <= n, inside `x`.
            unsafe { _mm256_storeu_ps(x.as_mut_ptr().add(i), e) };
            acc = _mm256_add_ps(acc, e);
            i += 8;
        }
        let mut sum = hsum(acc);
        if i < n {
            let mut last = [max; 8];
            last[..n - i].copy_from_slice(&x[i..]);
            let e = exp_avx2(_mm256_sub_ps(load(&last, 0), shift));
            // SAFETY: eight writable floats.
            unsafe { _mm256_storeu_ps(last.as_mut_ptr(), e) };
            x[i..].copy_from_slice(&last[..n - i]);
            sum += x[i..].iter().sum::<f32>();
        }
        sum
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn axpy_f16_avx2(y: &mut [f32], a: f32, x: &[f16]) {
        let n = y.len().min(x.len());
        let scale = _mm256_set1_ps(a);
        let mut i = 0;
        while i + 8 <= n {
            let sum = _mm256_fmadd_ps(scale, load_f16(x, i), load(y, i));
            // SAFETY: i + 8 <= n, inside `y`.
            unsafe { _mm256_storeu_ps(y.as_mut_ptr().add(i), sum) };
            i += 8;
        }
        y[i..n].iter_mut().zip(&x[i..n]).for_each(|(y, x)| *y += a * x.to_f32());
    }

    #[cfg(target_arch = "aarch64")]
    pub(super) fn dot_neon(a: &[f32], b: &[f32]) -> f32 {
        use std::arch::aarch64::*;
        let n = a.len().min(b.len());
        let mut i = 0;
        // SAFETY: NEON is part of aarch64; every load is inside both slices (i + 4 <= n).
        let mut sum = unsafe {
            let mut acc = vdupq_n_f32(0.0);
            while i + 4 <= n {
                acc = vfmaq_f32(acc, vld1q_f32(a.as_ptr().add(i)), vld1q_f32(b.as_ptr().add(i)));
                i += 4;
            }
            vaddvq_f32(acc)
        };
        sum += a[i..n].iter().zip(&b[i..n]).map(|(x, y)| x * y).sum::<f32>();
        sum
    }

    #[cfg(target_arch = "aarch64")]
    pub(super) fn add_neon(x: &mut [f32], y: &[f32]) {
        use std::arch::aarch64::*;
        let n = x.len().min(y.len());
        let mut i = 0;
        // SAFETY: NEON is part of aarch64; every access is inside both slices (i + 4 <= n).
        unsafe {
            while i + 4 <= n {
                vst1q_f32(
                    x.as_mut_ptr().add(i),
                    vaddq_f32(vld1q_f32(x.as_ptr().add(i)), vld1q_f32(y.as_ptr().add(i))),
                );
                i += 4;
            }
        }
        x[i..n].iter_mut().zip(&y[i..n]).for_each(|(x, y)| *x += y);
    }

    /// `x[i] = x[i] * scale * w[i]`, the products in that order as the portable loop.
    #[cfg(target_arch = "aarch64")]
    pub(super) fn scale_neon(x: &mut [f32], w: &[f32], scale: f32) {
        use std::arch::aarch64::*;
        let n = x.len().min(w.len());
        let mut i = 0;
        // SAFETY: NEON is part of aarch64; every access is inside both slices (i + 4 <= n).
        unsafe {
            let s = vdupq_n_f32(scale);
            while i + 4 <= n {
                let v = vmulq_f32(vmulq_f32(vld1q_f32(x.as_ptr().add(i)), s), vld1q_f32(w.as_ptr().add(i)));
                vst1q_f32(x.as_mut_ptr().add(i), v);
                i += 4;
            }
        }
        x[i..n].iter_mut().zip(&w[i..n]).for_each(|(v, w)| *v = *v * scale * w);
    }

    #[cfg(target_arch = "aarch64")]
    pub(super) fn axpy_neon(y: &mut [f32], a: f32, x: &[f32]) {
        use std::arch::aarch64::*;
        let n = y.len().min(x.len());
        let mut i = 0;
        // SAFETY: NEON is part of aarch64; every access is inside both slices (i + 4 <= n).
        unsafe {
            let scale = vdupq_n_f32(a);
            while i + 4 <= n {
                let sum = vfmaq_f32(vld1q_f32(y.as_ptr().add(i)), scale, vld1q_f32(x.as_ptr().add(i)));
                vst1q_f32(y.as_mut_ptr().add(i), sum);
                i += 4;
            }
        }
        y[i..n].iter_mut().zip(&x[i..n]).for_each(|(y, x)| *y += a * x);
    }
}

/// Reinterprets bytes as blocks. The blocks are plain `repr(C)` data of f16/integers, valid for
/// every bit pattern; `QMatrix::new` checked the alignment of the tensor and its rows are whole
/// blocks, and the activation buffers are typed.
fn cast<T, U>(bytes: &[T]) -> &[U] {
    let len = std::mem::size_of_val(bytes) / std::mem::size_of::<U>();
    debug_assert_eq!(len * std::mem::size_of::<U>(), std::mem::size_of_val(bytes));
    debug_assert_eq!(bytes.as_ptr() as usize % std::mem::align_of::<U>(), 0);
    // SAFETY: see above; the length covers exactly the same bytes.
    unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<U>(), len) }
}

/// Activation formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InputFormat {
    F32,
    /// `Q8Row`s, for the kernels of ours (the packed path included).
    Q8,
    /// candle's blocks for its dot products.
    Q8_0,
    Q8_1,
    Q8K,
}

/// Input rows (one per token), quantized on demand into each format a matrix asks for.
#[derive(Debug, Default)]
pub(crate) struct Input {
    cols: usize,
    tokens: usize,
    f32: Vec<f32>,
    q8: Vec<i8>,
    q8_scales: Vec<[f32; 2]>,
    q8_0: Vec<Q8_0>,
    q8_1: Vec<Q8_1>,
    q8k: Vec<BlockQ8K>,
    ready: [bool; 4],
}

impl Input {
    /// Takes `tokens` rows of `cols` values; quantized forms are made by `prepare`.
    pub fn set(&mut self, values: &[f32], tokens: usize, cols: usize) {
        self.cols = cols;
        self.tokens = tokens;
        self.f32.clear();
        self.f32.extend_from_slice(&values[..tokens * cols]);
        self.ready = [false; 4];
    }

    /// Quantizes the rows for `format` (once per `set`), the rows spread over `pool`.
    pub fn prepare(&mut self, format: InputFormat, pool: &crate::pool::ComputePool) {
        let (cols, tokens) = (self.cols, self.tokens);
        let values = &self.f32;
        match format {
            InputFormat::F32 => {}
            InputFormat::Q8 if !self.ready[0] => {
                self.q8.resize(tokens * cols, 0);
                self.q8_scales.resize(tokens * cols / 32, [0.0; 2]);
                let scales = crate::pool::SharedSlice::new(&mut self.q8_scales);
                rows(pool, tokens, &mut self.q8, cols, &|t, qs| {
                    for (b, (x, q)) in values[t * cols..(t + 1) * cols]
                        .chunks_exact(32)
                        .zip(qs.chunks_exact_mut(32))
                        .enumerate()
                    {
                        let (d, sum) = quantize_q8(x, q.try_into().expect("32 values"));
                        // SAFETY: token t's scales, written only by the task of token t.
                        unsafe { scales.write(t * cols / 32 + b, [d, d * sum as f32]) };
                    }
                });
                self.ready[0] = true;
            }
            InputFormat::Q8_0 if !self.ready[1] => {
                self.q8_0.resize(tokens * cols / 32, Q8_0 { d: f16::ZERO, qs: [0; 32] });
                rows(pool, tokens, &mut self.q8_0, cols / 32, &|t, blocks| {
                    for (x, b) in values[t * cols..(t + 1) * cols].chunks_exact(32).zip(blocks) {
                        let (d, qs) = quantize_block(x);
                        *b = Q8_0 { d: f16::from_f32(d), qs };
                    }
                });
                self.ready[1] = true;
            }
            InputFormat::Q8_1 if !self.ready[2] => {
                self.q8_1.resize(tokens * cols / 32, Q8_1 { d: f16::ZERO, s: f16::ZERO, qs: [0; 32] });
                rows(pool, tokens, &mut self.q8_1, cols / 32, &|t, blocks| {
                    for (x, b) in values[t * cols..(t + 1) * cols].chunks_exact(32).zip(blocks) {
                        let (d, qs) = quantize_block(x);
                        let sum: i32 = qs.iter().map(|&q| i32::from(q)).sum();
                        *b = Q8_1 { d: f16::from_f32(d), s: f16::from_f32(d * sum as f32), qs };
                    }
                });
                self.ready[2] = true;
            }
            InputFormat::Q8K if !self.ready[3] => {
                self.q8k.resize(tokens * cols / 256, BlockQ8K::zeros());
                rows(pool, tokens, &mut self.q8k, cols / 256, &|t, blocks| {
                    BlockQ8K::from_float(&values[t * cols..(t + 1) * cols], blocks);
                });
                self.ready[3] = true;
            }
            _ => {}
        }
    }

    /// Rows given to the last `set`.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Values per row given to the last `set`.
    pub fn cols(&self) -> usize {
        self.cols
    }

    fn f32(&self, token: usize) -> &[f32] {
        &self.f32[token * self.cols..(token + 1) * self.cols]
    }
    fn q8(&self, token: usize) -> Q8Row<'_> {
        let n = self.cols / 32;
        Q8Row {
            qs: &self.q8[token * self.cols..(token + 1) * self.cols],
            scales: &self.q8_scales[token * n..(token + 1) * n],
        }
    }
    fn q8_0(&self, token: usize) -> &[Q8_0] {
        let n = self.cols / 32;
        &self.q8_0[token * n..(token + 1) * n]
    }
    fn q8_1(&self, token: usize) -> &[Q8_1] {
        let n = self.cols / 32;
        &self.q8_1[token * n..(token + 1) * n]
    }
    fn q8k(&self, token: usize) -> &[BlockQ8K] {
        let n = self.cols / 256;
        &self.q8k[token * n..(token + 1) * n]
    }
}

/// `f(token, blocks)` for each token's row of `blocks` (`per_row` blocks each): in parallel
/// for a batch of tokens, on the calling thread for one.
fn rows<T: Send>(
    pool: &crate::pool::ComputePool,
    tokens: usize,
    blocks: &mut [T],
    per_row: usize,
    f: &(dyn Fn(usize, &mut [T]) + Sync),
) {
    if tokens == 1 {
        f(0, blocks);
    } else {
        pool.for_each_chunk(blocks, per_row, f);
    }
}

/// `quantize_block` into `q`, and the sum of the 8-bit values: in SIMD on x86 (the same
/// numbers: the same operations lane by lane).
fn quantize_q8(x: &[f32], q: &mut [i8; 32]) -> (f32, i32) {
    #[cfg(target_arch = "x86_64")]
    if x86::kernels().is_some() {
        // SAFETY: AVX2, FMA and F16C are there (`kernels()` is Some only then).
        return unsafe { float_simd::quantize_avx2(x, q) };
    }
    let (d, block) = quantize_block(x);
    *q = block;
    (d, block.iter().map(|&v| i32::from(v)).sum())
}

/// Symmetric 8-bit quantization of 32 values (ggml's `quantize_row_q8_0`).
fn quantize_block(x: &[f32]) -> (f32, [i8; 32]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; 32];
    for (q, v) in qs.iter_mut().zip(x) {
        // Rounding half away from zero (as `roundf`) without a libm call: |v * id| <= 127.
        let scaled = v * id;
        *q = (scaled + 0.5f32.copysign(scaled)) as i32 as i8;
    }
    (d, qs)
}

/// One token's products with `out.len()` rows of blocks `B`, all in one call (`w` holds the
/// rows one after the other).
type RowsKernel<B> = fn(&[B], Q8Row<'_>, &mut [f32]);
/// One row's products with four tokens.
type FourKernel<B> = fn(&[B], [Q8Row<'_>; 4]) -> [f32; 4];
type Q4_1Kernel = RowsKernel<Q4_1>;
type Q5_0Kernel = RowsKernel<Q5_0>;
type Q8_0Kernel = RowsKernel<Q8_0>;
type Q4_1x4Kernel = FourKernel<Q4_1>;
type Q5_0x4Kernel = FourKernel<Q5_0>;
type Q8_0x4Kernel = FourKernel<Q8_0>;
type Q4KKernel = RowsKernel<Q4K>;
type Q6KKernel = RowsKernel<Q6K>;

/// A kernel of rows from a kernel of one row (the portable and NEON levels; the x86 levels
/// have the loop inside their target features).
fn each_row<B>(w: &[B], x: Q8Row<'_>, out: &mut [f32], one: fn(&[B], Q8Row<'_>) -> f32) {
    if out.is_empty() {
        return;
    }
    for (row, o) in w.chunks_exact(w.len() / out.len()).zip(out) {
        *o = one(row, x);
    }
}

/// The instruction-set level the kernels run at: `avx512-vnni`, `avx-vnni`, `avx2`,
/// `neon-dotprod` or `portable`.
pub fn kernel_level() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    return x86::level().map_or("portable", |(name, _)| name);
    #[cfg(all(target_arch = "aarch64", target_feature = "dotprod"))]
    return "neon-dotprod";
    #[allow(unreachable_code)]
    "portable"
}

/// Which product a weight matrix of `dtype` runs (at [`kernel_level`] for ours).
pub fn kernel_for(dtype: GgmlDType) -> &'static str {
    match dtype {
        GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q8_0 => "ours, 8-bit activation rows",
        GgmlDType::Q4K if q4_k_kernel().is_some() => "ours, 8-bit activation rows",
        GgmlDType::Q6K if q6_k_kernel().is_some() => "ours, 8-bit activation rows",
        GgmlDType::F32 | GgmlDType::F16 => "ours, f32 activations",
        GgmlDType::Q4_0 => "candle's block dot, Q8_0 activations",
        GgmlDType::Q5_1 => "candle's block dot, Q8_1 activations",
        GgmlDType::Q2K | GgmlDType::Q3K | GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K => {
            "candle's block dot, Q8_K activations"
        }
        _ => "not supported",
    }
}

/// Picks the kernel of the best instruction set: the x86 level found at run time, NEON with
/// SDOT when the build has dotprod, else the portable one.
macro_rules! dispatch {
    ($name:ident, $kind:ty, $field:ident, $neon:expr, $portable:expr) => {
        fn $name() -> $kind {
            #[cfg(target_arch = "x86_64")]
            if let Some(k) = x86::kernels() {
                return k.$field;
            }
            #[cfg(all(target_arch = "aarch64", target_feature = "dotprod"))]
            return $neon;
            #[allow(unreachable_code)]
            $portable
        }
    };
}

dispatch!(q4_1_kernel, Q4_1Kernel, q4_1, |w, x, out| each_row(w, x, out, neon::q4_1), |w, x, out| each_row(
    w,
    x,
    out,
    scalar::q4_1
));
dispatch!(q5_0_kernel, Q5_0Kernel, q5_0, |w, x, out| each_row(w, x, out, neon::q5_0), |w, x, out| each_row(
    w,
    x,
    out,
    scalar::q5_0
));
dispatch!(q4_1_x4_kernel, Q4_1x4Kernel, q4_1_x4, neon::q4_1_x4, |w, x| x.map(|x| scalar::q4_1(w, x)));
dispatch!(q5_0_x4_kernel, Q5_0x4Kernel, q5_0_x4, neon::q5_0_x4, |w, x| x.map(|x| scalar::q5_0(w, x)));

/// Q4_K weights: ours at the AVX-512 level, candle's (with Q8_K activations) elsewhere.
fn q4_k_kernel() -> Option<Q4KKernel> {
    #[cfg(target_arch = "x86_64")]
    return x86::kernels().and_then(|k| k.q4_k);
    #[allow(unreachable_code)]
    None
}

/// Q6_K weights: ours at the AVX-512 level, candle's (with Q8_K activations) elsewhere.
fn q6_k_kernel() -> Option<Q6KKernel> {
    #[cfg(target_arch = "x86_64")]
    return x86::kernels().and_then(|k| k.q6_k);
    #[allow(unreachable_code)]
    None
}

dispatch!(q8_0_kernel, Q8_0Kernel, q8_0, |w, x, out| each_row(w, x, out, neon::q8_0), |w, x, out| each_row(
    w,
    x,
    out,
    scalar::q8_0
));
dispatch!(q8_0_x4_kernel, Q8_0x4Kernel, q8_0_x4, neon::q8_0_x4, |w, x| x.map(|x| scalar::q8_0(w, x)));

/// For byte `b`, the eight bytes `((b >> i) & 1) << 4`: Q5_0's fifth bits, eight at a time.
const FIFTH_BITS: [u64; 256] = {
    let mut table = [0u64; 256];
    let mut b = 0;
    while b < 256 {
        let mut v = 0u64;
        let mut i = 0;
        while i < 8 {
            v |= (((b >> i) & 1) as u64) << (8 * i + 4);
            i += 1;
        }
        table[b] = v;
        b += 1;
    }
    table
};

/// The 32 fifth bits of a Q5_0 block as bytes of 0 or 16, in element order.
#[inline(always)]
fn fifth_bits(qh: [u8; 4]) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, byte) in qh.iter().enumerate() {
        out[i * 8..i * 8 + 8].copy_from_slice(&FIFTH_BITS[*byte as usize].to_le_bytes());
    }
    out
}

mod scalar {
    use super::*;

    pub(super) fn q4_1(w: &[Q4_1], x: Q8Row<'_>) -> f32 {
        let mut sum = 0f32;
        for (b, w) in w.iter().enumerate() {
            let (xq, [dx, sx]) = (x.block(b), x.scales[b]);
            let mut acc = 0i32;
            for j in 0..16 {
                acc += i32::from(w.qs[j] & 0x0f) * i32::from(xq[j]);
                acc += i32::from(w.qs[j] >> 4) * i32::from(xq[j + 16]);
            }
            sum += w.d.to_f32() * dx * acc as f32 + w.m.to_f32() * sx;
        }
        sum
    }

    pub(super) fn q5_0(w: &[Q5_0], x: Q8Row<'_>) -> f32 {
        let mut sum = 0f32;
        for (b, w) in w.iter().enumerate() {
            let (xq, [dx, _]) = (x.block(b), x.scales[b]);
            let high = fifth_bits(w.qh);
            let mut acc = 0i32;
            for j in 0..16 {
                let lo = i32::from((w.qs[j] & 0x0f) | high[j]) - 16;
                let hi = i32::from((w.qs[j] >> 4) | high[j + 16]) - 16;
                acc += lo * i32::from(xq[j]) + hi * i32::from(xq[j + 16]);
            }
            sum += w.d.to_f32() * dx * acc as f32;
        }
        sum
    }

    pub(super) fn q8_0(w: &[Q8_0], x: Q8Row<'_>) -> f32 {
        let mut sum = 0f32;
        for (b, w) in w.iter().enumerate() {
            let acc: i32 = w.qs.iter().zip(x.block(b)).map(|(a, b)| i32::from(*a) * i32::from(*b)).sum();
            sum += w.d.to_f32() * x.scales[b][0] * acc as f32;
        }
        sum
    }
}

#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(all(target_arch = "aarch64", target_feature = "dotprod"))]
mod neon;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    /// `n` pseudo-random values in [-1, 1] from `seed` (xorshift).
    pub(crate) fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// `tensor` quantized to `dtype`, in u32 storage (the alignment a mapped file gives), and
    /// the length of its bytes.
    fn quantized(tensor: &Tensor, dtype: GgmlDType) -> (Vec<u32>, usize) {
        let bytes = QTensor::quantize(tensor, dtype)
            .and_then(|q| q.data().map(|d| d.into_owned()))
            .expect("quantize");
        let mut storage = vec![0u32; bytes.len().div_ceil(4)];
        for (word, chunk) in storage.iter_mut().zip(bytes.chunks(4)) {
            let mut four = [0u8; 4];
            four[..chunk.len()].copy_from_slice(chunk);
            *word = u32::from_ne_bytes(four);
        }
        (storage, bytes.len())
    }

    /// The blocks of `tensor` quantized to `dtype`, as one of our block types.
    fn blocks<T: Copy>(tensor: &Tensor, dtype: GgmlDType) -> Vec<T> {
        let (storage, len) = quantized(tensor, dtype);
        cast::<u8, T>(&cast::<u32, u8>(&storage)[..len]).to_vec()
    }

    /// A rows kernel's product with one row.
    fn one_row<B>(kernel: RowsKernel<B>, w: &[B], x: Q8Row<'_>) -> f32 {
        let mut out = [0f32];
        kernel(w, x, &mut out);
        out[0]
    }

    /// `tokens` input rows quantized for the kernels of ours.
    fn prepared(values: &[f32], tokens: usize, cols: usize) -> Input {
        let pool = crate::pool::ComputePool::new(2).expect("pool");
        let mut x = Input::default();
        x.set(values, tokens, cols);
        x.prepare(InputFormat::Q8, &pool);
        x
    }

    /// Each supported type's dot products against the f32 product of its own dequantized
    /// weights with the unquantized input: equal up to the input's 8-bit rounding.
    #[test]
    fn every_type_matches_the_dequantized_product() {
        let (rows, cols) = (8, 512);
        let weights = values(rows * cols, 1);
        // Six tokens: one group of four and two single ones.
        let tokens = 6;
        let input = values(tokens * cols, 2);
        let tensor = Tensor::from_vec(weights, (rows, cols), &Device::Cpu).expect("tensor");
        for dtype in [
            GgmlDType::F32,
            GgmlDType::F16,
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q8_0,
            GgmlDType::Q2K,
            GgmlDType::Q3K,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ] {
            let (storage, len) = quantized(&tensor, dtype);
            let matrix = QMatrix::new(dtype, rows, cols, &cast::<u32, u8>(&storage)[..len]).expect("matrix");
            let mut x = Input::default();
            x.set(&input, tokens, cols);
            x.prepare(matrix.input_format(), &crate::pool::ComputePool::new(2).expect("pool"));
            let mut got = vec![0f32; rows * tokens];
            matrix.dot_tile(&x, tokens, 0..rows, &mut got);
            let mut row = vec![0f32; cols];
            for r in 0..rows {
                matrix.row_to_f32(r, &mut row);
                for (t, input) in input.chunks_exact(cols).enumerate() {
                    let got = got[t * rows + r];
                    let want: f32 = row.iter().zip(input).map(|(a, b)| a * b).sum();
                    let scale: f32 = row.iter().zip(input).map(|(a, b)| (a * b).abs()).sum();
                    assert!(
                        (got - want).abs() <= 0.02 * scale + 1e-4,
                        "{dtype:?} row {r} token {t}: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// Activation quantization in SIMD gives the portable numbers.
    #[test]
    fn quantization_equals_the_portable_one() {
        let x: Vec<f32> = values(32 * 40, 13).iter().enumerate().map(|(i, v)| v * (i % 7) as f32).collect();
        for block in x.chunks_exact(32).chain([[0f32; 32].as_slice()]) {
            let (d, want) = quantize_block(block);
            let mut got = [0i8; 32];
            let (got_d, sum) = quantize_q8(block, &mut got);
            assert_eq!((got_d, got), (d, want));
            assert_eq!(sum, want.iter().map(|&v| i32::from(v)).sum::<i32>());
        }
    }

    /// The packed path's values decoded in SIMD equal the portable decoding, at every x86 level
    /// and for every type it takes (an odd number of blocks for the 32-value types).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_unpacking_equals_the_portable_one() {
        for (dtype, cols) in [
            (GgmlDType::Q4_1, 160),
            (GgmlDType::Q5_0, 160),
            (GgmlDType::Q8_0, 160),
            (GgmlDType::Q4K, 512),
            (GgmlDType::Q6K, 512),
        ] {
            let tensor = Tensor::from_vec(values(cols, 12), (1, cols), &Device::Cpu).expect("tensor");
            let (storage, len) = quantized(&tensor, dtype);
            let bytes = &cast::<u32, u8>(&storage)[..len];
            let mut portable = vec![0i8; cols];
            portable_values(dtype, bytes, &mut portable);
            for (level, k) in x86::every_level() {
                // Every level decodes the types it packs (the K-quants only at AVX-512).
                let k_quant = matches!(dtype, GgmlDType::Q4K | GgmlDType::Q6K);
                let mut simd = vec![0i8; cols];
                let unpacked = (k.unpack)(dtype, bytes, &mut simd);
                assert_eq!(unpacked, !k_quant || k.q4_k.is_some(), "{level} {dtype:?}");
                if unpacked {
                    assert_eq!(simd, portable, "{level} {dtype:?}");
                }
            }
        }
    }

    /// Attention of one head (at this CPU's level and portable) against its formula in f64:
    /// softmax over the scaled scores of rows with a stride and an offset, with a last
    /// partial vector of scores.
    #[test]
    fn attention_matches_its_formula() {
        let (dim, stride, offset, rows) = (72, 200, 64, 3..40);
        let query: Vec<f32> = values(dim, 18).iter().map(|v| v * 3.0).collect();
        let keys: Vec<f16> = values(40 * stride, 19).iter().map(|v| f16::from_f32(*v)).collect();
        let values_: Vec<f16> = values(40 * stride, 20).iter().map(|v| f16::from_f32(*v)).collect();
        let kv = KvHead { keys: &keys, values: &values_, stride, offset };
        let scale = 0.125;
        let row = |j: usize| j * stride + offset..j * stride + offset + dim;
        let scores: Vec<f64> = rows
            .clone()
            .map(|j| {
                let dot: f64 = query.iter().zip(&keys[row(j)]).map(|(q, k)| f64::from(*q) * k.to_f64()).sum();
                dot * f64::from(scale)
            })
            .collect();
        let max = scores.iter().fold(f64::NEG_INFINITY, |m, v| m.max(*v));
        let weights: Vec<f64> = scores.iter().map(|v| (v - max).exp()).collect();
        let sum: f64 = weights.iter().sum();
        let mut want = vec![0f64; dim];
        for (j, w) in rows.clone().zip(&weights) {
            for (o, v) in want.iter_mut().zip(&values_[row(j)]) {
                *o += w / sum * v.to_f64();
            }
        }
        let mut simd = vec![f32::NAN; dim];
        attend(&query, kv, rows.clone(), scale, &mut simd);
        let mut portable = vec![f32::NAN; dim];
        attend_portable(&query, kv, rows, scale, &mut portable);
        for (got, path) in [(simd, "attend"), (portable, "portable")] {
            for (g, w) in got.iter().zip(&want) {
                assert!((f64::from(*g) - w).abs() <= 1e-5, "{path}: {g} vs {w}");
            }
        }
    }

    /// The SIMD exp and the gated activations against f64 references.
    #[test]
    fn activations_match_their_formulas() {
        let gate: Vec<f32> = values(1003, 10).iter().map(|v| v * 12.0).collect();
        let up = values(1003, 11);
        for gelu in [false, true] {
            let mut got = gate.clone();
            if gelu {
                gelu_mul(&mut got, &up);
            } else {
                silu_mul(&mut got, &up);
            }
            for ((g, u), got) in gate.iter().zip(&up).zip(&got) {
                let (g, u) = (f64::from(*g), f64::from(*u));
                let activated = if gelu {
                    0.5 * g
                        * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (g + 0.044715 * g * g * g)).tanh())
                } else {
                    g / (1.0 + (-g).exp())
                };
                let want = activated * u;
                // f32 rounding of the exponent (up to about 20 here) grows by that factor in exp.
                assert!(
                    (f64::from(*got) - want).abs() <= 5e-6 * want.abs().max(1e-3),
                    "gelu {gelu}: {g} {got} {want}"
                );
            }
        }
        #[cfg(target_arch = "x86_64")]
        if x86::kernels().is_some() {
            // Inside the range it does not clamp.
            for x in (-890..=900).map(|i| i as f32 * 0.0977) {
                let mut lanes = [0f32; 8];
                // SAFETY: AVX2, FMA and F16C are there; eight writable floats.
                unsafe {
                    use std::arch::x86_64::*;
                    _mm256_storeu_ps(lanes.as_mut_ptr(), float_simd::exp_avx2(_mm256_set1_ps(x)));
                }
                let want = f64::from(x).exp();
                assert!(
                    (f64::from(lanes[0]) - want).abs() <= 3e-7 * want,
                    "exp({x}) = {} vs {want}",
                    lanes[0]
                );
            }
        }
    }

    #[test]
    fn simd_kernels_equal_the_scalar_ones() {
        let cols = 1024;
        let tensor = Tensor::from_vec(values(cols, 3), (1, cols), &Device::Cpu).expect("tensor");
        let x = prepared(&values(cols, 4), 1, cols);
        let w41: Vec<Q4_1> = blocks(&tensor, GgmlDType::Q4_1);
        let w50: Vec<Q5_0> = blocks(&tensor, GgmlDType::Q5_0);
        let (a, b) = (one_row(q4_1_kernel(), &w41, x.q8(0)), scalar::q4_1(&w41, x.q8(0)));
        assert!((a - b).abs() <= 1e-3 * b.abs().max(1.0), "q4_1 {a} vs {b}");
        let (a, b) = (one_row(q5_0_kernel(), &w50, x.q8(0)), scalar::q5_0(&w50, x.q8(0)));
        assert!((a - b).abs() <= 1e-3 * b.abs().max(1.0), "q5_0 {a} vs {b}");
        let x4 = prepared(&values(4 * cols, 5), 4, cols);
        let four = q4_1_x4_kernel()(&w41, std::array::from_fn(|t| x4.q8(t)));
        for (t, a) in four.into_iter().enumerate() {
            let b = scalar::q4_1(&w41, x4.q8(t));
            assert!((a - b).abs() <= 1e-3 * b.abs().max(1.0), "q4_1 x4 token {t}: {a} vs {b}");
        }
        let four = q5_0_x4_kernel()(&w50, std::array::from_fn(|t| x4.q8(t)));
        for (t, a) in four.into_iter().enumerate() {
            let b = scalar::q5_0(&w50, x4.q8(t));
            assert!((a - b).abs() <= 1e-3 * b.abs().max(1.0), "q5_0 x4 token {t}: {a} vs {b}");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_x86_level_equals_the_portable_kernels() {
        // An odd number of blocks: the AVX-512 kernels take a last block on its own.
        let cols = 1056;
        let tensor = Tensor::from_vec(values(cols, 6), (1, cols), &Device::Cpu).expect("tensor");
        let x = prepared(&values(4 * cols, 7), 4, cols);
        let w41: Vec<Q4_1> = blocks(&tensor, GgmlDType::Q4_1);
        let w50: Vec<Q5_0> = blocks(&tensor, GgmlDType::Q5_0);
        let w80: Vec<Q8_0> = blocks(&tensor, GgmlDType::Q8_0);
        let close = |a: f32, b: f32| (a - b).abs() <= 1e-3 * b.abs().max(1.0);
        let levels = x86::every_level();
        assert!(!levels.is_empty(), "no AVX2 on this machine: the portable kernels ran everywhere");
        for (level, k) in levels {
            for t in 0..4 {
                let want41 = scalar::q4_1(&w41, x.q8(t));
                let want50 = scalar::q5_0(&w50, x.q8(t));
                let want80 = scalar::q8_0(&w80, x.q8(t));
                assert!(close(one_row(k.q4_1, &w41, x.q8(t)), want41), "{level} q4_1 token {t}");
                assert!(close(one_row(k.q5_0, &w50, x.q8(t)), want50), "{level} q5_0 token {t}");
                assert!(close(one_row(k.q8_0, &w80, x.q8(t)), want80), "{level} q8_0 token {t}");
                assert!(
                    close((k.q4_1_x4)(&w41, std::array::from_fn(|j| x.q8(j)))[t], want41),
                    "{level} q4_1 x4"
                );
                assert!(
                    close((k.q5_0_x4)(&w50, std::array::from_fn(|j| x.q8(j)))[t], want50),
                    "{level} q5_0 x4"
                );
                assert!(
                    close((k.q8_0_x4)(&w80, std::array::from_fn(|j| x.q8(j)))[t], want80),
                    "{level} q8_0 x4"
                );
            }
        }
    }

    /// At every x86 level with a packed path (AVX-VNNI as well as AVX-512), the packed products
    /// are the numbers of that level's one-token kernels.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_packed_level_equals_its_one_token_kernels() {
        let (rows, tokens) = (2, 6);
        for (dtype, cols) in [
            (GgmlDType::Q4_1, 160),
            (GgmlDType::Q5_0, 160),
            (GgmlDType::Q8_0, 160),
            (GgmlDType::Q4K, 512),
            (GgmlDType::Q6K, 512),
        ] {
            let tensor =
                Tensor::from_vec(values(rows * cols, 14), (rows, cols), &Device::Cpu).expect("tensor");
            let x = prepared(&values(tokens * cols, 15), tokens, cols);
            let xs: Vec<Q8Row<'_>> = (0..tokens).map(|t| x.q8(t)).collect();
            for (level, k) in x86::every_level() {
                let Some(packed) = k.packed else { continue };
                // The K-quants pack where their one-token kernels are ours (AVX-512).
                if (dtype == GgmlDType::Q4K && k.q4_k.is_none())
                    || (dtype == GgmlDType::Q6K && k.q6_k.is_none())
                {
                    continue;
                }
                let (storage, len) = quantized(&tensor, dtype);
                let bytes = &cast::<u32, u8>(&storage)[..len];
                let matrix = QMatrix::new(dtype, rows, cols, bytes).expect("matrix");
                let mut packed_rows = [PackedRow::default(), PackedRow::default()];
                for (r, p) in packed_rows.iter_mut().enumerate() {
                    matrix.pack_row(r, p);
                }
                let mut got = vec![[0f32; 2]; tokens];
                packed([&packed_rows[0], &packed_rows[1]], &xs, &mut got);
                for (t, got) in got.iter().enumerate() {
                    let mut want = [0f32; 2];
                    match dtype {
                        GgmlDType::Q4_1 => (k.q4_1)(cast(bytes), xs[t], &mut want),
                        GgmlDType::Q5_0 => (k.q5_0)(cast(bytes), xs[t], &mut want),
                        GgmlDType::Q8_0 => (k.q8_0)(cast(bytes), xs[t], &mut want),
                        GgmlDType::Q4K => k.q4_k.expect("checked above")(cast(bytes), xs[t], &mut want),
                        _ => k.q6_k.expect("checked above")(cast(bytes), xs[t], &mut want),
                    }
                    assert_eq!(*got, want, "{level} {dtype:?} token {t}");
                }
            }
        }
    }

    /// The Q4_K and Q6_K kernels of ours (AVX-512) against candle's dequantized weights times
    /// the quantized activations, in f64 (within 1e-5 of the terms' magnitude).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_k_quant_kernels_compute_the_dequantized_products() {
        let cols = 768;
        let tensor = Tensor::from_vec(values(cols, 16), (1, cols), &Device::Cpu).expect("tensor");
        let x = prepared(&values(cols, 17), 1, cols);
        let xq = x.q8(0);
        let activations: Vec<f64> =
            (0..cols).map(|k| f64::from(xq.qs[k]) * f64::from(xq.scales[k / 32][0])).collect();
        for dtype in [GgmlDType::Q4K, GgmlDType::Q6K] {
            let (storage, len) = quantized(&tensor, dtype);
            let bytes = &cast::<u32, u8>(&storage)[..len];
            let mut weights = vec![0f32; cols];
            QMatrix::new(dtype, 1, cols, bytes).expect("matrix").row_to_f32(0, &mut weights);
            let (mut want, mut magnitude) = (0f64, 0f64);
            for (w, x) in weights.iter().zip(&activations) {
                want += f64::from(*w) * x;
                magnitude += (f64::from(*w) * x).abs();
            }
            for (level, k) in x86::every_level() {
                let kernel = match dtype {
                    GgmlDType::Q4K => k.q4_k.map(|q4_k| one_row(q4_k, cast(bytes), xq)),
                    _ => k.q6_k.map(|q6_k| one_row(q6_k, cast(bytes), xq)),
                };
                let Some(got) = kernel else { continue };
                assert!(
                    (f64::from(got) - want).abs() <= 1e-5 * magnitude,
                    "{level} {dtype:?}: {got} vs {want}"
                );
            }
        }
    }

    /// A token's products are the same numbers in a batch (the packed path on VNNI CPUs, the
    /// four-token kernels elsewhere) as alone, for the types with kernels of ours; with an even
    /// and an odd number of blocks per row.
    #[test]
    fn a_token_gives_the_same_products_in_a_batch_as_alone() {
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q8_0] {
            for cols in [256, 160] {
                same_products_in_a_batch_as_alone(dtype, cols);
            }
        }
        same_products_in_a_batch_as_alone(GgmlDType::Q4K, 512);
        same_products_in_a_batch_as_alone(GgmlDType::Q6K, 512);
    }

    fn same_products_in_a_batch_as_alone(dtype: GgmlDType, cols: usize) {
        let (rows, tokens) = (6, 7);
        let tensor = Tensor::from_vec(values(rows * cols, 8), (rows, cols), &Device::Cpu).expect("tensor");
        let input = values(tokens * cols, 9);
        let pool = crate::pool::ComputePool::new(2).expect("pool");
        {
            let (storage, len) = quantized(&tensor, dtype);
            let matrix = QMatrix::new(dtype, rows, cols, &cast::<u32, u8>(&storage)[..len]).expect("matrix");
            let mut batch = Input::default();
            batch.set(&input, tokens, cols);
            batch.prepare(matrix.input_format(), &pool);
            let mut together = vec![0f32; rows * tokens];
            matrix.dot_tile(&batch, tokens, 0..rows, &mut together);
            for t in 0..tokens {
                let mut one = Input::default();
                one.set(&input[t * cols..(t + 1) * cols], 1, cols);
                one.prepare(matrix.input_format(), &pool);
                let mut alone = vec![0f32; rows];
                matrix.dot_tile(&one, 1, 0..rows, &mut alone);
                assert_eq!(&together[t * rows..(t + 1) * rows], &alone[..], "{dtype:?} {cols} token {t}");
            }
        }
    }
}
