//! One answer: the opener from the engine, then the cloud's continuation through the seam,
//! or, when the cloud fails or is off, the local model finishing the sentence. Front ends
//! (CLI, gRPC, MQTT) only translate the event stream this produces.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cloud::{CloudClient, RecoveryMode, Seam};
use crate::engine::{CancelToken, Engine, Job, Opener, OpenerEvent, OpenerOptions, OpenerTimings, RequestError, StopReason, WordEvent};

/// Which front end a request came through (a metrics label and a log field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Front {
    Grpc,
    Mqtt,
    Cli,
}

impl Front {
    pub fn name(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::Mqtt => "mqtt",
            Self::Cli => "cli",
        }
    }
}

/// A fresh request id for callers that did not bring one: 16 hex digits.
pub fn new_request_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

#[derive(Debug, Clone)]
pub struct AnswerRequest {
    /// Names the request in logs and replies (chosen by the client or [`new_request_id`]).
    pub id: String,
    pub front: Front,
    pub query: String,
    pub opener: OpenerOptions,
    pub recovery: RecoveryMode,
    /// False keeps the whole answer on the device.
    pub use_cloud: bool,
}

/// Who wrote a piece of the continuation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Cloud,
    Local,
}

/// Why the answer was finished locally.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fallback {
    /// A stable name: not_configured, disabled, or the cloud error's code.
    pub reason: String,
    pub message: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AnswerTimings {
    pub ttft_ms: f64,
    pub opener_ms: f64,
    /// From the opener's end to the first continuation text from the cloud.
    pub cloud_first_token_ms: Option<f64>,
    pub total_ms: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Answer {
    /// Everything the user was shown, in order.
    pub text: String,
    pub opener: String,
    pub continuation: String,
    pub corrected: bool,
    pub fallback: Option<Fallback>,
    pub timings: AnswerTimings,
    pub prompt_tokens: usize,
    /// Tokens the local model generated (opener plus any local finish).
    pub local_tokens: usize,
    pub cloud_tokens: Option<u64>,
}

/// The events of one answer, in order: `Word`s, `OpenerDone`, `Delta`s (with at most one
/// `Correction` before the first cloud delta), then exactly one `Done` or `Error`.
#[derive(Debug, Clone, PartialEq)]
pub enum AnswerEvent {
    Word(WordEvent),
    /// `tokens`: how many the opener generated (for speed figures).
    OpenerDone { text: String, stop: StopReason, timings: OpenerTimings, tokens: usize },
    Delta { text: String, source: Source },
    Correction,
    Done(Box<Answer>),
    Error(RequestError),
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs the engine job and forwards its words; returns the finished opener or its error.
async fn run_local(
    engine: &Engine,
    query: &str,
    options: OpenerOptions,
    arrived: Instant,
    cancel: &CancellationToken,
    mut on_word: impl FnMut(WordEvent) -> bool,
) -> Result<Opener, RequestError> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let engine_cancel = CancelToken::default();
    let job = Job {
        query: query.to_string(),
        options,
        arrived,
        cancel: engine_cancel.clone(),
        sink: Box::new(move |ev| {
            let _ = tx.send(ev);
        }),
    };
    engine.submit(job).map_err(|(e, _)| e)?;
    loop {
        let ev = tokio::select! {
            _ = cancel.cancelled() => {
                engine_cancel.cancel();
                // Wait for the worker's terminal event so the job is really over.
                while let Some(ev) = rx.recv().await {
                    if !matches!(ev, OpenerEvent::Word(_)) { break; }
                }
                return Err(RequestError::Cancelled);
            }
            ev = rx.recv() => ev,
        };
        match ev {
            Some(OpenerEvent::Word(w)) => {
                if !on_word(w) {
                    engine_cancel.cancel();
                }
            }
            Some(OpenerEvent::Done(o)) => return Ok(o),
            Some(OpenerEvent::Error(e)) => return Err(e),
            None => return Err(RequestError::Inference("the engine dropped the request".into())),
        }
    }
}

/// Only the opener, written on the device, with its words passed to `on_word` as they
/// complete (returning false cancels). For callers that want no continuation.
pub async fn opener_only(
    engine: &Engine,
    query: &str,
    options: OpenerOptions,
    arrived: Instant,
    cancel: &CancellationToken,
    on_word: impl FnMut(WordEvent) -> bool,
) -> Result<Opener, RequestError> {
    run_local(engine, query, options, arrived, cancel, on_word).await
}

/// Produces one answer into `tx`. Ends with exactly one `Done` or `Error` (unless the receiver
/// is gone, which cancels the work). The channel is unbounded so no event is ever dropped or
/// waited for; an answer has at most a few hundred events.
///
/// Runs inside a `request` span carrying the id and front end, logs one line with the
/// timings when the answer is done, and records the metrics of [`crate::observe`].
pub async fn answer(
    engine: Arc<Engine>,
    cloud: Option<Arc<CloudClient>>,
    req: AnswerRequest,
    arrived: Instant,
    tx: mpsc::UnboundedSender<AnswerEvent>,
    cancel: CancellationToken,
) {
    use tracing::Instrument;
    let span = tracing::info_span!("request", id = %req.id, front = req.front.name());
    let front = req.front;
    crate::observe::started(engine.queue_depth());
    // Watch the terminal event on its way out, for the log line and the metrics.
    let (inner_tx, mut inner_rx) = mpsc::unbounded_channel();
    let work = answer_inner(engine, cloud, req, arrived, inner_tx, cancel.clone());
    let forward = async move {
        let mut finished = false;
        while let Some(ev) = inner_rx.recv().await {
            match &ev {
                AnswerEvent::Done(a) => {
                    finished = true;
                    let t = &a.timings;
                    tracing::info!(
                        ttft_ms = t.ttft_ms,
                        opener_ms = t.opener_ms,
                        cloud_first_token_ms = t.cloud_first_token_ms,
                        total_ms = t.total_ms,
                        corrected = a.corrected,
                        fallback = a.fallback.as_ref().map(|f| f.reason.as_str()),
                        "answered"
                    );
                    crate::observe::finished(front, Ok(a));
                }
                AnswerEvent::Error(e) => {
                    finished = true;
                    tracing::info!(code = e.code(), error = %e, "request failed");
                    crate::observe::finished(front, Err(e));
                }
                _ => {}
            }
            if tx.send(ev).is_err() {
                cancel.cancel();
            }
        }
        if !finished {
            // The caller went away before the end; count it as cancelled.
            crate::observe::finished(front, Err(&RequestError::Cancelled));
        }
    };
    futures_util::future::join(work, forward).instrument(span).await;
}

async fn answer_inner(
    engine: Arc<Engine>,
    cloud: Option<Arc<CloudClient>>,
    req: AnswerRequest,
    arrived: Instant,
    tx: mpsc::UnboundedSender<AnswerEvent>,
    cancel: CancellationToken,
) {
    let cloud = cloud.filter(|_| req.use_cloud);
    if let Some(c) = cloud.clone() {
        tokio::spawn(async move { c.warm().await });
    }
    // A client that goes away cancels everything it started.
    let send = |ev: AnswerEvent| {
        if tx.send(ev).is_err() {
            cancel.cancel();
        }
    };
    let opener = run_local(&engine, &req.query, req.opener.clone(), arrived, &cancel, |w| tx.send(AnswerEvent::Word(w)).is_ok()).await;
    let opener = match opener {
        Ok(o) => o,
        Err(e) => return send(AnswerEvent::Error(e)),
    };
    send(AnswerEvent::OpenerDone { text: opener.text.clone(), stop: opener.stop, timings: opener.timings.clone(), tokens: opener.generated_tokens });
    let opener_end = Instant::now();
    let mut shown = opener.text.clone();
    let mut continuation = String::new();
    let mut corrected = false;
    let mut cloud_first_token_ms = None;
    let mut cloud_tokens = None;
    let mut local_tokens = opener.generated_tokens;

    let fallback = match &cloud {
        None => Some(if req.use_cloud {
            Fallback { reason: "not_configured".into(), message: "no cloud endpoint is configured".into() }
        } else {
            Fallback { reason: "disabled".into(), message: "the request asked for no cloud".into() }
        }),
        Some(client) => {
            let mut seam = Seam::new(&opener.text);
            let (dtx, mut drx) = mpsc::unbounded_channel::<String>();
            let call = client.continue_answer(&req.query, &opener.text, req.recovery, &cancel, move |t| {
                let _ = dtx.send(t.to_string());
            });
            tokio::pin!(call);
            // Everything the seam lets through goes out the same way, wherever it was read.
            let mut emit = |out: crate::cloud::SeamOutput| {
                if out.correction && !corrected {
                    corrected = true;
                    send(AnswerEvent::Correction);
                }
                if !out.text.is_empty() {
                    cloud_first_token_ms.get_or_insert_with(|| ms(opener_end.elapsed()));
                    continuation.push_str(&out.text);
                    send(AnswerEvent::Delta { text: out.text, source: Source::Cloud });
                }
            };
            let result = loop {
                tokio::select! {
                    r = &mut call => break r,
                    Some(delta) = drx.recv() => emit(seam.push(&delta)),
                }
            };
            while let Ok(delta) = drx.try_recv() {
                emit(seam.push(&delta));
            }
            emit(seam.flush());
            match result {
                Ok(summary) => {
                    cloud_tokens = summary.completion_tokens;
                    None
                }
                Err(f) if f.error == crate::cloud::CloudError::Cancelled || cancel.is_cancelled() => {
                    return send(AnswerEvent::Error(RequestError::Cancelled));
                }
                Err(f) => {
                    tracing::warn!(error = %f.error, attempts = f.attempts, "cloud continuation failed; finishing locally");
                    Some(Fallback { reason: f.error.code().into(), message: f.error.to_string() })
                }
            }
        }
    };
    shown.push_str(&continuation);

    if fallback.is_some() {
        // Never leave a dangling half sentence: the local model finishes the current one.
        let options = OpenerOptions {
            continue_from: Some(shown.clone()),
            max_words: 40,
            max_tokens: 80,
            ..req.opener.clone()
        };
        let mut first = true;
        let ends_alnum = shown.chars().last().is_some_and(|c| c.is_alphanumeric() || c == ',');
        let mut local_text = String::new();
        let finished = run_local(&engine, &req.query, options, Instant::now(), &cancel, |w| {
            let lead = if first && w.leading.is_empty() && ends_alnum { " ".to_string() } else { w.leading.clone() };
            first = false;
            let text = format!("{lead}{}", w.text);
            local_text.push_str(&text);
            tx.send(AnswerEvent::Delta { text, source: Source::Local }).is_ok()
        })
        .await;
        match finished {
            Ok(o) => local_tokens += o.generated_tokens,
            Err(RequestError::Cancelled) => return send(AnswerEvent::Error(RequestError::Cancelled)),
            Err(e) => tracing::warn!(error = %e, "finishing the sentence locally failed"),
        }
        continuation.push_str(&local_text);
        shown.push_str(&local_text);
    }

    let answer = Answer {
        text: shown,
        opener: opener.text,
        continuation,
        corrected,
        fallback,
        timings: AnswerTimings {
            ttft_ms: ms(opener.timings.ttft),
            opener_ms: ms(opener.timings.opener),
            cloud_first_token_ms,
            total_ms: ms(arrived.elapsed()),
        },
        prompt_tokens: opener.prompt_tokens,
        local_tokens,
        cloud_tokens,
    };
    send(AnswerEvent::Done(Box::new(answer)));
}
