//! Swapping one tract op for one of the engine's, node by node, with the same inputs: what
//! `rope` and `softmax` do to tract-transformers' ops.

use tract_onnx::prelude::*;

/// Given a model and one of its nodes, the op to put in the node's place (same inputs, same
/// output), or `None` to keep it.
pub type Swap<'a> = dyn Fn(&TypedModel, &TypedNode) -> TractResult<Option<Box<dyn TypedOp>>> + 'a;

/// Gives each node of `model` to `swap` and puts in what it returns. Returns how many were
/// swapped.
pub fn swap_ops(model: &mut TypedModel, swap: &Swap) -> TractResult<usize> {
    let mut swapped = 0;
    // A single-op patch keeps every other node's id, so this order stays valid.
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(op) = swap(model, node)? else { continue };
        let patch = TypedModelPatch::replace_single_op(model, node, &node.inputs, op)?;
        patch.apply(model)?;
        swapped += 1;
    }
    Ok(swapped)
}

/// Graphs of one op for the swaps' tests.
#[cfg(test)]
pub mod testing {
    use super::*;

    /// A model of `op` alone, one source per fact in `inputs`.
    pub fn one_op_model(op: impl Into<Box<dyn TypedOp>>, inputs: Vec<TypedFact>) -> TypedModel {
        let mut model = TypedModel::default();
        let sources: Vec<OutletId> = inputs.into_iter().enumerate().map(|(i, f)| model.add_source(format!("in{i}"), f).unwrap()).collect();
        let y = model.wire_node("op", op, &sources).unwrap()[0];
        model.select_output_outlets(&[y]).unwrap();
        model
    }

    /// `model`'s output for `inputs`, planned as it is (not re-optimized).
    pub fn run(model: TypedModel, inputs: &[Tensor]) -> Tensor {
        let plan = model.into_runnable().unwrap();
        plan.run(inputs.iter().map(|t| t.clone().into_tvalue()).collect()).unwrap().remove(0).into_tensor()
    }
}
