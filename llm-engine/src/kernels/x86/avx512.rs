//! The AVX-512 VNNI level: two blocks of 32 per instruction.
//!
//! Every kernel here sums in the same order: even blocks in lanes 0..8 and odd blocks in lanes
//! 8..16 of one accumulator, the two halves added, an odd last block added to that in 256
//! bits, then the eight lanes summed. Scale products are `[d0, m0, d1, m1] x [dx0, sx0, dx1,
//! sx1]` in one multiply, whose odd lanes are the offsets, summed in their own lanes. The
//! packed batch kernel repeats these steps exactly, so a token gives the same numbers in a
//! batch as alone.

use super::super::{PackedRow, Q4_1, Q4K, Q5_0, Q6K, Q8_0, Q8Row, cast};
use candle_core::quantized::GgmlDType;
use half::f16;
use std::arch::x86_64::*;

pub(in super::super) static KERNELS: super::Kernels = super::Kernels {
    // SAFETY (all): `kernels()` hands these out only when the CPU has AVX-512 F, BW, VL and
    // VNNI (and AVX2, FMA, F16C).
    q4_1: |w, x, out| unsafe { q4_1_rows(w, x, out) },
    q4_1_x4: |w, x| x.map(|x| unsafe { q4_1(w, x) }),
    q5_0: |w, x, out| unsafe { q5_0_rows(w, x, out) },
    q5_0_x4: |w, x| x.map(|x| unsafe { q5_0(w, x) }),
    q8_0: |w, x, out| unsafe { q8_0_rows(w, x, out) },
    q8_0_x4: |w, x| x.map(|x| unsafe { q8_0(w, x) }),
    q4_k: Some(|w, x, out| unsafe { q4_k_rows(w, x, out) }),
    q6_k: Some(|w, x, out| unsafe { q6_k_rows(w, x, out) }),
    unpack: |dtype, bytes, q| unsafe { unpack(dtype, bytes, q) },
    packed: Some(|w, x, out| unsafe { packed_rows(w, x, out) }),
};

/// Stores the values of blocks taken two at a time by `$pair` (and a last odd one by
/// `$single`) into `$q`.
macro_rules! unpack_pairs {
    ($w:expr, $q:ident, $pair:ident, $single:ident) => {{
        let w = $w;
        assert!($q.len() >= w.len() * 32);
        for k in 0..w.len() / 2 {
            // SAFETY: 64 bytes at 64 k, inside `q` (asserted).
            unsafe {
                _mm512_storeu_si512($q.as_mut_ptr().add(64 * k).cast(), $pair(&w[2 * k], &w[2 * k + 1]).0)
            };
        }
        if w.len() % 2 == 1 {
            let b = w.len() - 1;
            // SAFETY: 32 bytes at 32 b, inside `q`.
            unsafe { _mm256_storeu_si256($q.as_mut_ptr().add(32 * b).cast(), $single(&w[b]).0) };
        }
    }};
}

/// Stores the 256 values of each K-quant block, 64 at a time by `$part(block, 0..4)`, into `$q`.
macro_rules! unpack_super_blocks {
    ($w:expr, $q:ident, $part:ident) => {{
        let w = $w;
        assert!($q.len() >= w.len() * 256);
        for (i, block) in w.iter().enumerate() {
            for part in 0..4 {
                // SAFETY: 64 bytes at 256 i + 64 part < 256 (i + 1) <= q.len() (asserted).
                unsafe {
                    _mm512_storeu_si512($q.as_mut_ptr().add(256 * i + 64 * part).cast(), $part(block, part))
                };
            }
        }
    }};
}

/// The kernel of one token for a weight type whose blocks `$pair` decodes two at a time (64
/// values in one register and their `[d0, m0, d1, m1]`) and `$single` one at a time; the
/// values are unsigned with an offset, or signed (`$signed`) without one.
macro_rules! one_token {
    ($name:ident, $block:ty, $pair:ident, $single:ident, $signed:literal) => {
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
        fn $name(w: &[$block], x: Q8Row<'_>) -> f32 {
            assert!(x.qs.len() >= w.len() * 32 && x.scales.len() >= w.len(), "activations too short");
            let mut acc = _mm512_setzero_ps();
            let mut offsets = _mm_setzero_ps();
            let pairs = w.len() / 2;
            for k in 0..pairs {
                let (q, wdm) = $pair(&w[2 * k], &w[2 * k + 1]);
                // SAFETY: blocks 2k and 2k + 1 of the activations (lengths asserted above).
                let (xv, xs) = unsafe {
                    (
                        _mm512_loadu_si512(x.qs.as_ptr().add(64 * k).cast()),
                        _mm_loadu_ps(x.scales.as_ptr().add(2 * k).cast()),
                    )
                };
                let scales = _mm_mul_ps(wdm, xs);
                offsets = _mm_add_ps(offsets, scales);
                acc = _mm512_fmadd_ps(spread(scales), products(q, xv, $signed), acc);
            }
            let mut acc = halves(acc);
            if w.len() % 2 == 1 {
                let b = w.len() - 1;
                let (q, wdm) = $single(&w[b]);
                // SAFETY: block b of the activations.
                let (xv, xs) = unsafe {
                    (
                        _mm256_loadu_si256(x.qs.as_ptr().add(32 * b).cast()),
                        _mm_castpd_ps(_mm_load_sd(x.scales.as_ptr().add(b).cast())),
                    )
                };
                let scales = _mm_mul_ps(wdm, xs);
                offsets = _mm_add_ps(offsets, scales);
                acc = _mm256_fmadd_ps(_mm256_broadcastss_ps(scales), products_256(q, xv, $signed), acc);
            }
            finish(acc, offsets)
        }
    };
}

one_token!(q4_1, Q4_1, q4_1_pair, q4_1_single, false);
one_token!(q5_0, Q5_0, q5_0_pair, q5_0_single, true);
one_token!(q8_0, Q8_0, q8_0_pair, q8_0_single, true);

rows_kernel!("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni", q4_1_rows, q4_1, Q4_1);
rows_kernel!("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni", q5_0_rows, q5_0, Q5_0);
rows_kernel!("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni", q8_0_rows, q8_0, Q8_0);
rows_kernel!("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni", q4_k_rows, q4_k, Q4K);
rows_kernel!("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni", q6_k_rows, q6_k, Q6K);

/// Q4_K: each run of 32 bytes holds two sub-blocks of 32 (low nibbles, then high ones), taken
/// as a pair in the steps of `one_token!`, with the sub-blocks' `[d * sc, -dmin * m]`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q4_k(w: &[Q4K], x: Q8Row<'_>) -> f32 {
    assert!(x.qs.len() >= w.len() * 256 && x.scales.len() >= w.len() * 8, "activations too short");
    let mut acc = _mm512_setzero_ps();
    let mut offsets = _mm_setzero_ps();
    for (i, block) in w.iter().enumerate() {
        let so = q4_k_scale_offsets(block);
        for run in 0..4 {
            let k = i * 4 + run;
            // SAFETY: blocks 2k and 2k + 1 of the activations (lengths asserted above); four
            // floats of `so`.
            let (xv, xs, wdm) = unsafe {
                (
                    _mm512_loadu_si512(x.qs.as_ptr().add(64 * k).cast()),
                    _mm_loadu_ps(x.scales.as_ptr().add(2 * k).cast()),
                    _mm_loadu_ps(so.as_ptr().add(2 * run).cast()),
                )
            };
            let scales = _mm_mul_ps(wdm, xs);
            offsets = _mm_add_ps(offsets, scales);
            acc = _mm512_fmadd_ps(spread(scales), products(q4_k_run(block, run), xv, false), acc);
        }
    }
    finish(halves(acc), offsets)
}

/// `Q4K::scale_offsets` with the CPU's f16 conversion and one multiply for the sixteen values:
/// the same numbers (the same IEEE products; negating a product or a factor is exact). Called
/// per block of 256 weights, the scalar form took over a quarter of a Q4_K_M model's decode.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q4_k_scale_offsets(block: &Q4K) -> [[f32; 2]; 8] {
    let pairs = block.scales_and_mins();
    // SAFETY: 16 bytes.
    let ints = _mm512_cvtepu8_epi32(unsafe { _mm_loadu_si128(pairs.as_ptr().cast()) });
    let halves = i32::from(block.d.to_bits()) | (i32::from(block.dmin.to_bits()) << 16);
    // [d, dmin, 0, 0], then [d, -dmin] in every pair of lanes.
    let d_dmin = _mm_mul_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(halves)), _mm_setr_ps(1.0, -1.0, 0.0, 0.0));
    let factors = _mm512_castpd_ps(_mm512_broadcastsd_pd(_mm_castps_pd(d_dmin)));
    let mut out = [[0f32; 2]; 8];
    // SAFETY: 16 floats.
    unsafe { _mm512_storeu_ps(out.as_mut_ptr().cast(), _mm512_mul_ps(_mm512_cvtepi32_ps(ints), factors)) };
    out
}

/// Q6_K: pairs of sub-blocks of 32 in the steps of `one_token!`, the signed values' integer
/// products by lanes of four multiplied by their 16-value sub-block's scale before the block
/// scale `d` (exact: at most 4 x 32 x 127 x 128).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q6_k(w: &[Q6K], x: Q8Row<'_>) -> f32 {
    assert!(x.qs.len() >= w.len() * 256 && x.scales.len() >= w.len() * 8, "activations too short");
    let mut acc = _mm512_setzero_ps();
    let mut offsets = _mm_setzero_ps();
    for (i, block) in w.iter().enumerate() {
        // SAFETY: 16 bytes of scales.
        let sixteen = _mm512_cvtepi8_epi32(unsafe { _mm_loadu_si128(block.scales.as_ptr().cast()) });
        let d = block.d.to_f32();
        let wdm = _mm_setr_ps(d, 0.0, d, 0.0);
        for pair in 0..4 {
            // Lanes of four values: 16 values (four lanes) per scale.
            let index = _mm512_add_epi32(
                _mm512_set1_epi32(4 * pair as i32),
                _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
            );
            let lane_scales = _mm512_permutexvar_epi32(index, sixteen);
            let k = i * 4 + pair;
            // SAFETY: blocks 2k and 2k + 1 of the activations (lengths asserted above).
            let (xv, xs) = unsafe {
                (
                    _mm512_loadu_si512(x.qs.as_ptr().add(64 * k).cast()),
                    _mm_loadu_ps(x.scales.as_ptr().add(2 * k).cast()),
                )
            };
            let scales = _mm_mul_ps(wdm, xs);
            offsets = _mm_add_ps(offsets, scales);
            let sums = _mm512_mullo_epi32(signed_sums(q6_k_pair(block, pair), xv), lane_scales);
            acc = _mm512_fmadd_ps(spread(scales), _mm512_cvtepi32_ps(sums), acc);
        }
    }
    finish(halves(acc), offsets)
}

/// The values the packed path multiplies, for a row of `dtype` blocks, decoded as the kernels
/// above decode them; false for a type it does not take.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn unpack(dtype: GgmlDType, bytes: &[u8], q: &mut [i8]) -> bool {
    match dtype {
        GgmlDType::Q4_1 => unpack_pairs!(cast::<u8, Q4_1>(bytes), q, q4_1_pair, q4_1_single),
        GgmlDType::Q5_0 => unpack_pairs!(cast::<u8, Q5_0>(bytes), q, q5_0_pair, q5_0_single),
        GgmlDType::Q8_0 => unpack_pairs!(cast::<u8, Q8_0>(bytes), q, q8_0_pair, q8_0_single),
        GgmlDType::Q4K => unpack_super_blocks!(cast::<u8, Q4K>(bytes), q, q4_k_run),
        GgmlDType::Q6K => unpack_super_blocks!(cast::<u8, Q6K>(bytes), q, q6_k_pair),
        _ => return false,
    }
    true
}

packed_rows_kernel!("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni");

/// Two weight rows against four tokens in the packed form, in the steps of `one_token!`:
/// activations plus 128 are unsigned, and corrections (-128 x the weights' sums per lane)
/// make the integer products exact.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn packed_2x4(w: [&PackedRow; 2], x: [Q8Row<'_>; 4]) -> [[f32; 4]; 2] {
    // No closures in here: they would not inherit the target features.
    let blocks = w[0].scale_offset.len();
    for r in w {
        assert!(r.q.len() >= blocks * 32 && r.scale_offset.len() >= blocks);
    }
    for t in x {
        assert!(t.qs.len() >= blocks * 32 && t.scales.len() >= blocks, "activations too short");
    }
    // Q6_K rows: integer scales per lane (both rows are of one matrix).
    let scaled = !w[0].lane_scales.is_empty();
    for r in w {
        assert!(!scaled || r.lane_scales.len() >= blocks);
    }
    let flip = _mm512_set1_epi8(-128);
    let mut acc = [[_mm512_setzero_ps(); 4]; 2];
    let mut offsets = [[_mm_setzero_ps(); 4]; 2];
    for k in 0..blocks / 2 {
        // SAFETY (all loads): blocks 2k and 2k + 1 of rows and activations of at least
        // `blocks` blocks (asserted above).
        let (q, so) = unsafe {
            (
                [
                    _mm512_loadu_si512(w[0].q.as_ptr().add(64 * k).cast()),
                    _mm512_loadu_si512(w[1].q.as_ptr().add(64 * k).cast()),
                ],
                [
                    _mm_loadu_ps(w[0].scale_offset.as_ptr().add(2 * k).cast()),
                    _mm_loadu_ps(w[1].scale_offset.as_ptr().add(2 * k).cast()),
                ],
            )
        };
        let c = [correction(q[0]), correction(q[1])];
        for j in 0..4 {
            // SAFETY: as above.
            let (xv, xs) = unsafe {
                (
                    _mm512_xor_si512(_mm512_loadu_si512(x[j].qs.as_ptr().add(64 * k).cast()), flip),
                    _mm_loadu_ps(x[j].scales.as_ptr().add(2 * k).cast()),
                )
            };
            for r in 0..2 {
                let mut sums = _mm512_dpbusd_epi32(c[r], xv, q[r]);
                if scaled {
                    // SAFETY: blocks 2k and 2k + 1 of `lane_scales` (asserted above).
                    let lane_scales =
                        unsafe { _mm512_loadu_si512(w[r].lane_scales.as_ptr().add(2 * k).cast()) };
                    sums = _mm512_mullo_epi32(sums, lane_scales);
                }
                let p = _mm512_cvtepi32_ps(sums);
                let scales = _mm_mul_ps(so[r], xs);
                offsets[r][j] = _mm_add_ps(offsets[r][j], scales);
                acc[r][j] = _mm512_fmadd_ps(spread(scales), p, acc[r][j]);
            }
        }
    }
    let mut out = [[0f32; 4]; 2];
    for r in 0..2 {
        for j in 0..4 {
            let mut sum = halves(acc[r][j]);
            let mut offset = offsets[r][j];
            if blocks % 2 == 1 {
                // Never a K-quant row (eight sub-blocks per block): no lane scales here.
                assert!(!scaled, "lane scales on an odd number of blocks");
                let b = blocks - 1;
                // SAFETY: block b of rows and activations of `blocks` blocks.
                let (q, so, xv, xs) = unsafe {
                    (
                        _mm256_loadu_si256(w[r].q.as_ptr().add(32 * b).cast()),
                        _mm_castpd_ps(_mm_load_sd(w[r].scale_offset.as_ptr().add(b).cast())),
                        _mm256_xor_si256(
                            _mm256_loadu_si256(x[j].qs.as_ptr().add(32 * b).cast()),
                            _mm256_set1_epi8(-128),
                        ),
                        _mm_castpd_ps(_mm_load_sd(x[j].scales.as_ptr().add(b).cast())),
                    )
                };
                let zero = _mm256_setzero_si256();
                let c = _mm256_sub_epi32(zero, _mm256_dpbusd_epi32(zero, _mm256_set1_epi8(-128), q));
                let p = _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(c, xv, q));
                let scales = _mm_mul_ps(so, xs);
                offset = _mm_add_ps(offset, scales);
                sum = _mm256_fmadd_ps(_mm256_broadcastss_ps(scales), p, sum);
            }
            out[r][j] = finish(sum, offset);
        }
    }
    out
}

/// -128 x the sum of each lane's four weights: what adding 128 to the activations puts in.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn correction(q: __m512i) -> __m512i {
    let zero = _mm512_setzero_si512();
    _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, _mm512_set1_epi8(-128), q))
}

/// The i32 dot products by groups of four of 64 weights `q` (unsigned, or signed when
/// `signed`) with 64 signed activations, as f32.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn products(q: __m512i, x: __m512i, signed: bool) -> __m512 {
    let sums = if signed { signed_sums(q, x) } else { _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, x) };
    _mm512_cvtepi32_ps(sums)
}

/// The i32 dot products by groups of four of signed weights and activations: |q| . (x with
/// q's sign), since VNNI takes unsigned times signed.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn signed_sums(q: __m512i, x: __m512i) -> __m512i {
    let zero = _mm512_setzero_si512();
    let negative = _mm512_movepi8_mask(q);
    _mm512_dpbusd_epi32(zero, _mm512_abs_epi8(q), _mm512_mask_sub_epi8(x, negative, zero, x))
}

/// `products` for one block.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn products_256(q: __m256i, x: __m256i, signed: bool) -> __m256 {
    let zero = _mm256_setzero_si256();
    let sums = if signed {
        _mm256_dpbusd_epi32(zero, _mm256_abs_epi8(q), _mm256_sign_epi8(x, q))
    } else {
        _mm256_dpbusd_epi32(zero, q, x)
    };
    _mm256_cvtepi32_ps(sums)
}

/// Lanes 0 and 2 of `[s0, o0, s1, o1]` (the two blocks' scales) over the two halves.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn spread(scales: __m128) -> __m512 {
    let index = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
    _mm512_permutexvar_ps(index, _mm512_castps128_ps512(scales))
}

/// The even-block and odd-block halves added.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn halves(acc: __m512) -> __m256 {
    let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc)));
    _mm256_add_ps(_mm512_castps512_ps256(acc), high)
}

/// The eight lanes summed, plus the offsets (lanes 1 and 3 of `offsets`).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn finish(acc: __m256, offsets: __m128) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let sum = _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
    let mut lanes = [0f32; 4];
    // SAFETY: four writable floats.
    unsafe { _mm_storeu_ps(lanes.as_mut_ptr(), offsets) };
    sum + (lanes[1] + lanes[3])
}

/// Two f16 as the two halves of a 32-bit lane.
fn halves_bits(low: f16, high: f16) -> i32 {
    (u32::from(low.to_bits()) | (u32::from(high.to_bits()) << 16)) as i32
}

/// `[d0, m0, d1, m1]` from each block's `d | m << 16`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn scales(first: i32, second: i32) -> __m128 {
    _mm_cvtph_ps(_mm_setr_epi32(first, second, 0, 0))
}

/// 16 bytes of nibbles of each of two blocks as 64 values: the first block's low then high
/// nibbles, then the second's.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn nibbles_pair(first: &[u8; 16], second: &[u8; 16]) -> __m512i {
    // SAFETY: 16 readable bytes each.
    let both = unsafe { _mm256_loadu2_m128i(second.as_ptr().cast(), first.as_ptr().cast()) };
    let doubled =
        _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 1, 0, 1, 2, 3, 2, 3), _mm512_castsi256_si512(both));
    let shifted = _mm512_srlv_epi64(doubled, _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4));
    _mm512_and_si512(shifted, _mm512_set1_epi8(0x0f))
}

/// One block's nibbles as 32 values, low ones first.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn nibbles(qs: &[u8; 16]) -> __m256i {
    // SAFETY: 16 readable bytes.
    let packed = unsafe { _mm256_broadcastsi128_si256(_mm_loadu_si128(qs.as_ptr().cast())) };
    _mm256_and_si256(_mm256_srlv_epi64(packed, _mm256_set_epi64x(4, 4, 0, 0)), _mm256_set1_epi8(0x0f))
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q4_1_pair(a: &Q4_1, b: &Q4_1) -> (__m512i, __m128) {
    (nibbles_pair(&a.qs, &b.qs), scales(halves_bits(a.d, a.m), halves_bits(b.d, b.m)))
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q4_1_single(a: &Q4_1) -> (__m256i, __m128) {
    (nibbles(&a.qs), scales(halves_bits(a.d, a.m), 0))
}

/// Q5_0 values minus 16: 16 is taken off where the fifth bit (bit i of `qh` for value i) is
/// clear.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q5_0_pair(a: &Q5_0, b: &Q5_0) -> (__m512i, __m128) {
    let high = u64::from(u32::from_le_bytes(a.qh)) | (u64::from(u32::from_le_bytes(b.qh)) << 32);
    let q = nibbles_pair(&a.qs, &b.qs);
    let values = _mm512_mask_sub_epi8(q, !high, q, _mm512_set1_epi8(16));
    (values, scales(halves_bits(a.d, f16::ZERO), halves_bits(b.d, f16::ZERO)))
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q5_0_single(a: &Q5_0) -> (__m256i, __m128) {
    let q = nibbles(&a.qs);
    let values = _mm256_mask_sub_epi8(q, !u32::from_le_bytes(a.qh), q, _mm256_set1_epi8(16));
    (values, scales(halves_bits(a.d, f16::ZERO), 0))
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q8_0_pair(a: &Q8_0, b: &Q8_0) -> (__m512i, __m128) {
    // SAFETY: 32 readable bytes each.
    let (low, high) =
        unsafe { (_mm256_loadu_si256(a.qs.as_ptr().cast()), _mm256_loadu_si256(b.qs.as_ptr().cast())) };
    let values = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(low), high);
    (values, scales(halves_bits(a.d, f16::ZERO), halves_bits(b.d, f16::ZERO)))
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q8_0_single(a: &Q8_0) -> (__m256i, __m128) {
    // SAFETY: 32 readable bytes.
    (unsafe { _mm256_loadu_si256(a.qs.as_ptr().cast()) }, scales(halves_bits(a.d, f16::ZERO), 0))
}

/// Run `run` of a Q4_K block: its 32 bytes' low nibbles (sub-block 2 run), then high ones.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q4_k_run(block: &Q4K, run: usize) -> __m512i {
    assert!(run < 4);
    // SAFETY: 32 bytes at 32 run of the 128.
    let packed = unsafe { _mm256_loadu_si256(block.qs.as_ptr().add(32 * run).cast()) };
    let both = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(packed), _mm256_srli_epi16::<4>(packed));
    _mm512_and_si512(both, _mm512_set1_epi8(0x0f))
}

/// Values `64 pair..64 pair + 64` of a Q6_K block minus 32 (the layout of `Q6K::values`).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q6_k_pair(block: &Q6K, pair: usize) -> __m512i {
    let (half, upper) = (pair / 2, pair % 2 == 1);
    assert!(half < 2);
    // SAFETY: 64 bytes of `ql` and 32 of `qh` in this half.
    let (low, high) = unsafe {
        (
            _mm512_loadu_si512(block.ql.as_ptr().add(64 * half).cast()),
            _mm256_loadu_si256(block.qh.as_ptr().add(32 * half).cast()),
        )
    };
    // `qh` for values 0..32 and (shifted by two) for 32..64 of the pair; the upper pair takes
    // the high nibbles and the bits four above.
    let high = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(high), _mm256_srli_epi16::<2>(high));
    let (nibbles, bits) =
        if upper { (_mm512_srli_epi16::<4>(low), _mm512_srli_epi16::<4>(high)) } else { (low, high) };
    let nibbles = _mm512_and_si512(nibbles, _mm512_set1_epi8(0x0f));
    let bits = _mm512_and_si512(bits, _mm512_set1_epi8(3));
    _mm512_sub_epi8(_mm512_or_si512(nibbles, _mm512_slli_epi16::<4>(bits)), _mm512_set1_epi8(32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_k_scale_offsets_are_the_portable_ones_to_the_bit() {
        let vnni = std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("f16c");
        if !vnni {
            eprintln!("no AVX-512 VNNI here: nothing to compare");
            return;
        }
        let mut state = 0x9e37_79b9u32;
        let mut byte = || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        };
        for case in 0..2000 {
            // Every bit pattern of the scales, and scales of every size (subnormal f16 too).
            // Bit 10 cleared: no infinity or NaN.
            let d = f16::from_bits((u16::from(byte()) | (u16::from(byte()) << 8)) & 0x7bff);
            let dmin = if case % 7 == 0 { f16::from_bits(3) } else { f16::from_bits(u16::from(byte()) << 6) };
            let block = Q4K { d, dmin, scales: std::array::from_fn(|_| byte()), qs: [0; 128] };
            // SAFETY: the features are there (checked above).
            let simd = unsafe { q4_k_scale_offsets(&block) };
            let portable = block.scale_offsets();
            let bits = |v: &[[f32; 2]; 8]| v.map(|p| p.map(f32::to_bits));
            assert_eq!(bits(&simd), bits(&portable), "d {d} dmin {dmin} scales {:?}", block.scales);
        }
    }
}
