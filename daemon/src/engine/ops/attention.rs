//! Attention in one op: the scores of a tile of query rows, their masked softmax and their mix
//! of the values, tile after tile, in place of the three ops that computed each over all rows.
//!
//! Contract: `y = mix(softmax(scores(q, k), mask), v)` where `scores` and `mix` are the two
//! [`ActivationProduct`]s this op replaces and `softmax` the [`MaskedSoftmax`] between them;
//! the same kernels in the same order, so the result is the three ops' to the bit.
//!
//! Why: a prompt's scores are `rows × keys` values per key head. For SmolLM2's 1,119-token
//! prompt that is 45 MB a layer, written by the scores product, read and written by the
//! softmax, read by the mix: larger than any cache, and in a mapping of its own that is
//! faulted in page by page at every layer (glibc maps allocations over 32 MiB). A tile of 32
//! rows of scores is 143 KB and stays in the cache from its scores to its mix. And with the
//! mask at hand, a tile computes scores only as far as its rows keep keys (about half of a
//! causal prompt's) and mixes values only as far as its weights are not zero.
//!
//! With `--threads`, the tiles (of every key head) are split over the engine's team: at 2
//! threads, attention on one thread alone was 39–43% of a 1,000-token prefill and decode step
//! of SmolLM2 q4 (bench/RESULTS.md, "Attention on every thread").

use std::cell::RefCell;
use std::sync::{Mutex, OnceLock};

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

use super::aligned::CacheAligned;
use super::attention_products::{kernels, ActivationProduct};
use super::kv_cache::Heads;
use super::rope::tables_fit;
use super::shares::split_parts;
use super::softmax::{Mask, MaskRow, MaskedSoftmax};

/// Query rows per tile: their scores stay in the L2 cache up to a few thousand keys.
const TILE: usize = 32;

/// See the module contract (`Attention` in profiles).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attention {
    scores: ActivationProduct,
    softmax: MaskedSoftmax,
    mix: ActivationProduct,
}

impl Op for Attention {
    fn name(&self) -> StaticName {
        "Attention".into()
    }

    op_as_typed_op!();
}

impl EvalOp for Attention {
    op_out_of_plan!();

    /// Inputs: queries, keys, the mask, values.
    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (q, k, mask, v) = args_4!(inputs);
        let (batch, rows, depth, keys) = self.scores.dims(q.shape(), k.shape())?;
        let scores_shape: TVec<usize> = [batch].into_iter().chain(rows.iter().copied()).chain([keys]).collect();
        ensure!(
            tables_fit(&scores_shape, mask.shape()),
            "Attention: a mask of shape {:?} does not fit scores of shape {scores_shape:?} (it must be [1…, positions, keys])",
            mask.shape()
        );
        let (_, mix_rows, mixed, width) = self.mix.dims(&scores_shape, v.shape())?;
        ensure!(mix_rows == rows && mixed == keys, "Attention: values of shape {:?} do not fit {keys} keys", v.shape());
        let m: usize = rows.iter().product();
        let out_shape: TVec<usize> = [batch].into_iter().chain(rows).chain([width]).collect();
        // SAFETY: f32 has no invalid bit patterns, and every tile writes all of its rows.
        let mut out = unsafe { Tensor::uninitialized::<f32>(&out_shape)? };
        {
            let mut out_ram = out.try_as_plain_ram_mut()?;
            let y = out_ram.as_slice_mut::<f32>()?;
            if keys == 0 {
                y.fill(0.0);
                return Ok(tvec!(out.into_tvalue()));
            }
            let mask = Mask::of(&mask)?;
            // A prompt's query rows mix the keys transposed, once per key head (as the scores
            // product does), and skip what the mask hides; a few decode rows take dot
            // products of every key, so their limits are not computed on each step.
            let transposed = m < kernels::ROWS_FOR_MIX;
            let limits = if transposed { Vec::new() } else { column_limits(&mask, batch * m, keys) };
            for (input, slot) in [(&k, 1), (&v, 3)] {
                ensure!(!Heads::is_rows(input) || self.reads_cache_rows(slot), "Attention: input {slot} is a KV cache this op cannot address by heads");
            }
            let q = q.try_as_plain_ram()?;
            let q = q.as_slice::<f32>()?;
            // Keys and values may be a cache with room between its heads (see `kv_cache`).
            let (k_heads, v_heads) = (Heads::of(&k)?, Heads::of(&v)?);
            // Per key head (TVec: inline up to 4, so a decode step allocates nothing for them).
            let keys_of: TVec<&[f32]> = (0..batch).map(|b| k_heads.head(b, keys * depth)).collect();
            let values_of: TVec<&[f32]> = (0..batch).map(|b| v_heads.head(b, keys * width)).collect();
            // A prompt's keys transposed, per head, by the first of its tiles to need them: on
            // one thread just before that head's tiles, as they are read, not all heads' at once.
            let keys_t: TVec<OnceLock<Vec<f32>>> = (0..batch).map(|_| OnceLock::new()).collect();
            let tiles = m.div_ceil(TILE);
            let out = TileRows { ptr: y.as_mut_ptr(), len: y.len() };
            let failed = Mutex::new(None);
            // Every tile of every key head is a part of its own: it reads only the inputs and
            // writes only its rows, with the scores in its thread's own buffer.
            split_parts(batch * m * keys * (depth + width), batch * tiles, &|part| {
                let (b, i0) = (part / tiles, part % tiles * TILE);
                let tile = TILE.min(m - i0);
                let first = b * m + i0;
                let k = if transposed { keys_of[b] } else { &keys_t[b].get_or_init(|| kernels::transpose(keys_of[b], keys, depth))[..] };
                let limits = if transposed { &[][..] } else { &limits[first..first + tile] };
                let q = &q[first * depth..][..tile * depth];
                // SAFETY: parts cover disjoint rows of the output: tile `i0` of head `b`.
                let y = unsafe { out.rows(first * width..(first + tile) * width) };
                if let Err(e) = self.tile(q, k, values_of[b], &mask, limits, y, Tile { first, rows: tile, depth, keys, width, transposed }) {
                    failed.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(e);
                }
            });
            if let Some(e) = failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
                return Err(e);
            }
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

/// One tile's place: its first row among all heads' rows, its row count and the sizes.
struct Tile {
    first: usize,
    rows: usize,
    depth: usize,
    keys: usize,
    width: usize,
    transposed: bool,
}

/// The output's rows, written by tiles that may run on different threads.
struct TileRows {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: each tile writes only its own rows (see `rows`), so threads sharing it never write
// the same element; the output outlives the parts (they end before `eval` goes on).
unsafe impl Sync for TileRows {}

impl TileRows {
    /// The floats `range` of the output.
    ///
    /// # Safety
    /// No other caller may hold a range that overlaps it while this one is in use.
    #[allow(clippy::mut_from_ref)]
    unsafe fn rows(&self, range: std::ops::Range<usize>) -> &mut [f32] {
        assert!(range.start <= range.end && range.end <= self.len, "rows outside the output");
        // SAFETY: in bounds (checked); exclusive by the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.len()) }
    }
}

impl Attention {
    /// One tile of query rows `q` against one key head's keys `k` (transposed for a prompt)
    /// and values `v`: scores, softmax under the mask, mix into `y`, the scores in this
    /// thread's [`SCORES`].
    #[allow(clippy::too_many_arguments)]
    fn tile(&self, q: &[f32], k: &[f32], v: &[f32], mask: &Mask, limits: &[usize], y: &mut [f32], t: Tile) -> TractResult<()> {
        SCORES.with_borrow_mut(|buffer| {
            let floats = (t.rows * t.keys + SKEWS) * 4;
            if buffer.len() < floats {
                *buffer = CacheAligned::zeroed(floats);
            }
            // Each row lies as far past a cache line as it would in the scores tensor of the
            // ops replaced: tract's softmax kernels sum the part before the first aligned
            // vector apart, so the sums would differ.
            let skew = (t.first * t.keys) % SKEWS;
            let scores = &mut buffer.floats_mut()[skew..][..t.rows * t.keys];
            kernels::run(t.transposed, q, k, scores, t.rows, t.depth, t.keys, limits);
            for (r, row) in scores.chunks_exact_mut(t.keys).enumerate() {
                self.softmax.row(row, mask.row(t.first + r, t.keys))?;
            }
            kernels::run(false, scores, v, y, t.rows, t.keys, t.width, &[]);
            Ok(())
        })
    }
}

impl Attention {
    /// The scores' product, the softmax and the mix's product, for the plan cache (`nnef`).
    pub(super) fn parts(&self) -> (&ActivationProduct, &MaskedSoftmax, &ActivationProduct) {
        (&self.scores, &self.softmax, &self.mix)
    }

    /// The op [`Attention::parts`] came from, refused where `use_attention` would not fuse them.
    pub(super) fn from_parts(scores: ActivationProduct, softmax: MaskedSoftmax, mix: ActivationProduct) -> TractResult<Self> {
        ensure!(fusable(&scores, &mix), "these products do not make an attention");
        Ok(Self { scores, softmax, mix })
    }

    /// Whether input `slot` (1: keys, 3: values) may be a [`super::kv_cache::KvRows`] tensor:
    /// its product reads it as `[1, heads, positions, depth]` batched over the heads.
    pub(super) fn reads_cache_rows(&self, slot: usize) -> bool {
        match slot {
            1 => self.scores.reads_cache_rows(),
            3 => self.mix.reads_cache_rows(),
            _ => false,
        }
    }
}

/// Floats in a cache line: how far a row of scores can lie past one.
const SKEWS: usize = 16;

thread_local! {
    /// One tile's scores, kept between calls by each thread that runs tiles (the caller and
    /// the team's helpers): at most [`TILE`] × the context's keys (1 MB for 8,192 keys) each.
    static SCORES: RefCell<CacheAligned> = RefCell::new(CacheAligned::zeroed(0));
}

/// For each of `rows` score rows of `keys`, how many leading keys its mask row keeps: one past
/// the last that is not masked (−∞ in a float mask, false in a boolean one).
fn column_limits(mask: &Mask, rows: usize, keys: usize) -> Vec<usize> {
    let last_kept = |row: MaskRow| match row {
        MaskRow::Float(add) => add.iter().rposition(|a| *a != f32::NEG_INFINITY),
        MaskRow::Bool(keep) => keep.iter().rposition(|k| *k),
    };
    (0..rows).map(|r| last_kept(mask.row(r, keys)).map_or(0, |j| j + 1)).collect()
}

impl TypedOp for Attention {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let (q, k, v) = (inputs[0], inputs[1], inputs[3]);
        ensure!([q, k, v].iter().all(|f| f.datum_type == f32::datum_type()), "Attention reads float32 queries, keys and values");
        let (batch, rows, _, keys) = self.scores.dims(&q.shape.to_tvec(), &k.shape.to_tvec())?;
        let scores: TVec<TDim> = [batch].into_iter().chain(rows).chain([keys]).collect();
        let (batch, rows, _, width) = self.mix.dims(&scores, &v.shape.to_tvec())?;
        Ok(tvec!(f32::fact([batch].into_iter().chain(rows).chain([width]).collect::<TVec<_>>())))
    }

    as_op!();
}

/// Replaces every chain of a scores [`ActivationProduct`], the [`MaskedSoftmax`] that alone
/// reads it and the value [`ActivationProduct`] that alone reads that by one [`Attention`].
/// Returns how many it replaced; a chain with another reader in between stays as it is.
pub fn use_attention(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    // Patches only add nodes, so this order's ids stay valid.
    for id in model.eval_order()? {
        let Some(patch) = attention_patch(model, id)? else { continue };
        patch.apply(model)?;
        replaced += 1;
    }
    Ok(replaced)
}

/// The patch putting an [`Attention`] in place of the chain whose scores product is node `id`.
fn attention_patch(model: &TypedModel, id: usize) -> TractResult<Option<TypedModelPatch>> {
    let outputs = model.output_outlets()?;
    // The one reader of node `id`'s output, if it reads it as its first input and the
    // output is not also the model's.
    let sole_reader = |id: usize| -> Option<&TypedNode> {
        let readers = &model.node(id).outputs[0].successors;
        (readers.len() == 1 && readers[0].slot == 0 && !outputs.contains(&id.into())).then(|| model.node(readers[0].node))
    };
    let node = model.node(id);
    let Some(scores) = node.op_as::<ActivationProduct>() else { return Ok(None) };
    let Some(softmax_node) = sole_reader(id) else { return Ok(None) };
    let Some(softmax) = softmax_node.op_as::<MaskedSoftmax>() else { return Ok(None) };
    let Some(mix_node) = sole_reader(softmax_node.id) else { return Ok(None) };
    let Some(mix) = mix_node.op_as::<ActivationProduct>() else { return Ok(None) };
    if !fusable(scores, mix) || node.inputs.len() != 2 {
        return Ok(None);
    }
    let op = Attention { scores: scores.clone(), softmax: softmax.clone(), mix: mix.clone() };
    let inputs = [node.inputs[0], node.inputs[1], softmax_node.inputs[1], mix_node.inputs[1]];
    let facts: TVec<&TypedFact> = inputs.iter().map(|i| model.outlet_fact(*i)).collect::<TractResult<_>>()?;
    // A shape this op would compute differently from the chain is left to the chain.
    if op.output_facts(&facts).ok().map(|f| f[0].shape.clone()) != Some(model.outlet_fact(mix_node.id.into())?.shape.clone()) {
        return Ok(None);
    }
    let mut patch = TypedModelPatch::default();
    let wires = inputs.iter().map(|i| patch.tap_model(model, *i)).collect::<TractResult<TVec<_>>>()?;
    let wire = patch.wire_node(format!("{}.attention", node.name), op, &wires)?[0];
    patch.shunt_outside(model, mix_node.id.into(), wire)?;
    Ok(Some(patch))
}

/// Whether a scores product and a mix product fit the fused kernels: keys read `[batch, n,
/// k]`, values `[batch, k, n]`, the probabilities in the order the scores left them.
fn fusable(scores: &ActivationProduct, mix: &ActivationProduct) -> bool {
    scores.transposed() && !mix.transposed() && mix.reads_first_operand_in_order()
}

#[cfg(test)]
mod tests;

