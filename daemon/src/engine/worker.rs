//! Inference off the async reactor: named worker threads fed by a bounded queue.
//!
//! Each worker owns one `Session` (its KV cache and tract state) and takes one request at a
//! time. Submitting never blocks: the prompt is tokenized and checked on the caller's thread
//! (a refusal is immediate), and a full queue is an immediate `Busy`. A request's events come
//! back on a channel; cancelling its token stops it between forward passes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::error::RequestError;
use super::model::Model;
use super::opener::{write, Opener, OpenerEvent, OpenerOptions, Pass, WordEvent};
use super::prompt::Prompt;
use super::queue::{Job, JobQueue};
use super::prefix_cache::PrefixCache;
use super::session::Session;

/// One request's events as the engine produces them: zero or more `Word`, then exactly one
/// `Done` or `Error`, then the end of the channel.
///
/// The channel is unbounded so that a worker never waits on a slow reader while holding the
/// model; it holds at most `max_words` (at most 64) words and one terminal event.
pub struct OpenerEvents {
    rx: mpsc::UnboundedReceiver<OpenerEvent>,
}

impl OpenerEvents {
    /// A connected pair: what a source of openers writes into, and what its caller reads.
    pub fn channel() -> (mpsc::UnboundedSender<OpenerEvent>, Self) {
        let (tx, rx) = mpsc::unbounded_channel();
        (tx, Self { rx })
    }

    /// The next event; None after the terminal one (or if the writer vanished without one).
    pub async fn recv(&mut self) -> Option<OpenerEvent> {
        self.rx.recv().await
    }

    /// Like [`OpenerEvents::recv`], blocking this (non-async) thread.
    pub fn blocking_recv(&mut self) -> Option<OpenerEvent> {
        self.rx.blocking_recv()
    }

    /// Blocks this (non-async) thread until the terminal event, passing words to `on_word`.
    pub fn wait(mut self, mut on_word: impl FnMut(&WordEvent)) -> Result<Opener, RequestError> {
        while let Some(ev) = self.rx.blocking_recv() {
            match ev {
                OpenerEvent::Word(w) => on_word(&w),
                OpenerEvent::Done(o) => return Ok(o),
                OpenerEvent::Error(e) => return Err(e),
            }
        }
        Err(RequestError::Inference("the engine stopped without finishing the request".into()))
    }
}

#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    pub workers: usize,
    pub queue_depth: usize,
    /// The longest prompt accepted, in tokens (the model's context is a further bound).
    pub max_prompt_tokens: usize,
    /// Prompt tokens per forward pass (cancellation and heartbeat are checked between).
    pub prefill_chunk: usize,
    /// Bytes of earlier prompts' KV caches kept for later prompts that start the same way
    /// (see `PrefixCache`); 0 keeps none.
    pub prefix_cache_bytes: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self { workers: 1, queue_depth: 8, max_prompt_tokens: 1024, prefill_chunk: 256, prefix_cache_bytes: 0 }
    }
}

/// What a worker shares with the engine handle.
#[derive(Default)]
struct WorkerState {
    /// 0 while idle, else the time (ms since the epoch) of its last progress.
    heartbeat: AtomicU64,
    /// The running request's token, so a stopping engine can cancel it.
    running: Mutex<Option<CancellationToken>>,
}

/// The handle the rest of mulmd holds. Dropping it (or `shutdown`) ends the waiting requests
/// with `ShuttingDown`, cancels the running ones (each stops within one forward pass) and
/// waits for the workers.
pub struct Engine {
    model: Arc<Model>,
    config: EngineConfig,
    queue: Arc<JobQueue>,
    workers: Vec<JoinHandle<()>>,
    states: Vec<Arc<WorkerState>>,
}

impl Engine {
    /// Starts the workers. Fails only if a worker's session or thread cannot be created.
    pub fn start(model: Arc<Model>, config: EngineConfig) -> Result<Self, RequestError> {
        let queue = Arc::new(JobQueue::new(config.queue_depth));
        let prefixes = Arc::new(PrefixCache::new(config.prefix_cache_bytes));
        let mut engine = Self { model: model.clone(), config, queue: queue.clone(), workers: Vec::new(), states: Vec::new() };
        for i in 0..config.workers.max(1) {
            let mut session = Session::new(model.clone()).map_err(|e| RequestError::Inference(format!("{e:#}")))?;
            if config.prefix_cache_bytes > 0 {
                session.share_prefixes(prefixes.clone());
            }
            let state = Arc::new(WorkerState::default());
            engine.states.push(state.clone());
            let (model, queue) = (model.clone(), queue.clone());
            let handle = std::thread::Builder::new()
                .name(format!("mulmd-infer-{i}"))
                .spawn(move || worker_loop(model, session, &queue, &state, config.prefill_chunk))
                .map_err(|e| RequestError::Inference(format!("cannot start a worker thread: {e}")))?;
            engine.workers.push(handle);
        }
        Ok(engine)
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Tokenizes `prompt` within the token budget (`max_prompt_tokens`, and the context less
    /// room for the words: older turns are dropped to fit, see [`Model::tokens`]) here, on the
    /// caller's thread, then queues it. Refusals (an empty question or one that alone does not
    /// fit, bad options, a full queue, a stopping engine) come back at once; everything after
    /// comes as events. `cancel` stops the request between passes
    /// (a waiting request gives up its queue place) and ends it with `Cancelled`.
    pub fn submit(&self, prompt: &Prompt, options: OpenerOptions, arrived: Instant, cancel: CancellationToken) -> Result<OpenerEvents, RequestError> {
        options.validate()?;
        let started = Instant::now();
        let room = self.model.context_length().saturating_sub(options.max_tokens + 1);
        let (budget, setting) = if self.config.max_prompt_tokens <= room {
            (self.config.max_prompt_tokens, "opener.max_prompt_tokens")
        } else {
            (room, "the model's context less the opener's max_tokens")
        };
        let ids = self.model.tokens(prompt, budget, setting)?;
        // A finish adds a bounded tail of shown text to a conversation that fitted.
        if ids.len() > room {
            return Err(RequestError::PromptTooLong { tokens: ids.len(), limit: room, setting: "the model's context less max_tokens" });
        }
        let (tx, events) = OpenerEvents::channel();
        let finish = prompt.continue_from.is_some();
        let job = Job { ids, finish, options, arrived, tokenize: started.elapsed(), cancel, tx };
        self.queue.push(job).map_err(|(e, _)| e)?;
        Ok(events)
    }

    /// Requests waiting for a worker (cancelled ones not counted).
    pub fn queue_depth(&self) -> usize {
        self.queue.depth()
    }

    /// How long the most stuck worker has gone without progress while holding a request
    /// (zero when every worker is idle or moving). Progress is reported between forward
    /// passes, so a long prompt reports every `prefill_chunk` tokens. A watchdog stops
    /// vouching for the daemon when this grows past a pass's worst-case time: a hung model
    /// then gets restarted.
    pub fn stalled_for(&self) -> Duration {
        let now = now_ms();
        let worst = self.states.iter().map(|s| s.heartbeat.load(Ordering::Relaxed)).filter(|&t| t != 0).map(|t| now.saturating_sub(t)).max().unwrap_or(0);
        Duration::from_millis(worst)
    }

    /// Stops taking requests, ends the waiting ones, cancels the running ones and waits for
    /// the workers (each stops within one forward pass).
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.queue.close();
        for s in &self.states {
            if let Some(t) = s.running.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                t.cancel();
            }
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn worker_loop(model: Arc<Model>, mut session: Session, queue: &JobQueue, state: &WorkerState, chunk: usize) {
    while let Some(job) = queue.pop() {
        if job.cancel.is_cancelled() {
            job.end(RequestError::Cancelled);
            continue;
        }
        *state.running.lock().unwrap_or_else(|p| p.into_inner()) = Some(job.cancel.clone());
        // A stop that came between pop() and here found no token to cancel.
        if queue.is_closed() {
            job.cancel.cancel();
        }
        state.heartbeat.store(now_ms(), Ordering::Relaxed);
        let beat = || state.heartbeat.store(now_ms(), Ordering::Relaxed);
        let pass = Pass { chunk, cancel: &job.cancel, beat: &beat };
        // A panic inside inference must end this request, not the worker.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            write(&model, &mut session, &job.ids, job.finish, &job.options, job.arrived, &pass, |w| {
                let _ = job.tx.send(OpenerEvent::Word(w));
            })
        }))
        .unwrap_or_else(|_| {
            tracing::error!("inference panicked; the request ends with an error");
            Err(RequestError::Inference("internal error in the model runtime".into()))
        });
        let _ = job.tx.send(match result {
            Ok(mut opener) => {
                opener.timings.tokenize = job.tokenize;
                OpenerEvent::Done(opener)
            }
            Err(RequestError::Cancelled) if queue.is_closed() => OpenerEvent::Error(RequestError::ShuttingDown),
            Err(e) => OpenerEvent::Error(e),
        });
        *state.running.lock().unwrap_or_else(|p| p.into_inner()) = None;
        state.heartbeat.store(0, Ordering::Relaxed);
    }
}
