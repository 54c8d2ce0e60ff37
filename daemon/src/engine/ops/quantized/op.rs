//! The W4A8 weights as a tract op's, and what puts them in place of tract's own 4-bit matrix
//! products.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::tract_data::dyn_eq::DynEq;
use tract_linalg::block_quant::{BlockQuantStorage, Q4_0};

use super::Weights;
use crate::engine::ops::product_rewrite::{replace_products, WeightMatrix};

impl WeightMatrix for Weights {
    const OP_NAME: &'static str = "W4A8MatMul";

    fn n(&self) -> usize {
        self.n
    }

    fn k(&self) -> usize {
        self.k
    }

    fn matmul(&self, a: &[f32], m: usize, out: &mut [f32]) {
        Weights::matmul(self, a, m, out)
    }
}

/// Replaces every product of a float32 activation with a constant Q4_0 weight (what
/// tract-onnx makes of a MatMulNBits with 4 bits and blocks of 32) stored `[n, k]` by a
/// [`WeightProduct`](crate::engine::ops::product_rewrite::WeightProduct) of these [`Weights`]
/// (`W4A8MatMul` in profiles). Returns how many it replaced; products of any other form are
/// left to tract.
pub fn use_w4a8_products(model: &mut TypedModel) -> TractResult<usize> {
    replace_products(model, "w4a8", &|weight, axes| {
        let Some(storage) = weight.storage_as::<BlockQuantStorage>() else { return Ok(None) };
        // Blocks run along the weight's last axes: its rows are outputs only if n comes first.
        if !DynEq::dyn_eq(storage.format(), &Q4_0) || !axes.outputs_first() {
            return Ok(None);
        }
        Weights::from_q4_0_blocks(storage.value(), axes.n, axes.k).map(Some).map_err(|e| anyhow::anyhow!(e))
    })
}
