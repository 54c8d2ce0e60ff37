//! `mulm.v1.Answerer`: requests checked against the configured limits, the answer stream, and
//! cancellation when the client goes away or its deadline passes.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::Stream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::convert;
use super::pb;
use crate::cloud::CloudClient;
use crate::engine::Engine;
use crate::limits::Limits;
use crate::pipeline::{self, AnswerRequest, Front};

#[derive(Clone)]
pub struct AnswerService {
    engine: Arc<Engine>,
    cloud: Option<Arc<CloudClient>>,
    limits: Limits,
}

impl AnswerService {
    pub fn new(engine: Arc<Engine>, cloud: Option<Arc<CloudClient>>, limits: Limits) -> Self {
        Self { engine, cloud, limits }
    }

    /// Checks the query and options within the limits, with the request's id: the caller's
    /// `x-request-id` when it sent a usable one, else a fresh one.
    fn request<T>(&self, req: &Request<T>, query: &str, options: Option<&pb::Options>) -> Result<AnswerRequest, Status> {
        let id = req
            .metadata()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 128)
            .map(str::to_string)
            .unwrap_or_else(pipeline::new_request_id);
        let opt = options.map(convert::options).unwrap_or_default();
        self.limits.request(id, Front::Grpc, query.to_string(), &opt).map_err(|e| convert::status(&e))
    }
}

/// The client's deadline from the `grpc-timeout` header (e.g. "250m", "3S").
fn deadline<T>(req: &Request<T>) -> Option<tokio::time::Instant> {
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    let d = match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    Some(tokio::time::Instant::now() + d)
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::AnswerEvent, Status>> + Send>>;

#[tonic::async_trait]
impl pb::answerer_server::Answerer for AnswerService {
    type AnswerStream = EventStream;

    async fn answer(&self, req: Request<pb::AnswerRequest>) -> Result<Response<EventStream>, Status> {
        let arrived = Instant::now();
        let deadline = deadline(&req);
        let request = self.request(&req, &req.get_ref().query, req.get_ref().options.as_ref())?;
        let cancel = CancellationToken::new();
        let (events_tx, mut events) = mpsc::unbounded_channel();
        tokio::spawn(pipeline::answer(self.engine.clone(), self.cloud.clone(), request, arrived, events_tx, cancel.clone()));
        let (out_tx, out_rx) = mpsc::channel::<Result<pb::AnswerEvent, Status>>(64);
        tokio::spawn(async move {
            let expired = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(expired);
            loop {
                tokio::select! {
                    // The client hung up: stop decoding and drop the cloud stream.
                    _ = out_tx.closed() => { cancel.cancel(); break; }
                    _ = &mut expired => {
                        cancel.cancel();
                        let _ = out_tx.send(Err(Status::deadline_exceeded("the deadline passed before the answer was complete"))).await;
                        break;
                    }
                    ev = events.recv() => {
                        let Some(ev) = ev else { break };
                        let item = convert::event(ev);
                        let last = item.is_err() || matches!(&item, Ok(pb::AnswerEvent { event: Some(pb::answer_event::Event::Final(_)) }));
                        if out_tx.send(item).await.is_err() {
                            cancel.cancel();
                            break;
                        }
                        if last { break; }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(out_rx))))
    }

    async fn open(&self, req: Request<pb::OpenRequest>) -> Result<Response<pb::OpenResponse>, Status> {
        let arrived = Instant::now();
        let request = self.request(&req, &req.get_ref().query, req.get_ref().options.as_ref())?;
        // Dropping this future (client gone, deadline) drops the guard, which cancels decoding.
        let cancel = CancellationToken::new();
        let _guard = cancel.clone().drop_guard();
        let o = pipeline::opener_only(&self.engine, &request.query, request.opener, arrived, &cancel, |_| true)
            .await
            .map_err(|e| convert::status(&e))?;
        Ok(Response::new(pb::OpenResponse {
            opener: o.text.clone(),
            words: o.words.iter().map(convert::word).collect(),
            stop_reason: convert::stop_reason(o.stop),
            timings: Some(convert::opener_timings(&o.timings)),
            prompt_tokens: o.prompt_tokens as u32,
            generated_tokens: o.generated_tokens as u32,
        }))
    }
}
