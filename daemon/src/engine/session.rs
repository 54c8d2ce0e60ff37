//! Per-request model state: the KV cache and a tract run state of its own.

use std::sync::Arc;

use tract_onnx::prelude::*;

use super::error::RequestError;
use super::forward::{empty_cache, feed, logits};
use super::model::Model;
use super::ops::kv_cache;
use super::prefix_cache::PrefixCache;
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
    /// Earlier prompts' caches to start from, and to keep this session's prompts in.
    prefixes: Option<Arc<PrefixCache>>,
}

impl Session {
    pub(crate) fn new(model: Arc<Model>) -> TractResult<Self> {
        let state = model.plan.spawn()?;
        let mut s = Self { model, state, past: tvec!(), len: 0, ids: Vec::new(), profile: None, prefixes: None };
        s.reset()?;
        Ok(s)
    }

    /// From now on, prompts start from the longest matching entry of `cache` when it covers
    /// more than the template head, and each prompt's cache is offered to it after prefill.
    pub fn share_prefixes(&mut self, cache: Arc<PrefixCache>) {
        self.prefixes = Some(cache);
    }

    /// Forgets every token fed so far.
    pub(crate) fn reset(&mut self) -> TractResult<()> {
        self.restart(None, 0)
    }

    /// Starts over from the first `n` positions of the cache `from` (none: from nothing),
    /// keeping this session's cache buffers where they have room (see
    /// [`kv_cache::restarted`]).
    fn restart(&mut self, from: Option<&TVec<TValue>>, n: usize) -> TractResult<()> {
        let old = std::mem::take(&mut self.past);
        let limit = self.model.context_length();
        let from = |i: usize| from.map(|kv| &kv[i]);
        let past: TractResult<TVec<TValue>> = if old.len() == 2 * self.model.manifest.architecture.num_layers {
            old.into_iter().enumerate().map(|(i, own)| kv_cache::restarted(own, from(i), n, limit)).collect()
        } else {
            // A new session, or one whose last start failed: nothing to keep.
            let empty = empty_cache(&self.model.manifest.architecture)?;
            empty.into_iter().enumerate().map(|(i, own)| kv_cache::restarted(own, from(i), n, limit)).collect()
        };
        // A failed start leaves no cache at all, so the next one starts from nothing.
        self.len = 0;
        self.past = past?;
        self.len = n;
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

    /// Starts over with `prompt` as the daemon does (reusing the prefilled template head or a
    /// shared prompt cache, see [`Session::prefill`]) and returns a copy of the last
    /// position's logits and how many prompt tokens were reused rather than fed.
    pub fn forward_prompt(&mut self, prompt: &[u32]) -> Result<(Vec<f32>, usize), RequestError> {
        let fed = self.prefill(prompt, usize::MAX, &mut || true).map_err(inference)?;
        let (out, reused) = fed.ok_or(RequestError::EmptyQuery)?;
        Ok((logits(&out).map(|l| l.to_vec()).map_err(inference)?, reused))
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

    /// Starts over with `prompt`: the part that the model's prefilled template head or an
    /// earlier prompt's cache (see [`Session::share_prefixes`]) covers is taken from there,
    /// whichever covers more; the rest is fed `chunk` tokens per pass. Before every pass
    /// `proceed` is asked whether to go on; when it says no, the prefill stops and returns
    /// None. Otherwise returns the last prompt token's logits and how many prompt tokens were
    /// reused, and offers the prompt's cache to the shared one. Chunks and reuse change the
    /// logits only by float rounding (the same products, blocked differently).
    pub(crate) fn prefill(&mut self, prompt: &[u32], chunk: usize, proceed: &mut dyn FnMut() -> bool) -> TractResult<Option<(TValue, usize)>> {
        let head = self.model.prefix.reusable(prompt);
        let hit = self.prefixes.as_ref().and_then(|c| c.lookup(prompt)).filter(|h| h.tokens > head);
        let reused = match hit {
            Some(h) => {
                self.restart(Some(h.prefix.kv()), h.tokens)?;
                h.tokens
            }
            None if head > 0 => {
                let model = self.model.clone();
                self.restart(Some(model.prefix.kv()), head)?;
                head
            }
            None => {
                self.reset()?;
                0
            }
        };
        let mut out = None;
        for piece in prompt[reused..].chunks(chunk.max(1)) {
            if !proceed() {
                return Ok(None);
            }
            out = Some(self.step(piece)?);
        }
        if let Some(cache) = &self.prefixes {
            cache.keep(prompt, &self.past, prompt.len() - head);
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
