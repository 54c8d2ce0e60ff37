//! x86-64 kernels for the quantized-product contract (4- and 8-bit codes), chosen at run time. With AVX-512 VNNI (Zen 4 and
//! later, Ice Lake and later Xeons), weights whose rows make groups of 16 sit side by side and
//! run on [`rows16`]; with AVX-VNNI (Alder Lake), groups of 8 on [`rows8`], as are 4-bit
//! weights with AVX2 alone; otherwise row by row, with `vpdpbusd` where there is AVX-VNNI and
//! AVX2 + FMA elsewhere.

use std::arch::x86_64::*;

use super::{row_tiles, run_group_tiles, Bits, OutputShare, QuantizedRows, RowTiles, Weights, BLOCK};
use crate::engine::ops::isa::{allows, Level};

/// Whether these kernels run here: the CPU has AVX2 and FMA (checked once; the answer is
/// cached by std) and the kernel level allows them (see `ops::isa`).
pub fn available() -> bool {
    allows(Level::Avx2) && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// Whether this CPU also has AVX-VNNI, and the level allows it.
pub fn has_vnni() -> bool {
    allows(Level::AvxVnni) && is_x86_feature_detected!("avxvnni")
}

/// See `portable::quantize`; the same arithmetic, 32 floats at a time.
///
/// # Safety
/// The CPU must have AVX2 and FMA ([`available`]).
#[target_feature(enable = "avx2,fma")]
pub unsafe fn quantize(a: &[f32], values: &mut [i8], scales: &mut [f32]) {
    // SAFETY: the caller upholds this function's contract (above): the CPU has the features it
    // enables, and every pointer it reads or writes stays inside the slice it comes from.
    unsafe {
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        for ((block, q), scale) in a.chunks_exact(BLOCK).zip(values.chunks_exact_mut(BLOCK)).zip(scales) {
            let p = block.as_ptr();
            let x = [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))];
            let m = _mm256_max_ps(
                _mm256_max_ps(_mm256_and_ps(x[0], abs_mask), _mm256_and_ps(x[1], abs_mask)),
                _mm256_max_ps(_mm256_and_ps(x[2], abs_mask), _mm256_and_ps(x[3], abs_mask)),
            );
            let amax = horizontal_max(m);
            *scale = amax / 127.0;
            let inverse = _mm256_set1_ps(if *scale != 0.0 { 1.0 / *scale } else { 0.0 });
            // cvtps rounds half to even under the default MXCSR, as onnxruntime's kernel does.
            let i = x.map(|v| _mm256_cvtps_epi32(_mm256_mul_ps(v, inverse)));
            // Packing interleaves 128-bit lanes; the permute puts the 32 bytes back in order.
            let words = [_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3])];
            let bytes = _mm256_packs_epi16(words[0], words[1]);
            let ordered = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, ordered);
        }
    }
}

/// `out = a · Wᵀ` (see `Weights::matmul_quantized`).
///
/// # Safety
/// The CPU must have AVX2 and FMA ([`available`]); `a.k == w.k`, `out.len() == a.m · w.n`.
pub unsafe fn matmul(w: &Weights, a: &QuantizedRows, out: OutputShare) {
    // SAFETY: the caller upholds this function's contract (above): the CPU has the features it
    // enables, and every pointer it reads or writes stays inside the slice it comes from.
    unsafe {
        if has_vnni() {
            vnni::matmul(w, a, out)
        } else {
            avx2::matmul(w, a, out)
        }
    }
}

/// A row-by-row kernel for one way of computing a block's integer dot: `$weight::<EIGHT>(p)`
/// turns the block's code bytes at `p` into the weight operand, `$dot::<EIGHT>(weight,
/// activation, sum)` gives the block's products of weights (code − offset) and activation
/// summed into 8 i32 lanes, `sum` being the activation block's sum (what the offset costs).
macro_rules! row_kernel {
    ($features:literal, $weight:ident, $dot:ident) => {
        /// # Safety
        /// The CPU must have this module's extensions; `a.k == w.k`.
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
                let (x_values, x_scales, x_sums) = a.tile_rows::<T>(r0);
                // Decode reads each weight once: ask for the rows `ROWS_AHEAD` rows on, at the
                // same place, so they are on their way while this tile runs (see ROWS_AHEAD).
                let ahead = ROWS_AHEAD * w.k / BLOCK * block_bytes;
                let mut acc = [[_mm256_setzero_ps(); T]; R];
                for b in 0..w.k / BLOCK {
                    if T == 1 {
                        for row in codes {
                            _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(b * block_bytes + ahead) as *const i8);
                        }
                    }
                    let mut x = [_mm256_setzero_si256(); T];
                    for t in 0..T {
                        x[t] = _mm256_loadu_si256(x_values[t].add(b * BLOCK) as *const __m256i);
                    }
                    for i in 0..R {
                        let weight = $weight::<EIGHT>(codes[i].add(b * block_bytes));
                        let ws = *w_scales[i].add(b);
                        for t in 0..T {
                            let dot = _mm256_cvtepi32_ps($dot::<EIGHT>(weight, x[t], *x_sums[t].add(b)));
                            acc[i][t] = _mm256_fmadd_ps(dot, _mm256_set1_ps(ws * *x_scales[t].add(b)), acc[i][t]);
                        }
                    }
                }
                for i in 0..R {
                    for t in 0..T {
                        out.set(r0 + t, j0 + i, super::horizontal_sum(acc[i][t]));
                    }
                }
            }
        }
    };
}

/// How far ahead of the rows being read decode's row-by-row kernels ask for codes, in rows.
/// A row is short (SmolLM2's 576 inputs are 9 cache lines at 8 bits), too short for the
/// hardware's stream prefetcher to learn before it ends, so without the hint each tile waited on
/// memory. With `MULMD_KERNELS=avx2`, decode with the hint against without (`mulmd probe`,
/// medians of 3 interleaved rounds, tok/s): SmolLM2 q8 40 → 60, q4 63 → 95; mulm-28m q8
/// 518 → 666, q4 600 → 636.
const ROWS_AHEAD: usize = 8;

/// A block's 32 codes in input order. 4-bit: low nibbles are inputs 0..16 and high nibbles
/// 16..32, so one shift and one mask give all 32; 8-bit: the bytes as they lie.
#[inline(always)]
unsafe fn codes_in_order<const EIGHT: bool>(codes: *const u8) -> __m256i {
    // SAFETY: the caller upholds this function's contract (above): the CPU has the features it
    // enables, and every pointer it reads or writes stays inside the slice it comes from.
    unsafe {
        if EIGHT {
            _mm256_loadu_si256(codes as *const __m256i)
        } else {
            let packed = _mm_loadu_si128(codes as *const __m128i);
            _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<4>(packed), packed), _mm256_set1_epi8(0x0f))
        }
    }
}

/// The codes' offset in every byte: 8, or 128 (as the byte 0x80).
#[inline(always)]
unsafe fn offsets<const EIGHT: bool>() -> __m256i {
    // SAFETY: register-only intrinsic, inside functions with AVX enabled.
    unsafe { _mm256_set1_epi8(Bits::of::<EIGHT>().offset() as u8 as i8) }
}

/// AVX2: `vpmaddubsw` multiplies unsigned by signed bytes, and `vpmaddwd` against ones widens
/// its pairs' sums to i32.
/// - 4-bit codes (0..16) go in unsigned as they are: a pair's sum stays within i16
///   (2 · 15 · 127 < 2^15), and the offset comes off once per block as 8 · (the activation's
///   block sum), one lane of the start. Against making each weight signed (a subtraction and
///   two `vpsignb` per row and block), decode with `MULMD_KERNELS=avx2` went from 811 to 885
///   tok/s on mulm-28m q4 and from 128 to 133 on SmolLM2 q4 (`mulmd probe`, medians of 7
///   interleaved rounds; bench/RESULTS.md, 2026-12-03).
/// - 8-bit codes (0..256) could overflow i16 that way, so the weight (code − 128) goes in as
///   its magnitude and its sign moves onto the activation: |w| ≤ 128 and |q| ≤ 127 keep each
///   pair's sum within i16 (2 · 128 · 127 < 2^15).
pub(super) mod avx2 {
    use super::*;

    #[inline(always)]
    unsafe fn weight<const EIGHT: bool>(codes: *const u8) -> __m256i {
        // SAFETY: the caller upholds this function's contract (above): the CPU has the features it
        // enables, and every pointer it reads or writes stays inside the slice it comes from.
        unsafe {
            if EIGHT {
                // The byte subtraction wraps: code − 128 is code with its top bit flipped.
                _mm256_sub_epi8(codes_in_order::<EIGHT>(codes), offsets::<EIGHT>())
            } else {
                codes_in_order::<EIGHT>(codes)
            }
        }
    }

    #[inline(always)]
    unsafe fn dot<const EIGHT: bool>(weight: __m256i, x: __m256i, x_sum: i32) -> __m256i {
        // SAFETY: the caller upholds this function's contract (above): the CPU has the features it
        // enables, and every pointer it reads or writes stays inside the slice it comes from.
        unsafe {
            let ones = _mm256_set1_epi16(1);
            if EIGHT {
                let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(weight, weight), _mm256_sign_epi8(x, weight));
                _mm256_madd_epi16(pairs, ones)
            } else {
                let offset = _mm256_zextsi128_si256(_mm_cvtsi32_si128(-Bits::Four.offset() * x_sum));
                _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(weight, x), ones), offset)
            }
        }
    }

    row_kernel!("avx2,fma", weight, dot);
}

/// AVX-VNNI: `vpdpbusd` multiplies the unsigned codes by the signed activation and sums four
/// products per i32 lane in one instruction, into a start that holds the codes' offset:
/// −offset · (the activation's block sum), in one lane.
pub(super) mod vnni {
    use super::*;

    #[inline(always)]
    unsafe fn dot<const EIGHT: bool>(codes: __m256i, x: __m256i, x_sum: i32) -> __m256i {
        // SAFETY: the caller upholds this function's contract (above): the CPU has the features it
        // enables, and every pointer it reads or writes stays inside the slice it comes from.
        unsafe {
            let start = _mm256_zextsi128_si256(_mm_cvtsi32_si128(-Bits::of::<EIGHT>().offset() * x_sum));
            _mm256_dpbusd_avx_epi32(start, codes, x)
        }
    }

    row_kernel!("avx2,fma,avxvnni", codes_in_order, dot);
}

#[target_feature(enable = "avx2,fma")]
unsafe fn horizontal_sum(v: __m256) -> f32 {
    // Register-only intrinsics: safe inside a function with their features.
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
}

#[target_feature(enable = "avx2,fma")]
unsafe fn horizontal_max(v: __m256) -> f32 {
    // Register-only intrinsics: safe inside a function with their features.
    let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_max_ss(s, _mm_shuffle_ps::<1>(s, s)))
}

/// AVX-VNNI on [`Layout::Rows8`](super::Layout::Rows8): each i32 lane is one of 8 output rows.
/// A block is 8 `vpdpbusd`, each multiplying 4 codes of every row by the same 4 activation
/// bytes (broadcast), so a block costs a fraction of the one-row-at-a-time kernel's
/// instructions and needs no horizontal sums. Without AVX-VNNI, 4-bit codes take the same
/// path with `vpmaddubsw` ([`rows8::avx2`]). The codes' offset (8 or 128) is taken off once
/// per block for all 8 rows: offset · (the block's activation sum).
pub(super) mod rows8 {
    use super::*;

    const GROUP: usize = 8;

    /// `out = a · Wᵀ` for `w` in `Layout::Rows8`. Where the CPU also has AVX-512 (VL and VNNI)
    /// the same instructions get 32 vector registers instead of 16, enough for prompt tiles
    /// of 8 activation rows sharing each unpacked block; without AVX-VNNI, [`avx2`] takes
    /// 4-bit codes.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA, and AVX-VNNI unless the codes are 4-bit; `a.k == w.k`.
    pub unsafe fn matmul(w: &Weights, a: &QuantizedRows, out: OutputShare) {
        // SAFETY: the caller upholds this function's contract (above): the CPU has the features it
        // enables, and every pointer it reads or writes stays inside the slice it comes from.
        unsafe {
            if has_avx512_vnni() {
                avx512::matmul(w, a, out)
            } else if has_vnni() {
                avx_vnni::matmul(w, a, out)
            } else {
                // 8-bit codes would overflow its 16-bit sums; `Layout::runs_here` keeps them out.
                debug_assert_eq!(w.bits, Bits::Four, "AVX2 alone runs only 4-bit codes side by side");
                avx2::matmul(w, a, out)
            }
        }
    }

    pub(crate) fn has_avx512_vnni() -> bool {
        allows(Level::Avx512) && is_x86_feature_detected!("avx512vl") && is_x86_feature_detected!("avx512vnni")
    }

    /// The kernel for one way of computing a block's dot (the module's `block_dot`) and the
    /// prompt tile its registers afford.
    macro_rules! group_kernel {
        ($features:literal, $wide:literal) => {
            /// # Safety
            /// The CPU must have this module's extensions; `a.k == w.k`.
            pub unsafe fn matmul(w: &Weights, a: &QuantizedRows, out: OutputShare) {
                // SAFETY: the caller upholds this function's contract (above): the CPU has the features it
                // enables, and every pointer it reads or writes stays inside the slice it comes from.
                unsafe {
                    debug_assert_eq!(w.layout, crate::engine::ops::quantized::Layout::Rows8);
                    match w.bits {
                        Bits::Four => run_group_tiles(w, a, &out, $wide, groups::<$wide, false>, groups::<1, false>),
                        Bits::Eight => run_group_tiles(w, a, &out, $wide, groups::<$wide, true>, groups::<1, true>),
                    }
                }
            }

            /// Every group of 8 weight rows against activation rows `r0..r0 + T`.
            #[target_feature(enable = $features)]
            unsafe fn groups<const T: usize, const EIGHT: bool>(w: &Weights, a: &QuantizedRows, r0: usize, out: &OutputShare) {
                // SAFETY: the caller upholds this function's contract (above): the CPU has the features it
                // enables, and every pointer it reads or writes stays inside the slice it comes from.
                unsafe {
                    let bits = Bits::of::<EIGHT>();
                    let blocks = w.k / BLOCK;
                    let (x_values, x_scales, x_sums) = a.tile_rows::<T>(r0);
                    for g in out.cols().start / GROUP..out.cols().end / GROUP {
                        let (codes, scales) = w.group(g);
                        let mut acc = [_mm256_setzero_ps(); T];
                        for b in 0..blocks {
                            let block = codes.add(b * GROUP * bits.block_bytes());
                            if T == 1 && !EIGHT {
                                // As rows16 does, and for the same reason; 4-bit only. Forced to
                                // this kernel, decode with the hint against without (`mulmd probe`,
                                // medians of 3 interleaved rounds): SmolLM2 q4 83 → 142 tok/s,
                                // mulm-28m q4 967 → 1065, but SmolLM2 q8 66 → 58, already reading
                                // about as fast as the AVX-512 kernel does.
                                for line in 0..GROUP * bits.block_bytes() / 64 {
                                    _mm_prefetch::<_MM_HINT_T0>(block.wrapping_add(super::rows16::PREFETCH + line * 64) as *const i8);
                                }
                            }
                            let ops = group_operands::<EIGHT>(block);
                            let w_scales = _mm256_loadu_ps(scales.add(b * GROUP));
                            for t in 0..T {
                                let x = x_values[t].add(b * BLOCK) as *const i32;
                                // Start from −offset · Σq: the offset of every row's codes, at once.
                                let start = _mm256_set1_epi32(-bits.offset() * *x_sums[t].add(b));
                                let dot = block_dot(start, &ops, x);
                                let scale = _mm256_mul_ps(w_scales, _mm256_set1_ps(*x_scales[t].add(b)));
                                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[t]);
                            }
                        }
                        for t in 0..T {
                            _mm256_storeu_ps(out.at(r0 + t, g * GROUP, GROUP), acc[t]);
                        }
                    }
                }
            }
        };
    }

    /// A group block's codes as eight operands, operand `c` holding codes `4c..4c + 4` of
    /// each of the 8 rows (to meet activation bytes `4c..4c + 4`). 4-bit: chunk `c` of the
    /// block gives operands `c` (low nibbles) and `4 + c` (high); 8-bit: chunk `c` is operand `c`.
    #[inline(always)]
    unsafe fn group_operands<const EIGHT: bool>(block: *const u8) -> [__m256i; 8] {
        // SAFETY: the caller upholds this function's contract (above): the CPU has the features it
        // enables, and every pointer it reads or writes stays inside the slice it comes from.
        unsafe {
            let load = |c: usize| _mm256_loadu_si256(block.add(c * 32) as *const __m256i);
            if EIGHT {
                std::array::from_fn(load)
            } else {
                let low_nibbles = _mm256_set1_epi8(0x0f);
                std::array::from_fn(|c| {
                    let bytes = load(c % 4);
                    let bytes = if c < 4 { bytes } else { _mm256_srli_epi16::<4>(bytes) };
                    _mm256_and_si256(bytes, low_nibbles)
                })
            }
        }
    }

    /// `start` plus the block's eight operands against the activation's 32 bytes at `x`, four
    /// bytes (one i32) broadcast to every row per operand, with `$dpbusd`.
    macro_rules! dpbusd_block_dot {
        ($dpbusd:ident) => {
            #[inline(always)]
            unsafe fn block_dot(start: __m256i, ops: &[__m256i; 8], x: *const i32) -> __m256i {
                // SAFETY: the caller upholds this function's contract (above): the CPU has the features it
                // enables, and every pointer it reads or writes stays inside the slice it comes from.
                unsafe { ops.iter().enumerate().fold(start, |dot, (c, op)| $dpbusd(dot, *op, _mm256_set1_epi32(x.add(c).read_unaligned()))) }
            }
        };
    }

    /// VEX-encoded `vpdpbusd`: 16 registers, prompt tiles of 4 activation rows.
    pub(crate) mod avx_vnni {
        use super::*;
        dpbusd_block_dot!(_mm256_dpbusd_avx_epi32);
        group_kernel!("avx2,fma,avxvnni", 4);
    }

    /// EVEX-encoded `vpdpbusd` on 256-bit vectors: 32 registers, prompt tiles of 8.
    pub(crate) mod avx512 {
        use super::*;
        dpbusd_block_dot!(_mm256_dpbusd_epi32);
        group_kernel!("avx2,fma,avx512vl,avx512vnni", 8);
    }

    /// AVX2 alone, 4-bit codes only: `vpmaddubsw` multiplies the unsigned codes by the signed
    /// activation in pairs summed to 16 bits, and a block's eight such results are summed in
    /// 16 bits too before one `vpmaddwd` widens them: a lane's 16 products of 4-bit codes stay
    /// within i16 (16 · 15 · 127 < 2^15). 8-bit codes would not, so they stay row by row.
    pub(crate) mod avx2 {
        use super::*;

        #[inline(always)]
        unsafe fn block_dot(start: __m256i, ops: &[__m256i; 8], x: *const i32) -> __m256i {
            // SAFETY: the caller upholds this function's contract (above): the CPU has the features it
            // enables, and every pointer it reads or writes stays inside the slice it comes from.
            unsafe {
                let pairs = |c: usize| _mm256_maddubs_epi16(ops[c], _mm256_set1_epi32(x.add(c).read_unaligned()));
                let sum = (1..8).fold(pairs(0), |sum, c| _mm256_add_epi16(sum, pairs(c)));
                _mm256_add_epi32(start, _mm256_madd_epi16(sum, _mm256_set1_epi16(1)))
            }
        }

        group_kernel!("avx2,fma", 4);
    }
}

/// AVX-512 VNNI on [`Layout::Rows16`](super::Layout::Rows16): the [`rows8`] kernel on 512-bit
/// vectors, each i32 lane one of 16 output rows. A block's instructions are the same as for 8
/// rows, so a decode step runs about half as many; mulm-28m q4's weights fit this machine's
/// cache, and its 4-bit products were bound by instructions, not memory.
pub(super) mod rows16 {
    use super::*;

    const GROUP: usize = 16;

    /// How far ahead of the block being read decode asks for codes, in bytes: 16 blocks,
    /// about what arrives in one trip to memory at this kernel's rate. At 2 KB, probe medians
    /// of three interleaved rounds fell from 2213 to 1844 tok/s on mulm-28m q4 and from 261
    /// to 224 on SmolLM2 q4; 1 KB and 16 KB were slower than 2 KB (SmolLM2, two rounds).
    pub(super) const PREFETCH: usize = 4096;

    /// Independent sums a decode block's products go into (prompt tiles have one per row).
    const CHAINS: usize = 4;

    #[inline(always)]
    unsafe fn sum_chains(d: [__m512i; CHAINS]) -> __m512i {
        // SAFETY: the caller upholds this function's contract (above): the CPU has the features it
        // enables, and every pointer it reads or writes stays inside the slice it comes from.
        unsafe {
            _mm512_add_epi32(_mm512_add_epi32(d[0], d[1]), _mm512_add_epi32(d[2], d[3]))
        }
    }

    /// Whether this CPU has the extensions of [`matmul`].
    pub fn available() -> bool {
        allows(Level::Avx512) && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vnni")
    }

    /// `out = a · Wᵀ` for `w` in `Layout::Rows16`; prompts in tiles of 8 activation rows.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and VNNI ([`available`]); `a.k == w.k`.
    pub unsafe fn matmul(w: &Weights, a: &QuantizedRows, out: OutputShare) {
        // SAFETY: the caller upholds this function's contract (above): the CPU has the features it
        // enables, and every pointer it reads or writes stays inside the slice it comes from.
        unsafe {
            debug_assert_eq!(w.layout, crate::engine::ops::quantized::Layout::Rows16);
            match w.bits {
                Bits::Four => run_group_tiles(w, a, &out, 8, groups::<8, false>, groups::<1, false>),
                Bits::Eight => run_group_tiles(w, a, &out, 8, groups::<8, true>, groups::<1, true>),
            }
        }
    }

    /// [`rows8::group_operands`] on 512-bit vectors: operand `c` holds codes `4c..4c + 4` of
    /// each of the 16 rows.
    #[inline(always)]
    unsafe fn group_operands<const EIGHT: bool>(block: *const u8) -> [__m512i; 8] {
        // SAFETY: the caller upholds this function's contract (above): the CPU has the features it
        // enables, and every pointer it reads or writes stays inside the slice it comes from.
        unsafe {
            let load = |c: usize| _mm512_loadu_si512(block.add(c * 64) as *const _);
            if EIGHT {
                std::array::from_fn(load)
            } else {
                let low_nibbles = _mm512_set1_epi8(0x0f);
                std::array::from_fn(|c| {
                    let bytes = load(c % 4);
                    let bytes = if c < 4 { bytes } else { _mm512_srli_epi16::<4>(bytes) };
                    _mm512_and_si512(bytes, low_nibbles)
                })
            }
        }
    }

    /// Every group of 16 weight rows against activation rows `r0..r0 + T`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn groups<const T: usize, const EIGHT: bool>(w: &Weights, a: &QuantizedRows, r0: usize, out: &OutputShare) {
        // SAFETY: the caller upholds this function's contract (above): the CPU has the features it
        // enables, and every pointer it reads or writes stays inside the slice it comes from.
        unsafe {
            let bits = Bits::of::<EIGHT>();
            let group_block = GROUP * bits.block_bytes();
            let blocks = w.k / BLOCK;
            let (x_values, x_scales, x_sums) = a.tile_rows::<T>(r0);
            for g in out.cols().start / GROUP..out.cols().end / GROUP {
                let (codes, scales) = w.group(g);
                let mut acc = [_mm512_setzero_ps(); T];
                for b in 0..blocks {
                    let block = codes.add(b * group_block);
                    if T == 1 {
                        for line in 0..group_block / 64 {
                            _mm_prefetch::<_MM_HINT_T0>(block.wrapping_add(PREFETCH + line * 64) as *const i8);
                        }
                        _mm_prefetch::<_MM_HINT_T0>(scales.wrapping_add(b * GROUP + PREFETCH / 4) as *const i8);
                    }
                    let ops = group_operands::<EIGHT>(block);
                    let w_scales = _mm512_loadu_ps(scales.add(b * GROUP));
                    for t in 0..T {
                        let x = x_values[t].add(b * BLOCK) as *const i32;
                        // Start from −offset · Σq: the offset of every row's codes, at once.
                        // Decode sums into CHAINS registers: in one chain, a block's 8 dependent
                        // `vpdpbusd` waited on each other's latency.
                        let mut dots = [_mm512_setzero_si512(); CHAINS];
                        dots[0] = _mm512_set1_epi32(-bits.offset() * *x_sums[t].add(b));
                        let chains = if T == 1 { CHAINS } else { 1 };
                        for (c, op) in ops.iter().enumerate() {
                            let d = &mut dots[c % chains];
                            *d = _mm512_dpbusd_epi32(*d, *op, _mm512_set1_epi32(x.add(c).read_unaligned()));
                        }
                        let dot = if T == 1 { sum_chains(dots) } else { dots[0] };
                        let scale = _mm512_mul_ps(w_scales, _mm512_set1_ps(*x_scales[t].add(b)));
                        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[t]);
                    }
                }
                for t in 0..T {
                    _mm512_storeu_ps(out.at(r0 + t, g * GROUP, GROUP), acc[t]);
                }
            }
        }
    }
}
