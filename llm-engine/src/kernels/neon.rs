//! NEON kernels with SDOT (ARMv8.2 dotprod builds: Cortex-A76 and later).

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

/// A Q4_1 block's nibbles as two signed vectors (elements 0..15, 16..31).
#[inline(always)]
fn q4_1_values(w: &Q4_1) -> (int8x16_t, int8x16_t) {
    // SAFETY: NEON is part of aarch64; 16 readable bytes.
    unsafe {
        let packed = vld1q_u8(w.qs.as_ptr());
        let lo = vreinterpretq_s8_u8(vandq_u8(packed, vdupq_n_u8(0x0f)));
        let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(packed));
        (lo, hi)
    }
}

/// A Q5_0 block's values minus 16 as two signed vectors.
#[inline(always)]
fn q5_0_values(w: &Q5_0) -> (int8x16_t, int8x16_t) {
    let high = fifth_bits(w.qh);
    // SAFETY: NEON is part of aarch64; every load reads 16 bytes of a block or of `high`.
    unsafe {
        let packed = vld1q_u8(w.qs.as_ptr());
        let lo = vorrq_u8(vandq_u8(packed, vdupq_n_u8(0x0f)), vld1q_u8(high.as_ptr()));
        let hi = vorrq_u8(vshrq_n_u8::<4>(packed), vld1q_u8(high.as_ptr().add(16)));
        let sixteen = vdupq_n_s8(16);
        (vsubq_s8(vreinterpretq_s8_u8(lo), sixteen), vsubq_s8(vreinterpretq_s8_u8(hi), sixteen))
    }
}

/// The integer dot product of a block's values with 32 activations.
#[inline(always)]
fn block_dot((lo, hi): (int8x16_t, int8x16_t), qs: &[i8; 32]) -> i32 {
    // SAFETY: NEON is part of aarch64; 32 readable bytes.
    unsafe {
        let y0 = vld1q_s8(qs.as_ptr());
        let y1 = vld1q_s8(qs.as_ptr().add(16));
        vaddvq_s32(sdot(sdot(vdupq_n_s32(0), lo, y0), hi, y1))
    }
}

pub(super) fn q4_1(w: &[Q4_1], x: Q8Row<'_>) -> f32 {
    let mut sum = 0f32;
    for (b, w) in w.iter().enumerate() {
        let [dx, sx] = x.scales[b];
        let dot = block_dot(q4_1_values(w), x.block(b));
        sum += w.d.to_f32() * dx * dot as f32 + w.m.to_f32() * sx;
    }
    sum
}

pub(super) fn q4_1_x4(w: &[Q4_1], x: [Q8Row<'_>; 4]) -> [f32; 4] {
    let mut sum = [0f32; 4];
    for (b, w) in w.iter().enumerate() {
        let values = q4_1_values(w);
        let (d, m) = (w.d.to_f32(), w.m.to_f32());
        for j in 0..4 {
            let [dx, sx] = x[j].scales[b];
            sum[j] += d * dx * block_dot(values, x[j].block(b)) as f32 + m * sx;
        }
    }
    sum
}

pub(super) fn q5_0(w: &[Q5_0], x: Q8Row<'_>) -> f32 {
    symmetric(w, x, |w| w.d, q5_0_values)
}

pub(super) fn q5_0_x4(w: &[Q5_0], x: [Q8Row<'_>; 4]) -> [f32; 4] {
    symmetric_x4(w, x, |w| w.d, q5_0_values)
}

pub(super) fn q8_0(w: &[Q8_0], x: Q8Row<'_>) -> f32 {
    symmetric(w, x, |w| w.d, q8_0_values)
}

pub(super) fn q8_0_x4(w: &[Q8_0], x: [Q8Row<'_>; 4]) -> [f32; 4] {
    symmetric_x4(w, x, |w| w.d, q8_0_values)
}

/// One token's product with a row of a symmetric type (`x = d * q`): `d` the block scale and
/// `values` the block's 32 signed values.
#[inline(always)]
fn symmetric<B>(
    w: &[B],
    x: Q8Row<'_>,
    d: impl Fn(&B) -> half::f16,
    values: impl Fn(&B) -> (int8x16_t, int8x16_t),
) -> f32 {
    let mut sum = 0f32;
    for (b, w) in w.iter().enumerate() {
        sum += d(w).to_f32() * x.scales[b][0] * block_dot(values(w), x.block(b)) as f32;
    }
    sum
}

/// `symmetric` for four tokens, each block decoded once.
#[inline(always)]
fn symmetric_x4<B>(
    w: &[B],
    x: [Q8Row<'_>; 4],
    d: impl Fn(&B) -> half::f16,
    values: impl Fn(&B) -> (int8x16_t, int8x16_t),
) -> [f32; 4] {
    let mut sum = [0f32; 4];
    for (b, w) in w.iter().enumerate() {
        let (values, d) = (values(w), d(w).to_f32());
        for j in 0..4 {
            sum[j] += d * x[j].scales[b][0] * block_dot(values, x[j].block(b)) as f32;
        }
    }
    sum
}

/// A Q8_0 block's values as two vectors.
#[inline(always)]
fn q8_0_values(w: &Q8_0) -> (int8x16_t, int8x16_t) {
    // SAFETY: NEON is part of aarch64; 32 readable bytes.
    unsafe { (vld1q_s8(w.qs.as_ptr()), vld1q_s8(w.qs.as_ptr().add(16))) }
}
