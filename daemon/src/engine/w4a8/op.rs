//! The W4A8 product as a tract op, and the graph rewrite that puts it in place of tract's own
//! 4-bit matrix products.

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::tract_data::dyn_eq::DynEq;
use tract_linalg::block_quant::{BlockQuantStorage, Q4_0};

use super::Weights;

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
/// tract-onnx makes of a MatMulNBits with 4 bits and blocks of 32) by a [`W4A8MatMul`],
/// moving and merging axes around it where tract's decluttering folded them into the product
/// (an attention output read per head, a unit batch axis dropped). Returns how many it
/// replaced; products of any other form are left to tract.
pub fn use_w4a8_products(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in model.eval_order()? {
        if let Some(patch) = w4a8_patch(model, id)? {
            patch.apply(model)?;
            replaced += 1;
        }
    }
    Ok(replaced)
}

/// The patch putting a [`W4A8MatMul`] in place of node `id`, if `id` is an einsum of an
/// activation with a Q4_0 constant whose storage order is `[n, contracted axes…]`.
fn w4a8_patch(model: &TypedModel, id: usize) -> TractResult<Option<TypedModelPatch>> {
    let node = model.node(id);
    let Some(einsum) = node.op_as::<EinSum>() else { return Ok(None) };
    if node.inputs.len() != 2 || einsum.q_params.is_some() || einsum.operating_dt != f32::datum_type() {
        return Ok(None);
    }
    let Some(konst) = model.node(node.inputs[1].node).op_as::<Const>() else { return Ok(None) };
    let Some(storage) = konst.val().storage_as::<BlockQuantStorage>() else { return Ok(None) };
    if !DynEq::dyn_eq(storage.format(), &Q4_0) {
        return Ok(None);
    }
    let x = model.outlet_fact(node.inputs[0])?.clone();
    let y = model.outlet_fact(node.id.into())?.clone();
    if x.datum_type != f32::datum_type() || y.datum_type != f32::datum_type() {
        return Ok(None);
    }
    let w_shape = konst.val().shape().to_vec();
    let axes = &einsum.axes;
    let repr_at = |slot: InOut, pos: usize| axes.axis((slot, pos)).map(|a| a.repr);
    let x_order: Vec<char> = (0..x.rank()).map(|p| repr_at(InOut::In(0), p)).collect::<TractResult<_>>()?;
    let w_order: Vec<char> = (0..w_shape.len()).map(|p| repr_at(InOut::In(1), p)).collect::<TractResult<_>>()?;
    let y_order: Vec<char> = (0..y.rank()).map(|p| repr_at(InOut::Out(0), p)).collect::<TractResult<_>>()?;
    let in_x = |c: &char| x_order.contains(c);
    let in_y = |c: &char| y_order.contains(c);
    // The weight: unit axes anywhere, then its one output axis n ahead of the contracted ones,
    // so that its blocks, row-major [n, K], run through the contracted axes in its order.
    let mut n_axis = None;
    let mut contracted = vec![];
    for (pos, c) in w_order.iter().enumerate() {
        match (in_x(c), in_y(c)) {
            (true, false) if n_axis.is_some() => contracted.push(*c),
            (false, true) if n_axis.is_none() && contracted.is_empty() => n_axis = Some(*c),
            (false, false) if w_shape[pos] == 1 => {}
            _ => return Ok(None),
        }
    }
    let Some(n_axis) = n_axis else { return Ok(None) };
    // The activation's other axes go through to the output (or are unit and dropped).
    let x_dim = |c: char| x.shape[x_order.iter().position(|x| *x == c).expect("axis of x")].clone();
    let batch: Vec<char> = x_order.iter().copied().filter(|c| !contracted.contains(c)).collect();
    if batch.iter().any(|c| !in_y(c) && x_dim(*c) != 1.to_dim()) {
        return Ok(None);
    }
    let Ok(k) = contracted.iter().map(|c| x_dim(*c).to_usize()).product::<Result<usize, _>>() else { return Ok(None) };
    let n = w_shape[w_order.iter().position(|c| *c == n_axis).expect("n is the weight's")];
    let weights = Weights::from_q4_0_blocks(storage.value(), n, k).map_err(|e| anyhow::anyhow!(e))?;

    let mut patch = TypedModelPatch::default();
    let mut wire = patch.tap_model(model, node.inputs[0])?;
    let mut order = x_order.clone();
    let name = &node.name;
    // Activation: its batch axes in their order, then the contracted ones in the weight's
    // order, merged into one.
    for (to, c) in batch.iter().chain(&contracted).enumerate() {
        let from = order.iter().position(|o| o == c).expect("axis of x");
        if from != to {
            wire = patch.wire_node(format!("{name}.w4a8_in_{to}"), AxisOp::Move(from, to), &[wire])?[0];
            let c = order.remove(from);
            order.insert(to, c);
        }
    }
    if contracted.len() != 1 {
        let dims = contracted.iter().map(|c| x_dim(*c)).collect();
        wire = patch.wire_node(format!("{name}.w4a8_k"), AxisOp::Reshape(batch.len(), dims, tvec!(k.to_dim())), &[wire])?[0];
    }
    order.truncate(batch.len());
    wire = patch.wire_node(format!("{name}.w4a8"), W4A8MatMul { weights: Arc::new(weights) }, &[wire])?[0];
    order.push(n_axis);
    // Output: drop unit axes it lacks, add the unit axes it has, then its order.
    while let Some(pos) = order.iter().position(|c| !in_y(c)) {
        wire = patch.wire_node(format!("{name}.w4a8_rm_{pos}"), AxisOp::Rm(pos), &[wire])?[0];
        order.remove(pos);
    }
    for c in &y_order {
        if !order.contains(c) {
            wire = patch.wire_node(format!("{name}.w4a8_add_{c}"), AxisOp::Add(order.len()), &[wire])?[0];
            order.push(*c);
        }
    }
    for (to, c) in y_order.iter().enumerate() {
        let from = order.iter().position(|o| o == c).expect("every output axis is placed");
        if from != to {
            wire = patch.wire_node(format!("{name}.w4a8_out_{to}"), AxisOp::Move(from, to), &[wire])?[0];
            let c = order.remove(from);
            order.insert(to, c);
        }
    }
    ensure!(patch.outlet_fact(wire)?.shape == y.shape, "W4A8 rewrite of {name}: shape {:?}, expected {:?}", patch.outlet_fact(wire)?.shape, y.shape);
    patch.shunt_outside(model, node.id.into(), wire)?;
    Ok(Some(patch))
}
