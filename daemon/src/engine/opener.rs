//! Writing one opener: prompt → prefill → decode, words streamed as they complete.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::error::RequestError;
use super::model::Model;
use super::prompt::Prompt;
use super::sampling::{Sampler, Sampling};
use super::forward::logits;
use super::session::Session;
use super::words::{StopReason, Word, WordSplitter};

/// What the caller may choose per request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpenerOptions {
    pub min_words: usize,
    pub max_words: usize,
    /// Hard cap on generated tokens, whatever the word count.
    pub max_tokens: usize,
    pub sampling: Sampling,
    /// The voice policy: instead of stopping at a clause boundary after `min_words`, stop at
    /// the first sentence end once this many characters are out (`max_words` still caps it),
    /// so a speech pipeline that waits for a whole sentence of some length can speak the
    /// device's part alone (Home Assistant starts past 60 characters).
    pub sentence_chars: Option<usize>,
}

impl Default for OpenerOptions {
    fn default() -> Self {
        // 4–8 words: the range the paper found best for a hand-off (§1, Table 2).
        Self {
            min_words: 4,
            max_words: 8,
            max_tokens: 48,
            sampling: Sampling::default(),
            sentence_chars: None,
        }
    }
}

impl OpenerOptions {
    pub fn validate(&self) -> Result<(), RequestError> {
        if self.min_words == 0 || self.min_words > self.max_words {
            return Err(RequestError::InvalidOptions(format!(
                "min_words {} and max_words {} must satisfy 1 <= min_words <= max_words",
                self.min_words, self.max_words
            )));
        }
        if self.max_words > 64 {
            return Err(RequestError::InvalidOptions(format!(
                "max_words {} is above 64; an opener is the first few words of an answer",
                self.max_words
            )));
        }
        if self.sentence_chars.is_some_and(|n| n == 0 || n > 1000) {
            return Err(RequestError::InvalidOptions("sentence_chars must be 1..=1000 characters".into()));
        }
        if self.max_tokens == 0 || self.max_tokens > 512 {
            return Err(RequestError::InvalidOptions(format!("max_tokens {} is outside 1..=512", self.max_tokens)));
        }
        self.sampling.validate()
    }
}

/// A word of the opener, as the event stream reports it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WordEvent {
    pub index: usize,
    /// The word as written, without surrounding whitespace.
    pub text: String,
    /// Whitespace that separates it from the previous word ("" for the first).
    pub leading: String,
    /// Time since the request arrived.
    #[serde(serialize_with = "ms")]
    pub at: Duration,
}

/// Timings of one opener, each measured from the request's arrival unless named otherwise.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct OpenerTimings {
    /// Waiting in the queue before a worker took the request.
    #[serde(serialize_with = "ms")]
    pub queued: Duration,
    /// Rendering the chat template and tokenizing (duration).
    #[serde(serialize_with = "ms")]
    pub tokenize: Duration,
    /// The prompt's forward pass (duration).
    #[serde(serialize_with = "ms")]
    pub prefill: Duration,
    /// Arrival to the first generated token.
    #[serde(serialize_with = "ms")]
    pub ttft: Duration,
    /// Arrival to the last word of the opener.
    #[serde(serialize_with = "ms")]
    pub opener: Duration,
    /// Arrival to the end of the work (including any token decoded past the last word).
    #[serde(serialize_with = "ms")]
    pub total: Duration,
}

/// The finished opener.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Opener {
    /// The words joined as the model wrote them (inner whitespace kept, none at either end).
    pub text: String,
    pub words: Vec<WordEvent>,
    pub stop: StopReason,
    pub timings: OpenerTimings,
    pub prompt_tokens: usize,
    /// Prompt tokens taken from the template head prefilled at load rather than fed; the
    /// prefill time covers only the other `prompt_tokens - reused_tokens`.
    pub reused_tokens: usize,
    pub generated_tokens: usize,
}

impl Opener {
    /// No opener at all (for an answer the device did not open).
    pub fn empty() -> Self {
        Self {
            text: String::new(),
            words: Vec::new(),
            stop: StopReason::EndOfText,
            timings: OpenerTimings::default(),
            prompt_tokens: 0,
            reused_tokens: 0,
            generated_tokens: 0,
        }
    }
}

/// What a request produces, in order: zero or more `Word`, then exactly one `Done` or `Error`.
#[derive(Debug, Clone, PartialEq)]
pub enum OpenerEvent {
    Word(WordEvent),
    Done(Opener),
    Error(RequestError),
}

fn ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

/// Runs one request to completion on the calling thread, sending words through `emit` as they
/// complete. Returns the opener, or the error that ended it (the caller turns either into the
/// request's one terminal event). Checked with `cancel` between forward passes.
pub fn write_opener(
    model: &Arc<Model>,
    session: &mut Session,
    prompt: &Prompt,
    opts: &OpenerOptions,
    arrived: Instant,
    cancel: &CancellationToken,
    emit: impl FnMut(WordEvent),
) -> Result<Opener, RequestError> {
    let t = Instant::now();
    let room = model.context_length().saturating_sub(opts.max_tokens + 1);
    let ids = model.tokens(prompt, room, "the model's context")?;
    let pass = Pass { chunk: usize::MAX, cancel, beat: &|| {} };
    let mut opener = write(model, session, &ids, prompt.continue_from.is_some(), opts, arrived, &pass, emit)?;
    opener.timings.tokenize = t.elapsed();
    Ok(opener)
}

/// How a request is run pass by pass: prompts are fed `chunk` tokens at a time, and between
/// any two forward passes `cancel` is checked and `beat` called (the watchdog's heartbeat).
pub(crate) struct Pass<'a> {
    pub chunk: usize,
    pub cancel: &'a CancellationToken,
    pub beat: &'a dyn Fn(),
}

impl Pass<'_> {
    /// Whether to go on; reports progress either way.
    fn proceed(&self) -> bool {
        (self.beat)();
        !self.cancel.is_cancelled()
    }
}

/// The work of [`write_opener`] on a tokenized prompt (`finish`: the prompt ends with text
/// already shown, to be finished to the end of its sentence).
#[allow(clippy::too_many_arguments)]
pub(crate) fn write(
    model: &Arc<Model>,
    session: &mut Session,
    prompt: &[u32],
    finish: bool,
    opts: &OpenerOptions,
    arrived: Instant,
    pass: &Pass,
    mut emit: impl FnMut(WordEvent),
) -> Result<Opener, RequestError> {
    let timings = OpenerTimings { queued: arrived.elapsed(), ..Default::default() };
    opts.validate()?;
    if prompt.is_empty() {
        // A finish with nothing left to finish (see `Model::tokens`).
        let timings = OpenerTimings { total: arrived.elapsed(), ..timings };
        return Ok(Opener { text: String::new(), words: Vec::new(), stop: StopReason::SentenceEnd, timings, prompt_tokens: 0, reused_tokens: 0, generated_tokens: 0 });
    }
    let limit = model.context_length();
    if prompt.len() + 1 >= limit {
        return Err(RequestError::PromptTooLong { tokens: prompt.len(), limit, setting: "the model's context" });
    }
    let inference = |e: tract_onnx::prelude::TractError| RequestError::Inference(format!("{e:#}"));
    let mut sampler = Sampler::new(opts.sampling.clone());
    let mut splitter = match (finish, opts.sentence_chars) {
        (true, _) => WordSplitter::to_sentence_end(opts.max_words),
        (false, Some(chars)) => WordSplitter::voice(chars, opts.max_words),
        (false, None) => WordSplitter::new(opts.min_words, opts.max_words),
    };
    let mut words: Vec<WordEvent> = Vec::with_capacity(opts.max_words);
    let mut text = String::new();
    let mut on_word = |w: Word, words: &mut Vec<WordEvent>| {
        let ev = WordEvent { index: words.len(), leading: w.leading, text: w.text, at: arrived.elapsed() };
        if !words.is_empty() {
            text.push_str(&ev.leading);
        }
        text.push_str(&ev.text);
        emit(ev.clone());
        words.push(ev);
    };

    let mut timings = timings;
    let t = Instant::now();
    let Some((out, reused_tokens)) = session.prefill(prompt, pass.chunk, &mut || pass.proceed()).map_err(inference)? else {
        return Err(RequestError::Cancelled);
    };
    timings.prefill = t.elapsed();
    let mut token = sampler.pick(logits(&out).map_err(inference)?);
    timings.ttft = arrived.elapsed();

    let mut generated: Vec<u32> = Vec::with_capacity(opts.max_tokens);
    let mut decoded_len = 0usize;
    let stop = loop {
        if !pass.proceed() {
            return Err(RequestError::Cancelled);
        }
        if model.stop_ids.contains(&token) {
            break StopReason::EndOfText;
        }
        generated.push(token);
        // Decode everything generated so far and take the new tail, holding it back while it
        // ends inside a multi-byte character (the tokenizer then yields U+FFFD). Bytes that
        // can never form a character (U+FFFD inside the text) are dropped, not shown.
        let decoded = model.tokenizer.decode(&generated, true).map_err(|e| RequestError::Inference(e.to_string()))?;
        if !decoded.ends_with('\u{FFFD}') && decoded.len() > decoded_len && decoded.is_char_boundary(decoded_len) {
            let piece = decoded[decoded_len..].replace('\u{FFFD}', "");
            decoded_len = decoded.len();
            if let Some(reason) = splitter.push(&piece, |w| on_word(w, &mut words)) {
                break reason;
            }
        }
        if generated.len() >= opts.max_tokens {
            break StopReason::TokenCap;
        }
        if session.len() + 1 >= limit {
            break StopReason::ContextFull;
        }
        let out = session.step(&[token]).map_err(inference)?;
        token = sampler.pick(logits(&out).map_err(inference)?);
    };
    if !matches!(stop, StopReason::WordBudget | StopReason::ClauseBoundary | StopReason::SentenceEnd) {
        splitter.finish(|w| on_word(w, &mut words));
    }
    timings.opener = words.last().map(|w| w.at).unwrap_or_else(|| arrived.elapsed());
    timings.total = arrived.elapsed();
    Ok(Opener { text, words, stop, timings, prompt_tokens: prompt.len(), reused_tokens, generated_tokens: generated.len() })
}
