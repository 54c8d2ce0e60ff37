//! Per-request model state: the KV cache and a tract run state of its own.

use std::sync::Arc;

use tract_onnx::prelude::*;

use super::model::Model;
use super::profile::OpProfile;

/// Feeds tokens through the model, keeping the KV cache between calls.
pub struct Session {
    model: Arc<Model>,
    state: TypedSimpleState,
    past: TVec<TValue>,
    len: usize,
    ids: Vec<i64>,
    /// When set, every forward pass times its ops into it (`mulmd probe --profile`).
    pub(crate) profile: Option<OpProfile>,
}

impl Session {
    pub(crate) fn new(model: Arc<Model>) -> TractResult<Self> {
        let state = model.plan.spawn()?;
        let mut s = Self { model, state, past: tvec!(), len: 0, ids: Vec::new(), profile: None };
        s.reset()?;
        Ok(s)
    }

    /// Forgets every token fed so far.
    pub(crate) fn reset(&mut self) -> TractResult<()> {
        self.past = empty_cache(&self.model)?;
        self.len = 0;
        Ok(())
    }

    /// Tokens in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Feeds `ids` and returns a copy of the last position's logits (for tests and tools;
    /// the decode loop reads them in place through `step`).
    pub fn forward(&mut self, ids: &[u32]) -> Result<Vec<f32>, String> {
        let out = self.step(ids).map_err(|e| format!("{e:#}"))?;
        logits(&out).map(|l| l.to_vec()).map_err(|e| format!("{e:#}"))
    }

    /// Starts over with `prompt` as the daemon does (reusing the prefilled template head,
    /// see [`Session::prefill`]) and returns a copy of the last position's logits.
    pub fn forward_prompt(&mut self, prompt: &[u32]) -> Result<Vec<f32>, String> {
        let (out, _) = self.prefill(prompt).map_err(|e| format!("{e:#}"))?;
        logits(&out).map(|l| l.to_vec()).map_err(|e| format!("{e:#}"))
    }

    /// Feeds `ids` after everything fed so far; returns the logits for the last of them
    /// (read them with [`logits`]).
    pub(crate) fn step(&mut self, ids: &[u32]) -> TractResult<TValue> {
        let past = std::mem::take(&mut self.past);
        let mut outputs = feed(&mut self.state, &mut self.ids, ids, past, self.profile.as_mut())?;
        let logits = outputs.remove(0);
        self.past = outputs;
        self.len += ids.len();
        Ok(logits)
    }

    /// Starts over with `prompt`: the part the model's prefilled template head covers comes
    /// from its shared cache, the rest is fed. Returns the last prompt token's logits and how
    /// many prompt tokens came from the cache.
    pub(crate) fn prefill(&mut self, prompt: &[u32]) -> TractResult<(TValue, usize)> {
        let reused = self.model.prefix.reusable(prompt);
        if reused == 0 {
            self.reset()?;
        } else {
            self.past = self.model.prefix.kv(reused)?;
            self.len = reused;
        }
        Ok((self.step(&prompt[reused..])?, reused))
    }
}

/// A KV cache holding no tokens: `[1, kv_heads, 0, head_dim]` per layer and kind.
pub(crate) fn empty_cache(model: &Model) -> TractResult<TVec<TValue>> {
    let a = &model.manifest.architecture;
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

impl Model {
    /// A fresh session (empty KV cache) over this model.
    pub fn session(self: &Arc<Self>) -> Result<Session, String> {
        Session::new(self.clone()).map_err(|e| format!("{e:#}"))
    }
}
