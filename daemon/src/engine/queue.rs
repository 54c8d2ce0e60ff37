//! The bounded queue between the async side and the inference workers.
//!
//! Bounded in live requests: a request whose client went away (its token cancelled) gives up
//! its place at once, at the next submit, instead of holding it until a worker reaches it;
//! it still gets its one terminal event (`Cancelled`). Submitting never blocks.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::error::RequestError;
use super::opener::{OpenerEvent, OpenerOptions};

/// One queued request, tokenized.
pub(crate) struct Job {
    pub(crate) ids: Vec<u32>,
    /// The prompt ends with shown text to finish to the end of its sentence.
    pub(crate) finish: bool,
    pub(crate) options: OpenerOptions,
    pub(crate) arrived: Instant,
    pub(crate) tokenize: Duration,
    pub(crate) cancel: CancellationToken,
    pub(crate) tx: mpsc::UnboundedSender<OpenerEvent>,
}

impl Job {
    /// Ends the job with `error` without running it.
    pub(crate) fn end(&self, error: RequestError) {
        let _ = self.tx.send(OpenerEvent::Error(error));
    }
}

pub(crate) struct JobQueue {
    state: Mutex<State>,
    ready: Condvar,
    capacity: usize,
}

struct State {
    jobs: VecDeque<Job>,
    closed: bool,
}

impl JobQueue {
    pub(crate) fn new(capacity: usize) -> Self {
        Self { state: Mutex::new(State { jobs: VecDeque::new(), closed: false }), ready: Condvar::new(), capacity: capacity.max(1) }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves the queue consistent (every change is one
        // VecDeque call), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `job`, after dropping the cancelled ones; a full or closed queue hands it back
    /// with the reason.
    pub(crate) fn push(&self, job: Job) -> Result<(), (RequestError, Job)> {
        let mut s = self.lock();
        if s.closed {
            return Err((RequestError::ShuttingDown, job));
        }
        s.jobs.retain(|j| {
            let live = !j.cancel.is_cancelled();
            if !live {
                j.end(RequestError::Cancelled);
            }
            live
        });
        if s.jobs.len() >= self.capacity {
            return Err((RequestError::Busy { capacity: self.capacity }, job));
        }
        s.jobs.push_back(job);
        drop(s);
        self.ready.notify_one();
        Ok(())
    }

    /// The next job, waiting for one; None once the queue is closed.
    pub(crate) fn pop(&self) -> Option<Job> {
        let mut s = self.lock();
        loop {
            if s.closed {
                return None;
            }
            if let Some(job) = s.jobs.pop_front() {
                return Some(job);
            }
            s = self.ready.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Requests waiting whose clients are still there.
    pub(crate) fn depth(&self) -> usize {
        self.lock().jobs.iter().filter(|j| !j.cancel.is_cancelled()).count()
    }

    /// Takes no more jobs and ends the waiting ones with `ShuttingDown`; workers see None.
    pub(crate) fn close(&self) {
        let mut s = self.lock();
        s.closed = true;
        for job in s.jobs.drain(..) {
            job.end(RequestError::ShuttingDown);
        }
        drop(s);
        self.ready.notify_all();
    }
}
