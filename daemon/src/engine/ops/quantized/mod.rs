//! Matrix products of 4- or 8-bit weights with 8-bit activations ("W4A8", "W8A8"), the way
//! llama.cpp runs Q4_0 and Q8_0 and onnxruntime runs MatMulNBits at `accuracy_level = 4`.
//!
//! Contract (what a quantized model file means to every runtime that runs it, checked against
//! onnxruntime in tests/numerics.rs): the weight is blocks of 32 inputs per output, each a
//! scale `sw` and 32 unsigned codes, weight = `(code − offset) · sw`, offset 8 for 4-bit codes
//! (Q4_0) and 128 for 8-bit ones (Q8_0, whose signed `q` is `code − 128`). Each row of the
//! activation is cut into the same blocks of 32 and quantized symmetrically: `sa = max|x| /
//! 127`, `q = round_half_even(x · (1 / sa))` (0 when the block is all zeros). Then
//! `y = Σ_blocks sw · sa · Σ_i (code_i − offset) · q_i`, the inner sum exact in integers. Only
//! the order of the float additions over blocks is the kernel's. (GGML's Q4_1 blocks, which
//! have a minimum too, add a second term: see [`BlockOffsets`]. mulm-export writes blocks of
//! 32. A 4-bit file with wider blocks, which tract-onnx splits into blocks of 32, still gets
//! activation blocks of 32 here, where onnxruntime would use its block size: close, not
//! identical.)
//!
//! Layout and threads: weights are reordered at load for the CPU's kernel (see [`Layout`]);
//! products of 2^16 multiply-adds or more are split by output rows over `--threads` threads,
//! a [`super::team::Team`] of helpers that poll while products keep coming.
//!
//! Why: tract 0.23.9 dequantizes Q4_0 to float inside its matmul, and on x86 it has only a
//! one-column kernel for it, so 4-bit decode and prompts ran slower than float32 (the profile
//! in bench/RESULTS.md); it has no 8-bit MatMulNBits at all. Integer dot products read the
//! codes directly: 32 products per instruction on AVX2 (`vpmaddubsw`), `vpdpbusd` on AVX-VNNI,
//! `sdot` on aarch64. Both widths share every kernel: a block is eight groups of four codes,
//! each group meeting four activation bytes; 4-bit codes are unpacked from nibbles into that
//! shape, 8-bit ones are read as they lie.

#[cfg(target_arch = "aarch64")]
mod arm;
mod offsets;
mod op;
mod portable;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use offsets::{attach as attach_offsets, forget_all as forget_offsets, BlockOffsets};
pub use op::use_quantized_products;

use std::cell::RefCell;

use tract_onnx::prelude::f16;

use super::aligned::CacheAligned;
use super::shares::{split_columns, OutputShare};
use super::stored::{times, RecordReader, RecordWriter, StoredWeights};

/// Inputs per quantization block, for weights and activations alike.
pub const BLOCK: usize = 32;

/// How wide a weight's codes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bits {
    /// Q4_0: two codes a byte.
    Four,
    /// Q8_0: a code a byte.
    Eight,
}

impl Bits {
    /// Bytes of codes per block of 32 weights.
    pub const fn block_bytes(self) -> usize {
        match self {
            Bits::Four => BLOCK / 2,
            Bits::Eight => BLOCK,
        }
    }

    /// What a code is above the value it stands for: weight = (code − offset) · scale.
    pub const fn offset(self) -> i32 {
        match self {
            Bits::Four => 8,
            Bits::Eight => 128,
        }
    }

    /// The kernels' compile-time form of the width: `EIGHT` is true for 8-bit codes.
    const fn of<const EIGHT: bool>() -> Self {
        if EIGHT { Bits::Eight } else { Bits::Four }
    }

    /// The GGML block format these codes come in.
    fn format(self) -> &'static str {
        match self {
            Bits::Four => "Q4_0",
            Bits::Eight => "Q8_0",
        }
    }
}

/// A quantized weight of `n` outputs × `k` inputs, laid out for the kernels.
pub struct Weights {
    pub n: usize,
    pub k: usize,
    bits: Bits,
    layout: Layout,
    /// [`Bits::block_bytes`] per block of 32 codes. 4-bit: within a row's block, byte `j`
    /// holds code `j` in its low nibble and code `j + 16` in its high nibble (GGML's order: one
    /// shift splits a block into its two halves). 8-bit: byte `j` is code `j`, the unsigned
    /// q + 128, except in [`Layout::Rows4`], where it is the signed q itself: that layout's
    /// `sdot` multiplies signed bytes, and flipping every byte back at each product was a
    /// fifth of the instructions of mulm-28m q8's decode step (9.27 → 7.45 M under qemu's
    /// Cortex-A76, bench/arm_proxy.py). How blocks are ordered is the layout's.
    codes: CacheAligned,
    /// One scale per block, ordered like the codes.
    scales: Vec<f32>,
    /// Q4_1 blocks' offsets, added after the integer product (see [`BlockOffsets`]).
    offsets: Option<BlockOffsets>,
}

/// How a weight's blocks are ordered in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Row by row, `[n, k/32]` blocks: what every kernel reads.
    Rows,
    /// Eight rows side by side, for kernels whose 8 vector lanes are output rows (x86 with
    /// AVX-VNNI, or with AVX2 alone for 4-bit codes): `[n/8, k/32]` groups of blocks; within a
    /// group's block four chunks (eight at 8 bits), chunk `c` holding bytes `4c..4c + 4` of
    /// each of the 8 rows in turn; scales `[n/8, k/32, 8]`.
    /// A lane then sums its own row, so no horizontal sums, and the rows share each broadcast
    /// of four activation bytes.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Rows8,
    /// The same with sixteen rows, for 16-lane kernels (x86 with AVX-512 VNNI): chunk `c`
    /// holds bytes `4c..4c + 4` of each of the 16 rows, one 64-byte vector.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Rows16,
    /// The same with four rows, for 4-lane kernels (aarch64 with the dot-product extension).
    #[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
    Rows4,
}

impl Layout {
    /// Rows side by side.
    pub fn group(self) -> usize {
        match self {
            Layout::Rows => 1,
            Layout::Rows16 => 16,
            Layout::Rows8 => 8,
            Layout::Rows4 => 4,
        }
    }

    /// Whether this CPU has a kernel for the layout and codes of this width.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    fn runs_here(self, bits: Bits) -> bool {
        match self {
            Layout::Rows => true,
            #[cfg(target_arch = "x86_64")]
            Layout::Rows16 => x86::available() && x86::rows16::available(),
            #[cfg(target_arch = "x86_64")]
            Layout::Rows8 => x86::available() && (x86::has_vnni() || bits == Bits::Four),
            #[cfg(target_arch = "aarch64")]
            Layout::Rows4 => arm::has_dotprod(),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }
}

/// Output columns in a thread's share are a multiple of this: every layout's group divides it.
const SHARE_ALIGN: usize = 16;

/// A record of the sizes, the code width, the layout, then the codes and scales as the
/// kernels read them and the Q4_1 offsets if any. Reading one back checks that this CPU has a
/// kernel for its layout: a cache written under another kernel level is refused, not misread.
impl StoredWeights for Weights {
    const TAG: u64 = 0x6d75_6c6d_7162_6c01;

    fn store<W: std::io::Write>(&self, out: &mut RecordWriter<W>) -> std::io::Result<()> {
        let layout = [Layout::Rows, Layout::Rows8, Layout::Rows16, Layout::Rows4].iter().position(|l| *l == self.layout);
        for field in [self.n, self.k, self.bits.block_bytes(), layout.unwrap_or(0), usize::from(self.offsets.is_some())] {
            out.u64(field as u64)?;
        }
        out.aligned_bytes(&self.codes)?;
        out.floats(&self.scales)?;
        match &self.offsets {
            Some(offsets) => offsets.store(out),
            None => Ok(()),
        }
    }

    fn restore(from: &mut RecordReader) -> Result<Self, String> {
        let left = from.left();
        let n = from.size("a quantized weight's outputs", left)?;
        let k = from.size("a quantized weight's inputs", left.saturating_mul(2))?;
        let bits = match from.u64("a quantized weight's code width")? {
            16 => Bits::Four,
            32 => Bits::Eight,
            other => return Err(format!("no quantized codes take {other} bytes a block")),
        };
        let layout = match from.u64("a quantized weight's layout")? {
            0 => Layout::Rows,
            1 => Layout::Rows8,
            2 => Layout::Rows16,
            3 => Layout::Rows4,
            other => return Err(format!("no layout is numbered {other}")),
        };
        let has_offsets = from.u64("whether a quantized weight has block offsets")? == 1;
        if n == 0 || k == 0 || k % BLOCK != 0 || n % layout.group() != 0 {
            return Err(format!("a {n} × {k} weight does not fit the {layout:?} layout"));
        }
        if !layout.runs_here(bits) {
            return Err(format!("no kernel on this CPU reads the {layout:?} layout"));
        }
        let blocks = times(n, k / BLOCK, "quantized blocks")?;
        let codes = from.aligned(times(blocks, bits.block_bytes(), "quantized codes")?, "quantized codes")?;
        let scales = from.floats(blocks, "quantized scales")?;
        let offsets = if has_offsets { Some(BlockOffsets::restore(from, n, k)?) } else { None };
        Ok(Self { n, k, bits, layout, codes, scales, offsets })
    }
}

/// An activation of `m` rows quantized per block to int8 (see the module contract).
#[derive(Default)]
pub struct QuantizedRows {
    m: usize,
    k: usize,
    values: Vec<i8>,
    /// `[m, k/32]`.
    scales: Vec<f32>,
    /// Sum of each block's values, `[m, k/32]`: what the codes' offset costs a block.
    sums: Vec<i32>,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let format = if self.offsets.is_some() { "Q4_1" } else { self.bits.format() };
        write!(f, "{format} {} × {}", self.n, self.k)
    }
}

impl Weights {
    /// Builds weights from Q4_0 blocks as GGML and tract store them, per block a little-endian
    /// float16 scale then 16 bytes of codes, in the layout this CPU's kernels read fastest.
    pub fn from_q4_0_blocks(bytes: &[u8], n: usize, k: usize) -> Result<Self, String> {
        Self::with_layout(Bits::Four, bytes, n, k, Self::preferred_layout(Bits::Four, n))
    }

    /// Builds weights from 8-bit blocks as tract stores Q8_1, per block a little-endian
    /// float16 scale, a float16 sum (unused), then 32 signed codes `q` (weight = `q · scale`,
    /// GGML's Q8_0 with a sum between), in the layout this CPU's kernels read fastest.
    pub fn from_q8_1_blocks(bytes: &[u8], n: usize, k: usize) -> Result<Self, String> {
        Self::with_layout(Bits::Eight, bytes, n, k, Self::preferred_layout(Bits::Eight, n))
    }

    fn preferred_layout(bits: Bits, n: usize) -> Layout {
        [Layout::Rows16, Layout::Rows8, Layout::Rows4]
            .into_iter()
            .find(|l| l.runs_here(bits) && n % l.group() == 0)
            .unwrap_or(Layout::Rows)
    }

    /// [`Weights::from_q4_0_blocks`] or [`Weights::from_q8_1_blocks`] in a given layout.
    pub fn with_layout(bits: Bits, bytes: &[u8], n: usize, k: usize, layout: Layout) -> Result<Self, String> {
        // Ahead of a block's codes: its scale, and at 8 bits a sum.
        let head = match bits {
            Bits::Four => 2,
            Bits::Eight => 4,
        };
        let code_bytes = bits.block_bytes();
        let block_bytes = head + code_bytes;
        let format = match bits {
            Bits::Four => "Q4_0",
            Bits::Eight => "Q8_1",
        };
        if k % BLOCK != 0 || n == 0 {
            return Err(format!("a {format} weight needs inputs in multiples of {BLOCK} and at least one output, got {n} × {k}"));
        }
        let blocks = n * (k / BLOCK);
        if bytes.len() != blocks * block_bytes {
            return Err(format!("a {n} × {k} {format} weight is {} bytes, found {}", blocks * block_bytes, bytes.len()));
        }
        if !layout.runs_here(bits) {
            return Err(format!("no kernel on this CPU reads the {layout:?} layout"));
        }
        let group = layout.group();
        if n % group != 0 {
            return Err(format!("{n} rows do not make groups of {group} for the {layout:?} layout"));
        }
        // Each block goes straight to its place in the layout (Rows is groups of one row), so
        // building a weight holds it once, not once per step: loading's peak includes the
        // largest weight being built beside all the others.
        let per_row = k / BLOCK;
        let mut codes = CacheAligned::zeroed(blocks * code_bytes);
        let mut scales = vec![0f32; blocks];
        for (i, block) in bytes.chunks_exact(block_bytes).enumerate() {
            let (row, b) = (i / per_row, i % per_row);
            let (first, lane) = ((row / group * per_row + b) * group, row % group);
            scales[first + lane] = f16::from_bits(u16::from_le_bytes([block[0], block[1]])).to_f32();
            for (chunk, bytes) in block[head..].chunks_exact(4).enumerate() {
                let at = first * code_bytes + (chunk * group + lane) * 4;
                codes[at..at + 4].copy_from_slice(bytes);
                if bits == Bits::Eight && layout != Layout::Rows4 {
                    // Signed q to the unsigned code q + 128 (flipping the top bit).
                    codes[at..at + 4].iter_mut().for_each(|c| *c ^= 0x80);
                }
            }
        }
        Ok(Self { n, k, bits, layout, codes, scales, offsets: None })
    }

    /// These weights with Q4_1 block offsets: [`Weights::matmul`] adds their term.
    pub fn with_offsets(self, offsets: BlockOffsets) -> Result<Self, String> {
        if (offsets.n(), offsets.k()) != (self.n, self.k) {
            return Err(format!("block offsets of a {} × {} weight do not fit a {} × {} one", offsets.n(), offsets.k(), self.n, self.k));
        }
        Ok(Self { offsets: Some(offsets), ..self })
    }

    /// `out[r, j] = Σ_k W[j, k] · a[r, k]` under the module contract, for `a` of `m` rows of `k`
    /// (row-major) and `out` of `m` rows of `n`.
    pub fn matmul(&self, a: &[f32], m: usize, out: &mut [f32]) {
        thread_local! {
            // The quantized activation, reused: a decode step runs ~60 products, and their
            // buffers would otherwise be allocated and freed on every one.
            static ROWS: RefCell<QuantizedRows> = RefCell::new(QuantizedRows::default());
        }
        ROWS.with(|rows| match rows.try_borrow_mut() {
            Ok(mut rows) => {
                rows.fill(a, m, self.k);
                self.matmul_quantized(&rows, out)
            }
            // Only if a kernel ever re-entered: correct, merely allocating.
            Err(_) => self.matmul_quantized(&QuantizedRows::new(a, m, self.k), out),
        });
        if let Some(offsets) = &self.offsets {
            offsets.add_to(a, m, out);
        }
    }

    /// The codes' part of [`Weights::matmul`] (all of it but Q4_1 offsets' term) on an
    /// activation already quantized. Large products are split by output rows over
    /// `--threads` threads (see [`split_columns`]).
    pub fn matmul_quantized(&self, a: &QuantizedRows, out: &mut [f32]) {
        assert_eq!(a.k, self.k, "activation width must match the weight's inputs");
        assert_eq!(out.len(), a.m * self.n, "output must hold m × n values");
        split_columns(a.m * self.n * self.k, out, self.n, SHARE_ALIGN, &|share| self.run_kernel(a, share));
    }

    /// This CPU's kernel for this layout, on one share of the output.
    fn run_kernel(&self, a: &QuantizedRows, out: OutputShare) {
        #[cfg(target_arch = "x86_64")]
        if x86::available() {
            // SAFETY: available() checked that this CPU has AVX2 and FMA; with_layout made
            // Rows8 only where it also has AVX-VNNI, Rows16 only where it has AVX-512 VNNI.
            unsafe {
                match self.layout {
                    Layout::Rows16 => x86::rows16::matmul(self, a, out),
                    Layout::Rows8 => x86::rows8::matmul(self, a, out),
                    _ => x86::matmul(self, a, out),
                }
            }
            return;
        }
        #[cfg(target_arch = "aarch64")]
        if arm::neon_allowed() {
            return match self.layout {
                // SAFETY: with_layout made Rows4 only where the core has the dot-product extension.
                Layout::Rows4 => unsafe { arm::rows4::matmul(self, a, out) },
                _ => arm::matmul(self, a, out),
            };
        }
        #[allow(unreachable_code)]
        portable::matmul(self, a, out);
    }

    /// Row `row`'s codes, in [`Layout::Rows`].
    fn row_codes(&self, row: usize) -> &[u8] {
        let len = self.k / BLOCK * self.bits.block_bytes();
        &self.codes[row * len..][..len]
    }

    /// Row `row`'s scales, in [`Layout::Rows`].
    fn row_scales(&self, row: usize) -> &[f32] {
        let len = self.k / BLOCK;
        &self.scales[row * len..][..len]
    }
}

impl QuantizedRows {
    /// Quantizes `m` rows of `k` floats (row-major), `k` a multiple of [`BLOCK`].
    pub fn new(a: &[f32], m: usize, k: usize) -> Self {
        let mut rows = Self::default();
        rows.fill(a, m, k);
        rows
    }

    /// [`QuantizedRows::new`] into this value's buffers, reusing their capacity.
    pub fn fill(&mut self, a: &[f32], m: usize, k: usize) {
        assert!(k % BLOCK == 0 && a.len() == m * k, "activation must be m × k with k a multiple of {BLOCK}");
        (self.m, self.k) = (m, k);
        self.values.resize(a.len(), 0);
        self.scales.resize(a.len() / BLOCK, 0.0);
        quantize(a, &mut self.values, &mut self.scales);
        self.sums.clear();
        self.sums.extend(self.values.chunks_exact(BLOCK).map(|b| b.iter().map(|&v| v as i32).sum::<i32>()));
    }

    /// Values, scales and block sums of rows `r0..r0 + T`, for a tile.
    #[allow(clippy::type_complexity)]
    fn tile_rows<const T: usize>(&self, r0: usize) -> ([*const i8; T], [*const f32; T], [*const i32; T]) {
        (
            std::array::from_fn(|t| self.row(r0 + t).0.as_ptr()),
            std::array::from_fn(|t| self.row(r0 + t).1.as_ptr()),
            std::array::from_fn(|t| self.row_sums(r0 + t).as_ptr()),
        )
    }

    fn row(&self, r: usize) -> (&[i8], &[f32]) {
        (&self.values[r * self.k..][..self.k], &self.scales[r * (self.k / BLOCK)..][..self.k / BLOCK])
    }

    /// Row `r`'s block sums.
    fn row_sums(&self, r: usize) -> &[i32] {
        &self.sums[r * (self.k / BLOCK)..][..self.k / BLOCK]
    }
}

/// The contract's activation quantization on this CPU's vector unit.
fn quantize(a: &[f32], values: &mut [i8], scales: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY: available() checked that this CPU has AVX2 and FMA.
        return unsafe { x86::quantize(a, values, scales) };
    }
    #[cfg(target_arch = "aarch64")]
    if arm::neon_allowed() {
        return arm::quantize(a, values, scales);
    }
    #[allow(unreachable_code)]
    portable::quantize(a, values, scales)
}

/// Weight rows `j0..j0 + R` against activation rows `r0..r0 + T`, for a row-by-row kernel
/// (arguments: weights, activation, j0, r0, output).
type RowTile = unsafe fn(&Weights, &QuantizedRows, usize, usize, &OutputShare);

/// A row-by-row kernel's four tile shapes. Prompts: 4 activation rows share each unpacked
/// weight block, 2 weight rows at a time (`wide`, then `wide_single` for a last odd row).
/// Decode and a prompt's last rows: 4 weight rows share each activation block (`narrow`,
/// then `narrow_single`). Several accumulators stay in flight either way: one per output
/// would wait on the FMA latency at every block.
struct RowTiles {
    wide: RowTile,
    wide_single: RowTile,
    narrow: RowTile,
    narrow_single: RowTile,
}

/// The [`RowTiles`] of a kernel's generic `tile::<R, T, EIGHT>` function for one code width.
macro_rules! row_tiles {
    ($tile:ident, $eight:literal) => {
        RowTiles {
            wide: $tile::<2, 4, $eight>,
            wide_single: $tile::<1, 4, $eight>,
            narrow: $tile::<4, 1, $eight>,
            narrow_single: $tile::<1, 1, $eight>,
        }
    };
}
#[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(unused_imports))]
use row_tiles;

impl RowTiles {
    const WIDE: (usize, usize) = (2, 4);
    const NARROW: (usize, usize) = (4, 1);

    /// Covers the share with tiles.
    ///
    /// # Safety
    /// The CPU must have the tiles' instruction-set extensions.
    unsafe fn run(&self, w: &Weights, a: &QuantizedRows, out: &OutputShare) {
        // SAFETY: the caller upholds this function's contract (above): the CPU has the features it
        // enables, and every pointer it reads or writes stays inside the slice it comes from.
        unsafe {
            let cols = out.cols();
            let mut r = 0;
            while r < a.m {
                let ((weight_rows, act_rows), full, single) = if a.m - r >= Self::WIDE.1 {
                    (Self::WIDE, self.wide, self.wide_single)
                } else {
                    (Self::NARROW, self.narrow, self.narrow_single)
                };
                let mut j = cols.start;
                while cols.end - j >= weight_rows {
                    full(w, a, j, r, out);
                    j += weight_rows;
                }
                while j < cols.end {
                    single(w, a, j, r, out);
                    j += 1;
                }
                r += act_rows;
            }
        }
    }
}

/// Every group of a side-by-side layout's rows against activation rows `r0..r0 + T`
/// (arguments: weights, activation, r0, output).
type GroupTile = unsafe fn(&Weights, &QuantizedRows, usize, &OutputShare);

/// Runs a side-by-side kernel over the activation: `wide_rows` rows at a time, then one.
///
/// # Safety
/// The CPU must have the tiles' instruction-set extensions.
unsafe fn run_group_tiles(w: &Weights, a: &QuantizedRows, out: &OutputShare, wide_rows: usize, wide: GroupTile, one: GroupTile) {
    // SAFETY: the caller upholds this function's contract (above): the CPU has the features it
    // enables, and every pointer it reads or writes stays inside the slice it comes from.
    unsafe {
        let mut r = 0;
        while a.m - r >= wide_rows {
            wide(w, a, r, out);
            r += wide_rows;
        }
        while r < a.m {
            one(w, a, r, out);
            r += 1;
        }
    }
}

impl Weights {
    /// Codes and scales of rows `j0..j0 + R` in [`Layout::Rows`], for a tile.
    fn tile_rows<const R: usize>(&self, j0: usize) -> ([*const u8; R], [*const f32; R]) {
        (std::array::from_fn(|i| self.row_codes(j0 + i).as_ptr()), std::array::from_fn(|i| self.row_scales(j0 + i).as_ptr()))
    }

    /// Codes and scales of group `g` of a side-by-side layout.
    #[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(dead_code))]
    fn group(&self, g: usize) -> (*const u8, *const f32) {
        let (rows, blocks) = (self.layout.group(), self.k / BLOCK);
        (self.codes[g * blocks * rows * self.bits.block_bytes()..].as_ptr(), self.scales[g * blocks * rows..].as_ptr())
    }
}

#[cfg(test)]
mod tests;
