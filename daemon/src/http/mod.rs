//! The HTTP front: Ollama's API (`/api/*`, what Home Assistant's Ollama integration calls) and
//! OpenAI's (`/v1/*`, what LiteLLM, Open WebUI and every OpenAI client call) on one opt-in
//! listener. Both only translate the answer service's events: the device's opener streams
//! first, then the cloud's continuation; tool calls and structured output pass through to the
//! cloud without an opener.
//!
//! - [`ollama`]: `/api/tags`, `/api/ps`, `/api/version`, `/api/show`, `/api/pull`,
//!   `/api/chat`, `/api/generate` (NDJSON streams).
//! - [`openai`]: `/v1/models`, `/v1/chat/completions` (SSE streams).
//! - here: the router, bearer tokens, reading bodies, answering with a status first, and
//!   streaming a body from the answer's events.

pub mod ollama;
pub mod openai;
pub mod server;

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;

use crate::answer::{AnswerEvent, AnswerRequest, Answerer, Events};
use crate::config::HttpSection;
use crate::engine::RequestError;
use crate::host::secrets::Tokens;

/// What the APIs list about the model they serve.
#[derive(Debug, Clone)]
pub struct ModelCard {
    /// The name clients ask for (`http.model`).
    pub name: String,
    /// The model directory's own name, precision and context.
    pub source: String,
    pub precision: String,
    pub context_length: usize,
    /// A hex digest of the model file, as Ollama lists one.
    pub digest: String,
    pub size: u64,
}

/// Everything a handler needs.
pub struct HttpFront {
    pub(crate) answerer: Arc<Answerer>,
    pub(crate) cfg: HttpSection,
    pub(crate) model: ModelCard,
    tokens: Option<Arc<Tokens>>,
    /// When the front started: the models' "modified" time.
    pub(crate) started: SystemTime,
}

/// Why the HTTP front could not serve.
#[derive(Debug, thiserror::Error)]
#[error("HTTP front: {0}")]
pub struct HttpError(String);

impl HttpFront {
    pub fn new(answerer: Arc<Answerer>, cfg: HttpSection, model: ModelCard, tokens: Option<Arc<Tokens>>) -> Self {
        Self { answerer, cfg, model, tokens, started: SystemTime::now() }
    }

    pub fn cfg_ollama(&self) -> bool {
        self.cfg.ollama
    }

    pub fn cfg_openai(&self) -> bool {
        self.cfg.openai
    }

    /// Whether `name` is the model this front serves (`mulmd` or `mulmd:latest`).
    pub(crate) fn serves(&self, name: &str) -> bool {
        let name = name.strip_suffix(":latest").unwrap_or(name);
        name == self.model.name
    }
}

/// The router of the enabled APIs, behind the token check when tokens are configured.
pub fn router(front: Arc<HttpFront>) -> Router {
    let mut app = Router::new();
    if front.cfg.ollama {
        app = app.merge(ollama::routes());
    }
    if front.cfg.openai {
        app = app.merge(openai::routes());
    }
    let limit = front.cfg.max_request_bytes;
    app.layer(axum::middleware::from_fn_with_state(front.clone(), authorize))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(front)
}

/// Serves `router` on `listener` (TLS when `tls` is set) until `shutdown` resolves.
pub async fn serve(
    router: Router,
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), HttpError> {
    server::serve(router, listener, tls, shutdown).await.map_err(|e| HttpError(e.to_string()))
}

/// Lets a request through when no tokens are configured or it carries one of them as
/// `Authorization: Bearer …`; else 401 in the API's own error shape. `GET /` (Ollama's "is it
/// running" probe) stays open: it says nothing. The token is never logged; its name is.
async fn authorize(State(front): State<Arc<HttpFront>>, req: Request, next: Next) -> Response {
    let Some(tokens) = &front.tokens else { return next.run(req).await };
    if req.uri().path() == "/" {
        return next.run(req).await;
    }
    let why = match tokens.authorize(req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok())) {
        Ok(name) => {
            tracing::debug!(token = name, path = req.uri().path(), "authorized");
            return next.run(req).await;
        }
        Err(why) => why,
    };
    let mut r = if req.uri().path().starts_with("/v1/") {
        openai::error_response(StatusCode::UNAUTHORIZED, "authentication_error", why)
    } else {
        ollama::error_response(StatusCode::UNAUTHORIZED, why)
    };
    r.headers_mut().insert("www-authenticate", HeaderValue::from_static("Bearer"));
    r
}

/// A JSON response.
pub(crate) fn json(status: StatusCode, body: serde_json::Value) -> Response {
    (status, [(CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

/// The HTTP status of a request error, by each API's convention; a busy server adds
/// `Retry-After`.
pub(crate) fn status_of(e: &RequestError) -> StatusCode {
    match e {
        RequestError::EmptyQuery | RequestError::QueryTooLong { .. } | RequestError::PromptTooLong { .. } | RequestError::InvalidOptions(_) => StatusCode::BAD_REQUEST,
        RequestError::Busy { .. } | RequestError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        RequestError::Upstream(_) => StatusCode::BAD_GATEWAY,
        RequestError::Cancelled | RequestError::Inference(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Adds `Retry-After: 1` to a busy answer.
pub(crate) fn with_retry(mut r: Response, e: &RequestError) -> Response {
    if matches!(e, RequestError::Busy { .. }) {
        r.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

/// A request body as JSON, or the reason it is not.
pub(crate) fn parse_body(body: &Bytes) -> Result<serde_json::Value, String> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| format!("the request body is not JSON: {e}"))?;
    if !v.is_object() {
        return Err("the request body must be a JSON object".into());
    }
    Ok(v)
}

/// Starts answering and waits for the first event, so a refusal (bad request, busy) still
/// becomes an HTTP status instead of an error inside a 200 stream. Returns the events with
/// the first one put back.
pub(crate) async fn start(answerer: &Answerer, req: AnswerRequest) -> Result<(AnswerEvent, Events), RequestError> {
    let mut events = answerer.answer(req);
    match events.next().await {
        Some(AnswerEvent::Error(e)) => Err(e),
        Some(first) => Ok((first, events)),
        None => Err(RequestError::Inference("the answer ended before it began".into())),
    }
}

/// Waits for the whole answer (for `stream: false`).
pub(crate) async fn collect(first: AnswerEvent, mut events: Events) -> Vec<AnswerEvent> {
    let mut all = vec![first];
    while let Some(ev) = events.next().await {
        all.push(ev);
    }
    all
}

/// A streaming body: `first`, then every later event, each turned into zero or more pieces
/// of the body by `render`. The body ends after the terminal event's pieces. Dropping it (the
/// client went away) drops the answer, which cancels it.
pub(crate) fn stream_body<F>(first: AnswerEvent, events: Events, render: F) -> Body
where
    F: FnMut(AnswerEvent) -> Vec<Bytes> + Send + 'static,
{
    struct State<F> {
        events: Events,
        queue: VecDeque<Bytes>,
        render: F,
        ended: bool,
    }
    let mut state = State { events, queue: VecDeque::new(), render, ended: false };
    let terminal = first.is_terminal();
    state.queue.extend((state.render)(first));
    state.ended = terminal;
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(piece) = s.queue.pop_front() {
                return Some((Ok::<_, std::convert::Infallible>(piece), s));
            }
            if s.ended {
                return None;
            }
            let ev = s.events.next().await?;
            s.ended = ev.is_terminal();
            let pieces = (s.render)(ev);
            s.queue.extend(pieces);
        }
    });
    Body::from_stream(stream)
}

/// `t` as RFC 3339 UTC with milliseconds ("2026-12-01T21:35:02.123Z"), as Ollama writes times.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z", rem / 3600, rem / 60 % 60, rem % 60, d.subsec_millis())
}

/// Seconds since the epoch.
pub(crate) fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The request id: the client's `x-request-id` when usable, else a fresh one.
pub(crate) fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_string)
        .unwrap_or_else(crate::answer::new_request_id)
}

/// Milliseconds as whole nanoseconds (Ollama's durations).
pub(crate) fn ns(ms: f64) -> u64 {
    if ms.is_finite() && ms > 0.0 {
        (ms * 1e6) as u64
    } else {
        0
    }
}

/// When a request arrived, for its timings.
pub(crate) fn now() -> Instant {
    Instant::now()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn times_are_written_as_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_796_160_902_123);
        assert_eq!(rfc3339(t), "2026-12-01T21:35:02.123Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00:00:00.000Z");
    }
}
