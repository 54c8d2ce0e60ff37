//! Rotary position embedding in one pass over the activation.
//!
//! Why: tract-transformers' `ApplyRope` evaluates `x · cos + rotate_half(x) · sin` as four
//! tensor ops: a rotated copy, two products that broadcast `cos` and `sin` over the heads
//! through tract's generic loop, and a sum. In `mulmd probe --profile` it took 2.4–2.8 ms of
//! SmolLM2 q4's prompt and 0.14–0.15 ms of each decode step (0.04–0.05 of mulm-28m q4's
//! ~0.7 ms step), for one multiply-add per value.
//!
//! Contract, for `x` of shape `[…, positions, d]` and `cos`, `sin` of shape
//! `[1…, positions, d]` (`d` even, `h = d / 2`): per position,
//! `y[j] = x[j] · cos[j] − x[j + h] · sin[j]` and `y[j + h] = x[j + h] · cos[j + h] +
//! x[j] · sin[j + h]` for `j < h`, each a float32 product then a sum, no fused multiply-add:
//! the same rounding as `ApplyRope`, so the two agree to the bit. Other shapes stay with
//! tract's op.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_transformers::ops::apply_rope::ApplyRope;

use super::op_swap::swap_ops;

/// See the module contract (`Rope` in profiles).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rope;

impl Op for Rope {
    fn name(&self) -> StaticName {
        "Rope".into()
    }

    op_as_typed_op!();
}

impl EvalOp for Rope {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (x, cos, sin) = args_3!(inputs);
        let shape = x.shape();
        let d = shape.last().copied().unwrap_or(0);
        ensure!(
            d > 0 && d % 2 == 0 && tables_fit(shape, cos.shape()) && tables_fit(shape, sin.shape()),
            "Rope: tables {:?} and {:?} do not fit an input of shape {shape:?} (they must be [1…, positions, d], d even)",
            cos.shape(),
            sin.shape()
        );
        // SAFETY: f32 has no invalid bit patterns, and `rotate` writes every value.
        let mut y = unsafe { Tensor::uninitialized::<f32>(shape)? };
        let (x_ram, cos_ram, sin_ram) = (x.try_as_plain_ram()?, cos.try_as_plain_ram()?, sin.try_as_plain_ram()?);
        let mut y_ram = y.try_as_plain_ram_mut()?;
        let (cos, sin) = (cos_ram.as_slice::<f32>()?, sin_ram.as_slice::<f32>()?);
        rotate(x_ram.as_slice::<f32>()?, cos, sin, y_ram.as_slice_mut::<f32>()?, d);
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for Rope {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.iter().all(|f| f.datum_type == f32::datum_type()), "Rope reads float32");
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    as_op!();
}

/// Whether a table of shape `table` (rope's `cos` or `sin`, attention's mask) fits `x` of
/// shape `x`: the same rank, unit axes but for the last two, which equal `x`'s.
pub(super) fn tables_fit<D: PartialEq + From<usize> + Clone>(x: &[D], table: &[D]) -> bool {
    let rank = x.len();
    let one = D::from(1);
    rank >= 2
        && table.len() == rank
        && table[..rank - 2].iter().all(|d| *d == one)
        && table[rank - 2..] == x[rank - 2..]
}

/// `y = rope(x)` for `x` and `y` of rows of `d` values and tables `cos`, `sin` of one row per
/// position: the rows of `x` run through the positions once per head (and batch).
fn rotate(x: &[f32], cos: &[f32], sin: &[f32], y: &mut [f32], d: usize) {
    if cos.is_empty() {
        return;
    }
    for (x, y) in x.chunks_exact(cos.len()).zip(y.chunks_exact_mut(cos.len())) {
        let rows = x.chunks_exact(d).zip(y.chunks_exact_mut(d));
        for ((x, y), (cos, sin)) in rows.zip(cos.chunks_exact(d).zip(sin.chunks_exact(d))) {
            rotate_row(x, cos, sin, y);
        }
    }
}

/// One row: its two halves swap places, the first negated, as the contract says.
#[inline]
fn rotate_row(x: &[f32], cos: &[f32], sin: &[f32], y: &mut [f32]) {
    let h = x.len() / 2;
    let (x1, x2) = x.split_at(h);
    let (c1, c2) = cos.split_at(h);
    let (s1, s2) = sin.split_at(h);
    let (y1, y2) = y.split_at_mut(h);
    for j in 0..h {
        y1[j] = x1[j] * c1[j] - x2[j] * s1[j];
        y2[j] = x2[j] * c2[j] + x1[j] * s2[j];
    }
}

/// Replaces every float32 `ApplyRope` whose tables fit the contract by a [`Rope`]. Returns
/// how many it replaced.
pub fn use_rope(model: &mut TypedModel) -> TractResult<usize> {
    swap_ops(model, &|model, node| {
        let fits = node.op_is::<ApplyRope>() && node.inputs.len() == 3 && fits_contract(model, node.id)?;
        Ok(fits.then(|| Box::new(Rope) as Box<dyn TypedOp>))
    })
}

/// Whether node `id`'s inputs are float32 with tables that fit the contract and an even width.
fn fits_contract(model: &TypedModel, id: usize) -> TractResult<bool> {
    let facts = model.node_input_facts(id)?;
    let x = &facts[0].shape;
    Ok(facts.iter().all(|f| f.datum_type == f32::datum_type())
        && tables_fit(x, &facts[1].shape)
        && tables_fit(x, &facts[2].shape)
        && x.last().and_then(|d| d.to_usize().ok()).is_some_and(|d| d > 0 && d % 2 == 0))
}

#[cfg(test)]
mod tests;
