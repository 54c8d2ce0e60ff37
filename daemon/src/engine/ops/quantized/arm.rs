//! aarch64 kernels for the quantized-product contract (4- and 8-bit codes), chosen at run time: `sdot` on rows side by side
//! where the core has the dot-product extension (Cortex-A76/A55 in the RK3588 and most boards
//! since), else NEON widening multiplies row by row. Their speed on a board is not measured
//! yet; qemu checks what they compute.

use std::arch::aarch64::*;
use std::arch::asm;

use super::{row_tiles, run_group_tiles, Bits, OutputShare, QuantizedRows, RowTiles, Weights, BLOCK};
use crate::engine::ops::isa::{allows, Level};

/// Whether this core has the dot-product instructions, and the kernel level allows them.
pub fn has_dotprod() -> bool {
    allows(Level::Dotprod) && std::arch::is_aarch64_feature_detected!("dotprod")
}

/// Whether the NEON kernels may run (NEON is baseline; only `MULMD_KERNELS=portable` stops them).
pub fn neon_allowed() -> bool {
    allows(Level::Neon)
}

/// `out = a · Wᵀ` (see `Weights::matmul_quantized`); `a.k == w.k`, `out.len() == a.m · w.n`.
pub fn matmul(w: &Weights, a: &QuantizedRows, out: OutputShare) {
    if has_dotprod() {
        // SAFETY: the core has the dot-product extension (checked above); NEON is baseline.
        unsafe { dotprod::matmul(w, a, out) }
    } else {
        // SAFETY: NEON is part of the aarch64 baseline.
        unsafe { neon::matmul(w, a, out) }
    }
}

/// A block's code bytes to its 32 signed weights (code − offset), inputs 0..16 then 16..32.
#[inline(always)]
unsafe fn signed_weights<const EIGHT: bool>(codes: *const u8) -> [int8x16_t; 2] {
    // SAFETY: the caller upholds this function's contract (above): the CPU has the features it
    // enables, and every pointer it reads or writes stays inside the slice it comes from.
    unsafe {
        if EIGHT {
            // code − 128 is the code with its top bit flipped.
            let flip = vdupq_n_u8(0x80);
            [vreinterpretq_s8_u8(veorq_u8(vld1q_u8(codes), flip)), vreinterpretq_s8_u8(veorq_u8(vld1q_u8(codes.add(16)), flip))]
        } else {
            let packed = vld1q_u8(codes);
            let eight = vdupq_n_s8(8);
            [
                vsubq_s8(vreinterpretq_s8_u8(vandq_u8(packed, vdupq_n_u8(0x0f))), eight),
                vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8::<4>(packed)), eight),
            ]
        }
    }
}

/// A row-by-row kernel for one way of computing a block's integer dot: `$dot(weight,
/// activation)` gives the block's products summed into 4 i32 lanes.
macro_rules! row_kernel {
    ($features:literal, $dot:ident) => {
        /// # Safety
        /// The core must have this module's extensions; `a.k == w.k`.
        pub unsafe fn matmul(w: &Weights, a: &QuantizedRows, out: OutputShare) {
            // SAFETY: the caller upholds this function's contract (above): the CPU has the features it
            // enables, and every pointer it reads or writes stays inside the slice it comes from.
            unsafe {
                match w.bits {
                    Bits::Four => row_tiles!(tile, false).run(w, a, &out),
                    Bits::Eight => row_tiles!(tile, true).run(w, a, &out),
                }
            }
        }

        #[target_feature(enable = $features)]
        unsafe fn tile<const R: usize, const T: usize, const EIGHT: bool>(
            w: &Weights,
            a: &QuantizedRows,
            j0: usize,
            r0: usize,
            out: &OutputShare,
        ) {
            // SAFETY: the caller upholds this function's contract (above): the CPU has the features it
            // enables, and every pointer it reads or writes stays inside the slice it comes from.
            unsafe {
                let block_bytes = Bits::of::<EIGHT>().block_bytes();
                let (codes, w_scales) = w.tile_rows::<R>(j0);
                let (x_values, x_scales, _) = a.tile_rows::<T>(r0);
                let mut acc = [[vdupq_n_f32(0.0); T]; R];
                for b in 0..w.k / BLOCK {
                    let mut x = [[vdupq_n_s8(0); 2]; T];
                    for t in 0..T {
                        let p = x_values[t].add(b * BLOCK);
                        x[t] = [vld1q_s8(p), vld1q_s8(p.add(BLOCK / 2))];
                    }
                    for i in 0..R {
                        let weight = signed_weights::<EIGHT>(codes[i].add(b * block_bytes));
                        let ws = *w_scales[i].add(b);
                        for t in 0..T {
                            let dot = vcvtq_f32_s32($dot(weight, x[t]));
                            acc[i][t] = vfmaq_n_f32(acc[i][t], dot, ws * *x_scales[t].add(b));
                        }
                    }
                }
                for i in 0..R {
                    for t in 0..T {
                        out.set(r0 + t, j0 + i, vaddvq_f32(acc[i][t]));
                    }
                }
            }
        }
    };
}

/// Plain NEON: widening multiplies to i16 (|w| ≤ 128, |q| ≤ 127: a pair's sum fits), then
/// pairwise widening adds to four i32 lanes.
pub(super) mod neon {
    use super::*;

    #[inline(always)]
    unsafe fn dot(w: [int8x16_t; 2], x: [int8x16_t; 2]) -> int32x4_t {
        // SAFETY: the caller upholds this function's contract (above): the CPU has the features it
        // enables, and every pointer it reads or writes stays inside the slice it comes from.
        unsafe {
            let lo = vmlal_high_s8(vmull_s8(vget_low_s8(w[0]), vget_low_s8(x[0])), w[0], x[0]);
            let hi = vmlal_high_s8(vmull_s8(vget_low_s8(w[1]), vget_low_s8(x[1])), w[1], x[1]);
            vaddq_s32(vpaddlq_s16(lo), vpaddlq_s16(hi))
        }
    }

    row_kernel!("neon", dot);
}

/// `sdot`: four byte products summed into each i32 lane in one instruction. Its intrinsic is
/// not stable in Rust yet, so it is written as the instruction.
pub(super) mod dotprod {
    use super::*;

    #[inline(always)]
    unsafe fn dot(w: [int8x16_t; 2], x: [int8x16_t; 2]) -> int32x4_t {
        // SAFETY: the caller upholds this function's contract (above): the CPU has the features it
        // enables, and every pointer it reads or writes stays inside the slice it comes from.
        unsafe {
            let mut acc = vdupq_n_s32(0);
            asm!(
                "sdot {acc:v}.4s, {w0:v}.16b, {x0:v}.16b",
                "sdot {acc:v}.4s, {w1:v}.16b, {x1:v}.16b",
                acc = inout(vreg) acc,
                w0 = in(vreg) w[0], x0 = in(vreg) x[0], w1 = in(vreg) w[1], x1 = in(vreg) x[1],
                options(pure, nomem, nostack, preserves_flags),
            );
            acc
        }
    }

    row_kernel!("neon,dotprod", dot);
}

/// `sdot` by element on [`Layout::Rows4`](super::Layout::Rows4): each i32 lane is one of 4
/// output rows. A block is 8 `sdot`, each multiplying 4 codes of every row by the same 4
/// activation bytes (an element of the activation register, no broadcast needed). 4-bit codes
/// stay unsigned (0..16) and their offset of 8 comes off once per block for all 4 rows as
/// 8 · (the block's activation sum); 8-bit codes are stored signed in this layout (see
/// `Weights::codes`), as `sdot` takes them.
pub(super) mod rows4 {
    use super::*;

    const GROUP: usize = 4;

    /// `out = a · Wᵀ` for `w` in `Layout::Rows4`.
    ///
    /// # Safety
    /// The core must have the dot-product extension; `a.k == w.k`.
    pub unsafe fn matmul(w: &Weights, a: &QuantizedRows, out: OutputShare) {
        // SAFETY: the caller upholds this function's contract (above): the CPU has the features it
        // enables, and every pointer it reads or writes stays inside the slice it comes from.
        unsafe {
            match w.bits {
                Bits::Four => run_group_tiles(w, a, &out, 4, groups::<4, false>, groups::<1, false>),
                Bits::Eight => run_group_tiles(w, a, &out, 4, groups::<4, true>, groups::<1, true>),
            }
        }
    }

    /// Σ over one block of 4 rows' operands (operand `c` holding codes `4c..4c + 4` of each
    /// row) times the block's activation (`x[0]` inputs 0..16, `x[1]` 16..32), added to `acc`.
    #[inline(always)]
    unsafe fn block_dot(mut acc: int32x4_t, ops: &[int8x16_t; 8], x: [int8x16_t; 2]) -> int32x4_t {
        // SAFETY: the caller upholds this function's contract (above): the CPU has the features it
        // enables, and every pointer it reads or writes stays inside the slice it comes from.
        unsafe {
            asm!(
                "sdot {acc:v}.4s, {o0:v}.16b, {xa:v}.4b[0]",
                "sdot {acc:v}.4s, {o1:v}.16b, {xa:v}.4b[1]",
                "sdot {acc:v}.4s, {o2:v}.16b, {xa:v}.4b[2]",
                "sdot {acc:v}.4s, {o3:v}.16b, {xa:v}.4b[3]",
                "sdot {acc:v}.4s, {o4:v}.16b, {xb:v}.4b[0]",
                "sdot {acc:v}.4s, {o5:v}.16b, {xb:v}.4b[1]",
                "sdot {acc:v}.4s, {o6:v}.16b, {xb:v}.4b[2]",
                "sdot {acc:v}.4s, {o7:v}.16b, {xb:v}.4b[3]",
                acc = inout(vreg) acc,
                o0 = in(vreg) ops[0], o1 = in(vreg) ops[1], o2 = in(vreg) ops[2], o3 = in(vreg) ops[3],
                o4 = in(vreg) ops[4], o5 = in(vreg) ops[5], o6 = in(vreg) ops[6], o7 = in(vreg) ops[7],
                xa = in(vreg) x[0], xb = in(vreg) x[1],
                options(pure, nomem, nostack, preserves_flags),
            );
            acc
        }
    }

    /// A group block's codes as eight signed operands: 4-bit, chunk `c` gives operands `c`
    /// (low nibbles) and `4 + c` (high); 8-bit, chunk `c` is operand `c` as stored (signed).
    #[inline(always)]
    unsafe fn group_operands<const EIGHT: bool>(block: *const u8) -> [int8x16_t; 8] {
        // SAFETY: the caller upholds this function's contract (above): the CPU has the features it
        // enables, and every pointer it reads or writes stays inside the slice it comes from.
        unsafe {
            let load = |c: usize| vld1q_u8(block.add(c * 16));
            if EIGHT {
                std::array::from_fn(|c| vreinterpretq_s8_u8(load(c)))
            } else {
                std::array::from_fn(|c| {
                    let bytes = load(c % 4);
                    vreinterpretq_s8_u8(if c < 4 { vandq_u8(bytes, vdupq_n_u8(0x0f)) } else { vshrq_n_u8::<4>(bytes) })
                })
            }
        }
    }

    /// Every group of 4 weight rows against activation rows `r0..r0 + T`.
    #[target_feature(enable = "neon,dotprod")]
    unsafe fn groups<const T: usize, const EIGHT: bool>(w: &Weights, a: &QuantizedRows, r0: usize, out: &OutputShare) {
        // SAFETY: the caller upholds this function's contract (above): the CPU has the features it
        // enables, and every pointer it reads or writes stays inside the slice it comes from.
        unsafe {
            let group_block = GROUP * Bits::of::<EIGHT>().block_bytes();
            let blocks = w.k / BLOCK;
            let (x_values, x_scales, x_sums) = a.tile_rows::<T>(r0);
            for g in out.cols().start / GROUP..out.cols().end / GROUP {
                let (codes, scales) = w.group(g);
                let mut acc = [vdupq_n_f32(0.0); T];
                for b in 0..blocks {
                    let ops = group_operands::<EIGHT>(codes.add(b * group_block));
                    let w_scales = vld1q_f32(scales.add(b * GROUP));
                    for t in 0..T {
                        let x = x_values[t].add(b * BLOCK);
                        // 8-bit operands are already signed; 4-bit ones carry the offset of 8.
                        let start = vdupq_n_s32(if EIGHT { 0 } else { -Bits::Four.offset() * *x_sums[t].add(b) });
                        let dot = block_dot(start, &ops, [vld1q_s8(x), vld1q_s8(x.add(BLOCK / 2))]);
                        acc[t] = vfmaq_f32(acc[t], vcvtq_f32_s32(dot), vmulq_n_f32(w_scales, *x_scales[t].add(b)));
                    }
                }
                for t in 0..T {
                    vst1q_f32(out.at(r0 + t, g * GROUP, GROUP), acc[t]);
                }
            }
        }
    }
}

/// See `portable::quantize`; the same arithmetic, 32 floats at a time.
pub fn quantize(a: &[f32], values: &mut [i8], scales: &mut [f32]) {
    for ((block, q), scale) in a.chunks_exact(BLOCK).zip(values.chunks_exact_mut(BLOCK)).zip(scales) {
        // SAFETY: NEON is part of the aarch64 baseline; the block holds 32 floats and q 32 bytes.
        unsafe {
            let p = block.as_ptr();
            let x = [vld1q_f32(p), vld1q_f32(p.add(4)), vld1q_f32(p.add(8)), vld1q_f32(p.add(12)),
                     vld1q_f32(p.add(16)), vld1q_f32(p.add(20)), vld1q_f32(p.add(24)), vld1q_f32(p.add(28))];
            let mut m = vabsq_f32(x[0]);
            for v in &x[1..] {
                m = vmaxnmq_f32(m, vabsq_f32(*v));
            }
            *scale = vmaxnmvq_f32(m) / 127.0;
            let inverse = if *scale != 0.0 { 1.0 / *scale } else { 0.0 };
            // fcvtns: round to nearest, ties to even, saturating; then narrow with saturation.
            let i = x.map(|v| vcvtnq_s32_f32(vmulq_n_f32(v, inverse)));
            let h = [vqmovn_high_s32(vqmovn_s32(i[0]), i[1]), vqmovn_high_s32(vqmovn_s32(i[2]), i[3]),
                     vqmovn_high_s32(vqmovn_s32(i[4]), i[5]), vqmovn_high_s32(vqmovn_s32(i[6]), i[7])];
            vst1q_s8(q.as_mut_ptr(), vqmovn_high_s16(vqmovn_s16(h[0]), h[1]));
            vst1q_s8(q.as_mut_ptr().add(16), vqmovn_high_s16(vqmovn_s16(h[2]), h[3]));
        }
    }
}
