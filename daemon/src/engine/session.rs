//! Per-request model state: the KV cache and a tract run state of its own.

use std::sync::Arc;

use tract_onnx::prelude::*;

use super::error::RequestError;
use super::forward::{empty_cache, feed, logits};
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
        self.past = empty_cache(&self.model.manifest.architecture)?;
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
    pub fn forward(&mut self, ids: &[u32]) -> Result<Vec<f32>, RequestError> {
        let out = self.step(ids).map_err(inference)?;
        logits(&out).map(|l| l.to_vec()).map_err(inference)
    }

    /// Starts over with `prompt` as the daemon does (reusing the prefilled template head,
    /// see [`Session::prefill`]) and returns a copy of the last position's logits.
    pub fn forward_prompt(&mut self, prompt: &[u32]) -> Result<Vec<f32>, RequestError> {
        let fed = self.prefill(prompt, usize::MAX, &mut || true).map_err(inference)?;
        let (out, _) = fed.ok_or(RequestError::EmptyQuery)?;
        logits(&out).map(|l| l.to_vec()).map_err(inference)
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
    /// from its shared cache, the rest is fed `chunk` tokens per pass. Before every pass
    /// `proceed` is asked whether to go on; when it says no, the prefill stops and returns
    /// None. Otherwise returns the last prompt token's logits and how many prompt tokens came
    /// from the cache. Chunks change the logits only by float rounding (the same products,
    /// blocked differently).
    pub(crate) fn prefill(&mut self, prompt: &[u32], chunk: usize, proceed: &mut dyn FnMut() -> bool) -> TractResult<Option<(TValue, usize)>> {
        let reused = self.model.prefix.reusable(prompt);
        if reused == 0 {
            self.reset()?;
        } else {
            self.past = self.model.prefix.kv(reused)?;
            self.len = reused;
        }
        let mut out = None;
        for piece in prompt[reused..].chunks(chunk.max(1)) {
            if !proceed() {
                return Ok(None);
            }
            out = Some(self.step(piece)?);
        }
        Ok(out.map(|o| (o, reused)))
    }
}

impl Model {
    /// A fresh session (empty KV cache) over this model.
    pub fn session(self: &Arc<Self>) -> Result<Session, RequestError> {
        Session::new(self.clone()).map_err(inference)
    }
}

/// A runtime error as a request's error.
fn inference(e: TractError) -> RequestError {
    RequestError::Inference(format!("{e:#}"))
}
