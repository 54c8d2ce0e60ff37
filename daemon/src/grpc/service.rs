//! `mulm.v1.Answerer`: request validation within configured bounds, the answer stream, and
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
use crate::cloud::{CloudClient, RecoveryMode};
use crate::engine::{Engine, OpenerOptions, Sampling};
use crate::pipeline::{self, AnswerRequest};

/// What a request may ask for (from the configuration's [opener] section).
#[derive(Debug, Clone)]
pub struct Limits {
    pub defaults: OpenerOptions,
    pub max_words_limit: usize,
    pub max_query_chars: usize,
    pub recovery: RecoveryMode,
}

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

    /// Checks the query and turns wire options into engine options within the limits.
    fn request(&self, query: &str, options: Option<&pb::Options>) -> Result<(OpenerOptions, RecoveryMode, bool), Status> {
        if query.trim().is_empty() {
            return Err(Status::invalid_argument("the query is empty; send the user's question as text"));
        }
        let chars = query.chars().count();
        if chars > self.limits.max_query_chars {
            return Err(Status::invalid_argument(format!(
                "the query has {chars} characters, more than the {} allowed (opener.max_query_chars)",
                self.limits.max_query_chars
            )));
        }
        let mut o = self.limits.defaults.clone();
        let Some(opt) = options else { return Ok((o, self.limits.recovery, true)) };
        if let Some(n) = opt.min_words {
            o.min_words = n as usize;
        }
        if let Some(n) = opt.max_words {
            o.max_words = n as usize;
        }
        if o.max_words > self.limits.max_words_limit {
            return Err(Status::invalid_argument(format!(
                "max_words {} is above this server's limit of {} (opener.max_words_limit)",
                o.max_words, self.limits.max_words_limit
            )));
        }
        o.sampling = Sampling {
            temperature: opt.temperature.unwrap_or(o.sampling.temperature),
            top_k: opt.top_k.map(|k| k as usize).unwrap_or(o.sampling.top_k),
            top_p: opt.top_p.unwrap_or(o.sampling.top_p),
            seed: opt.seed.or(o.sampling.seed),
        };
        o.validate().map_err(|e| convert::status(&e))?;
        let recovery = match pb::RecoveryMode::try_from(opt.recovery).unwrap_or(pb::RecoveryMode::Unspecified) {
            pb::RecoveryMode::Unspecified => self.limits.recovery,
            pb::RecoveryMode::Natural => RecoveryMode::Natural,
            pb::RecoveryMode::Explicit => RecoveryMode::Explicit,
            pb::RecoveryMode::Humor => RecoveryMode::Humor,
        };
        Ok((o, recovery, opt.cloud.unwrap_or(true)))
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
        let body = req.into_inner();
        let (opener, recovery, use_cloud) = self.request(&body.query, body.options.as_ref())?;
        let request = AnswerRequest { query: body.query, opener, recovery, use_cloud };
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
        let body = req.into_inner();
        let (options, _, _) = self.request(&body.query, body.options.as_ref())?;
        // Dropping this future (client gone, deadline) drops the guard, which cancels decoding.
        let cancel = CancellationToken::new();
        let _guard = cancel.clone().drop_guard();
        let o = pipeline::opener_only(&self.engine, &body.query, options, arrived, &cancel, |_| true)
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
