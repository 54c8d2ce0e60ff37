//! Where openers come from: the engine; for tests of a front that are about the front, not
//! the model, a scripted source that needs no model; and for trying a continuator on a given
//! start (a wrong one, say), a given opener with the engine behind it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::engine::{Engine, Opener, OpenerEvent, OpenerEvents, OpenerOptions, OpenerTimings, Prompt, RequestError, StopReason, WordEvent};

/// Writes openers (and local finishes, for prompts with `continue_from`). The contract is
/// [`Engine::submit`]'s: refusals at once, then words and exactly one terminal event.
pub trait OpenerSource: Send + Sync {
    fn submit(&self, prompt: &Prompt, options: OpenerOptions, arrived: Instant, cancel: CancellationToken) -> Result<OpenerEvents, RequestError>;
    /// Requests waiting for a worker.
    fn queue_depth(&self) -> usize;
    /// The model's name, as fronts list it.
    fn model_name(&self) -> String;
}

impl OpenerSource for Engine {
    fn submit(&self, prompt: &Prompt, options: OpenerOptions, arrived: Instant, cancel: CancellationToken) -> Result<OpenerEvents, RequestError> {
        Engine::submit(self, prompt, options, arrived, cancel)
    }

    fn queue_depth(&self) -> usize {
        Engine::queue_depth(self)
    }

    fn model_name(&self) -> String {
        self.model().manifest.name.clone()
    }
}

/// A source that writes the same words for every question, and others to finish an answer,
/// with no model: for tests of fronts. Each request gets at most its `max_words` of the
/// opener; a prompt with `continue_from` gets the finish words. `refuse` makes every request
/// fail with an error instead.
pub struct ScriptedOpener {
    opener: Vec<String>,
    finish: Vec<String>,
    refusal: Mutex<Option<RequestError>>,
    prompts: Mutex<Vec<Prompt>>,
    served: AtomicUsize,
}

impl ScriptedOpener {
    /// `opener` and `finish` are split into words at whitespace.
    pub fn new(opener: &str, finish: &str) -> Self {
        let words = |s: &str| s.split_whitespace().map(str::to_string).collect();
        Self { opener: words(opener), finish: words(finish), refusal: Mutex::new(None), prompts: Mutex::new(Vec::new()), served: AtomicUsize::new(0) }
    }

    /// From now on every request is refused with `error` (None: served again).
    pub fn refuse(&self, error: Option<RequestError>) {
        *self.refusal.lock().unwrap_or_else(|p| p.into_inner()) = error;
    }

    /// Every prompt submitted so far, in order.
    pub fn prompts(&self) -> Vec<Prompt> {
        self.prompts.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Requests served (not refused).
    pub fn served(&self) -> usize {
        self.served.load(Ordering::Relaxed)
    }
}

impl OpenerSource for ScriptedOpener {
    fn submit(&self, prompt: &Prompt, options: OpenerOptions, arrived: Instant, cancel: CancellationToken) -> Result<OpenerEvents, RequestError> {
        options.validate()?;
        if let Some(e) = self.refusal.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Err(e);
        }
        self.prompts.lock().unwrap_or_else(|p| p.into_inner()).push(prompt.clone());
        self.served.fetch_add(1, Ordering::Relaxed);
        let (tx, events) = OpenerEvents::channel();
        let finishing = prompt.continue_from.is_some();
        let script = if finishing { &self.finish } else { &self.opener };
        let words: Vec<WordEvent> = script
            .iter()
            .take(options.max_words)
            .enumerate()
            .map(|(index, text)| WordEvent { index, text: text.clone(), leading: if index == 0 { String::new() } else { " ".into() }, at: arrived.elapsed() })
            .collect();
        if cancel.is_cancelled() {
            let _ = tx.send(OpenerEvent::Error(RequestError::Cancelled));
            return Ok(events);
        }
        for w in &words {
            let _ = tx.send(OpenerEvent::Word(w.clone()));
        }
        let stop = match (finishing, words.len() >= options.max_words) {
            (true, _) => StopReason::SentenceEnd,
            (false, true) => StopReason::WordBudget,
            (false, false) => StopReason::EndOfText,
        };
        let at = arrived.elapsed();
        let timings = OpenerTimings { queued: Duration::ZERO, tokenize: Duration::ZERO, prefill: Duration::ZERO, ttft: at, opener: at, total: at };
        let text = words.iter().map(|w| w.text.as_str()).collect::<Vec<_>>().join(" ");
        let tokens = words.len();
        let prompt_tokens = prompt.query.split_whitespace().count();
        let _ = tx.send(OpenerEvent::Done(Opener { text, words, stop, timings, prompt_tokens, reused_tokens: 0, generated_tokens: tokens }));
        Ok(events)
    }

    fn queue_depth(&self) -> usize {
        0
    }

    fn model_name(&self) -> String {
        "scripted".into()
    }
}

/// A given opener in place of the model's (at most 64 words), with `inner` writing the
/// device's finishes (prompts with `continue_from`): for trying how a continuator repairs a
/// start, a wrong one included (`mulmd ask --opener`).
pub struct GivenOpener {
    given: ScriptedOpener,
    words: usize,
    inner: std::sync::Arc<dyn OpenerSource>,
}

impl GivenOpener {
    pub fn new(opener: &str, inner: std::sync::Arc<dyn OpenerSource>) -> Self {
        Self { given: ScriptedOpener::new(opener, ""), words: opener.split_whitespace().count().clamp(1, 64), inner }
    }
}

impl OpenerSource for GivenOpener {
    fn submit(&self, prompt: &Prompt, options: OpenerOptions, arrived: Instant, cancel: CancellationToken) -> Result<OpenerEvents, RequestError> {
        if prompt.continue_from.is_some() {
            return self.inner.submit(prompt, options, arrived, cancel);
        }
        // All the given words, whatever length the request asked for.
        let options = OpenerOptions { min_words: 1, max_words: self.words, ..options };
        self.given.submit(prompt, options, arrived, cancel)
    }

    fn queue_depth(&self) -> usize {
        self.inner.queue_depth()
    }

    fn model_name(&self) -> String {
        self.inner.model_name()
    }
}
