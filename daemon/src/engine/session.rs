//! Per-request model state: the KV cache and a tract run state of its own.

use std::sync::Arc;

use tract_onnx::prelude::*;

use super::model::Model;

/// Feeds tokens through the model, keeping the KV cache between calls.
pub struct Session {
    model: Arc<Model>,
    state: TypedSimpleState,
    past: TVec<TValue>,
    len: usize,
    ids: Vec<i64>,
}

impl Session {
    pub(crate) fn new(model: Arc<Model>) -> TractResult<Self> {
        let state = model.plan.spawn()?;
        let mut s = Self { model, state, past: tvec!(), len: 0, ids: Vec::new() };
        s.reset()?;
        Ok(s)
    }

    /// Forgets every token fed so far.
    pub(crate) fn reset(&mut self) -> TractResult<()> {
        let a = &self.model.manifest.architecture;
        let empty: TValue = Tensor::zero::<f32>(&[1, a.num_kv_heads, 0, a.head_dim])?.into_tvalue();
        self.past = (0..2 * a.num_layers).map(|_| empty.clone()).collect();
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

    /// Feeds `ids` after everything fed so far; returns the logits for the last of them
    /// (read them with [`logits`]).
    pub(crate) fn step(&mut self, ids: &[u32]) -> TractResult<TValue> {
        self.ids.clear();
        self.ids.extend(ids.iter().map(|&i| i as i64));
        let input = Tensor::from_shape(&[1, ids.len()], &self.ids)?.into_tvalue();
        let mut inputs: TVec<TValue> = tvec!(input);
        inputs.extend(self.past.drain(..));
        let mut outputs = self.state.run(inputs)?;
        let logits = outputs.remove(0);
        self.past = outputs;
        self.len += ids.len();
        Ok(logits)
    }
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
