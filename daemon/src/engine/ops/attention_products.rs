//! Products of two activations (attention's scores `q · kᵀ` and its mix `p · v`), computed
//! directly instead of through tract's packing matmul.
//!
//! Why: at decode each such product is small (a few query rows against the cached keys), and
//! tract packs both operands into its kernel layout on every call, the whole KV cache
//! included. In `mulmd probe --profile` the packing and the products took 0.12 of mulm-28m
//! q4's 0.76 ms of ops per decode step and 1.0 of SmolLM2 q4's 5.0 ms, for under a megaflop
//! of arithmetic; these kernels take 0.05 and 0.25–0.3 ms. In prompts (8 query rows per key
//! head or more) scores are not dot products, each ending in a sum across lanes, but a mix
//! of the keys transposed once per product, as the value products are computed: a
//! 1,031-token SmolLM2 prompt spends 1.5 s here instead of 3.6 s.
//!
//! Contract: `y[b, i, j] = Σ_l a[b, i, l] · w[b, j, l]` (`w` stored `[batch, n, k]`, as
//! attention reads keys) or `Σ_l a[b, i, l] · w[b, l, j]` (`[batch, k, n]`, as it reads
//! values), in float32 with fused multiply-adds; only the order of the additions is the
//! kernel's. The rewrite finds these shapes in tract's einsums whatever unit axes and split
//! row axes (query heads per key head, positions) the graph gives them.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::konst::Const;

/// Lanes the kernels sum in: one AVX-512 vector, two AVX2, four NEON.
const LANES: usize = 16;

/// A batch of products `[batch, m, k] × [batch, n, k] or [batch, k, n] → [batch, m, n]`, read
/// from operands as the graph has them: `m` may be several axes (query heads per key head,
/// positions), and unit axes may sit anywhere. Neither changes where a value lies in memory,
/// so no reshaping op runs before or after (tract dispatches each for ~0.5 µs, and SmolLM2's
/// attention would need 150 of them per decode step).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ActivationProduct {
    /// The first operand's batch axis, row axes (in order) and summed axis.
    a_batch: usize,
    a_rows: Vec<usize>,
    a_sum: usize,
    /// The second operand's batch axis, column axis and summed axis.
    w_batch: usize,
    w_col: usize,
    w_sum: usize,
}

impl Op for ActivationProduct {
    fn name(&self) -> StaticName {
        "ActivationProduct".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("second operand {}", if self.transposed() { "[batch, n, k]" } else { "[batch, k, n]" })])
    }

    op_as_typed_op!();
}

/// Sizes of one product: batch, rows (one per row axis), summed, columns.
type Dims<D> = (D, TVec<D>, D, D);

impl ActivationProduct {
    /// The axes as one list, for the plan cache (`nnef`): `[a_batch, a_sum, w_batch, w_col,
    /// w_sum, a_rows…]`.
    pub(super) fn axes(&self) -> Vec<usize> {
        let mut axes = vec![self.a_batch, self.a_sum, self.w_batch, self.w_col, self.w_sum];
        axes.extend(&self.a_rows);
        axes
    }

    /// What [`ActivationProduct::axes`] listed, for operands of `ranks`: every axis within its
    /// operand's rank and named once.
    pub(super) fn from_axes(axes: &[usize], ranks: (usize, usize)) -> TractResult<Self> {
        ensure!(axes.len() >= 5, "an activation product names at least 5 axes");
        let op = Self {
            a_batch: axes[0],
            a_sum: axes[1],
            w_batch: axes[2],
            w_col: axes[3],
            w_sum: axes[4],
            a_rows: axes[5..].to_vec(),
        };
        let mut a: Vec<usize> = op.a_rows.iter().copied().chain([op.a_batch, op.a_sum]).collect();
        let mut w = vec![op.w_batch, op.w_col, op.w_sum];
        for (list, rank) in [(&mut a, ranks.0), (&mut w, ranks.1)] {
            let count = list.len();
            list.sort_unstable();
            list.dedup();
            ensure!(list.len() == count && list.iter().all(|&p| p < rank), "axes {axes:?} do not fit operands of ranks {ranks:?}");
        }
        Ok(op)
    }

    /// Whether the second operand is stored `[batch, n, k]` (its rows are what the first
    /// operand's rows meet).
    pub(super) fn transposed(&self) -> bool {
        self.w_col < self.w_sum
    }

    /// Whether the second operand is read as a KV cache `[1, heads, positions, depth]`:
    /// batched over the heads, each head's positions and depth its other two axes.
    pub(super) fn reads_cache_rows(&self) -> bool {
        self.w_batch == 1 && self.w_col.min(self.w_sum) == 2 && self.w_col.max(self.w_sum) == 3
    }

    /// Whether the first operand is read as it lies: `[batch, rows…, summed]` and no unit
    /// axes, as this op's own output is.
    pub(super) fn reads_first_operand_in_order(&self) -> bool {
        self.a_batch == 0 && self.a_rows.iter().enumerate().all(|(i, &p)| p == i + 1) && self.a_sum == self.a_rows.len() + 1
    }

    /// The sizes of operands with these shapes, checked against each other: equal batch and
    /// summed sizes, every other axis of size 1.
    pub(super) fn dims<D: DimLike>(&self, a: &[D], w: &[D]) -> TractResult<Dims<D>> {
        // No allocation: this runs on every decode step, ~60 times on SmolLM2.
        let a_named = |p: usize| p == self.a_batch || p == self.a_sum || self.a_rows.contains(&p);
        let w_named = |p: usize| p == self.w_batch || p == self.w_col || p == self.w_sum;
        let fits = |shape: &[D], named: &dyn Fn(usize) -> bool, largest: usize| {
            largest < shape.len() && shape.iter().enumerate().all(|(p, d)| named(p) || *d == D::one())
        };
        let a_largest = self.a_rows.iter().copied().chain([self.a_batch, self.a_sum]).max().unwrap_or(0);
        let w_largest = self.w_batch.max(self.w_col).max(self.w_sum);
        ensure!(
            fits(a, &a_named, a_largest) && fits(w, &w_named, w_largest) && a[self.a_batch] == w[self.w_batch] && a[self.a_sum] == w[self.w_sum],
            "ActivationProduct: operands {a:?} and {w:?} do not match {self:?}"
        );
        let rows = self.a_rows.iter().map(|&p| a[p].clone()).collect();
        Ok((a[self.a_batch].clone(), rows, a[self.a_sum].clone(), w[self.w_col].clone()))
    }
}

impl EvalOp for ActivationProduct {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (a, w) = args_2!(inputs);
        let (batch, rows, k, n) = self.dims(a.shape(), w.shape())?;
        let m: usize = rows.iter().product();
        let shape: TVec<usize> = [batch].into_iter().chain(rows).chain([n]).collect();
        // SAFETY: f32 has no invalid bit patterns, and the kernel writes every value.
        let mut y = unsafe { Tensor::uninitialized::<f32>(&shape)? };
        {
            let (a, w) = (a.try_as_plain_ram()?, w.try_as_plain_ram()?);
            let mut y = y.try_as_plain_ram_mut()?;
            let (a, w, y) = (a.as_slice::<f32>()?, w.as_slice::<f32>()?, y.as_slice_mut::<f32>()?);
            for ((a, w), y) in a.chunks_exact(m * k).zip(w.chunks_exact(k * n)).zip(y.chunks_exact_mut(m * n)) {
                kernels::run(self.transposed(), a, w, y, m, k, n, &[]);
            }
        }
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for ActivationProduct {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.iter().all(|f| f.datum_type == f32::datum_type()), "ActivationProduct reads float32");
        let (batch, rows, _, n) = self.dims(&inputs[0].shape.to_tvec(), &inputs[1].shape.to_tvec())?;
        let shape: TVec<TDim> = [batch].into_iter().chain(rows).chain([n]).collect();
        Ok(tvec!(f32::fact(shape)))
    }

    as_op!();
}

/// One generic loop nest per operand order, compiled for each instruction set it runs on (as
/// in `f32_products`).
pub(super) mod kernels {
    use super::LANES;

    /// One batch element: `y` (`[m, n]`) from `a` (`[m, k]`) and `w`. `limits`, empty or one
    /// per row, lets a prompt's scores skip the keys a causal mask hides (as the fused
    /// [`Attention`](crate::engine::ops::attention::Attention) does): a tile of rows computes
    /// the columns up to its largest limit and writes 0 past them. Decode's dot products
    /// compute every column.
    #[allow(clippy::too_many_arguments)]
    pub fn run(transposed: bool, a: &[f32], w: &[f32], y: &mut [f32], m: usize, k: usize, n: usize, limits: &[usize]) {
        // Transposed here, outside the loop nests: a second call site of the mix inside
        // `any` made the compiler vectorize both ten times worse.
        let wt;
        let (w, transposed) = if transposed && m >= ROWS_FOR_MIX {
            wt = transpose(w, n, k);
            (&wt[..], false)
        } else {
            (w, transposed)
        };
        #[cfg(target_arch = "x86_64")]
        {
            use crate::engine::ops::isa::{allows, Level};
            if allows(Level::Avx512) && std::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F.
                return unsafe { avx512(transposed, a, w, y, m, k, n, limits) };
            }
            if allows(Level::Avx2) && std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU has AVX2 and FMA.
                return unsafe { avx2(transposed, a, w, y, m, k, n, limits) };
            }
        }
        any::<LANES, { 2 * LANES }>(transposed, a, w, y, m, k, n, limits)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn avx512(transposed: bool, a: &[f32], w: &[f32], y: &mut [f32], m: usize, k: usize, n: usize, limits: &[usize]) {
        any::<{ 2 * LANES }, { 4 * LANES }>(transposed, a, w, y, m, k, n, limits)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn avx2(transposed: bool, a: &[f32], w: &[f32], y: &mut [f32], m: usize, k: usize, n: usize, limits: &[usize]) {
        any::<LANES, { 4 * LANES }>(transposed, a, w, y, m, k, n, limits)
    }

    /// Rows from which scores are computed as a mix of the transposed keys rather than as
    /// dot products. A dot product ends in a sum across lanes, paid once per score; a mix
    /// keeps 16 scores in the lanes and pays one copy of the keys per product instead. At
    /// decode (a few query rows per key head) the copy costs more than the sums it saves; in
    /// a prompt it is nothing beside them (`mulmd probe --profile` on a 1,031-token SmolLM2
    /// prompt: these products took 3.6 s of the 6.5 s prefill as dot products).
    pub const ROWS_FOR_MIX: usize = 8;

    /// `w` `[n, k]` → `[k, n]`: the keys as a matrix the query rows mix.
    pub fn transpose(w: &[f32], n: usize, k: usize) -> Vec<f32> {
        let mut wt = vec![0f32; k * n];
        for (j, row) in w.chunks_exact(k).enumerate() {
            for (l, x) in row.iter().enumerate() {
                wt[l * n + j] = *x;
            }
        }
        wt
    }

    /// Everything here is inlined into the callers above, so it is compiled with their
    /// features: `mul_add` outside them is a call to the C library's `fmaf`. A mix sums
    /// `WIDE` output columns at a time where the vector registers hold them for 4 rows, and
    /// `FEW` for the 1 to 3 rows left over, decode's case (see [`mix_tile`]).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn any<const WIDE: usize, const FEW: usize>(transposed: bool, a: &[f32], w: &[f32], y: &mut [f32], m: usize, k: usize, n: usize, limits: &[usize]) {
        if transposed {
            rows_dot_rows(a, w, y, k, n)
        } else {
            rows_times_matrix::<WIDE, FEW>(a, w, n, y, m, k, n, limits)
        }
    }

    /// `y[i, j] = a[i, :] · w[j, :]`: scores, each query row against each key row.
    ///
    /// A block of [`KEYS_PER_BLOCK`] keys at a time, every query row against it: the keys
    /// are read from memory once, not once per row (a long cache's keys are 768 KB a head at
    /// 3,000 positions), and a query row stays in registers across its block. Key by key,
    /// every row against each, spilled 4 rows of 64 out of AVX2's 16 registers (mulm-28m's
    /// decode at 0.74×).
    #[inline(always)]
    fn rows_dot_rows(a: &[f32], w: &[f32], y: &mut [f32], k: usize, n: usize) {
        for (b, block) in w.chunks(KEYS_PER_BLOCK * k).enumerate() {
            let j0 = b * KEYS_PER_BLOCK;
            for (row, y) in a.chunks_exact(k).zip(y.chunks_exact_mut(n)) {
                for (key, y) in block.chunks_exact(k).zip(&mut y[j0..]) {
                    *y = dot(row, key);
                }
            }
        }
    }

    /// Keys a block of [`rows_dot_rows`] holds: 16 KB of 64-float keys, in L1 while every
    /// query row passes over them.
    const KEYS_PER_BLOCK: usize = 64;

    #[inline(always)]
    fn dot(x: &[f32], w: &[f32]) -> f32 {
        let whole = x.len() / LANES * LANES;
        let mut acc = [0f32; LANES];
        for (xs, ws) in x[..whole].chunks_exact(LANES).zip(w[..whole].chunks_exact(LANES)) {
            for l in 0..LANES {
                acc[l] = xs[l].mul_add(ws[l], acc[l]);
            }
        }
        // A tree over the lanes: shorter dependency chains than a left-to-right sum.
        let mut width = LANES / 2;
        while width > 0 {
            for l in 0..width {
                acc[l] += acc[l + width];
            }
            width /= 2;
        }
        let mut sum = acc[0];
        for (x, w) in x[whole..].iter().zip(&w[whole..]) {
            sum = x.mul_add(*w, sum);
        }
        sum
    }

    /// `y[i, :] = Σ_l a[i, l] · w[l, :]`: a mix of value rows, `w` `[k, stride]` of which
    /// the first `n` columns count. Four rows at a time share each load of `w` and keep four
    /// chains of fused multiply-adds in flight; one row alone would wait on each addition.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn rows_times_matrix<const WIDE: usize, const FEW: usize>(a: &[f32], w: &[f32], stride: usize, y: &mut [f32], m: usize, k: usize, n: usize, limits: &[usize]) {
        let mut i = 0;
        while m - i >= 4 {
            mix_tile::<4, WIDE>(a, w, stride, y, i, k, n, limits);
            i += 4;
        }
        match m - i {
            3 => mix_tile::<3, FEW>(a, w, stride, y, i, k, n, limits),
            2 => mix_tile::<2, FEW>(a, w, stride, y, i, k, n, limits),
            1 => mix_tile::<1, FEW>(a, w, stride, y, i, k, n, limits),
            _ => {}
        }
    }

    /// `acc[t] += rows[t][l] · values` (a function, not a closure: closures are not inlined
    /// into the feature-enabled callers reliably, and a `mul_add` outside them calls `fmaf`).
    #[inline(always)]
    fn add<const T: usize, const C: usize>(acc: &mut [[f32; C]; T], rows: &[&[f32]; T], l: usize, values: &[f32; C]) {
        for t in 0..T {
            let x = rows[t][l];
            for (s, v) in acc[t].iter_mut().zip(values) {
                *s = v.mul_add(x, *s);
            }
        }
    }

    /// How many of the rows' leading entries the mix reads: up to the last that is not zero
    /// in any of them.
    ///
    /// Why: in a prompt, a causal mask leaves each position's attention weights zero past its
    /// own key, so the value mix of the rows of early positions would spend about half its
    /// work on zeros. A zero weight adds nothing to a finite value, so the sums are the same.
    /// Query rows (the scores' mix) rarely end in zeros and stop the search at once.
    #[inline(always)]
    fn mixed<const T: usize>(rows: &[&[f32]; T]) -> usize {
        rows.iter().map(|row| row.iter().rposition(|x| *x != 0.0).map_or(0, |l| l + 1)).max().unwrap_or(0)
    }

    /// Rows `i0..i0 + T` of [`rows_times_matrix`], `WIDE` output columns at a time (then 16)
    /// so their sums stay in registers across the whole of `k`.
    ///
    /// Why `WIDE`: each step of `l` loads a row of `w` and broadcasts `T` weights for `T`
    /// multiply-adds per 16 columns, so 16 columns at a time spend more loads than
    /// multiply-adds. AVX-512's 32 registers hold 4 rows × 32 columns of sums: two loads,
    /// four broadcasts, eight multiply-adds per step. AVX2's 16 and NEON's 32 shorter ones
    /// hold 16 columns.
    ///
    /// Fewer rows leave room for more columns: 3 rows × 64 columns are 12 AVX2 or AVX-512
    /// registers (24 of NEON's at 32 columns). At decode this makes one pass over the values
    /// instead of one per 16 columns, each reading a quarter of every row: a long cache's
    /// values come from memory, and strided passes over them ran at half the speed.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn mix_tile<const T: usize, const WIDE: usize>(a: &[f32], w: &[f32], stride: usize, y: &mut [f32], i0: usize, k: usize, n: usize, limits: &[usize]) {
        let rows: [&[f32]; T] = std::array::from_fn(|t| &a[(i0 + t) * k..][..k]);
        let k = mixed(&rows);
        // Columns no row of the tile keeps are 0, in whole groups of 16 past the last kept.
        let kept = if limits.is_empty() { n } else { limits[i0..i0 + T].iter().copied().max().unwrap_or(n).min(n) };
        let computed = (kept.div_ceil(LANES) * LANES).min(n);
        for t in 0..T {
            y[(i0 + t) * n + computed..][..n - computed].fill(0.0);
        }
        let mut j = 0;
        while WIDE > LANES && j + WIDE <= computed {
            let mut acc = [[0f32; WIDE]; T];
            for l in 0..k {
                add(&mut acc, &rows, l, w[l * stride + j..][..WIDE].try_into().expect("WIDE values"));
            }
            for (t, sums) in acc.iter().enumerate() {
                y[(i0 + t) * n + j..][..WIDE].copy_from_slice(sums);
            }
            j += WIDE;
        }
        while j < computed {
            let mut acc = [[0f32; LANES]; T];
            if j + LANES <= stride {
                for l in 0..k {
                    add(&mut acc, &rows, l, w[l * stride + j..][..LANES].try_into().expect("16 values"));
                }
            } else {
                // Unpadded last columns (a value head size not a multiple of 16).
                for l in 0..k {
                    let mut values = [0f32; LANES];
                    for (v, w) in values.iter_mut().zip(&w[l * stride + j..(l + 1) * stride]) {
                        *v = *w;
                    }
                    add(&mut acc, &rows, l, &values);
                }
            }
            let width = LANES.min(n - j);
            for (t, sums) in acc.iter().enumerate() {
                for (y, s) in y[(i0 + t) * n + j..][..width].iter_mut().zip(sums) {
                    *y = *s;
                }
            }
            j += LANES;
        }
    }
}

/// Replaces every float32 einsum of two activations that is a batch of plain products (see
/// the module contract) by an [`ActivationProduct`]. Returns how many it replaced; any other
/// einsum is left to tract.
pub fn use_activation_products(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    // Patches only add nodes, so this order's ids stay valid.
    for id in model.eval_order()? {
        if let Some(patch) = activation_patch(model, id)? {
            patch.apply(model)?;
            replaced += 1;
        }
    }
    Ok(replaced)
}

/// What an einsum axis is to a batched product.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    /// In both operands and the output.
    Batch,
    /// The first operand's rows: in it and the output only.
    Row,
    /// The second operand's columns.
    Col,
    /// Summed over: in both operands, not the output.
    Sum,
    /// Size 1 and in no output: read past, as it moves no value in memory.
    Unit,
}

fn activation_patch(model: &TypedModel, id: usize) -> TractResult<Option<TypedModelPatch>> {
    let node = model.node(id);
    let Some(einsum) = node.op_as::<EinSum>() else { return Ok(None) };
    if node.inputs.len() != 2 || einsum.q_params.is_some() || einsum.operating_dt != f32::datum_type() {
        return Ok(None);
    }
    if node.inputs.iter().any(|i| model.node(i.node).op_is::<Const>()) {
        return Ok(None);
    }
    let facts = [model.outlet_fact(node.inputs[0])?.clone(), model.outlet_fact(node.inputs[1])?.clone()];
    let y = model.outlet_fact(node.id.into())?.clone();
    if facts.iter().chain([&y]).any(|f| f.datum_type != f32::datum_type()) {
        return Ok(None);
    }
    // Each operand's and the output's axes, in order, with their roles.
    let mut order: [Vec<(char, Role)>; 3] = [vec![(' ', Role::Unit); facts[0].rank()], vec![(' ', Role::Unit); facts[1].rank()], vec![(' ', Role::Unit); y.rank()]];
    for axis in einsum.axes.iter_all_axes() {
        let (a, w, out) = (&axis.inputs[0], &axis.inputs[1], &axis.outputs[0]);
        if a.len() > 1 || w.len() > 1 || out.len() > 1 {
            return Ok(None);
        }
        let unit = a.iter().all(|&p| facts[0].shape[p] == 1.to_dim()) && w.iter().all(|&p| facts[1].shape[p] == 1.to_dim());
        let role = match (a.len(), w.len(), out.len()) {
            (1, 1, 1) => Role::Batch,
            (1, 0, 1) => Role::Row,
            (0, 1, 1) => Role::Col,
            (_, _, 0) if unit => Role::Unit,
            (1, 1, 0) => Role::Sum,
            _ => return Ok(None),
        };
        for (slot, positions) in [a, w, out].into_iter().enumerate() {
            if let Some(&p) = positions.first() {
                order[slot][p] = (axis.repr, role);
            }
        }
    }
    let kept = |slot: usize| -> Vec<(char, Role)> { order[slot].iter().copied().filter(|(_, r)| *r != Role::Unit).collect() };
    let roles = |axes: &[(char, Role)]| -> Vec<Role> { axes.iter().map(|(_, r)| *r).collect() };
    let (a_axes, w_axes, y_axes) = (kept(0), kept(1), kept(2));
    let rows: Vec<char> = a_axes.iter().filter(|(_, r)| *r == Role::Row).map(|(c, _)| *c).collect();
    // [batch, rows…, sum] · [batch, col, sum] or [batch, sum, col] → [batch, rows…, col],
    // the rows in the same order in the first operand and the output.
    let mut want_a = vec![Role::Batch];
    want_a.extend(rows.iter().map(|_| Role::Row));
    want_a.push(Role::Sum);
    let mut want_y = want_a.clone();
    *want_y.last_mut().expect("pushed") = Role::Col;
    let transposed = match roles(&w_axes).as_slice() {
        [Role::Batch, Role::Col, Role::Sum] => true,
        [Role::Batch, Role::Sum, Role::Col] => false,
        _ => return Ok(None),
    };
    let same_rows = y_axes.iter().filter(|(_, r)| *r == Role::Row).map(|(c, _)| *c).eq(rows.iter().copied());
    if rows.is_empty() || roles(&a_axes) != want_a || roles(&y_axes) != want_y || !same_rows {
        return Ok(None);
    }

    let position = |slot: usize, role: Role| order[slot].iter().position(|(_, r)| *r == role).expect("role checked above");
    let op = ActivationProduct {
        a_batch: position(0, Role::Batch),
        a_rows: (0..order[0].len()).filter(|&p| order[0][p].1 == Role::Row).collect(),
        a_sum: position(0, Role::Sum),
        w_batch: position(1, Role::Batch),
        w_col: position(1, Role::Col),
        w_sum: position(1, Role::Sum),
    };
    debug_assert_eq!(op.transposed(), transposed);
    // Operands whose batch or summed sizes differ (a broadcast) are tract's, as is any shape
    // this rewrite did not foresee.
    let produced = op.output_facts(&[&facts[0], &facts[1]]);
    if produced.map_or(true, |f| f[0].shape != y.shape) {
        return Ok(None);
    }
    let mut patch = TypedModelPatch::default();
    let operands = [patch.tap_model(model, node.inputs[0])?, patch.tap_model(model, node.inputs[1])?];
    let wire = patch.wire_node(format!("{}.act", node.name), op, &operands)?[0];
    patch.shunt_outside(model, node.id.into(), wire)?;
    Ok(Some(patch))
}

#[cfg(test)]
mod tests;
