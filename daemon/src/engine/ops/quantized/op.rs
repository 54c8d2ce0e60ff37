//! The quantized weights as a tract op's, and what puts them in place of tract's own matrix
//! products of 4- and 8-bit block weights.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::tract_data::dyn_eq::DynEq;
use tract_linalg::block_quant::{BlockQuantStorage, Q4_0, Q8_1};

use super::{offsets, Weights};
use crate::engine::ops::product_rewrite::{replace_products, WeightMatrix};

impl WeightMatrix for Weights {
    const OP_NAME: &'static str = "QuantizedMatMul";

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

/// Replaces every product of a float32 activation with a constant block-quantized weight
/// stored `[n, k]` — Q4_0 (what tract-onnx makes of a MatMulNBits with 4 bits and blocks of
/// 32) or Q8_1 (what `load::matmul_nbits` makes of one with 8 bits) — by a
/// [`WeightProduct`](crate::engine::ops::product_rewrite::WeightProduct) of these [`Weights`]
/// (`QuantizedMatMul` in profiles), with the Q4_1 block offsets the loader attached to the
/// constant. Returns how many it replaced; products of any other form are left to tract.
pub fn use_quantized_products(model: &mut TypedModel) -> TractResult<usize> {
    let replaced = replace_products(model, "quantized", &|weight, axes| {
        let Some(storage) = weight.storage_as::<BlockQuantStorage>() else { return Ok(None) };
        // Blocks run along the weight's last axes: its rows are outputs only if n comes first.
        if !axes.outputs_first() {
            return Ok(None);
        }
        let weights = if DynEq::dyn_eq(storage.format(), &Q4_0) {
            Weights::from_q4_0_blocks(storage.value(), axes.n, axes.k)
        } else if DynEq::dyn_eq(storage.format(), &Q8_1) {
            Weights::from_q8_1_blocks(storage.value(), axes.n, axes.k)
        } else {
            return Ok(None);
        };
        let weights = match offsets::take(storage.value()) {
            Some(offsets) => weights.and_then(|w| w.with_offsets(offsets)),
            None => weights,
        };
        weights.map(Some).map_err(|e| anyhow::anyhow!(e))
    });
    // Offsets still attached belong to a product left to tract, which would compute it
    // without them: a wrong answer, not a slow one.
    let left = offsets::forget_all();
    anyhow::ensure!(left == 0, "{left} product(s) of Q4_1 weights took a form mulmd's kernels do not run; export the model again");
    replaced
}
