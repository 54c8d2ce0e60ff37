//! Attention's scaled, masked softmax, one row at a time.
//!
//! Why: tract-transformers' `ScaledMaskedSoftmax` builds a tensor for each step: the scores
//! times the scale, then the mask added (or applied), both through tract's generic
//! broadcasting loop, then the softmax. In `mulmd probe --profile` it took 1.8 ms of SmolLM2
//! q4's prompt and 0.10 ms of each decode step (0.025 of mulm-28m q4's ~0.6 ms step).
//!
//! Contract, for scores `x` of shape `[…, positions, keys]` and a mask of shape
//! `[1…, positions, keys]`: each row becomes `x · scale + mask` (a float32 product, then a
//! sum) for a float mask, or `x · scale` where a boolean mask is true and −∞ where it is
//! false; then the softmax over the row, on tract-linalg's kernels for the maximum, the sum
//! of exponentials and the final scaling, as tract's own softmax runs them. With
//! `post_softmax_mask`, a boolean mask's false positions end at 0. The result equals tract's
//! op to the bit (tested). Other shapes stay with tract's op.

use std::sync::Arc;

use tract_linalg::element_wise::ElementWise;
use tract_linalg::reduce::{MapReduce, Reduce};
use tract_linalg::routines::Func;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_transformers::ops::scaled_masked_softmax::ScaledMaskedSoftmax;

use super::op_swap::swap_ops;
use super::rope::tables_fit;

/// See the module contract (`MaskedSoftmax` in profiles).
#[derive(Debug, Clone)]
pub struct MaskedSoftmax {
    scale: f32,
    post_softmax_mask: bool,
    kernels: Arc<Kernels>,
}

/// tract-linalg's best kernels on this CPU for the three passes over a row.
#[derive(Debug)]
struct Kernels {
    max: Box<dyn Reduce<f32>>,
    exp_sum: Box<dyn MapReduce<f32, f32>>,
    scale: Box<dyn ElementWise<f32, f32>>,
}

impl MaskedSoftmax {
    pub(super) fn new(scale: f32, post_softmax_mask: bool) -> TractResult<Self> {
        let kernels = Kernels {
            max: Func::ReduceMax.reduce_f32()?,
            exp_sum: Func::Softmax2.map_reduce_f32()?,
            scale: Func::MulByScalar.ew_f32_param()?,
        };
        Ok(Self { scale, post_softmax_mask, kernels: Arc::new(kernels) })
    }

    /// The scale and whether masked positions are zeroed after, as `new` takes them.
    pub(super) fn attributes(&self) -> (f32, bool) {
        (self.scale, self.post_softmax_mask)
    }

    /// Softmax of one row in place, as tract's softmax computes it.
    fn normalize(&self, row: &mut [f32]) -> TractResult<()> {
        let max = self.kernels.max.run(row)?;
        let sum = self.kernels.exp_sum.run_with_params(row, max)?;
        self.kernels.scale.run_with_params(row, sum.recip())
    }

    /// One row of scores made probabilities in place under its row of the mask.
    pub(super) fn row(&self, row: &mut [f32], mask: MaskRow) -> TractResult<()> {
        match mask {
            MaskRow::Bool(keep) => {
                for (v, &keep) in row.iter_mut().zip(keep) {
                    *v = if keep { *v * self.scale } else { f32::NEG_INFINITY };
                }
                self.normalize(row)?;
                if self.post_softmax_mask {
                    row.iter_mut().zip(keep).filter(|(_, keep)| !**keep).for_each(|(v, _)| *v = 0.0);
                }
            }
            MaskRow::Float(add) => {
                for (v, add) in row.iter_mut().zip(add) {
                    *v = *v * self.scale + add;
                }
                self.normalize(row)?;
            }
        }
        Ok(())
    }
}

/// A float32 or boolean mask's values (see the module contract).
pub(super) enum Mask<'a> {
    Float(&'a [f32]),
    Bool(&'a [bool]),
}

/// One row of a [`Mask`].
#[derive(Clone, Copy)]
pub(super) enum MaskRow<'a> {
    Float(&'a [f32]),
    Bool(&'a [bool]),
}

impl<'a> Mask<'a> {
    pub(super) fn of(mask: &'a Tensor) -> TractResult<Self> {
        if mask.datum_type() == bool::datum_type() {
            Ok(Mask::Bool(mask.try_as_plain_ram()?.as_slice::<bool>()?))
        } else {
            Ok(Mask::Float(mask.try_as_plain_ram()?.as_slice::<f32>()?))
        }
    }

    /// The mask row that score row `r` (of `keys` scores) meets: the mask's rows in turn,
    /// starting over at its end. The mask must hold at least one row of `keys`.
    pub(super) fn row(&self, r: usize, keys: usize) -> MaskRow<'a> {
        match self {
            Mask::Float(v) => {
                let rows = v.len() / keys;
                MaskRow::Float(&v[(r % rows) * keys..][..keys])
            }
            Mask::Bool(v) => {
                let rows = v.len() / keys;
                MaskRow::Bool(&v[(r % rows) * keys..][..keys])
            }
        }
    }
}

impl PartialEq for MaskedSoftmax {
    fn eq(&self, other: &Self) -> bool {
        self.scale.to_bits() == other.scale.to_bits() && self.post_softmax_mask == other.post_softmax_mask
    }
}
impl Eq for MaskedSoftmax {}

impl Op for MaskedSoftmax {
    fn name(&self) -> StaticName {
        "MaskedSoftmax".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("scale {}, post-softmax mask {}", self.scale, self.post_softmax_mask)])
    }

    op_as_typed_op!();
}

impl EvalOp for MaskedSoftmax {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (x, mask) = args_2!(inputs);
        let keys = x.shape().last().copied().unwrap_or(0);
        ensure!(
            tables_fit(x.shape(), mask.shape()),
            "MaskedSoftmax: a mask of shape {:?} does not fit scores of shape {:?} (it must be [1…, positions, keys])",
            mask.shape(),
            x.shape()
        );
        let mut y = x.into_tensor();
        if keys == 0 {
            return Ok(tvec!(y.into_tvalue()));
        }
        let mut y_ram = y.try_as_plain_ram_mut()?;
        let rows = y_ram.as_slice_mut::<f32>()?.chunks_exact_mut(keys);
        let mask = Mask::of(&mask)?;
        // Score rows meet mask rows in turn, starting over at the mask's end.
        for (r, row) in rows.enumerate() {
            self.row(row, mask.row(r, keys))?;
        }
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for MaskedSoftmax {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs[0].datum_type == f32::datum_type(), "MaskedSoftmax reads float32 scores");
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    as_op!();
}

/// Replaces every `ScaledMaskedSoftmax` of float32 scores, a float32 or boolean mask that
/// fits the contract and a scalar scale by a [`MaskedSoftmax`]. Returns how many it replaced.
pub fn use_masked_softmax(model: &mut TypedModel) -> TractResult<usize> {
    swap_ops(model, &|model, node| {
        let Some(op) = node.op_as::<ScaledMaskedSoftmax>() else { return Ok(None) };
        if node.inputs.len() != 2 || op.scale.len() != 1 || !fits_contract(model, node.id)? {
            return Ok(None);
        }
        let scale = op.scale.cast_to_scalar::<f32>()?;
        Ok(Some(Box::new(MaskedSoftmax::new(scale, op.post_softmax_mask)?)))
    })
}

/// Whether node `id`'s scores are float32 and its mask, float32 or boolean, fits them.
fn fits_contract(model: &TypedModel, id: usize) -> TractResult<bool> {
    let facts = model.node_input_facts(id)?;
    let (x, mask) = (facts[0], facts[1]);
    Ok(x.datum_type == f32::datum_type()
        && (mask.datum_type == f32::datum_type() || mask.datum_type == bool::datum_type())
        && tables_fit(&x.shape, &mask.shape))
}

#[cfg(test)]
mod tests;
