//! The KV cache appended to in place: each layer's keys and values keep room for more
//! positions, so a decode step writes its one new row per head instead of copying the cache.
//!
//! Contract: [`KvAppend`] computes what the `Concat` on the positions axis it replaces does,
//! `[1, heads, past, depth] ++ [1, heads, new, depth] → [1, heads, past + new, depth]`, to the
//! bit. Its output is a [`KvRows`] tensor: each head's rows contiguous, heads
//! [`KvRows::capacity`] rows apart. Only the engine reads one (the session hands it back as
//! the next pass's cache and refills it for its next prompt with [`restarted`],
//! [`super::attention::Attention`] reads it through [`Heads`], [`first_rows`] cuts it);
//! tract's own ops cannot, and refuse it ("not plain") rather than misread it.
//!
//! When the cache it is given is its alone (the session's, not one a prefix cache shares)
//! and has room, the new rows are written past the old ones. Otherwise it copies the cache
//! into a new one with room for an eighth more positions (at least [`MIN_ROOM`]), up to the
//! model's context length: a shared cache is never written (copy on write).
//!
//! Why: the `Concat` copied every layer's whole cache on every decode step. At 1,000 cached
//! positions that was 18% of a SmolLM2 q4 step (2.3 of 12.7 ms, `mulmd probe --profile`),
//! growing with the conversation.

use std::fmt;
use std::sync::{Arc, RwLock, RwLockReadGuard};

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::array::TypedConcat;

use super::aligned::CacheAligned;
use super::attention::Attention;

/// Positions of room a cache grows by at least, so short answers after a short prompt copy
/// their cache once.
pub const MIN_ROOM: usize = 64;

/// The storage of a cache tensor `[1, heads, len, depth]`: `heads` blocks of `capacity`
/// rows of `depth` floats; rows past the tensor's `len` are room, zero until written.
pub struct KvRows {
    heads: usize,
    depth: usize,
    capacity: usize,
    /// Written only by [`KvAppend`], only past the tensor's length, and only while it holds
    /// the tensor by value (so no reader can exist); the lock keeps that safe Rust.
    rows: RwLock<CacheAligned>,
}

impl KvRows {
    fn new(heads: usize, depth: usize, capacity: usize) -> Self {
        Self { heads, depth, capacity, rows: RwLock::new(CacheAligned::zeroed(heads * capacity * depth * 4)) }
    }

    /// Positions each head has room for.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn read(&self) -> RwLockReadGuard<'_, CacheAligned> {
        // Nothing panics while holding the lock, so a poisoned one still holds whole rows.
        self.rows.read().unwrap_or_else(|p| p.into_inner())
    }
}

impl fmt::Debug for KvRows {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KvRows({} heads × {} positions × {})", self.heads, self.capacity, self.depth)
    }
}

impl fmt::Display for KvRows {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl PartialEq for KvRows {
    fn eq(&self, other: &Self) -> bool {
        (self.heads, self.depth, self.capacity) == (other.heads, other.depth, other.capacity) && self.read().floats() == other.read().floats()
    }
}

impl Eq for KvRows {}

impl TensorStorage for KvRows {
    fn byte_len(&self) -> usize {
        self.heads * self.capacity * self.depth * 4
    }

    fn is_empty(&self) -> bool {
        self.byte_len() == 0
    }

    fn deep_clone(&self) -> Box<dyn TensorStorage> {
        let copy = KvRows::new(self.heads, self.depth, self.capacity);
        copy.rows.write().unwrap_or_else(|p| p.into_inner()).copy_from_slice(&self.read());
        Box::new(copy)
    }

    fn as_plain_ram(&self) -> Option<&PlainStorage> {
        None
    }

    fn as_plain_ram_mut(&mut self) -> Option<&mut PlainStorage> {
        None
    }

    fn into_plain_ram(self: Box<Self>) -> Option<PlainStorage> {
        None
    }

    fn dyn_hash(&self, state: &mut dyn std::hash::Hasher) {
        state.write_usize(self.heads);
        state.write_usize(self.capacity);
        state.write(&self.read());
    }

    fn exotic_fact(&self, _shape: &[usize]) -> TractResult<Option<Box<dyn ExoticFact>>> {
        Ok(None)
    }

    /// The tensor's type and shape say all a fact needs (float32 `[1, heads, len, depth]`);
    /// only where its rows lie differs from a plain tensor.
    fn is_exotic(&self) -> bool {
        false
    }
}

/// A cache tensor's heads, read in place: plain (`[1, heads, len, depth]`, heads `len`
/// rows apart) or [`KvRows`] (heads `capacity` rows apart).
pub(crate) enum Heads<'a> {
    Plain(&'a [f32]),
    Rows { rows: RwLockReadGuard<'a, CacheAligned>, stride: usize },
}

impl<'a> Heads<'a> {
    /// The heads of `t`, whose batch (first non-unit) axis is its heads.
    pub(crate) fn of(t: &'a Tensor) -> TractResult<Self> {
        Ok(match t.storage_as::<KvRows>() {
            Some(s) => Heads::Rows { rows: s.read(), stride: s.capacity() * s.depth },
            None => Heads::Plain(t.try_as_plain_ram()?.as_slice::<f32>()?),
        })
    }

    /// The first `floats` values of head `h`, where a plain tensor's heads are `floats` apart.
    pub(crate) fn head(&self, h: usize, floats: usize) -> &[f32] {
        match self {
            Heads::Plain(all) => &all[h * floats..][..floats],
            Heads::Rows { rows, stride } => &rows.floats()[h * stride..][..floats],
        }
    }

    /// Whether `t` is a [`KvRows`] tensor, whose heads only the first axes of size
    /// `[1, heads]` address.
    pub(crate) fn is_rows(t: &Tensor) -> bool {
        t.storage_as::<KvRows>().is_some()
    }
}

/// The sizes of a cache tensor: heads, positions, depth.
fn cache_dims(t: &Tensor) -> TractResult<(usize, usize, usize)> {
    match *t.shape() {
        [1, heads, len, depth] => Ok((heads, len, depth)),
        ref s => bail!("a KV cache tensor must be [1, heads, positions, depth], found {s:?}"),
    }
}

/// Positions allocated for a cache of `len`: an eighth more, at least [`MIN_ROOM`] more, but
/// not past `limit` (the context length) unless `len` is.
fn capacity_for(len: usize, limit: usize) -> usize {
    (len + (len / 8).max(MIN_ROOM)).min(limit.max(len))
}

/// A [`KvRows`] tensor holding the first `len` positions of `t` (plain or [`KvRows`]), with
/// room for `capacity` in all.
fn copy_rows(t: &Tensor, len: usize, capacity: usize) -> TractResult<Tensor> {
    let (heads, held, depth) = cache_dims(t)?;
    ensure!(len <= held && len <= capacity, "KV cache: {len} positions asked of {held} held, room for {capacity}");
    let storage = KvRows::new(heads, depth, capacity);
    {
        let from = Heads::of(t)?;
        let mut rows = storage.rows.write().unwrap_or_else(|p| p.into_inner());
        let rows = rows.floats_mut();
        for h in 0..heads {
            rows[h * capacity * depth..][..len * depth].copy_from_slice(&from.head(h, held * depth)[..len * depth]);
        }
    }
    Ok(Tensor::from_storage(f32::datum_type(), &[1, heads, len, depth], storage))
}

/// The cache `t` cut to its first `n` positions (for a session starting from part of a shared
/// prefix): a [`KvRows`] tensor with room to grow if `t` is one, else a plain copy (the cache
/// of a layer whose `Concat` was not replaced).
pub(crate) fn first_rows(t: &Tensor, n: usize, limit: usize) -> TractResult<Tensor> {
    match t.storage_as::<KvRows>() {
        Some(_) => copy_rows(t, n, capacity_for(n, limit)),
        None => t.slice(2, 0, n),
    }
}

/// `own`, a session's cache tensor of the pass before, made to hold the first `n` positions
/// of `from` (none: no positions) for a new prompt: in its own rows when it is a [`KvRows`]
/// tensor the session alone holds with room for `n`; else `from` itself when `n` is all of
/// it (the first pass after copies it), a copy as [`first_rows`] makes, or an empty plain
/// tensor.
///
/// Why: a session that starts over would otherwise free its cache and allocate the next
/// prompt's, and a freed cache of tens of MB goes back to the kernel and is faulted in
/// afresh. `mulmd probe --runs 8` on a 1,000-token SmolLM2 q4 prompt: 288,000 page faults
/// with the `Concat`'s tensors (which malloc reused), 453,000 with a cache allocated per
/// prompt, 241,000 with this.
pub(crate) fn restarted(own: TValue, from: Option<&TValue>, n: usize, limit: usize) -> TractResult<TValue> {
    let (heads, _, depth) = cache_dims(&own)?;
    let reusable = |t: &Tensor| t.storage_as::<KvRows>().is_some_and(|s| (s.heads, s.depth) == (heads, depth) && s.capacity > n);
    let mut own = match Arc::try_unwrap(own.into_arc_tensor()) {
        Ok(t) if reusable(&t) => t,
        _ => {
            return Ok(match from {
                Some(from) if n == cache_dims(from)?.1 => from.clone(),
                Some(from) => first_rows(from, n, limit)?.into_tvalue(),
                None => Tensor::zero::<f32>(&[1, heads, 0, depth])?.into_tvalue(),
            })
        }
    };
    if let Some(from) = from {
        let (from_heads, held, from_depth) = cache_dims(from)?;
        ensure!((from_heads, from_depth) == (heads, depth) && n <= held, "KV cache: {n} positions of {:?} do not fit a cache of {heads} heads of {depth}", from.shape());
        let storage = own.storage_as::<KvRows>().expect("checked by reusable");
        let from = Heads::of(from)?;
        let mut rows = storage.rows.write().unwrap_or_else(|p| p.into_inner());
        let rows = rows.floats_mut();
        for h in 0..heads {
            rows[h * storage.capacity * depth..][..n * depth].copy_from_slice(&from.head(h, held * depth)[..n * depth]);
        }
    }
    // SAFETY: as in `KvAppend::eval`: the storage is not plain, and its first `n` rows per
    // head are the positions now held.
    unsafe { own.set_shape_unchecked(&[1, heads, n, depth]) };
    Ok(own.into_tvalue())
}

/// Bytes a cache tensor holds, its room included (what a prefix cache's budget counts).
pub(crate) fn bytes(t: &Tensor) -> usize {
    t.storage_as::<KvRows>().map_or(t.len() * t.datum_type().size_of(), |s| s.byte_len())
}

/// See the module contract (`KvAppend` in profiles).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KvAppend {
    /// The context length: a cache never gets room past it.
    pub limit: usize,
}

impl Op for KvAppend {
    fn name(&self) -> StaticName {
        "KvAppend".into()
    }

    op_as_typed_op!();
}

impl EvalOp for KvAppend {
    op_out_of_plan!();

    /// Inputs: the cache so far, the new positions' rows.
    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (past, new) = args_2!(inputs);
        let (heads, old, depth) = cache_dims(&past)?;
        let (new_heads, added, new_depth) = cache_dims(&new)?;
        ensure!(
            (heads, depth) == (new_heads, new_depth),
            "KvAppend: new rows {:?} do not fit the cache {:?}",
            new.shape(),
            past.shape()
        );
        let len = old + added;
        // The cache itself when it is this pass's alone and has room, else a copy with room.
        let mut cache = match Arc::try_unwrap(past.into_arc_tensor()) {
            Ok(t) if t.storage_as::<KvRows>().is_some_and(|s| s.capacity >= len) => t,
            Ok(t) => copy_rows(&t, old, capacity_for(len, self.limit))?,
            Err(shared) => copy_rows(&shared, old, capacity_for(len, self.limit))?,
        };
        {
            let storage = cache.storage_as::<KvRows>().expect("made or checked above");
            let new = new.try_as_plain_ram()?;
            let new = new.as_slice::<f32>()?;
            let mut rows = storage.rows.write().unwrap_or_else(|p| p.into_inner());
            let rows = rows.floats_mut();
            for h in 0..heads {
                rows[(h * storage.capacity + old) * depth..][..added * depth].copy_from_slice(&new[h * added * depth..][..added * depth]);
            }
        }
        // SAFETY: the storage is not plain, so the shape is all tract reads of this tensor's
        // geometry; it now covers the `len` positions written.
        unsafe { cache.set_shape_unchecked(&[1, heads, len, depth]) };
        Ok(tvec!(cache.into_tvalue()))
    }
}

impl TypedOp for KvAppend {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let (past, new) = (inputs[0], inputs[1]);
        ensure!(past.datum_type == f32::datum_type() && new.datum_type == f32::datum_type(), "KvAppend appends float32 rows");
        ensure!(past.rank() == 4 && new.rank() == 4, "KvAppend appends [1, heads, positions, depth] tensors");
        let mut shape = past.shape.to_tvec();
        shape[2] = shape[2].clone() + new.shape[2].clone();
        Ok(tvec!(f32::fact(shape)))
    }

    as_op!();
}

/// Replaces every `Concat` on the positions axis of two `[1, heads, positions, depth]`
/// float32 tensors whose readers are all [`Attention`] ops that can read a [`KvRows`] tensor
/// in place (and the model's outputs) by a [`KvAppend`] that never grows a cache past
/// `limit` positions. Returns how many it replaced.
pub fn use_kv_append(model: &mut TypedModel, limit: usize) -> TractResult<usize> {
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(concat) = node.op_as::<TypedConcat>() else { continue };
        let op = KvAppend { limit };
        let facts = model.node_input_facts(id)?;
        let shape = &model.outlet_fact(id.into())?.shape;
        let fits = concat.axis == 2
            && node.inputs.len() == 2
            && facts.iter().all(|f| f.shape.len() == 4 && f.shape[0] == 1.to_dim())
            && op.output_facts(&facts).is_ok_and(|f| f[0].shape == *shape)
            && node.outputs[0].successors.iter().all(|s| model.node(s.node).op_as::<Attention>().is_some_and(|a| a.reads_cache_rows(s.slot)));
        drop(facts);
        if !fits {
            continue;
        }
        let patch = TypedModelPatch::replace_single_op(model, node, &node.inputs, op)?;
        patch.apply(model)?;
        replaced += 1;
    }
    Ok(replaced)
}

#[cfg(test)]
mod tests;
