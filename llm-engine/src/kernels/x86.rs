//! x86 kernels: one set per instruction-set level, the best one picked at run time.
//!
//! Within a level, a token's products are the same numbers in the packed batch path as in
//! the one-token kernels: the integer block products are exact either way, and the float
//! steps (scale products, accumulation order, final sums) are the same operations in the same
//! order.

use super::*;

/// The x86 kernels of one instruction-set level.
pub(super) struct Kernels {
    pub q4_1: Q4_1Kernel,
    pub q4_1_x4: Q4_1x4Kernel,
    pub q5_0: Q5_0Kernel,
    pub q5_0_x4: Q5_0x4Kernel,
    pub q8_0: Q8_0Kernel,
    pub q8_0_x4: Q8_0x4Kernel,
    /// Only at the AVX-512 level (candle's elsewhere). At the 256-bit levels kernels of ours
    /// were measured no faster than candle's at AVX-VNNI and slower at AVX2 (see
    /// ARCHITECTURE.md).
    pub q4_k: Option<Q4KKernel>,
    pub q6_k: Option<Q6KKernel>,
    /// The packed path's values of a row of blocks in SIMD (false: a type it does not take,
    /// decoded by pack_row's portable loops).
    pub unpack: UnpackKernel,
    /// Only with VNNI (AVX2's maddubs would saturate on activations plus 128).
    pub packed: Option<PackedKernel>,
}

/// AVX-512 with the byte/word instructions, 256-bit forms and VNNI (Ice Lake, Zen 4 and later).
fn avx512() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

/// Names `TMO_LLM_X86_LEVEL` takes, lowest first.
const LEVEL_NAMES: [&str; 4] = ["portable", "avx2", "avx-vnni", "avx512-vnni"];

/// The best level this CPU has: AVX-512 VNNI, AVX-VNNI or AVX2 (each with FMA and F16C),
/// with its name; `None` below AVX2 (the portable kernels run then). `$TMO_LLM_X86_LEVEL`
/// (one of `LEVEL_NAMES`) caps it, to compare the levels on one machine.
pub(super) fn level() -> Option<(&'static str, &'static Kernels)> {
    static LEVEL: std::sync::OnceLock<Option<(&'static str, &'static Kernels)>> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        let levels = every_level();
        let cap = match std::env::var("TMO_LLM_X86_LEVEL") {
            Err(_) => LEVEL_NAMES.len(),
            Ok(name) => match LEVEL_NAMES.iter().position(|n| *n == name) {
                Some(rank) => rank,
                None => {
                    tracing::warn!("TMO_LLM_X86_LEVEL={name:?} is none of {LEVEL_NAMES:?}: ignored");
                    LEVEL_NAMES.len()
                }
            },
        };
        levels.into_iter().rev().find(|(name, _)| LEVEL_NAMES.iter().position(|n| n == name) <= Some(cap))
    })
}

/// The kernels of `level()`.
pub(super) fn kernels() -> Option<&'static Kernels> {
    level().map(|(_, k)| k)
}

/// Every level this CPU runs, lowest first.
pub(super) fn every_level() -> Vec<(&'static str, &'static Kernels)> {
    let base = is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c");
    let mut levels = Vec::new();
    if base {
        levels.push(("avx2", &avx2::KERNELS));
        if is_x86_feature_detected!("avxvnni") {
            levels.push(("avx-vnni", &avxvnni::KERNELS));
        }
        if avx512() {
            levels.push(("avx512-vnni", &avx512::KERNELS));
        }
    }
    levels
}

/// A kernel over rows (`RowsKernel`) from a one-row kernel compiled for the same features,
/// which inlines into the loop.
macro_rules! rows_kernel {
    ($features:literal, $name:ident, $one:ident, $block:ty) => {
        #[target_feature(enable = $features)]
        fn $name(w: &[$block], x: Q8Row<'_>, out: &mut [f32]) {
            if out.is_empty() {
                return;
            }
            for (row, o) in w.chunks_exact(w.len() / out.len()).zip(out) {
                *o = $one(row, x);
            }
        }
    };
}

/// `PackedKernel` from a level's `packed_2x4`: groups of four tokens, the last group repeating
/// its last token (the extra results are dropped).
macro_rules! packed_rows_kernel {
    ($features:literal) => {
        #[allow(dead_code)]
        #[target_feature(enable = $features)]
        fn packed_rows(w: [&PackedRow; 2], x: &[Q8Row<'_>], out: &mut [[f32; 2]]) {
            let tokens = x.len().min(out.len());
            let mut t = 0;
            while t < tokens {
                let last = tokens - 1;
                let group = [x[t], x[(t + 1).min(last)], x[(t + 2).min(last)], x[(t + 3).min(last)]];
                let r = packed_2x4(w, group);
                for j in 0..4.min(tokens - t) {
                    out[t + j] = [r[0][j], r[1][j]];
                }
                t += 4;
            }
        }
    };
}

/// The 256-bit one-token and four-token kernels of a symmetric type (`x = d * q`, signed `q`)
/// whose 32 values `$values` decodes.
macro_rules! signed_kernels {
    ($features:literal, $one:ident, $four:ident, $block:ty, $values:ident) => {
        #[target_feature(enable = $features)]
        fn $one(w: &[$block], x: Q8Row<'_>) -> f32 {
            let mut acc = _mm256_setzero_ps();
            for (b, w) in w.iter().enumerate() {
                let q = $values(w);
                let products = signed_dot(q, _mm256_sign_epi8(q, q), load(x.block(b)));
                acc = _mm256_fmadd_ps(_mm256_set1_ps(f32_of(w.d) * x.scales[b][0]), products, acc);
            }
            hsum(acc)
        }

        #[target_feature(enable = $features)]
        fn $four(w: &[$block], x: [Q8Row<'_>; 4]) -> [f32; 4] {
            let mut acc = [_mm256_setzero_ps(); 4];
            for (b, w) in w.iter().enumerate() {
                let q = $values(w);
                let magnitude = _mm256_sign_epi8(q, q);
                let d = f32_of(w.d);
                for j in 0..4 {
                    let products = signed_dot(q, magnitude, load(x[j].block(b)));
                    acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(d * x[j].scales[b][0]), products, acc[j]);
                }
            }
            [hsum(acc[0]), hsum(acc[1]), hsum(acc[2]), hsum(acc[3])]
        }
    };
}

/// One set of 256-bit kernels compiled for `$features`, with `$dot` the eight f32 partial sums
/// of the u8 x i8 products of two 32-byte vectors.
macro_rules! kernel_set {
    ($name:ident, $features:literal, $packed:expr, |$u:ident, $s:ident| $dot:expr,
     |$a:ident, $pu:ident, $ps:ident| $dpbusd:expr) => {
        mod $name {
            use super::super::{PackedRow, Q4_1, Q5_0, Q8_0, Q8Row, cast};
            use candle_core::quantized::GgmlDType;
            use half::f16;
            use std::arch::x86_64::*;

            pub(in super::super) static KERNELS: super::Kernels = super::Kernels {
                // SAFETY (all): `kernels()` hands these out only when the CPU has
                // `$features`.
                q4_1: |w, x, out| unsafe { q4_1_rows(w, x, out) },
                q4_1_x4: |w, x| unsafe { q4_1_x4(w, x) },
                q5_0: |w, x, out| unsafe { q5_0_rows(w, x, out) },
                q5_0_x4: |w, x| unsafe { q5_0_x4(w, x) },
                q8_0: |w, x, out| unsafe { q8_0_rows(w, x, out) },
                q8_0_x4: |w, x| unsafe { q8_0_x4(w, x) },
                q4_k: None,
                q6_k: None,
                unpack: |dtype, bytes, q| unsafe { unpack(dtype, bytes, q) },
                packed: $packed,
            };

            rows_kernel!($features, q4_1_rows, q4_1, Q4_1);
            rows_kernel!($features, q5_0_rows, q5_0, Q5_0);
            rows_kernel!($features, q8_0_rows, q8_0, Q8_0);

            packed_rows_kernel!($features);

            /// The packed two-row, four-token product (VNNI levels only; see `packed_tile`).
            #[allow(dead_code)]
            #[target_feature(enable = $features)]
            fn packed_2x4(w: [&PackedRow; 2], x: [Q8Row<'_>; 4]) -> [[f32; 4]; 2] {
                // No closures in here: they would not inherit the target features, and the
                // intrinsics in them would become calls.
                let mut acc = [[_mm256_setzero_ps(); 4]; 2];
                let mut offsets = [[0f32; 4]; 2];
                let flip = _mm256_set1_epi8(-128);
                // Q6_K rows (with lane scales) pack only at the AVX-512 level.
                assert!(w[0].lane_scales.is_empty() && w[1].lane_scales.is_empty());
                for b in 0..w[0].scale_offset.len() {
                    // SAFETY (loads): 32 bytes at block b of rows of whole blocks.
                    let (w0, w1) = unsafe {
                        (
                            _mm256_loadu_si256(w[0].q.as_ptr().add(b * 32).cast()),
                            _mm256_loadu_si256(w[1].q.as_ptr().add(b * 32).cast()),
                        )
                    };
                    // -128 x the sum of each lane's four weights, which the 128 added to the
                    // activations puts in.
                    let zero = _mm256_setzero_si256();
                    let c0 = _mm256_sub_epi32(zero, dpbusd(zero, flip, w0));
                    let c1 = _mm256_sub_epi32(zero, dpbusd(zero, flip, w1));
                    let ([s0, o0], [s1, o1]) = (w[0].scale_offset[b], w[1].scale_offset[b]);
                    for j in 0..4 {
                        // Activations plus 128: unsigned.
                        let xv = _mm256_xor_si256(load(x[j].block(b)), flip);
                        let [dx, sx] = x[j].scales[b];
                        let p0 = _mm256_cvtepi32_ps(dpbusd(c0, xv, w0));
                        let p1 = _mm256_cvtepi32_ps(dpbusd(c1, xv, w1));
                        acc[0][j] = _mm256_fmadd_ps(_mm256_set1_ps(s0 * dx), p0, acc[0][j]);
                        acc[1][j] = _mm256_fmadd_ps(_mm256_set1_ps(s1 * dx), p1, acc[1][j]);
                        offsets[0][j] += o0 * sx;
                        offsets[1][j] += o1 * sx;
                    }
                }
                let mut out = [[0f32; 4]; 2];
                for r in 0..2 {
                    for j in 0..4 {
                        out[r][j] = hsum(acc[r][j]) + offsets[r][j];
                    }
                }
                out
            }

            #[target_feature(enable = $features)]
            fn dot($u: __m256i, $s: __m256i) -> __m256 {
                $dot
            }

            /// `acc` plus the u8 x i8 dot products by groups of four bytes.
            #[allow(dead_code)]
            #[target_feature(enable = $features)]
            fn dpbusd($a: __m256i, $pu: __m256i, $ps: __m256i) -> __m256i {
                $dpbusd
            }

            /// Sum of the eight lanes.
            #[target_feature(enable = $features)]
            fn hsum(v: __m256) -> f32 {
                let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
            }

            /// f16 to f32 in one instruction (`half` calls out of line for it).
            #[target_feature(enable = $features)]
            fn f32_of(h: f16) -> f32 {
                _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h.to_bits()))))
            }

            /// The 32 nibbles of 16 bytes, low halves in the first 16 lanes.
            #[target_feature(enable = $features)]
            fn nibbles(qs: &[u8; 16]) -> __m256i {
                // SAFETY: 16 readable bytes.
                let packed = unsafe { _mm256_broadcastsi128_si256(_mm_loadu_si128(qs.as_ptr().cast())) };
                // The upper copy shifted by four: its low nibbles are the high ones.
                let shifted = _mm256_srlv_epi64(packed, _mm256_set_epi64x(4, 4, 0, 0));
                _mm256_and_si256(shifted, _mm256_set1_epi8(0x0f))
            }

            /// The 32 bits of `qh` as bytes of 16 (set) or 0, in element order.
            #[target_feature(enable = $features)]
            fn fifth_bits(qh: [u8; 4]) -> __m256i {
                // Byte i takes byte i / 8 of the bits; OR-ing every bit but bit i % 8 and
                // comparing with all ones tells whether bit i % 8 is set.
                let spread = _mm256_shuffle_epi8(
                    _mm256_set1_epi32(i32::from_le_bytes(qh)),
                    _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0),
                );
                let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe_u64 as i64);
                let set = _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi64x(-1));
                _mm256_and_si256(set, _mm256_set1_epi8(16))
            }

            #[target_feature(enable = $features)]
            fn load(qs: &[i8; 32]) -> __m256i {
                // SAFETY: 32 readable bytes.
                unsafe { _mm256_loadu_si256(qs.as_ptr().cast()) }
            }

            /// Signed weights `q` (-127..127) times activations: |q| . sign(y, q).
            #[target_feature(enable = $features)]
            fn signed_dot(q: __m256i, magnitude: __m256i, y: __m256i) -> __m256 {
                dot(magnitude, _mm256_sign_epi8(y, q))
            }

            #[target_feature(enable = $features)]
            fn q5_0_values(w: &Q5_0) -> __m256i {
                _mm256_sub_epi8(_mm256_or_si256(nibbles(&w.qs), fifth_bits(w.qh)), _mm256_set1_epi8(16))
            }

            #[target_feature(enable = $features)]
            fn q4_1(w: &[Q4_1], x: Q8Row<'_>) -> f32 {
                let mut acc = _mm256_setzero_ps();
                let mut offset = 0f32;
                for (b, w) in w.iter().enumerate() {
                    let [dx, sx] = x.scales[b];
                    let scale = _mm256_set1_ps(f32_of(w.d) * dx);
                    acc = _mm256_fmadd_ps(scale, dot(nibbles(&w.qs), load(x.block(b))), acc);
                    offset += f32_of(w.m) * sx;
                }
                hsum(acc) + offset
            }

            #[target_feature(enable = $features)]
            fn q4_1_x4(w: &[Q4_1], x: [Q8Row<'_>; 4]) -> [f32; 4] {
                let mut acc = [_mm256_setzero_ps(); 4];
                let mut offset = [0f32; 4];
                for (b, w) in w.iter().enumerate() {
                    let q = nibbles(&w.qs);
                    let (d, m) = (f32_of(w.d), f32_of(w.m));
                    for j in 0..4 {
                        let [dx, sx] = x[j].scales[b];
                        acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), dot(q, load(x[j].block(b))), acc[j]);
                        offset[j] += m * sx;
                    }
                }
                [
                    hsum(acc[0]) + offset[0],
                    hsum(acc[1]) + offset[1],
                    hsum(acc[2]) + offset[2],
                    hsum(acc[3]) + offset[3],
                ]
            }

            signed_kernels!($features, q5_0, q5_0_x4, Q5_0, q5_0_values);
            signed_kernels!($features, q8_0, q8_0_x4, Q8_0, q8_0_values);

            #[target_feature(enable = $features)]
            fn q8_0_values(w: &Q8_0) -> __m256i {
                load(&w.qs)
            }

            /// The values the packed path multiplies, for a row of `dtype` blocks, decoded as
            /// the kernels above decode them; false for a type it does not take.
            #[target_feature(enable = $features)]
            fn unpack(dtype: GgmlDType, bytes: &[u8], q: &mut [i8]) -> bool {
                match dtype {
                    GgmlDType::Q4_1 => {
                        for (b, w) in cast::<u8, Q4_1>(bytes).iter().enumerate() {
                            store(q, 32 * b, nibbles(&w.qs));
                        }
                    }
                    GgmlDType::Q5_0 => {
                        for (b, w) in cast::<u8, Q5_0>(bytes).iter().enumerate() {
                            store(q, 32 * b, q5_0_values(w));
                        }
                    }
                    GgmlDType::Q8_0 => {
                        for (b, w) in cast::<u8, Q8_0>(bytes).iter().enumerate() {
                            store(q, 32 * b, q8_0_values(w));
                        }
                    }
                    _ => return false,
                }
                true
            }

            /// 32 values into `q[at..at + 32]`.
            #[target_feature(enable = $features)]
            fn store(q: &mut [i8], at: usize, v: __m256i) {
                let q: &mut [i8; 32] = (&mut q[at..at + 32]).try_into().expect("32 values");
                // SAFETY: 32 writable bytes.
                unsafe { _mm256_storeu_si256(q.as_mut_ptr().cast(), v) }
            }
        }
    };
}

// maddubs pairs stay within i16: 2 * 127 * 127 at most (activations are -127..127).
kernel_set!(
    avx2,
    "avx2,fma,f16c",
    None,
    |u, s| _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))),
    |a, u, s| _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)))
);
kernel_set!(
    avxvnni,
    "avx2,fma,f16c,avxvnni",
    // SAFETY: handed out by `kernels()` only when the CPU has AVX-VNNI.
    Some(|w, x, out| unsafe { packed_rows(w, x, out) }),
    |u, s| _mm256_cvtepi32_ps(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s)),
    |a, u, s| _mm256_dpbusd_avx_epi32(a, u, s)
);

mod avx512;
