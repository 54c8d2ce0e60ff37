//! Inference off the async reactor: named worker threads fed by a bounded queue.
//!
//! Each worker owns one `Session` (its KV cache and tract state) and takes one request at a
//! time. Submitting never blocks: a full queue is an immediate `Busy`.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};

use super::error::RequestError;
use super::model::Model;
use super::opener::{write_opener, CancelToken, OpenerEvent, OpenerOptions};
use super::session::Session;

/// Receives a request's events on the worker thread. Must not block for long: it runs
/// between tokens. `Done` or `Error` is always the last call.
pub type EventSink = Box<dyn FnMut(OpenerEvent) + Send>;

/// One queued request.
pub struct Job {
    pub query: String,
    pub options: OpenerOptions,
    /// When the request reached mulmd; every timing is measured from here.
    pub arrived: Instant,
    pub cancel: CancelToken,
    pub sink: EventSink,
}

#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    pub workers: usize,
    pub queue_depth: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self { workers: 1, queue_depth: 8 }
    }
}

/// The handle the rest of mulmd holds. Dropping it (or `shutdown`) lets the workers finish
/// the queued requests and exit.
pub struct Engine {
    model: Arc<Model>,
    tx: Option<Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
    capacity: usize,
    queued: Arc<AtomicUsize>,
    /// Per worker: 0 while idle, else the time (ms since the epoch) of its last progress.
    progress: Vec<Arc<AtomicU64>>,
}

impl Engine {
    /// Starts the workers. Fails only if a worker's session cannot be created.
    pub fn start(model: Arc<Model>, cfg: EngineConfig) -> Result<Self, RequestError> {
        let workers_n = cfg.workers.max(1);
        let capacity = cfg.queue_depth.max(1);
        let (tx, rx) = bounded::<Job>(capacity);
        let queued = Arc::new(AtomicUsize::new(0));
        let mut workers = Vec::with_capacity(workers_n);
        let mut progress = Vec::with_capacity(workers_n);
        for i in 0..workers_n {
            let session = Session::new(model.clone()).map_err(|e| RequestError::Inference(format!("{e:#}")))?;
            let heartbeat = Arc::new(AtomicU64::new(0));
            progress.push(heartbeat.clone());
            let (rx, model, queued) = (rx.clone(), model.clone(), queued.clone());
            let handle = std::thread::Builder::new()
                .name(format!("mulmd-infer-{i}"))
                .spawn(move || worker_loop(model, session, rx, queued, heartbeat))
                .map_err(|e| RequestError::Inference(format!("cannot start a worker thread: {e}")))?;
            workers.push(handle);
        }
        Ok(Self { model, tx: Some(tx), workers, capacity, queued, progress })
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Queues a request. On `Err` the job's sink has not been called and never will be.
    pub fn submit(&self, job: Job) -> Result<(), (RequestError, Job)> {
        let Some(tx) = &self.tx else { return Err((RequestError::ShuttingDown, job)) };
        self.queued.fetch_add(1, Ordering::Relaxed);
        match tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(job)) => {
                self.queued.fetch_sub(1, Ordering::Relaxed);
                Err((RequestError::Busy { capacity: self.capacity }, job))
            }
            Err(TrySendError::Disconnected(job)) => {
                self.queued.fetch_sub(1, Ordering::Relaxed);
                Err((RequestError::ShuttingDown, job))
            }
        }
    }

    /// Requests waiting for a worker.
    pub fn queue_depth(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// How long the most stuck worker has gone without progress while holding a request
    /// (zero when every worker is idle or moving). A watchdog stops vouching for the daemon
    /// when this grows past a token's worst-case time: a hung model then gets restarted.
    pub fn stalled_for(&self) -> std::time::Duration {
        let now = now_ms();
        let worst = self
            .progress
            .iter()
            .map(|p| p.load(Ordering::Relaxed))
            .filter(|&t| t != 0)
            .map(|t| now.saturating_sub(t))
            .max()
            .unwrap_or(0);
        std::time::Duration::from_millis(worst)
    }

    /// Stops taking requests, lets the workers drain the queue, and waits for them.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.tx.take();
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

fn worker_loop(model: Arc<Model>, mut session: Session, rx: Receiver<Job>, queued: Arc<AtomicUsize>, heartbeat: Arc<AtomicU64>) {
    while let Ok(mut job) = rx.recv() {
        queued.fetch_sub(1, Ordering::Relaxed);
        heartbeat.store(now_ms(), Ordering::Relaxed);
        let sink = &mut job.sink;
        let result = if job.cancel.is_cancelled() {
            Err(RequestError::Cancelled)
        } else {
            // A panic inside inference must end this request, not the worker.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                write_opener(&model, &mut session, &job.query, &job.options, job.arrived, &job.cancel, |w| {
                    heartbeat.store(now_ms(), Ordering::Relaxed);
                    sink(OpenerEvent::Word(w))
                })
            }))
            .unwrap_or_else(|_| {
                tracing::error!("inference panicked; the request ends with an error");
                Err(RequestError::Inference("internal error in the model runtime".into()))
            })
        };
        (job.sink)(match result {
            Ok(opener) => OpenerEvent::Done(opener),
            Err(e) => OpenerEvent::Error(e),
        });
        heartbeat.store(0, Ordering::Relaxed);
    }
}
