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

#[cfg(test)]
mod tests {
    use super::*;

    fn job(cancel: &CancellationToken) -> (Job, mpsc::UnboundedReceiver<OpenerEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let job = Job {
            ids: vec![1, 2, 3],
            finish: false,
            options: OpenerOptions::default(),
            arrived: Instant::now(),
            tokenize: Duration::ZERO,
            cancel: cancel.clone(),
            tx,
        };
        (job, rx)
    }

    #[test]
    fn a_full_queue_refuses_at_once_and_a_cancelled_job_gives_its_place_back() {
        let q = JobQueue::new(1);
        let first = CancellationToken::new();
        let (a, mut a_events) = job(&first);
        assert!(q.push(a).is_ok());
        let (b, _) = job(&CancellationToken::new());
        let (e, _) = q.push(b).err().unwrap();
        assert_eq!(e, RequestError::Busy { capacity: 1 });
        assert_eq!(q.depth(), 1);
        // The waiting job's client goes away: it no longer counts, and the next push takes
        // its place and ends it with its one terminal event.
        first.cancel();
        assert_eq!(q.depth(), 0);
        let (c, _) = job(&CancellationToken::new());
        assert!(q.push(c).is_ok());
        assert_eq!(a_events.try_recv().unwrap(), OpenerEvent::Error(RequestError::Cancelled));
        assert!(a_events.try_recv().is_err(), "exactly one event");
        assert_eq!(q.depth(), 1);
    }

    #[test]
    fn closing_ends_the_waiting_jobs_and_refuses_new_ones() {
        let q = JobQueue::new(4);
        let (a, mut a_events) = job(&CancellationToken::new());
        q.push(a).ok().unwrap();
        q.close();
        assert_eq!(a_events.try_recv().unwrap(), OpenerEvent::Error(RequestError::ShuttingDown));
        assert!(q.pop().is_none() && q.is_closed());
        let (b, _) = job(&CancellationToken::new());
        assert_eq!(q.push(b).err().unwrap().0, RequestError::ShuttingDown);
    }

    #[test]
    fn pop_waits_for_a_job() {
        let q = std::sync::Arc::new(JobQueue::new(2));
        let q2 = q.clone();
        let worker = std::thread::spawn(move || q2.pop().map(|j| j.ids));
        let (a, _) = job(&CancellationToken::new());
        q.push(a).ok().unwrap();
        assert_eq!(worker.join().unwrap(), Some(vec![1, 2, 3]));
    }
}
