//! The streaming client for an OpenAI-compatible `POST /chat/completions`: SSE parsed by
//! eventsource-stream, every event checked for an error object, truncation detected, retries
//! with backoff (honouring Retry-After) only before the first continuation token, and a
//! connection pool kept warm so the hand-off pays no handshake.
//!
//! Whatever the provider sends, memory stays bounded: the raw stream is cut at a total and
//! per-event size, and the continuation passed on at `max_output_bytes` / `max_output_chunks`
//! (the stream is then dropped and the answer says so).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use eventsource_stream::Eventsource;
use futures_util::{Stream, StreamExt};
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::config::CloudConfig;
use super::probe::LayoutChoice;
use super::prompt::{messages, prefill_fields, Layout};
use super::provider::{self, clean, error_message, error_text};
use crate::config::RecoveryMode;

/// Why a continuation failed. Messages never contain the API key.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CloudError {
    #[error("cannot reach the cloud endpoint: {0}")]
    Connect(String),
    #[error("the cloud answered HTTP {status}: {message}")]
    Http { status: u16, message: String, retry_after: Option<Duration> },
    #[error("no continuation text within {0:?} of the request")]
    FirstTokenTimeout(Duration),
    #[error("the cloud stream stalled for {0:?}")]
    IdleTimeout(Duration),
    #[error("the continuation took longer than {0:?} in all")]
    TotalTimeout(Duration),
    #[error("the cloud stream ended without [DONE] or a finish reason (truncated)")]
    Truncated,
    #[error("the cloud reported an error mid-stream: {0}")]
    Stream(String),
    #[error("the cloud sent a malformed event: {0}")]
    Malformed(String),
    #[error("the cloud sent too much: {0}")]
    Oversize(String),
    #[error("cancelled")]
    Cancelled,
    #[error("internal error: {0}")]
    Internal(String),
}

impl CloudError {
    /// A short stable name for metrics and terminal events.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::Http { status: 429, .. } => "rate_limited",
            Self::Http { .. } => "http_error",
            Self::FirstTokenTimeout(_) => "first_token_timeout",
            Self::IdleTimeout(_) => "stalled",
            Self::TotalTimeout(_) => "total_timeout",
            Self::Truncated => "truncated",
            Self::Stream(_) => "stream_error",
            Self::Malformed(_) => "malformed_event",
            Self::Oversize(_) => "oversize",
            Self::Cancelled => "cancelled",
            Self::Internal(_) => "internal",
        }
    }

    /// Every code [`CloudError::code`] can return.
    pub const CODES: &'static [&'static str] = &[
        "connect", "rate_limited", "http_error", "first_token_timeout", "stalled", "total_timeout", "truncated", "stream_error",
        "malformed_event", "oversize", "cancelled", "internal",
    ];

    fn retryable(&self) -> bool {
        match self {
            Self::Connect(_) | Self::FirstTokenTimeout(_) => true,
            Self::Http { status, message, .. } => {
                matches!(status, 408 | 409 | 500..=599) || (*status == 429 && !message.contains("insufficient_quota"))
            }
            _ => false,
        }
    }
}

/// A function call the cloud asked for, in OpenAI's shape (`arguments` is the JSON text).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

/// How a successful continuation went.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CloudSummary {
    pub attempts: u32,
    /// From the call to the first continuation text.
    #[serde(skip)]
    pub first_token: Option<Duration>,
    /// The provider's (`stop`, `length`, …), or `output_cap` when mulmd stopped reading.
    pub finish_reason: Option<String>,
    /// Which cap ended the continuation, when one did.
    pub capped: Option<String>,
    pub completion_tokens: Option<u64>,
    pub prompt_tokens: Option<u64>,
    /// Function calls the cloud made instead of (or after) text.
    pub tool_calls: Vec<ToolCall>,
}

/// A failure, and whether any text had already been passed on (then it was not retried).
#[derive(Debug, Clone)]
pub struct Failure {
    pub error: CloudError,
    pub forwarded: bool,
    pub attempts: u32,
}

/// What a continuation stream yields: text to append, then exactly one `End`.
#[derive(Debug, Clone)]
pub enum CloudEvent {
    Delta(String),
    End(Result<CloudSummary, Failure>),
}

/// What the cloud is asked.
#[derive(Debug, Clone)]
pub struct ContinuationRequest {
    /// The conversation in OpenAI's message shape, ending with the turn to answer.
    pub messages: Vec<Value>,
    /// Continue this opener (see `prompt::messages`); None asks the conversation as it is.
    pub opener: Option<String>,
    pub mode: RecoveryMode,
    /// Request fields as the client sent them (`tools`, `response_format`, `temperature`…).
    /// mulmd's own (`model`, `messages`, `stream`, `stream_options`) are not taken from here;
    /// `max_tokens` only when below the configured one.
    pub params: Map<String, Value>,
}

/// A continuation in progress: a stream of [`CloudEvent`]s ending with one `End`. Dropping it
/// stops the request.
pub struct Continuation {
    rx: mpsc::Receiver<CloudEvent>,
    ended: bool,
    _stop: DropGuard,
}

impl Stream for Continuation {
    type Item = CloudEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<CloudEvent>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let ev = match self.rx.poll_recv(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Some(ev)) => ev,
            // The request task ended without its End (it panicked): still one End.
            Poll::Ready(None) => CloudEvent::End(Err(Failure {
                error: CloudError::Internal("the continuation stopped unexpectedly".into()),
                forwarded: true,
                attempts: 0,
            })),
        };
        self.ended = matches!(ev, CloudEvent::End(_));
        Poll::Ready(Some(ev))
    }
}

pub struct CloudClient {
    http: reqwest::Client,
    cfg: CloudConfig,
    last_used: Mutex<Option<Instant>>,
    layout: LayoutChoice,
}

/// The HTTP client could not be built (a TLS set-up problem).
#[derive(Debug, thiserror::Error)]
#[error("cannot build the cloud's HTTP client: {0}")]
pub struct BuildError(String);

/// Connections idle longer than this may have been dropped by a proxy: warm them again.
const WARM_AFTER: Duration = Duration::from_secs(30);
/// Retry-After values beyond this are not waited for: the user would rather have the fallback.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(10);
/// Deltas read ahead of the answer's consumer; beyond them reading waits (TCP backpressure).
const READ_AHEAD: usize = 16;
/// The longest SSE event read; eventsource-stream holds an event whole until it ends.
const MAX_EVENT_BYTES: usize = 64 * 1024;
/// Raw stream bytes allowed besides 64 per byte of output cap (JSON framing, usage chunks,
/// keep-alive comments): a stream of empty events cannot run on for ever either.
const RESPONSE_BYTES_BASE: usize = 4 << 20;

impl CloudClient {
    pub fn new(cfg: CloudConfig) -> Result<Self, BuildError> {
        crate::host::tls::install_crypto();
        let http = reqwest::Client::builder()
            .connect_timeout(cfg.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(300))
            .tcp_keepalive(Duration::from_secs(30))
            .tcp_nodelay(true)
            .user_agent(concat!("mulmd/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| BuildError(e.to_string()))?;
        Ok(Self { http, cfg, last_used: Mutex::new(None), layout: LayoutChoice::default() })
    }

    /// The key, for cutting it out of whatever the provider sends back: providers sometimes
    /// quote the key they were sent in an error body ("invalid key sk-…"), and that text
    /// becomes a log line and a reply.
    fn key(&self) -> Option<&str> {
        self.cfg.api_key.as_ref().map(|k| k.expose())
    }

    pub fn config(&self) -> &CloudConfig {
        &self.cfg
    }

    fn touch(&self) -> bool {
        let mut last = self.last_used.lock().unwrap_or_else(|p| p.into_inner());
        let stale = last.is_none_or(|t| t.elapsed() > WARM_AFTER);
        *last = Some(Instant::now());
        stale
    }

    /// How the opener is put to this endpoint (probed once with `cloud.prompt = "auto"`).
    pub async fn layout(&self) -> Layout {
        self.layout.layout(&self.http, &self.cfg).await
    }

    /// Opens (or refreshes) a pooled connection, TLS included, if none was used recently, and
    /// settles the prompt layout. Cheap to call at the start of every request, concurrently
    /// with the opener. Its request never overlaps a continuation's: llama-cpp-python's server
    /// (`interrupt_requests`, on by default) ends the stream it is sending when any other
    /// request arrives, `/models` included, and the answer lost its whole continuation.
    ///
    /// So a warm-up's own request goes out only when the layout is already known, at once, while
    /// the opener is still being written; the first request's layout probe is itself a request
    /// on the pooled connection and warms it instead.
    pub async fn warm(&self) {
        if !self.layout.known(&self.cfg) {
            self.layout().await;
            self.touch();
            return;
        }
        if !self.touch() {
            return;
        }
        let mut req = self.http.get(format!("{}/models", self.cfg.base_url)).timeout(self.cfg.connect_timeout * 2);
        if let Some(k) = self.key() {
            req = req.bearer_auth(k);
        }
        if let Err(e) = req.send().await {
            tracing::debug!(error = %clean(&redact(&e.to_string()), self.key(), false), "warming the cloud connection failed");
        }
    }

    /// Starts the continuation of `req.opener`: deltas as they arrive, then one `End`.
    /// Retries only while nothing has been passed on. `cancel` (or dropping the stream) stops
    /// the request.
    pub fn continuation(self: &Arc<Self>, req: ContinuationRequest, cancel: &CancellationToken) -> Continuation {
        let (tx, rx) = mpsc::channel(READ_AHEAD);
        let stop = cancel.child_token();
        let (me, token) = (self.clone(), stop.clone());
        tokio::spawn(async move {
            let end = me.run(&req, &token, &tx).await;
            let _ = tx.send(CloudEvent::End(end)).await;
        });
        Continuation { rx, ended: false, _stop: stop.drop_guard() }
    }

    async fn run(&self, req: &ContinuationRequest, cancel: &CancellationToken, tx: &mpsc::Sender<CloudEvent>) -> Result<CloudSummary, Failure> {
        let started = Instant::now();
        let deadline = started + self.cfg.total_timeout;
        let layout = match req.opener {
            Some(_) => self.layout().await,
            None => Layout::Instruct,
        };
        let body = self.body(req, layout);
        // A warm-up that starts from now on finds the connection just used and sends nothing.
        self.touch();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let mut out = Output { tx, forwarded: false, bytes: 0, chunks: 0 };
            let result = self.attempt(&body, cancel, deadline, started, &mut out).await;
            self.touch();
            let forwarded = out.forwarded;
            match result {
                Ok(mut s) => {
                    s.attempts = attempt;
                    return Ok(s);
                }
                Err(error) if forwarded || !error.retryable() || attempt > self.cfg.max_retries => {
                    return Err(Failure { error, forwarded, attempts: attempt });
                }
                Err(error) => {
                    let wait = match &error {
                        CloudError::Http { retry_after: Some(d), .. } => *d,
                        _ => backoff(attempt),
                    };
                    if wait > MAX_RETRY_WAIT || Instant::now().checked_add(wait).is_none_or(|t| t >= deadline) {
                        return Err(Failure { error, forwarded, attempts: attempt });
                    }
                    tracing::info!(attempt, wait_ms = wait.as_millis() as u64, error = %error, "retrying the cloud request");
                    tokio::select! {
                        _ = cancel.cancelled() => return Err(Failure { error: CloudError::Cancelled, forwarded, attempts: attempt }),
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    /// The request body: the client's fields, then mulmd's over them.
    fn body(&self, req: &ContinuationRequest, layout: Layout) -> Value {
        let mut body = req.params.clone();
        for own in ["model", "messages", "stream", "stream_options", "n", "max_completion_tokens", "continue_final_message", "add_generation_prompt"] {
            body.remove(own);
        }
        let asked = req.params.get("max_tokens").or_else(|| req.params.get("max_completion_tokens")).and_then(Value::as_u64);
        let max_tokens = asked.map_or(self.cfg.max_tokens as u64, |a| a.min(self.cfg.max_tokens as u64));
        let messages = match &req.opener {
            Some(opener) => messages(&req.messages, opener, req.mode, layout),
            None => req.messages.clone(),
        };
        if req.opener.is_some() && layout == Layout::Prefill {
            body.extend(prefill_fields().map(|(k, v)| (k.to_string(), v)));
        }
        body.insert("model".into(), self.cfg.model.clone().into());
        body.insert("messages".into(), messages.into());
        body.insert("stream".into(), true.into());
        body.insert("max_tokens".into(), max_tokens.into());
        if let (Some(t), false) = (self.cfg.temperature, body.contains_key("temperature")) {
            body.insert("temperature".into(), t.into());
        }
        if self.cfg.include_usage {
            body.insert("stream_options".into(), serde_json::json!({ "include_usage": true }));
        }
        Value::Object(body)
    }

    async fn attempt(
        &self,
        body: &Value,
        cancel: &CancellationToken,
        deadline: Instant,
        started: Instant,
        out: &mut Output<'_>,
    ) -> Result<CloudSummary, CloudError> {
        let total = self.cfg.total_timeout;
        let mut request = self.http.post(format!("{}/chat/completions", self.cfg.base_url)).json(body);
        if let Some(k) = self.key() {
            request = request.bearer_auth(k);
        }
        for (name, value) in &self.cfg.extra_headers {
            request = request.header(name, value);
        }
        let first_deadline = (Instant::now() + self.cfg.first_token_timeout).min(deadline);
        let send = tokio::time::timeout_at(first_deadline.into(), request.send());
        let response = tokio::select! {
            _ = cancel.cancelled() => return Err(CloudError::Cancelled),
            r = send => match r {
                Err(_) => return Err(timeout_error(first_deadline, deadline, self.cfg.first_token_timeout, total)),
                Ok(Err(e)) => return Err(CloudError::Connect(clean(&redact(&e.to_string()), self.key(), false))),
                Ok(Ok(r)) => r,
            },
        };
        let status = response.status();
        if !status.is_success() {
            let retry_after = provider::retry_after(response.headers());
            let (body, cut) = read_capped(response, provider::MAX_ERROR_BODY, Duration::from_secs(2)).await;
            return Err(CloudError::Http { status: status.as_u16(), message: error_message(&body, self.key(), cut), retry_after });
        }
        let limit = RESPONSE_BYTES_BASE + 64 * self.cfg.max_output_bytes;
        let mut events = bounded(response.bytes_stream(), limit, MAX_EVENT_BYTES).eventsource();
        let mut summary = CloudSummary::default();
        let mut got_text = false;
        loop {
            let until = if got_text { (Instant::now() + self.cfg.idle_timeout).min(deadline) } else { first_deadline };
            let next = tokio::select! {
                _ = cancel.cancelled() => return Err(CloudError::Cancelled),
                n = tokio::time::timeout_at(until.into(), events.next()) => n,
            };
            let event = match next {
                Err(_) if got_text => {
                    return Err(if Instant::now() >= deadline { CloudError::TotalTimeout(total) } else { CloudError::IdleTimeout(self.cfg.idle_timeout) })
                }
                Err(_) => return Err(timeout_error(first_deadline, deadline, self.cfg.first_token_timeout, total)),
                Ok(None) if summary.finish_reason.is_some() => return Ok(summary),
                Ok(None) => return Err(CloudError::Truncated),
                Ok(Some(Err(eventsource_stream::EventStreamError::Transport(BodyError::Oversize(what))))) => return Err(CloudError::Oversize(what)),
                Ok(Some(Err(e))) => return Err(CloudError::Malformed(clean(&redact(&e.to_string()), self.key(), false))),
                Ok(Some(Ok(ev))) => ev,
            };
            let Some(read) = read_event(&event.data, self.key())? else {
                return Ok(summary);
            };
            if let Some(u) = read.usage {
                (summary.completion_tokens, summary.prompt_tokens) = u;
            }
            for text in read.texts {
                if !got_text {
                    got_text = true;
                    summary.first_token = Some(started.elapsed());
                }
                if let Passed::Capped(why) = out.pass(&text, &self.cfg).await? {
                    summary.finish_reason = Some("output_cap".into());
                    summary.capped = Some(why);
                    return Ok(summary);
                }
            }
            for piece in read.tool_calls {
                // A call counts as text for the first-token and idle clocks, and its bytes
                // against the output cap.
                if !got_text {
                    got_text = true;
                    summary.first_token = Some(started.elapsed());
                }
                if let Err(why) = out.call(piece, &mut summary.tool_calls, &self.cfg) {
                    summary.finish_reason = Some("output_cap".into());
                    summary.capped = Some(why);
                    return Ok(summary);
                }
            }
            if read.finish_reason.is_some() {
                summary.finish_reason = read.finish_reason;
            }
        }
    }
}

/// A piece of a streamed function call: OpenAI streams the `index`, `id` and `name` once and
/// the `arguments` text in pieces.
#[derive(Debug, Default, PartialEq)]
struct CallPiece {
    index: usize,
    id: Option<String>,
    name: Option<String>,
    arguments: String,
}

/// What one SSE event of a chat-completions stream says.
#[derive(Debug, Default, PartialEq)]
struct Read {
    /// Non-empty `delta.content` pieces, in choice order.
    texts: Vec<String>,
    tool_calls: Vec<CallPiece>,
    finish_reason: Option<String>,
    /// (completion_tokens, prompt_tokens) from a usage object.
    usage: Option<(Option<u64>, Option<u64>)>,
}

/// One event's data: None for `[DONE]`, an error for an error object or data that is not
/// JSON (text scrubbed of `key`), else what it carries (possibly nothing: comments, empty
/// events and chunks without content are normal).
fn read_event(data: &str, key: Option<&str>) -> Result<Option<Read>, CloudError> {
    let data = data.trim();
    if data.is_empty() {
        return Ok(Some(Read::default()));
    }
    if data == "[DONE]" {
        return Ok(None);
    }
    let v: serde_json::Value = serde_json::from_str(data).map_err(|e| {
        let excerpt: String = clean(data, key, false).chars().take(80).collect();
        CloudError::Malformed(format!("{e} in {excerpt:?}"))
    })?;
    if let Some(err) = v.get("error").filter(|e| !e.is_null()) {
        return Err(CloudError::Stream(clean(&error_text(err), key, false)));
    }
    if v.get("object").and_then(|o| o.as_str()) == Some("error") {
        return Err(CloudError::Stream(clean(&error_text(&v), key, false)));
    }
    let mut read = Read::default();
    if let Some(usage) = v.get("usage").filter(|u| u.is_object()) {
        read.usage = Some((usage.get("completion_tokens").and_then(|x| x.as_u64()), usage.get("prompt_tokens").and_then(|x| x.as_u64())));
    }
    for choice in v.get("choices").and_then(|c| c.as_array()).into_iter().flatten() {
        if let Some(text) = choice.pointer("/delta/content").and_then(|c| c.as_str()).filter(|t| !t.is_empty()) {
            read.texts.push(text.to_string());
        }
        for call in choice.pointer("/delta/tool_calls").and_then(Value::as_array).into_iter().flatten() {
            let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
            read.tool_calls.push(CallPiece {
                index: call.get("index").and_then(Value::as_u64).unwrap_or(0).min(usize::MAX as u64) as usize,
                id: text(call.get("id")),
                name: text(call.pointer("/function/name")),
                arguments: text(call.pointer("/function/arguments")).unwrap_or_default(),
            });
        }
        if let Some(reason) = choice.get("finish_reason").and_then(|r| r.as_str()) {
            read.finish_reason = Some(clean(reason, key, false));
        }
    }
    Ok(Some(read))
}

/// Where one attempt's text goes, and how much of it has gone.
struct Output<'a> {
    tx: &'a mpsc::Sender<CloudEvent>,
    forwarded: bool,
    bytes: usize,
    chunks: usize,
}

enum Passed {
    All,
    /// A cap was reached (what was allowed went out); why, for the answer's end.
    Capped(String),
}

impl Output<'_> {
    /// Passes `text` on, as much of it as the caps allow.
    async fn pass(&mut self, text: &str, cfg: &CloudConfig) -> Result<Passed, CloudError> {
        if self.chunks >= cfg.max_output_chunks {
            return Ok(Passed::Capped(format!("the continuation reached {} chunks (cloud.max_output_chunks)", cfg.max_output_chunks)));
        }
        let room = cfg.max_output_bytes.saturating_sub(self.bytes);
        let capped = text.len() > room;
        let piece = if capped { floor_char(text, room) } else { text };
        if !piece.is_empty() {
            self.forwarded = true;
            self.bytes += piece.len();
            self.chunks += 1;
            if self.tx.send(CloudEvent::Delta(piece.to_string())).await.is_err() {
                return Err(CloudError::Cancelled);
            }
        }
        Ok(if capped {
            Passed::Capped(format!("the continuation reached {} bytes (cloud.max_output_bytes)", cfg.max_output_bytes))
        } else {
            Passed::All
        })
    }
}

/// Most function calls one continuation may make.
const MAX_TOOL_CALLS: usize = 64;

impl Output<'_> {
    /// Adds a piece of a function call to `calls`, within the caps (the arguments' bytes count
    /// against `max_output_bytes`).
    fn call(&mut self, piece: CallPiece, calls: &mut Vec<ToolCall>, cfg: &CloudConfig) -> Result<(), String> {
        self.forwarded = true;
        if piece.index >= MAX_TOOL_CALLS {
            return Err(format!("the continuation made more than {MAX_TOOL_CALLS} function calls"));
        }
        while calls.len() <= piece.index {
            calls.push(ToolCall { id: format!("call_{}", calls.len()), name: String::new(), arguments: String::new() });
        }
        let size = piece.arguments.len() + piece.name.as_ref().map_or(0, String::len) + piece.id.as_ref().map_or(0, String::len);
        if self.bytes + size > cfg.max_output_bytes {
            return Err(format!("the continuation reached {} bytes (cloud.max_output_bytes)", cfg.max_output_bytes));
        }
        self.bytes += size;
        let call = &mut calls[piece.index];
        if let Some(id) = piece.id {
            call.id = id;
        }
        if let Some(name) = piece.name {
            call.name.push_str(&name);
        }
        call.arguments.push_str(&piece.arguments);
        Ok(())
    }
}

/// The longest start of `s` of at most `max` bytes that ends on a character boundary.
fn floor_char(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Why the raw response stream was cut.
#[derive(Debug)]
enum BodyError {
    Transport(String),
    Oversize(String),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Transport(e) | Self::Oversize(e) => f.write_str(e),
        }
    }
}

/// The response body, ended with an error once it passes `total` bytes or an SSE event (the
/// bytes since the last blank line) passes `event` bytes.
fn bounded(
    body: impl Stream<Item = reqwest::Result<Bytes>>,
    total: usize,
    event: usize,
) -> impl Stream<Item = Result<Bytes, BodyError>> {
    // (bytes so far, bytes since the last event boundary, last byte other than '\r', failed)
    let state = (0usize, 0usize, 0u8, false);
    body.scan(state, move |(seen, since, last, failed), item| {
        if *failed {
            return std::future::ready(None);
        }
        let out = match item {
            Err(e) => Err(BodyError::Transport(redact(&e.to_string()))),
            Ok(bytes) => {
                *seen += bytes.len();
                for &b in bytes.iter() {
                    match b {
                        b'\r' => {}
                        b'\n' if *last == b'\n' => *since = 0,
                        _ => *since += 1,
                    }
                    if b != b'\r' {
                        *last = b;
                    }
                }
                if *seen > total {
                    Err(BodyError::Oversize(format!("the stream passed {} MiB", total >> 20)))
                } else if *since > event {
                    Err(BodyError::Oversize(format!("an event passed {} KiB", event >> 10)))
                } else {
                    Ok(bytes)
                }
            }
        };
        *failed = out.is_err();
        std::future::ready(Some(out))
    })
}

fn timeout_error(first_deadline: Instant, deadline: Instant, first: Duration, total: Duration) -> CloudError {
    if first_deadline >= deadline {
        CloudError::TotalTimeout(total)
    } else {
        CloudError::FirstTokenTimeout(first)
    }
}

/// Exponential backoff from 0.5 s, capped at 8 s, with up to 25% jitter.
fn backoff(attempt: u32) -> Duration {
    let base = 0.5 * 2f64.powi(attempt.saturating_sub(1).min(16) as i32);
    let jitter = 1.0 - 0.25 * rand::random::<f64>();
    Duration::from_secs_f64(base.min(8.0) * jitter)
}

/// Up to `max` bytes of an error body, read for at most `wait`; true when the body was longer
/// (or did not end in time), so the text stops mid-way.
async fn read_capped(mut response: reqwest::Response, max: usize, wait: Duration) -> (String, bool) {
    let mut body = Vec::new();
    let read = async {
        while let Ok(Some(chunk)) = response.chunk().await {
            let room = max - body.len();
            body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if chunk.len() > room {
                return true;
            }
        }
        false
    };
    let cut = tokio::time::timeout(wait, read).await.unwrap_or(true);
    (String::from_utf8_lossy(&body).into_owned(), cut)
}

/// reqwest errors may quote the URL; a key is never in it, but query strings could carry
/// one, so anything after '?' is cut.
fn redact(s: &str) -> String {
    match s.find('?') {
        Some(i) => format!("{}?…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn feed(chunks: &[&[u8]], total: usize, event: usize) -> Vec<Result<usize, String>> {
        let body = futures_util::stream::iter(chunks.iter().map(|c| Ok::<_, reqwest::Error>(Bytes::copy_from_slice(c))).collect::<Vec<_>>());
        let out = bounded(body, total, event).collect::<Vec<_>>().await;
        out.into_iter().map(|r| r.map(|b| b.len()).map_err(|e| e.to_string())).collect()
    }

    #[tokio::test]
    async fn the_raw_stream_is_cut_at_its_total_and_at_any_long_event() {
        let ok = feed(&[b"data: a\n\n", b"data: b\r\n\r\n"], 100, 10).await;
        assert!(ok.iter().all(|r| r.is_ok()), "{ok:?}");
        let long_event = feed(&[b"data: 0123", b"456789abc", b"\n\ndata: x\n\n"], 100, 10).await;
        assert_eq!(long_event.len(), 2, "nothing after the error: {long_event:?}");
        assert!(long_event[1].as_ref().unwrap_err().contains("event"));
        // Many short lines without a blank line between them are still one event.
        let lines = feed(&[b"data: a\n", b"data: b\n", b"data: c\n"], 100, 20).await;
        assert!(lines.last().unwrap().is_err(), "{lines:?}");
        let total = feed(&[b"data: a\n\n".as_slice(); 5], 30, 20).await;
        assert!(total[3].as_ref().unwrap_err().contains("stream"), "{total:?}");
    }

    #[test]
    fn a_cut_never_splits_a_character() {
        assert_eq!(floor_char("añb", 2), "a");
        assert_eq!(floor_char("añb", 3), "añ");
        assert_eq!(floor_char("ab", 9), "ab");
    }

    #[test]
    fn backoff_grows_and_stays_capped_for_any_attempt() {
        assert!(backoff(1) <= Duration::from_millis(500));
        assert!(backoff(u32::MAX) <= Duration::from_secs(8));
    }

    #[test]
    fn events_say_what_they_carry() {
        let chunk = r#"{"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#;
        assert_eq!(read_event(chunk, None).unwrap().unwrap().texts, ["Hi"]);
        assert_eq!(read_event("[DONE]", None).unwrap(), None);
        assert_eq!(read_event("", None).unwrap(), Some(Read::default()));
        let usage = r#"{"choices":[],"usage":{"completion_tokens":7,"prompt_tokens":-1}}"#;
        assert_eq!(read_event(usage, None).unwrap().unwrap().usage, Some((Some(7), None)));
        let e = read_event(r#"{"error":{"message":"boom sk-secret-key-1"}}"#, Some("sk-secret-key-1")).unwrap_err();
        assert_eq!(e, CloudError::Stream("boom [redacted]".into()));
        assert!(matches!(read_event("{nope", None), Err(CloudError::Malformed(_))));
    }

    proptest::proptest! {
        #[test]
        fn any_event_data_is_read_or_refused_without_a_panic(data in "\\PC{0,200}") {
            let _ = read_event(&data, Some("sk-abcdef123"));
        }

        #[test]
        fn any_json_event_is_read_or_refused_without_a_panic(
            content in proptest::option::of(".{0,20}"),
            finish in proptest::option::of("[a-z_]{0,10}"),
            tokens in proptest::option::of(proptest::num::i64::ANY),
            n in 0usize..3,
        ) {
            let choice = serde_json::json!({"delta": {"content": content}, "finish_reason": finish});
            let v = serde_json::json!({"choices": vec![choice; n], "usage": {"completion_tokens": tokens}});
            let read = read_event(&v.to_string(), None).unwrap().unwrap();
            proptest::prop_assert_eq!(read.texts.len(), if content.as_deref().is_some_and(|c| !c.is_empty()) { n } else { 0 });
        }
    }
}
