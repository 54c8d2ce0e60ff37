//! `mulm.v1.Answerer`: requests checked against the configured limits, the answer stream, and
//! cancellation when the client goes away or its deadline passes.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::convert;
use super::pb;
use crate::answer::{new_request_id, AnswerRequest, Answerer, Events, Front};

#[derive(Clone)]
pub struct AnswerService {
    answerer: Arc<Answerer>,
}

impl AnswerService {
    pub fn new(answerer: Arc<Answerer>) -> Self {
        Self { answerer }
    }

    /// Checks the conversation and options, with the request's id: the caller's
    /// `x-request-id` when it sent a usable one, else a fresh one.
    fn admit<T>(&self, req: &Request<T>, arrived: Instant, ask: Ask<'_>) -> Result<AnswerRequest, Status> {
        let id = req
            .metadata()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 128)
            .map(str::to_string)
            .unwrap_or_else(new_request_id);
        let opt = ask.options.map(convert::options).unwrap_or_default();
        let conversation = convert::conversation(ask.system, ask.history, ask.query);
        let kept = Some(ask.conversation_id).filter(|c| !c.is_empty()).map(str::to_string);
        self.answerer.admit_conversation(id, Front::Grpc, arrived, conversation, kept, &opt).map_err(|e| convert::status(&e))
    }
}

/// The parts of an `AnswerRequest` or `OpenRequest` that make the request.
struct Ask<'a> {
    query: &'a str,
    system: &'a str,
    history: &'a [pb::Turn],
    options: Option<&'a pb::Options>,
    conversation_id: &'a str,
}

/// The client's deadline from the `grpc-timeout` header (e.g. "250m", "3S"): at most 8 digits
/// and a unit, per the gRPC spec. Anything else (or a time the clock cannot hold) means no
/// deadline of the client's own; the answer still ends by the cloud's and engine's bounds.
fn deadline<T>(req: &Request<T>) -> Option<tokio::time::Instant> {
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    tokio::time::Instant::now().checked_add(grpc_timeout(v)?)
}

fn grpc_timeout(v: &str) -> Option<Duration> {
    if !v.is_ascii() {
        return None;
    }
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    if num.is_empty() || num.len() > 8 || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    match unit {
        "H" => Some(Duration::from_secs(n * 3600)),
        "M" => Some(Duration::from_secs(n * 60)),
        "S" => Some(Duration::from_secs(n)),
        "m" => Some(Duration::from_millis(n)),
        "u" => Some(Duration::from_micros(n)),
        "n" => Some(Duration::from_nanos(n)),
        _ => None,
    }
}

/// The answer's events on the wire, ended early with DEADLINE_EXCEEDED when the client's
/// deadline passes. It ends after the terminal event; dropping it (the client hung up) drops
/// the answer, which cancels decoding and the cloud request.
struct Wire {
    events: Events,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    done: bool,
}

impl Stream for Wire {
    type Item = Result<pb::AnswerEvent, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        if let Some(d) = self.deadline.as_mut() {
            if d.as_mut().poll(cx).is_ready() {
                self.done = true;
                return Poll::Ready(Some(Err(Status::deadline_exceeded("the deadline passed before the answer was complete"))));
            }
        }
        loop {
            let ev = match self.events.poll_next_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    self.done = true;
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(ev)) => ev,
            };
            self.done = ev.is_terminal();
            if let Some(item) = convert::event(ev) {
                return Poll::Ready(Some(item));
            }
        }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::AnswerEvent, Status>> + Send>>;

#[tonic::async_trait]
impl pb::answerer_server::Answerer for AnswerService {
    type AnswerStream = EventStream;

    async fn answer(&self, req: Request<pb::AnswerRequest>) -> Result<Response<EventStream>, Status> {
        let arrived = Instant::now();
        let deadline = deadline(&req);
        let r = req.get_ref();
        let ask = Ask { query: &r.query, system: &r.system, history: &r.history, options: r.options.as_ref(), conversation_id: &r.conversation_id };
        let request = self.admit(&req, arrived, ask)?;
        let deadline = deadline.map(|d| Box::pin(tokio::time::sleep_until(d)));
        Ok(Response::new(Box::pin(Wire { events: self.answerer.answer(request), deadline, done: false })))
    }

    async fn open(&self, req: Request<pb::OpenRequest>) -> Result<Response<pb::OpenResponse>, Status> {
        let arrived = Instant::now();
        let r = req.get_ref();
        let ask = Ask { query: &r.query, system: &r.system, history: &r.history, options: r.options.as_ref(), conversation_id: "" };
        let request = self.admit(&req, arrived, ask)?;
        // Dropping this future (client gone, deadline) cancels decoding.
        let o = self.answerer.open(request).await.map_err(|e| convert::status(&e))?;
        Ok(Response::new(pb::OpenResponse {
            opener: o.text.clone(),
            words: o.words.iter().map(convert::word).collect(),
            stop_reason: convert::stop_reason(o.stop),
            timings: Some(convert::opener_timings(&o.timings)),
            prompt_tokens: convert::saturate(o.prompt_tokens),
            generated_tokens: convert::saturate(o.generated_tokens),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_within_the_spec_and_nothing_else_does() {
        assert_eq!(grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(grpc_timeout("99999999H"), Some(Duration::from_secs(99_999_999 * 3600)));
        for bad in ["", "S", "123456789S", "18446744073709551615H", "-1S", "+5S", "1.5S", "10x", "٣S", "1٣"] {
            assert_eq!(grpc_timeout(bad), None, "{bad:?}");
        }
        // The longest legal value still gives a deadline (or none), never a panic.
        let mut req = Request::new(());
        req.metadata_mut().insert("grpc-timeout", "99999999H".parse().unwrap());
        let _ = deadline(&req);
    }

    proptest::proptest! {
        #[test]
        fn any_grpc_timeout_header_is_a_duration_or_none(v in "\\PC{0,24}") {
            let _ = grpc_timeout(&v);
        }
    }
}
