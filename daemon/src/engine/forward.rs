//! One forward pass through the plan, and the pieces every caller of it needs: an empty KV
//! cache to start from (of the model's architecture) and the logits read in place. Shared by `Session` (per request) and
//! `Model` (the template head prefilled at load).

use tract_onnx::prelude::*;

use super::manifest::Architecture;
use super::profile::OpProfile;

/// A KV cache holding no tokens: `[1, kv_heads, 0, head_dim]` per layer and kind.
pub(crate) fn empty_cache(a: &Architecture) -> TractResult<TVec<TValue>> {
    let empty: TValue = Tensor::zero::<f32>(&[1, a.num_kv_heads, 0, a.head_dim])?.into_tvalue();
    Ok((0..2 * a.num_layers).map(|_| empty.clone()).collect())
}

/// One forward pass of `ids` (through `scratch`, reused to spare an allocation) after the
/// cache `past`; returns the logits followed by the new cache. With `profile`, each op's
/// evaluation is timed into it.
pub(crate) fn feed(
    state: &mut TypedSimpleState,
    scratch: &mut Vec<i64>,
    ids: &[u32],
    past: TVec<TValue>,
    profile: Option<&mut OpProfile>,
) -> TractResult<TVec<TValue>> {
    scratch.clear();
    scratch.extend(ids.iter().map(|&i| i as i64));
    let input = Tensor::from_shape(&[1, ids.len()], scratch)?.into_tvalue();
    let mut inputs: TVec<TValue> = tvec!(input);
    inputs.extend(past);
    let Some(profile) = profile else { return state.run(inputs) };
    profile.passes += 1;
    state.run_plan_with_eval(inputs, |ctx, op_state, node, inputs| {
        let t = std::time::Instant::now();
        let out = tract_onnx::tract_core::plan::eval(ctx, op_state, node, inputs);
        profile.add(&node.op.name(), t.elapsed());
        out
    })
}

/// The logits a `Session::step` returned, as a flat slice over the vocabulary.
pub(crate) fn logits(value: &TValue) -> TractResult<&[f32]> {
    value.try_as_plain_ram()?.as_slice::<f32>()
}
