//! The W4A8 product as a tract op, and what puts it in place of tract's own 4-bit matrix
//! products.

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::tract_data::dyn_eq::DynEq;
use tract_linalg::block_quant::{BlockQuantStorage, Q4_0};

use super::Weights;
use crate::engine::product_rewrite::replace_products;

/// `y[.., n] = Σ_k W[n, k] · x[.., k]` for a float32 `x` of any rank, under the W4A8 contract.
#[derive(Debug, Clone)]
pub struct W4A8MatMul {
    weights: Arc<Weights>,
}

impl PartialEq for W4A8MatMul {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.weights, &other.weights)
    }
}
impl Eq for W4A8MatMul {}

impl Op for W4A8MatMul {
    fn name(&self) -> StaticName {
        "W4A8MatMul".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{:?}", self.weights)])
    }

    op_as_typed_op!();
}

impl EvalOp for W4A8MatMul {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let shape = x.shape();
        ensure!(
            shape.last() == Some(&self.weights.k),
            "W4A8MatMul: input of shape {shape:?} does not end in the weight's {} inputs",
            self.weights.k
        );
        let rows = shape[..shape.len() - 1].iter().product();
        let mut out_shape: TVec<usize> = shape.into();
        *out_shape.last_mut().expect("rank checked above") = self.weights.n;
        let mut y = Tensor::zero::<f32>(&out_shape)?;
        let (x_view, mut y_view) = (x.try_as_plain_ram()?, y.try_as_plain_ram_mut()?);
        self.weights.matmul(x_view.as_slice::<f32>()?, rows, y_view.as_slice_mut::<f32>()?);
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for W4A8MatMul {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let x = inputs[0];
        ensure!(x.datum_type == f32::datum_type(), "W4A8MatMul reads float32, got {:?}", x.datum_type);
        let mut shape: TVec<TDim> = x.shape.to_tvec();
        *shape.last_mut().context("W4A8MatMul needs an input of rank ≥ 1")? = self.weights.n.to_dim();
        Ok(tvec!(f32::fact(&shape)))
    }

    as_op!();
}

/// Replaces every product of a float32 activation with a constant Q4_0 weight (what
/// tract-onnx makes of a MatMulNBits with 4 bits and blocks of 32) stored `[n, k]` by a
/// [`W4A8MatMul`]. Returns how many it replaced; products of any other form are left to tract.
pub fn use_w4a8_products(model: &mut TypedModel) -> TractResult<usize> {
    replace_products(model, "w4a8", &|weight, axes| {
        let Some(storage) = weight.storage_as::<BlockQuantStorage>() else { return Ok(None) };
        // Blocks run along the weight's last axes: its rows are outputs only if n comes first.
        if !DynEq::dyn_eq(storage.format(), &Q4_0) || !axes.outputs_first() {
            return Ok(None);
        }
        let weights = Weights::from_q4_0_blocks(storage.value(), axes.n, axes.k).map_err(|e| anyhow::anyhow!(e))?;
        Ok(Some(Box::new(W4A8MatMul { weights: Arc::new(weights) })))
    })
}
