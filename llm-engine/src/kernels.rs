//! Quantized matrix-vector products over GGUF weights in place (memory-mapped, never copied).
//!
//! Activations are quantized once per input row to the 8-bit format each weight type's dot
//! product takes (as llama.cpp does): Q8_0 for Q4_0/Q5_0/Q8_0, Q8_1 for Q4_1/Q5_1, Q8_K for
//! the K-quants. candle's block dot products are used where they have SIMD code (Q4_0, Q8_0
//! and the K-quants, on AVX2 and NEON); Q4_1 and Q5_0, whose candle dot products are scalar,
//! have their own AVX2 and NEON (dotprod) kernels here.
#![allow(unsafe_code)]

use std::ops::Range;

use candle_core::quantized::GgmlDType;
use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K, BlockQ8_0,
    BlockQ8_1, BlockQ8K, GgmlType,
};
use half::f16;

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

/// Q8_0 activations: `x = q * d`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Q8_0 {
    d: f16,
    qs: [i8; 32],
}

/// Q8_1 activations: Q8_0 with `s = d * sum(q)` for the offset of Q4_1/Q5_1 weights.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Q8_1 {
    d: f16,
    s: f16,
    qs: [i8; 32],
}

// Layout-identical to candle's blocks, which the SIMD dot products of candle take.
const _: () = assert!(std::mem::size_of::<Q4_1>() == std::mem::size_of::<BlockQ4_1>());
const _: () = assert!(std::mem::size_of::<Q8_0>() == std::mem::size_of::<BlockQ8_0>());
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

    /// The activation format this matrix's dot product takes.
    pub fn input_format(&self) -> InputFormat {
        match self.dtype {
            GgmlDType::Q4_0 | GgmlDType::Q5_0 | GgmlDType::Q8_0 => InputFormat::Q8_0,
            GgmlDType::Q4_1 | GgmlDType::Q5_1 => InputFormat::Q8_1,
            GgmlDType::F32 | GgmlDType::F16 => InputFormat::F32,
            _ => InputFormat::Q8K,
        }
    }

    /// `out[i] = row(rows.start + i) . x` for one quantized input row.
    pub fn dot_rows(&self, x: &Input, token: usize, rows: Range<usize>, out: &mut [f32]) {
        let rb = self.row_bytes();
        let w = &self.bytes[rows.start * rb..rows.end * rb];
        let n = self.cols;
        match self.dtype {
            GgmlDType::Q4_1 => {
                let xs = x.q8_1(token);
                let kernel = q4_1_kernel();
                for (o, row) in out.iter_mut().zip(w.chunks_exact(rb)) {
                    *o = kernel(cast(row), xs);
                }
            }
            GgmlDType::Q5_0 => {
                let xs = x.q8_0(token);
                let kernel = q5_0_kernel();
                for (o, row) in out.iter_mut().zip(w.chunks_exact(rb)) {
                    *o = kernel(cast(row), xs);
                }
            }
            GgmlDType::Q4_0 => candle_dots::<BlockQ4_0>(n, w, rb, cast(x.q8_0(token)), out),
            GgmlDType::Q8_0 => candle_dots::<BlockQ8_0>(n, w, rb, cast(x.q8_0(token)), out),
            GgmlDType::Q5_1 => candle_dots::<BlockQ5_1>(n, w, rb, cast(x.q8_1(token)), out),
            GgmlDType::Q2K => candle_dots::<BlockQ2K>(n, w, rb, x.q8k(token), out),
            GgmlDType::Q3K => candle_dots::<BlockQ3K>(n, w, rb, x.q8k(token), out),
            GgmlDType::Q4K => candle_dots::<BlockQ4K>(n, w, rb, x.q8k(token), out),
            GgmlDType::Q5K => candle_dots::<BlockQ5K>(n, w, rb, x.q8k(token), out),
            GgmlDType::Q6K => candle_dots::<BlockQ6K>(n, w, rb, x.q8k(token), out),
            GgmlDType::F32 => {
                let xs = x.f32(token);
                for (o, row) in out.iter_mut().zip(w.chunks_exact(rb)) {
                    *o = dot_f32(cast(row), xs);
                }
            }
            GgmlDType::F16 => {
                let xs = x.f32(token);
                for (o, row) in out.iter_mut().zip(w.chunks_exact(rb)) {
                    let row: &[f16] = cast(row);
                    *o = row.iter().zip(xs).map(|(w, x)| w.to_f32() * x).sum();
                }
            }
            other => unreachable!("checked in QMatrix::new: {other:?}"),
        }
    }
}

fn to_float<T: GgmlType>(bytes: &[u8], out: &mut [f32]) {
    T::to_float(cast(bytes), out);
}

fn candle_dots<T: GgmlType>(n: usize, w: &[u8], rb: usize, xs: &[T::VecDotType], out: &mut [f32]) {
    for (o, row) in out.iter_mut().zip(w.chunks_exact(rb)) {
        // candle's NEON dot products issue SDOT whatever the build's features: an ARMv8.0
        // build (no dotprod) takes its portable ones.
        #[cfg(all(target_arch = "aarch64", not(target_feature = "dotprod")))]
        {
            *o = T::vec_dot_unopt(n, cast(row), xs);
        }
        #[cfg(not(all(target_arch = "aarch64", not(target_feature = "dotprod"))))]
        {
            *o = T::vec_dot(n, cast(row), xs);
        }
    }
}

fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    // Eight lanes so the compiler vectorises the sum.
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

/// Dot product of two f32 vectors (attention scores).
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_f32(a, b)
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
    q8_0: Vec<Q8_0>,
    q8_1: Vec<Q8_1>,
    q8k: Vec<BlockQ8K>,
    ready: [bool; 3],
}

impl Input {
    /// Takes `tokens` rows of `cols` values; quantized forms are made by `prepare`.
    pub fn set(&mut self, values: &[f32], tokens: usize, cols: usize) {
        self.cols = cols;
        self.tokens = tokens;
        self.f32.clear();
        self.f32.extend_from_slice(&values[..tokens * cols]);
        self.ready = [false; 3];
    }

    /// Quantizes the rows for `format` (once per `set`).
    pub fn prepare(&mut self, format: InputFormat) {
        let (cols, tokens) = (self.cols, self.tokens);
        match format {
            InputFormat::F32 => {}
            InputFormat::Q8_0 if !self.ready[0] => {
                self.q8_0.resize(tokens * cols / 32, Q8_0 { d: f16::ZERO, qs: [0; 32] });
                for (row, blocks) in self.f32.chunks_exact(cols).zip(self.q8_0.chunks_exact_mut(cols / 32)) {
                    for (x, b) in row.chunks_exact(32).zip(blocks) {
                        let (d, qs) = quantize_block(x);
                        *b = Q8_0 { d: f16::from_f32(d), qs };
                    }
                }
                self.ready[0] = true;
            }
            InputFormat::Q8_1 if !self.ready[1] => {
                self.q8_1.resize(tokens * cols / 32, Q8_1 { d: f16::ZERO, s: f16::ZERO, qs: [0; 32] });
                for (row, blocks) in self.f32.chunks_exact(cols).zip(self.q8_1.chunks_exact_mut(cols / 32)) {
                    for (x, b) in row.chunks_exact(32).zip(blocks) {
                        let (d, qs) = quantize_block(x);
                        let sum: i32 = qs.iter().map(|&q| i32::from(q)).sum();
                        *b = Q8_1 { d: f16::from_f32(d), s: f16::from_f32(d * sum as f32), qs };
                    }
                }
                self.ready[1] = true;
            }
            InputFormat::Q8K if !self.ready[2] => {
                self.q8k.resize(tokens * cols / 256, BlockQ8K::zeros());
                for (row, blocks) in self.f32.chunks_exact(cols).zip(self.q8k.chunks_exact_mut(cols / 256)) {
                    BlockQ8K::from_float(row, blocks);
                }
                self.ready[2] = true;
            }
            _ => {}
        }
    }

    fn f32(&self, token: usize) -> &[f32] {
        &self.f32[token * self.cols..(token + 1) * self.cols]
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

/// Symmetric 8-bit quantization of 32 values (ggml's `quantize_row_q8_0`).
fn quantize_block(x: &[f32]) -> (f32, [i8; 32]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; 32];
    for (q, v) in qs.iter_mut().zip(x) {
        *q = (v * id).round() as i8;
    }
    (d, qs)
}

type Q4_1Kernel = fn(&[Q4_1], &[Q8_1]) -> f32;
type Q5_0Kernel = fn(&[Q5_0], &[Q8_0]) -> f32;

fn q4_1_kernel() -> Q4_1Kernel {
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        return x86::q4_1_q8_1;
    }
    #[cfg(all(target_arch = "aarch64", target_feature = "dotprod"))]
    return neon::q4_1_q8_1;
    #[allow(unreachable_code)]
    scalar::q4_1_q8_1
}

fn q5_0_kernel() -> Q5_0Kernel {
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        return x86::q5_0_q8_0;
    }
    #[cfg(all(target_arch = "aarch64", target_feature = "dotprod"))]
    return neon::q5_0_q8_0;
    #[allow(unreachable_code)]
    scalar::q5_0_q8_0
}

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

    pub(super) fn q4_1_q8_1(w: &[Q4_1], x: &[Q8_1]) -> f32 {
        let mut sum = 0f32;
        for (w, x) in w.iter().zip(x) {
            let mut acc = 0i32;
            for j in 0..16 {
                acc += i32::from(w.qs[j] & 0x0f) * i32::from(x.qs[j]);
                acc += i32::from(w.qs[j] >> 4) * i32::from(x.qs[j + 16]);
            }
            sum += w.d.to_f32() * x.d.to_f32() * acc as f32 + w.m.to_f32() * x.s.to_f32();
        }
        sum
    }

    pub(super) fn q5_0_q8_0(w: &[Q5_0], x: &[Q8_0]) -> f32 {
        let mut sum = 0f32;
        for (w, x) in w.iter().zip(x) {
            let high = fifth_bits(w.qh);
            let mut acc = 0i32;
            for j in 0..16 {
                let lo = i32::from((w.qs[j] & 0x0f) | high[j]) - 16;
                let hi = i32::from((w.qs[j] >> 4) | high[j + 16]) - 16;
                acc += lo * i32::from(x.qs[j]) + hi * i32::from(x.qs[j + 16]);
            }
            sum += w.d.to_f32() * x.d.to_f32() * acc as f32;
        }
        sum
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    pub(super) fn available() -> bool {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }

    /// Sum of the eight f32 lanes.
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps::<1>(v);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// The 32 nibbles of 16 bytes, low halves in the first 16 lanes.
    #[target_feature(enable = "avx2,fma")]
    fn nibbles(qs: &[u8; 16]) -> __m256i {
        // SAFETY: 16 readable bytes.
        let packed = unsafe { _mm_loadu_si128(qs.as_ptr().cast()) };
        let mask = _mm_set1_epi8(0x0f);
        let lo = _mm_and_si128(packed, mask);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(packed), mask);
        _mm256_set_m128i(hi, lo)
    }

    /// Eight i32 partial sums of u8 x i8 products (each pair fits in i16: 31 * 127 * 2).
    #[target_feature(enable = "avx2,fma")]
    fn dot_u8_i8(u: __m256i, s: __m256i) -> __m256 {
        let pairs = _mm256_maddubs_epi16(u, s);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }

    pub(super) fn q4_1_q8_1(w: &[Q4_1], x: &[Q8_1]) -> f32 {
        // SAFETY: `available()` was checked by the caller's dispatch.
        unsafe { q4_1_q8_1_avx2(w, x) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn q4_1_q8_1_avx2(w: &[Q4_1], x: &[Q8_1]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut offset = 0f32;
        for (w, x) in w.iter().zip(x) {
            let q = nibbles(&w.qs);
            // SAFETY: 32 readable bytes.
            let y = unsafe { _mm256_loadu_si256(x.qs.as_ptr().cast()) };
            let scale = _mm256_set1_ps(w.d.to_f32() * x.d.to_f32());
            acc = _mm256_fmadd_ps(scale, dot_u8_i8(q, y), acc);
            offset += w.m.to_f32() * x.s.to_f32();
        }
        hsum(acc) + offset
    }

    pub(super) fn q5_0_q8_0(w: &[Q5_0], x: &[Q8_0]) -> f32 {
        // SAFETY: `available()` was checked by the caller's dispatch.
        unsafe { q5_0_q8_0_avx2(w, x) }
    }

    /// The 32 bits of `qh` as bytes of 16 (set) or 0, in element order.
    #[target_feature(enable = "avx2,fma")]
    fn fifth_bits(qh: [u8; 4]) -> __m256i {
        // Byte i takes byte i / 8 of the bits; OR-ing every bit but bit i % 8 and comparing
        // with all ones tells whether bit i % 8 is set.
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(i32::from_le_bytes(qh)),
            _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0),
        );
        let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe_u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi64x(-1));
        _mm256_and_si256(set, _mm256_set1_epi8(16))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn q5_0_q8_0_avx2(w: &[Q5_0], x: &[Q8_0]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let sixteen = _mm256_set1_epi8(16);
        for (w, x) in w.iter().zip(x) {
            // SAFETY: 32 readable bytes.
            let y = unsafe { _mm256_loadu_si256(x.qs.as_ptr().cast()) };
            // q in -16..15 as i8; |q| * sign(y, q) keeps maddubs' unsigned operand.
            let q = _mm256_sub_epi8(_mm256_or_si256(nibbles(&w.qs), fifth_bits(w.qh)), sixteen);
            let products = dot_u8_i8(_mm256_sign_epi8(q, q), _mm256_sign_epi8(y, q));
            let scale = _mm256_set1_ps(w.d.to_f32() * x.d.to_f32());
            acc = _mm256_fmadd_ps(scale, products, acc);
        }
        hsum(acc)
    }
}

#[cfg(all(target_arch = "aarch64", target_feature = "dotprod"))]
mod neon {
    use super::*;
    use std::arch::aarch64::*;

    /// `acc + a . b` by groups of four bytes (SDOT; stable Rust has no intrinsic for it).
    #[inline(always)]
    fn sdot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        let mut out = acc;
        // SAFETY: the build enables dotprod (checked at start by device_profiles::cpu).
        unsafe {
            std::arch::asm!(
                "sdot {out:v}.4s, {a:v}.16b, {b:v}.16b",
                out = inout(vreg) out,
                a = in(vreg) a,
                b = in(vreg) b,
                options(pure, nomem, nostack),
            );
        }
        out
    }

    pub(super) fn q4_1_q8_1(w: &[Q4_1], x: &[Q8_1]) -> f32 {
        let mut sum = 0f32;
        // SAFETY: NEON is part of aarch64; every load reads 16 bytes inside a block.
        unsafe {
            let mask = vdupq_n_u8(0x0f);
            for (w, x) in w.iter().zip(x) {
                let packed = vld1q_u8(w.qs.as_ptr());
                let lo = vreinterpretq_s8_u8(vandq_u8(packed, mask));
                let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(packed));
                let y0 = vld1q_s8(x.qs.as_ptr());
                let y1 = vld1q_s8(x.qs.as_ptr().add(16));
                let dot = sdot(sdot(vdupq_n_s32(0), lo, y0), hi, y1);
                sum += w.d.to_f32() * x.d.to_f32() * vaddvq_s32(dot) as f32 + w.m.to_f32() * x.s.to_f32();
            }
        }
        sum
    }

    pub(super) fn q5_0_q8_0(w: &[Q5_0], x: &[Q8_0]) -> f32 {
        let mut sum = 0f32;
        // SAFETY: NEON is part of aarch64; every load reads 16 bytes inside a block or table.
        unsafe {
            let mask = vdupq_n_u8(0x0f);
            let sixteen = vdupq_n_s8(16);
            for (w, x) in w.iter().zip(x) {
                let high = fifth_bits(w.qh);
                let packed = vld1q_u8(w.qs.as_ptr());
                let lo = vorrq_u8(vandq_u8(packed, mask), vld1q_u8(high.as_ptr()));
                let hi = vorrq_u8(vshrq_n_u8::<4>(packed), vld1q_u8(high.as_ptr().add(16)));
                let lo = vsubq_s8(vreinterpretq_s8_u8(lo), sixteen);
                let hi = vsubq_s8(vreinterpretq_s8_u8(hi), sixteen);
                let y0 = vld1q_s8(x.qs.as_ptr());
                let y1 = vld1q_s8(x.qs.as_ptr().add(16));
                let dot = sdot(sdot(vdupq_n_s32(0), lo, y0), hi, y1);
                sum += w.d.to_f32() * x.d.to_f32() * vaddvq_s32(dot) as f32;
            }
        }
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    fn values(n: usize, seed: u32) -> Vec<f32> {
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

    /// Each supported type's dot products against the f32 product of its own dequantized
    /// weights with the unquantized input: equal up to the input's 8-bit rounding.
    #[test]
    fn every_type_matches_the_dequantized_product() {
        let (rows, cols) = (8, 512);
        let weights = values(rows * cols, 1);
        let input = values(cols, 2);
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
            let q = QTensor::quantize(&tensor, dtype).expect("quantize");
            let bytes = q.data().expect("bytes").into_owned();
            // Copy into u32 storage for the alignment a mapped file gives.
            let mut aligned = vec![0u32; bytes.len().div_ceil(4)];
            let view: &mut [u8] = {
                let len = bytes.len();
                // SAFETY: u32 storage viewed as its bytes.
                unsafe { std::slice::from_raw_parts_mut(aligned.as_mut_ptr().cast::<u8>(), len) }
            };
            view.copy_from_slice(&bytes);
            let matrix = QMatrix::new(dtype, rows, cols, view).expect("matrix");
            let mut x = Input::default();
            x.set(&input, 1, cols);
            x.prepare(matrix.input_format());
            let mut got = vec![0f32; rows];
            matrix.dot_rows(&x, 0, 0..rows, &mut got);
            let mut row = vec![0f32; cols];
            for (r, got) in got.iter().enumerate() {
                matrix.row_to_f32(r, &mut row);
                let want: f32 = row.iter().zip(&input).map(|(a, b)| a * b).sum();
                let scale: f32 = row.iter().zip(&input).map(|(a, b)| (a * b).abs()).sum();
                assert!((got - want).abs() <= 0.02 * scale + 1e-4, "{dtype:?} row {r}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn simd_kernels_equal_the_scalar_ones() {
        let cols = 1024;
        let tensor = Tensor::from_vec(values(cols, 3), (1, cols), &Device::Cpu).expect("tensor");
        let mut x = Input::default();
        x.set(&values(cols, 4), 1, cols);
        x.prepare(InputFormat::Q8_0);
        x.prepare(InputFormat::Q8_1);
        let q41 =
            QTensor::quantize(&tensor, GgmlDType::Q4_1).expect("q4_1").data().expect("data").into_owned();
        let q50 =
            QTensor::quantize(&tensor, GgmlDType::Q5_0).expect("q5_0").data().expect("data").into_owned();
        let w41: Vec<Q4_1> = q41
            .chunks_exact(20)
            .map(|b| Q4_1 {
                d: f16::from_le_bytes([b[0], b[1]]),
                m: f16::from_le_bytes([b[2], b[3]]),
                qs: b[4..20].try_into().expect("16"),
            })
            .collect();
        let w50: Vec<Q5_0> = q50
            .chunks_exact(22)
            .map(|b| Q5_0 {
                d: f16::from_le_bytes([b[0], b[1]]),
                qh: b[2..6].try_into().expect("4"),
                qs: b[6..22].try_into().expect("16"),
            })
            .collect();
        let (a, b) = (q4_1_kernel()(&w41, x.q8_1(0)), scalar::q4_1_q8_1(&w41, x.q8_1(0)));
        assert!((a - b).abs() <= 1e-3 * b.abs().max(1.0), "q4_1 {a} vs {b}");
        let (a, b) = (q5_0_kernel()(&w50, x.q8_0(0)), scalar::q5_0_q8_0(&w50, x.q8_0(0)));
        assert!((a - b).abs() <= 1e-3 * b.abs().max(1.0), "q5_0 {a} vs {b}");
    }
}
