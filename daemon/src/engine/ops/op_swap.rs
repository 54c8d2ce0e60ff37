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
    use rand::Rng;

    use super::*;

    /// Floats drawn uniformly from `-bound..bound`, in `shape`.
    pub fn random(rng: &mut impl Rng, shape: &[usize], bound: f32) -> Tensor {
        let values: Vec<f32> = (0..shape.iter().product()).map(|_| rng.random_range(-bound..bound)).collect();
        Tensor::from_shape(shape, &values).unwrap()
    }

    /// Runs `model` (one `Old` op) on `inputs`, swaps the op with `swap`, and checks that
    /// exactly one node was swapped, no `Old` is left, and the output is the same to the bit.
    pub fn assert_swap_is_bit_equal<Old: Op>(
        mut model: TypedModel,
        inputs: &[Tensor],
        swap: impl FnOnce(&mut TypedModel) -> TractResult<usize>,
        case: &str,
    ) {
        let want = run(model.clone(), inputs);
        assert_eq!(swap(&mut model).unwrap(), 1, "{case}");
        assert!(!model.nodes().iter().any(|n| n.op_is::<Old>()), "{case}: tract's op is gone");
        assert_eq!(run(model, inputs), want, "{case}");
    }

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
