//! Float32 matrix products of an activation with a constant weight, the weight laid out in
//! panels of 16 outputs so that a decode step streams it from memory in one pass.
//!
//! Contract: `y[r, j] = Σ_i W[j, i] · x[r, i]` in float32 with fused multiply-adds; only the
//! order of the additions is the kernel's (checked against onnxruntime in tests/numerics.rs).
//!
//! Why: a float32 decode step is a read of every weight, so its speed is the memory bandwidth a
//! product reaches. tract 0.23.9 packs the activation before each product, then reads the
//! weight: on mulm-28m f32 (116 MB of weights) its products took 3.51 ms per decode step and
//! the packing 0.13 (`mulmd probe --profile`, 1 thread), about 33 GB/s. Streaming panels of 16
//! outputs, one broadcast input against 16 weights per fused multiply-add, takes 2.9–3.0 ms
//! (about 40 GB/s). And the products split over `--threads` on the engine's polling
//! [`super::team::Team`], which tract's parked rayon workers did not do at decode.
//!
//! Layout: `[⌈n/16⌉, k, 16]`: panel `p` holds outputs `16p..16p + 16`, input by input, so a
//! panel is one sequential stream; outputs past `n` in the last panel are zeros.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

use super::aligned::CacheAligned;
use super::product_rewrite::{replace_products, WeightAxes, WeightMatrix};
use super::shares::{split_columns, OutputShare};
use super::stored::{times, RecordReader, RecordWriter, StoredWeights};

/// Outputs per panel: one AVX-512 vector, two AVX2 vectors, four NEON vectors.
const PANEL: usize = 16;

/// A float32 weight of `n` outputs × `k` inputs in panels.
pub struct PanelWeights {
    pub n: usize,
    pub k: usize,
    /// `⌈n/16⌉ · k · 16` floats, cache-line aligned like the 4-bit codes (see [`CacheAligned`]).
    panels: CacheAligned,
}

impl std::fmt::Debug for PanelWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "f32 {} × {} in panels of {PANEL}", self.n, self.k)
    }
}

impl PanelWeights {
    /// Lays out `weight`, a float32 tensor read as `axes` say (output axis, contracted axes in
    /// order, unit axes), in panels.
    pub fn new(weight: &Tensor, axes: &WeightAxes) -> TractResult<Self> {
        let (n, k) = (axes.n, axes.k);
        ensure!(n > 0 && k > 0, "a float32 weight needs outputs and inputs, got {n} × {k}");
        let shape = weight.shape();
        let values = weight.try_as_plain_ram()?;
        let values = values.as_slice::<f32>()?;
        let mut panels = CacheAligned::zeroed(n.div_ceil(PANEL) * k * PANEL * 4);
        let out = panels.floats_mut();
        // The weight's own row-major order, its last axis as runs: where each value goes
        // depends on its output j and its input i, the row-major index over the contracted axes.
        let rank = shape.len();
        let last = rank - 1;
        let run = shape[last];
        let mut index = vec![0usize; rank];
        let at = |j: usize, i: usize| (j / PANEL) * k * PANEL + i * PANEL + j % PANEL;
        for chunk in values.chunks_exact(run) {
            let j0 = if axes.n_axis == last { 0 } else { index[axes.n_axis] };
            let i0 = axes.contracted.iter().fold(0, |acc, &a| acc * shape[a] + if a == last { 0 } else { index[a] });
            if axes.n_axis == last {
                chunk.iter().enumerate().for_each(|(j, v)| out[at(j, i0)] = *v);
            } else if axes.contracted.last() == Some(&last) {
                // The last axis is the fastest contracted one: consecutive inputs.
                chunk.iter().enumerate().for_each(|(i, v)| out[at(j0, i0 + i)] = *v);
            } else {
                // A unit axis.
                out[at(j0, i0)] = chunk[0];
            }
            // The next run: count up the axes before the last, rightmost fastest.
            for a in (0..last).rev() {
                index[a] += 1;
                if index[a] < shape[a] {
                    break;
                }
                index[a] = 0;
            }
        }
        Ok(Self { n, k, panels })
    }

    /// `out[r, j] = Σ_i W[j, i] · a[r, i]` for `a` of `m` rows of `k` (row-major) and `out` of
    /// `m` rows of `n`. Large products are split by panels over `--threads` threads.
    pub fn matmul(&self, a: &[f32], m: usize, out: &mut [f32]) {
        assert_eq!(a.len(), m * self.k, "activation must be m × k");
        assert_eq!(out.len(), m * self.n, "output must hold m × n values");
        split_columns(m * self.n * self.k, out, self.n, PANEL, &|share| self.run_kernel(a, m, share));
    }

    /// This CPU's kernel on one share of the output.
    fn run_kernel(&self, a: &[f32], m: usize, out: OutputShare) {
        #[cfg(target_arch = "x86_64")]
        {
            use super::isa::{allows, Level};
            if allows(Level::Avx512) && std::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F.
                return unsafe { kernels::avx512(self, a, m, &out) };
            }
            if allows(Level::Avx2) && std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU has AVX2 and FMA.
                return unsafe { kernels::avx2(self, a, m, &out) };
            }
        }
        kernels::portable(self, a, m, &out)
    }

    /// Panel `p`: `k` groups of 16 weights, input by input.
    fn panel(&self, p: usize) -> &[f32] {
        &self.panels.floats()[p * self.k * PANEL..][..self.k * PANEL]
    }
}

/// The kernels: one generic loop nest, compiled for each instruction set it runs on. The
/// compiler vectorizes the 16-wide inner loops about as well as hand-written AVX2 intrinsics
/// did in a scratch comparison, and no `unsafe` is needed beyond enabling the features.
/// Everything below is `#[inline(always)]` into the feature-enabled entry points: compiled
/// outside them, `mul_add` is a call to the C library's `fmaf`.
mod kernels {
    use super::*;

    /// Runs over the share's panels with activation tiles of `T` rows, then 4, then the last
    /// one to three rows together.
    ///
    /// A prompt's panel comes from memory once and from the cache for every further pass over
    /// it, so each pass also asks for its even share of the next panel's lines ([`Fetch`]):
    /// memory delivers the next panel while this one computes, all passes long.
    #[inline(always)]
    fn panels<const T: usize>(w: &PanelWeights, a: &[f32], m: usize, out: &OutputShare) {
        let cols = out.cols();
        let last = w.n.div_ceil(PANEL) - 1;
        let passes = passes::<T>(m);
        for p in cols.start / PANEL..cols.end.div_ceil(PANEL) {
            let panel = w.panel(p);
            let next = w.panel((p + 1).min(last)).as_ptr();
            let (j0, len) = (p * PANEL, PANEL.min(w.n - p * PANEL));
            // A decode step (one row) streams each panel once, and the CPU's own prefetcher
            // follows that stream: hints there made it slower (see [`Fetch`]).
            let fetch = |pass: usize| if m == 1 { Fetch::NONE } else { Fetch { next, first: pass, every: passes } };
            let (mut r, mut pass) = (0, 0);
            while m - r >= T {
                write_tile(out, r, j0, len, &tile::<T>(panel, a, w.k, r, fetch(pass)));
                (r, pass) = (r + T, pass + 1);
            }
            // Leftover rows: one at a time reads the panel once per row, so narrower tiles
            // first (a 20-token prompt in tiles of 12 leaves 8; in tiles of 6, 2).
            while m - r >= 4 {
                write_tile(out, r, j0, len, &tile::<4>(panel, a, w.k, r, fetch(pass)));
                (r, pass) = (r + 4, pass + 1);
            }
            debug_assert_eq!(pass + usize::from(m > r), passes, "passes::<{T}>({m}) counts the passes made");
            match m - r {
                0 => {}
                1 => write(out, r, j0, &row(panel, &a[r * w.k..][..w.k], fetch(pass))[..len]),
                2 => write_tile(out, r, j0, len, &tile::<2>(panel, a, w.k, r, fetch(pass))),
                _ => write_tile(out, r, j0, len, &tile::<3>(panel, a, w.k, r, fetch(pass))),
            }
        }
    }

    /// How many passes [`panels`] makes over each panel for `m` rows: tiles of `T`, then of 4,
    /// then one for the one to three rows left.
    pub(super) fn passes<const T: usize>(m: usize) -> usize {
        let rest = m % T;
        m / T + rest / 4 + usize::from(rest % 4 > 0)
    }

    /// The lines of the next panel one pass over a panel asks the cache for: input `first`'s
    /// (the countdown to it starts at `first`), then every `every`-th (a panel's 16 floats per input are one 64-byte line), so the
    /// passes share them out evenly and all of them are asked for once.
    ///
    /// Why into L2 and spread: asking for the whole next panel during the first pass, into L1
    /// (as before), ended that pass before memory could deliver it, left memory idle through
    /// the others, and pushed the panel being read out of L1 (a panel of 512 inputs is 32 KB,
    /// all of L1 on the AMD EPYC measured). There, with 1 thread, a cold prompt's prefill went
    /// from 15.8 to 12.9 ms (mulm-28m f32, 20 tokens) and 113 to 106 ms (SmolLM2 f32, 40) on
    /// the AVX2 path, 17.1 to 14.3 and 117 to 94 ms on AVX-512's; 1,000-token prompts and
    /// decode steps did not change (bench/RESULTS.md, "Float32 prompts: the next panel fetched
    /// by every pass"; bench/scratch/f32_panel_fetch.rs compares the ways of fetching).
    #[derive(Clone, Copy)]
    pub(super) struct Fetch {
        pub(super) next: *const f32,
        pub(super) first: usize,
        pub(super) every: usize,
    }

    impl Fetch {
        /// Asks for nothing.
        pub(super) const NONE: Fetch = Fetch { next: std::ptr::null(), first: usize::MAX, every: usize::MAX };

        /// At input `i` with `countdown` steps to the next line to ask for: asks for input
        /// `i`'s line when it is due, and counts down.
        #[inline(always)]
        fn step(&self, i: usize, countdown: &mut usize) {
            if self.due(countdown) {
                prefetch_l2(self.next.wrapping_add(i * PANEL));
            }
        }

        /// Whether this step's line is to be asked for; counts down to the next.
        #[inline(always)]
        pub(super) fn due(&self, countdown: &mut usize) -> bool {
            let due = *countdown == 0;
            if due {
                *countdown = self.every;
            }
            *countdown -= 1;
            due
        }
    }

    /// Rows `r0..r0 + T` of the activation against one panel: each group of 16 weights is
    /// loaded once for the `T` rows, and `fetch`'s lines of the next panel are asked for
    /// (without any, mulm-28m f32's 20-token prompt products took 11.0 ms rather than 6.8 in
    /// tiles of 12, `mulmd probe --profile`).
    #[inline(always)]
    fn tile<const T: usize>(panel: &[f32], a: &[f32], k: usize, r0: usize, fetch: Fetch) -> [[f32; PANEL]; T] {
        let rows: [&[f32]; T] = std::array::from_fn(|t| &a[(r0 + t) * k..][..k]);
        let mut acc = [[0f32; PANEL]; T];
        let mut countdown = fetch.first;
        for (i, weights) in panel.chunks_exact(PANEL).enumerate() {
            fetch.step(i, &mut countdown);
            for t in 0..T {
                let x = rows[t][i];
                for (s, w) in acc[t].iter_mut().zip(weights) {
                    *s = w.mul_add(x, *s);
                }
            }
        }
        acc
    }

    /// A hint to bring the cache line at `at` into L2 (not L1: see [`Fetch`]); no effect
    /// where there is no such hint.
    #[inline(always)]
    fn prefetch_l2(at: *const f32) {
        // SAFETY: a prefetch does not access memory; any address is allowed.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(at.cast())
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = at;
    }

    /// One row against one panel, four inputs at a time into four sums, so four fused
    /// multiply-add chains are in flight rather than one waiting on its own latency; `fetch`'s
    /// lines of the next panel are asked for as in [`tile`].
    #[inline(always)]
    fn row(panel: &[f32], x: &[f32], fetch: Fetch) -> [f32; PANEL] {
        const U: usize = 4;
        let mut acc = [[0f32; PANEL]; U];
        let whole = x.len() / U * U;
        let mut countdown = fetch.first;
        for (q, (weights, xs)) in panel.chunks_exact(U * PANEL).zip(x[..whole].chunks_exact(U)).enumerate() {
            for u in 0..U {
                fetch.step(q * U + u, &mut countdown);
                for (s, w) in acc[u].iter_mut().zip(&weights[u * PANEL..][..PANEL]) {
                    *s = w.mul_add(xs[u], *s);
                }
            }
        }
        for (i, (weights, x)) in panel[whole * PANEL..].chunks_exact(PANEL).zip(&x[whole..]).enumerate() {
            fetch.step(whole + i, &mut countdown);
            for (s, w) in acc[0].iter_mut().zip(weights) {
                *s = w.mul_add(*x, *s);
            }
        }
        std::array::from_fn(|j| (acc[0][j] + acc[1][j]) + (acc[2][j] + acc[3][j]))
    }

    fn write_tile<const T: usize>(out: &OutputShare, r0: usize, j0: usize, len: usize, sums: &[[f32; PANEL]; T]) {
        for (t, sum) in sums.iter().enumerate() {
            write(out, r0 + t, j0, &sum[..len]);
        }
    }

    fn write(out: &OutputShare, r: usize, j0: usize, values: &[f32]) {
        // SAFETY: `at` checked that the columns are this share's; no other share writes them.
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), out.at(r, j0, values.len()), values.len()) }
    }

    /// Prompts in tiles of 12 rows: twelve 16-wide sums in 12 of the 32 vector registers
    /// (in a scratch comparison with the next panel fetched ahead, clearly faster than 8).
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,fma")]
    pub unsafe fn avx512(w: &PanelWeights, a: &[f32], m: usize, out: &OutputShare) {
        panels::<12>(w, a, m, out)
    }

    /// Prompts in tiles of 6 rows: twelve 8-wide sums, the panel's two weight vectors and the
    /// broadcast input fill 15 of the 16 vector registers (the compiler keeps them there: no
    /// spills in the loop). Per input that is 12 fused multiply-adds for 8 loads, where tiles
    /// of 4 did 8 for 6. SmolLM2's products of 40 rows ran 6–8% faster than in tiles of 4 in
    /// a scratch comparison; whole prompts ran 0.98–1.11× as fast, near the VM's noise (bench/RESULTS.md,
    /// "AVX2 float32 prompts in tiles of 6 rows").
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn avx2(w: &PanelWeights, a: &[f32], m: usize, out: &OutputShare) {
        panels::<6>(w, a, m, out)
    }

    /// Any other CPU; on aarch64, NEON (always present) with tiles of 4 rows.
    pub fn portable(w: &PanelWeights, a: &[f32], m: usize, out: &OutputShare) {
        panels::<4>(w, a, m, out)
    }
}

impl WeightMatrix for PanelWeights {
    const OP_NAME: &'static str = "F32MatMul";

    fn n(&self) -> usize {
        self.n
    }

    fn k(&self) -> usize {
        self.k
    }

    fn matmul(&self, a: &[f32], m: usize, out: &mut [f32]) {
        PanelWeights::matmul(self, a, m, out)
    }
}

/// A record of `n`, `k` and the panels as they lie in memory.
impl StoredWeights for PanelWeights {
    const TAG: u64 = 0x6d75_6c6d_6633_3201;

    fn store<W: std::io::Write>(&self, out: &mut RecordWriter<W>) -> std::io::Result<()> {
        out.u64(self.n as u64)?;
        out.u64(self.k as u64)?;
        out.aligned_bytes(&self.panels)
    }

    fn restore(from: &mut RecordReader) -> Result<Self, String> {
        let left = from.left();
        let n = from.size("a float32 weight's outputs", left)?;
        let k = from.size("a float32 weight's inputs", left)?;
        if n == 0 || k == 0 {
            return Err(format!("a float32 weight of {n} × {k}"));
        }
        let len = times(times(n.div_ceil(PANEL), k, "float32 panels")?, PANEL * 4, "float32 panels")?;
        let panels = from.aligned(len, "float32 panels")?;
        Ok(Self { n, k, panels })
    }
}

/// Replaces every product of a float32 activation with a constant float32 weight by a
/// [`WeightProduct`](super::product_rewrite::WeightProduct) of [`PanelWeights`] (`F32MatMul`
/// in profiles). Returns how many it replaced.
pub fn use_f32_products(model: &mut TypedModel) -> TractResult<usize> {
    replace_products(model, "f32mm", &|weight, axes| {
        if weight.datum_type() != f32::datum_type() || weight.try_as_plain_ram().is_err() {
            return Ok(None);
        }
        Ok(Some(PanelWeights::new(weight, axes)?))
    })
}

#[cfg(test)]
mod tests;
