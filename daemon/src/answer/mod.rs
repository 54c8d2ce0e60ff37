//! The answer service every front holds: it owns the opener source (the engine), the cloud
//! client and admission, and offers [`Answerer::answer`] (a stream of events ending in exactly
//! one `Done` or `Error`) and [`Answerer::open`] (only the opener). Both are watched the same
//! way (a request span, one `answered` log line, the metrics; see [`tap`]). Fronts translate
//! the events and nothing else.
//!
//! - [`request`]: what a request is; [`conversation`]: its messages; [`admission`]: which
//!   requests are taken; [`memory`]: the turns kept for clients that send a conversation id.
//! - [`compose`]: how an answer is composed (opener → seam → cloud → local finish).
//! - [`events`]: what comes out; [`source`]: where openers come from (engine or scripted).
//! - [`tap`]: the one observer of every request (log line, Prometheus, Home Assistant state).

mod admission;
mod compose;
mod conversation;
mod events;
mod memory;
mod request;
mod source;
mod tap;

pub use admission::{Admission, RequestOptions};
pub use conversation::{Conversation, Message, Role};
pub use events::{Answer, AnswerEvent, AnswerTimings, Fallback, Source, ToolCall};
pub use memory::Conversations;
pub use request::{new_request_id, AnswerRequest, Front};
pub use source::{GivenOpener, OpenerSource, ScriptedOpener};
pub use tap::{Stats, StatsSnapshot};

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::Stream;
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::Instrument;

use crate::cloud::CloudClient;
use crate::engine::{Opener, OpenerEvent, RequestError};
use tap::Tap;

/// Events composed ahead of the reader; beyond that the composition (and the cloud stream
/// behind it) waits. Words and deltas are small, so this is a few KB per answer at most.
const EVENTS_AHEAD: usize = 32;

pub struct Answerer {
    source: Arc<dyn OpenerSource>,
    cloud: Option<Arc<CloudClient>>,
    admission: Admission,
    stats: Arc<Stats>,
    memory: Arc<Conversations>,
    /// Parent of every answer's token: [`Answerer::stop_all`] ends whatever still runs.
    stopping: CancellationToken,
}

impl Answerer {
    /// The service over `source` and `cloud`, taking what `admission` admits, keeping
    /// conversations within the default bounds (see [`Answerer::with_memory`]).
    pub fn new(source: Arc<dyn OpenerSource>, cloud: Option<Arc<CloudClient>>, admission: Admission) -> Self {
        let stats = Arc::new(Stats::new(cloud.is_some()));
        let memory = Arc::new(Conversations::new(&crate::config::Config::default().conversation));
        Self { source, cloud, admission, stats, memory, stopping: CancellationToken::new() }
    }

    /// The same service keeping conversations in `memory`.
    pub fn with_memory(self, memory: Conversations) -> Self {
        Self { memory: Arc::new(memory), ..self }
    }

    /// Checks a one-question request as it arrived at a front; the error says what to change.
    pub fn admit(&self, id: String, front: Front, arrived: std::time::Instant, query: String, options: &RequestOptions) -> Result<AnswerRequest, RequestError> {
        self.admission.admit(id, front, arrived, query, options)
    }

    /// Checks a conversation as it arrived at a front (see [`Admission::admit_conversation`]),
    /// with the turns kept under `conversation_id` put before its own.
    pub fn admit_conversation(
        &self,
        id: String,
        front: Front,
        arrived: std::time::Instant,
        mut conversation: Conversation,
        conversation_id: Option<String>,
        options: &RequestOptions,
    ) -> Result<AnswerRequest, RequestError> {
        if let Some(cid) = &conversation_id {
            Conversations::check_id(cid)?;
            let kept = self.memory.recall(cid);
            // After the request's own system turns, before its other turns.
            let at = conversation.messages.iter().take_while(|m| m.role == Role::System).count();
            conversation.messages.splice(at..at, kept);
        }
        let mut req = self.admission.admit_conversation(id, front, arrived, conversation, options)?;
        req.conversation_id = conversation_id;
        Ok(req)
    }

    /// Starts answering `req`. The stream yields the answer's events and ends after exactly
    /// one `Done` or `Error`, whatever happens inside (a panic there becomes an `Error`).
    /// Dropping it cancels the answer: decoding stops and the cloud request is dropped.
    pub fn answer(&self, req: AnswerRequest) -> Events {
        let span = tracing::info_span!("request", id = %req.id, front = req.front.name());
        let tap = Tap::new(req.front, span.clone(), self.stats.clone(), self.source.queue_depth());
        let cancel = self.stopping.child_token();
        let (tx, rx) = mpsc::channel(EVENTS_AHEAD);
        let memory = req.conversation_id.clone().map(|id| (self.memory.clone(), id));
        let parts = compose::Parts { source: self.source.clone(), cloud: self.cloud.clone(), stopping: self.stopping.clone(), memory };
        tokio::spawn(compose::compose(parts, req, tx, cancel.clone()).instrument(span));
        Events { rx, tap, ended: false, _cancel: cancel.drop_guard() }
    }

    /// Only the opener, written on the device. Dropping the future cancels it.
    pub async fn open(&self, req: AnswerRequest) -> Result<Opener, RequestError> {
        let span = tracing::info_span!("request", id = %req.id, front = req.front.name());
        let mut tap = Tap::new(req.front, span.clone(), self.stats.clone(), self.source.queue_depth());
        let cancel = self.stopping.child_token();
        let _stop = cancel.clone().drop_guard();
        let source = self.source.clone();
        let result = async move {
            let options = req.opener.ok_or_else(|| RequestError::InvalidOptions("the conversation's last turn is not the user's; there is nothing to open".into()))?;
            let mut events = source.submit(&req.conversation.prompt(), options, req.arrived, cancel)?;
            loop {
                match events.recv().await {
                    Some(OpenerEvent::Word(_)) => {}
                    Some(OpenerEvent::Done(o)) => return Ok(o),
                    Some(OpenerEvent::Error(e)) => return Err(e),
                    None => return Err(RequestError::Inference("the engine dropped the request".into())),
                }
            }
        }
        .instrument(span)
        .await;
        tap.opened(&result);
        result
    }

    /// Ends every answer still running with `ShuttingDown` (after a stop's grace period).
    pub fn stop_all(&self) {
        self.stopping.cancel();
    }

    /// The figures of the answers given so far (for Home Assistant's state topic).
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    pub fn model_name(&self) -> String {
        self.source.model_name()
    }

    /// Requests waiting for an inference worker.
    pub fn queue_depth(&self) -> usize {
        self.source.queue_depth()
    }
}

/// One answer's events, each seen by the metrics tap on its way to the front.
pub struct Events {
    rx: mpsc::Receiver<AnswerEvent>,
    tap: Tap,
    ended: bool,
    _cancel: DropGuard,
}

impl Events {
    /// The next event, or None after the terminal one.
    pub async fn next(&mut self) -> Option<AnswerEvent> {
        futures_util::StreamExt::next(self).await
    }
}

impl Stream for Events {
    type Item = AnswerEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<AnswerEvent>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let ev = match self.rx.poll_recv(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Some(ev)) => ev,
            // The composition ended without a terminal event: it panicked. The client still
            // gets its one terminal event, and says what happened.
            Poll::Ready(None) => AnswerEvent::Error(RequestError::Inference("internal error while composing the answer".into())),
        };
        self.ended = ev.is_terminal();
        self.tap.see(&ev);
        Poll::Ready(Some(ev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_composition_that_dies_without_an_end_still_gives_one_error() {
        let (tx, rx) = mpsc::channel(4);
        let stats = Arc::new(Stats::new(false));
        let tap = Tap::new(Front::Cli, tracing::Span::none(), stats, 0);
        let mut events = Events { rx, tap, ended: false, _cancel: CancellationToken::new().drop_guard() };
        tx.send(AnswerEvent::Correction).await.unwrap();
        drop(tx); // what a panic in the composing task does to its sender
        assert_eq!(events.next().await, Some(AnswerEvent::Correction));
        let Some(AnswerEvent::Error(RequestError::Inference(why))) = events.next().await else { panic!("no error") };
        assert!(why.contains("internal error"), "{why}");
        assert_eq!(events.next().await, None, "exactly one terminal event");
    }
}
