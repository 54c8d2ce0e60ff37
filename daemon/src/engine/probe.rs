//! Raw speed of the engine for benchmarks: greedy decoding of a fixed number of tokens with
//! a timestamp per token (end-of-text ignored), so runtimes can be compared token for token.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::error::RequestError;
use super::model::Model;
use super::profile::OpProfile;
use super::sampling::argmax;
use super::forward::logits;
use super::session::Session;

#[derive(Debug, Clone, Serialize)]
pub struct ProbeRun {
    pub prompt_tokens: usize,
    /// Prompt tokens taken from the prefilled template head instead of being fed (0: cold).
    pub reused_tokens: usize,
    /// Template rendering and tokenization.
    pub tokenize_ms: f64,
    /// The prompt's forward pass alone.
    pub prefill_ms: f64,
    /// For each generated token, ms from the start of the run (text handed over) until it
    /// was chosen; the first entry is the time to first token.
    pub token_ms: Vec<f64>,
    pub tokens: Vec<u32>,
    /// Per-op time of this run's prompt pass and decode steps (with `profile`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<RunProfile>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunProfile {
    pub prefill: OpProfile,
    pub decode: OpProfile,
}

/// How a probe run goes.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProbeOptions {
    /// Greedy tokens to decode (end-of-text ignored).
    pub tokens: usize,
    /// Start from the model's prefilled template head as the daemon does, instead of feeding
    /// the whole prompt (a cold prompt, as the peers are measured).
    pub reuse_head: bool,
    /// Time every op of every pass (see [`OpProfile`]).
    pub profile: bool,
}

/// Renders `query` with the chat template, then decodes `opts.tokens` tokens greedily.
pub fn probe(model: &Arc<Model>, session: &mut Session, query: &str, opts: ProbeOptions) -> Result<ProbeRun, RequestError> {
    let ProbeOptions { tokens: n, reuse_head, profile } = opts;
    let err = |e: tract_onnx::prelude::TractError| RequestError::Inference(format!("{e:#}"));
    let start = Instant::now();
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
    let prompt = model.prompt_ids(None, query)?;
    let tokenize_ms = ms(start);
    if prompt.len() + n >= model.context_length() {
        return Err(RequestError::PromptTooLong { tokens: prompt.len() + n, limit: model.context_length(), setting: "the model's context (prompt and --tokens)" });
    }
    session.profile = profile.then(OpProfile::default);
    let t = Instant::now();
    let (out, reused_tokens) = if reuse_head {
        session.prefill(&prompt, usize::MAX, &mut || true).and_then(|fed| fed.ok_or_else(|| tract_onnx::prelude::TractError::msg("the prompt is empty")))
    } else {
        session.reset().and_then(|_| session.step(&prompt)).map(|out| (out, 0))
    }
    .map_err(err)?;
    let prefill_ms = ms(t);
    let prefill_profile = session.profile.as_mut().map(std::mem::take);
    let mut token = argmax(logits(&out).map_err(err)?);
    let mut token_ms = vec![ms(start)];
    let mut tokens = vec![token];
    while tokens.len() < n {
        let out = session.step(&[token]).map_err(err)?;
        token = argmax(logits(&out).map_err(err)?);
        token_ms.push(ms(start));
        tokens.push(token);
    }
    let profile = prefill_profile.zip(session.profile.take()).map(|(prefill, decode)| RunProfile { prefill, decode });
    Ok(ProbeRun { prompt_tokens: prompt.len(), reused_tokens, tokenize_ms, prefill_ms, token_ms, tokens, profile })
}
