//! Putting the engine's own matrix-product ops in place of tract's: finding each product of
//! an activation with a constant weight, whatever axes tract's decluttering left it with, and
//! rewiring it as a plain `[rows, k] → [rows, n]` product ([`WeightProduct`]).

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::konst::Const;

/// A constant weight of `n` outputs × `k` inputs laid out for one of the engine's kernels.
pub trait WeightMatrix: std::fmt::Debug + Send + Sync + 'static {
    /// The op's name in profiles (`mulmd probe --profile`).
    const OP_NAME: &'static str;
    fn n(&self) -> usize;
    fn k(&self) -> usize;
    /// `out[r, j] = Σ_i W[j, i] · a[r, i]` for `a` of `m` rows of `k` and `out` of `m` rows
    /// of `n`, row-major; every value of `out` is written.
    fn matmul(&self, a: &[f32], m: usize, out: &mut [f32]);
}

/// `y[1…, .., n] = Σ_i W[n, i] · x[.., i]` for a float32 `x` of any rank, as `W`'s kernel
/// computes, with `lead` unit axes ahead of `x`'s.
///
/// Why the unit axes are the op's: a model's output projections feed residual adds whose
/// operands carry a unit batch axis the product's activation lacks. Added by tract's
/// `AddAxis`, that axis gets a stride tract's vectorized element-wise kernels refuse, and
/// SmolLM2's prompt spent 2.4 ms in the generic fallback's residual adds.
#[derive(Debug)]
pub struct WeightProduct<W: WeightMatrix> {
    pub weights: Arc<W>,
    pub lead: usize,
}

impl<W: WeightMatrix> Clone for WeightProduct<W> {
    fn clone(&self) -> Self {
        Self { weights: self.weights.clone(), lead: self.lead }
    }
}

impl<W: WeightMatrix> PartialEq for WeightProduct<W> {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.weights, &other.weights) && self.lead == other.lead
    }
}
impl<W: WeightMatrix> Eq for WeightProduct<W> {}

impl<W: WeightMatrix> Op for WeightProduct<W> {
    fn name(&self) -> StaticName {
        W::OP_NAME.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{:?}", self.weights)])
    }

    op_as_typed_op!();
}

impl<W: WeightMatrix> EvalOp for WeightProduct<W> {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let shape = x.shape();
        let (n, k) = (self.weights.n(), self.weights.k());
        ensure!(shape.last() == Some(&k), "{}: input of shape {shape:?} does not end in the weight's {k} inputs", W::OP_NAME);
        let rows = shape[..shape.len() - 1].iter().product();
        let mut out_shape: TVec<usize> = tvec![1; self.lead];
        out_shape.extend_from_slice(&shape[..shape.len() - 1]);
        out_shape.push(n);
        // SAFETY: f32 has no invalid bit patterns, and `matmul` writes every value.
        let mut y = unsafe { Tensor::uninitialized::<f32>(&out_shape)? };
        let (x_view, mut y_view) = (x.try_as_plain_ram()?, y.try_as_plain_ram_mut()?);
        self.weights.matmul(x_view.as_slice::<f32>()?, rows, y_view.as_slice_mut::<f32>()?);
        Ok(tvec!(y.into_tvalue()))
    }
}

impl<W: WeightMatrix> TypedOp for WeightProduct<W> {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let x = inputs[0];
        ensure!(x.datum_type == f32::datum_type(), "{} reads float32, got {:?}", W::OP_NAME, x.datum_type);
        ensure!(x.rank() >= 1, "{} needs an input of rank ≥ 1", W::OP_NAME);
        let mut shape: TVec<TDim> = tvec![1.to_dim(); self.lead];
        shape.extend(x.shape.iter().take(x.rank() - 1).cloned());
        shape.push(self.weights.n().to_dim());
        Ok(tvec!(f32::fact(&shape)))
    }

    as_op!();
}

/// How a product reads its constant weight, so an op can lay the weight out for itself.
pub struct WeightAxes {
    /// Outputs: the size of the weight's one axis that goes to the product's output.
    pub n: usize,
    /// Inputs: the product of the contracted axes' sizes.
    pub k: usize,
    /// Position of the output axis among the weight's axes.
    pub n_axis: usize,
    /// Positions of the contracted axes among the weight's, in the weight's order: the
    /// activation's inputs are merged into one axis in this order, so input `i` of the
    /// product is the row-major index over these axes. The weight's other axes have size 1.
    pub contracted: Vec<usize>,
}

impl WeightAxes {
    /// Whether the weight is stored `[n, k]` up to unit axes: the output axis ahead of every
    /// contracted one, so each output's inputs are contiguous.
    pub fn outputs_first(&self) -> bool {
        self.contracted.iter().all(|&c| c > self.n_axis)
    }
}

/// Lays out a product's constant weight `weight`, read as `axes` say, for a kernel, or gives
/// `None` to leave that product to tract.
pub type MakeWeights<'a, W> = dyn Fn(&Tensor, &WeightAxes) -> TractResult<Option<W>> + 'a;

/// Replaces every float32 product of an activation with a constant weight that `make` lays
/// out by a [`WeightProduct`] of it, moving and merging axes around it where tract's
/// decluttering folded them into the product (an attention output read per head, a unit batch
/// axis dropped). Returns how many it replaced.
///
/// Replaced weights are dropped from the model every [`DROP_EVERY`] bytes or so, so loading
/// holds the original and the new form of a few weights at a time, not of all of them.
pub fn replace_products<W: WeightMatrix>(model: &mut TypedModel, label: &str, make: &MakeWeights<W>) -> TractResult<usize> {
    let mut replaced = 0;
    // Nodes whose product `make` declined, by name: node ids change when the model is compacted.
    let mut declined = std::collections::HashSet::new();
    loop {
        let mut undropped = 0;
        // Patches only add nodes, so the ids of this order stay valid until `compact`.
        for id in model.eval_order()? {
            if declined.contains(&model.node(id).name) {
                continue;
            }
            let Some((patch, weight_values)) = product_patch(model, id, label, make)? else {
                declined.insert(model.node(id).name.clone());
                continue;
            };
            patch.apply(model)?;
            replaced += 1;
            undropped += weight_values * 4;
            if undropped >= DROP_EVERY {
                break;
            }
        }
        // Drops the replaced products' weights: their last readers are gone.
        model.compact()?;
        if undropped < DROP_EVERY {
            return Ok(replaced);
        }
    }
}

/// Bytes of replaced float32 weights (or the float32 a quantized one stands for) after which
/// they are dropped: compacting the model costs a walk of the whole graph, too slow to run
/// after each of SmolLM2's 211 products, while this bounds what loading holds twice.
const DROP_EVERY: usize = 16 << 20;

/// The patch putting `make`'s op in place of node `id`, if `id` is a float32 einsum of an
/// activation with a constant whose axes are one output axis, contracted axes and unit axes;
/// and how many values the weight has.
fn product_patch<W: WeightMatrix>(
    model: &TypedModel,
    id: usize,
    label: &str,
    make: &MakeWeights<W>,
) -> TractResult<Option<(TypedModelPatch, usize)>> {
    let node = model.node(id);
    let Some(einsum) = node.op_as::<EinSum>() else { return Ok(None) };
    if node.inputs.len() != 2 || einsum.q_params.is_some() || einsum.operating_dt != f32::datum_type() {
        return Ok(None);
    }
    let Some(konst) = model.node(node.inputs[1].node).op_as::<Const>() else { return Ok(None) };
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
    // The weight: one output axis n, contracted axes, unit axes.
    let mut n_axis = None;
    let mut contracted = vec![];
    for (pos, c) in w_order.iter().enumerate() {
        match (in_x(c), in_y(c)) {
            (true, false) => contracted.push(pos),
            (false, true) if n_axis.is_none() => n_axis = Some(pos),
            (false, false) if w_shape[pos] == 1 => {}
            _ => return Ok(None),
        }
    }
    let Some(n_axis) = n_axis else { return Ok(None) };
    if contracted.is_empty() {
        return Ok(None);
    }
    let contracted_reprs: Vec<char> = contracted.iter().map(|&p| w_order[p]).collect();
    // The activation's other axes go through to the output (or are unit and dropped).
    let x_dim = |c: char| x.shape[x_order.iter().position(|x| *x == c).expect("axis of x")].clone();
    let batch: Vec<char> = x_order.iter().copied().filter(|c| !contracted_reprs.contains(c)).collect();
    if batch.iter().any(|c| !in_y(c) && x_dim(*c) != 1.to_dim()) {
        return Ok(None);
    }
    let k = contracted.iter().map(|&p| w_shape[p]).product();
    let weight_axes = WeightAxes { n: w_shape[n_axis], k, n_axis, contracted };
    let Some(weights) = make(konst.val(), &weight_axes)? else { return Ok(None) };

    let mut patch = TypedModelPatch::default();
    let mut wire = patch.tap_model(model, node.inputs[0])?;
    let mut order = x_order.clone();
    let name = &node.name;
    // Activation: its batch axes in their order, then the contracted ones in the weight's
    // order, merged into one.
    for (to, c) in batch.iter().chain(&contracted_reprs).enumerate() {
        let from = order.iter().position(|o| o == c).expect("axis of x");
        if from != to {
            wire = patch.wire_node(format!("{name}.{label}_in_{to}"), AxisOp::Move(from, to), &[wire])?[0];
            let c = order.remove(from);
            order.insert(to, c);
        }
    }
    if contracted_reprs.len() != 1 {
        let dims = contracted_reprs.iter().map(|c| x_dim(*c)).collect();
        wire = patch.wire_node(format!("{name}.{label}_k"), AxisOp::Reshape(batch.len(), dims, tvec!(k.to_dim())), &[wire])?[0];
    }
    order.truncate(batch.len());
    order.push(w_order[n_axis]);
    // The output's leading axes that the activation lacks are unit: the op puts them first.
    let lead = y_order.iter().take_while(|c| !order.contains(c)).count();
    order.splice(0..0, y_order[..lead].iter().copied());
    let op = WeightProduct { weights: Arc::new(weights), lead };
    wire = patch.wire_node(format!("{name}.{label}"), op, &[wire])?[0];
    // Output: drop unit axes it lacks, add the unit axes it has, then its order.
    while let Some(pos) = order.iter().position(|c| !in_y(c)) {
        wire = patch.wire_node(format!("{name}.{label}_rm_{pos}"), AxisOp::Rm(pos), &[wire])?[0];
        order.remove(pos);
    }
    for c in &y_order {
        if !order.contains(c) {
            wire = patch.wire_node(format!("{name}.{label}_add_{c}"), AxisOp::Add(order.len()), &[wire])?[0];
            order.push(*c);
        }
    }
    for (to, c) in y_order.iter().enumerate() {
        let from = order.iter().position(|o| o == c).expect("every output axis is placed");
        if from != to {
            wire = patch.wire_node(format!("{name}.{label}_out_{to}"), AxisOp::Move(from, to), &[wire])?[0];
            let c = order.remove(from);
            order.insert(to, c);
        }
    }
    ensure!(
        patch.outlet_fact(wire)?.shape == y.shape,
        "{label} rewrite of {name}: shape {:?}, expected {:?}",
        patch.outlet_fact(wire)?.shape,
        y.shape
    );
    patch.shunt_outside(model, node.id.into(), wire)?;
    Ok(Some((patch, weight_axes.n * weight_axes.k)))
}
