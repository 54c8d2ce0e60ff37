//! The streaming client for an OpenAI-compatible `POST /chat/completions`: SSE parsed by
//! eventsource-stream, every event checked for an error object, truncation detected, retries
//! with backoff (honouring Retry-After) only before the first continuation token, and a
//! connection pool kept warm so the hand-off pays no handshake.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::config::CloudConfig;
use super::prompt::{messages, RecoveryMode};

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
    #[error("cancelled")]
    Cancelled,
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
            Self::Cancelled => "cancelled",
        }
    }

    /// The same error with every occurrence of `secret` in its text replaced.
    fn without(self, secret: &str) -> Self {
        let clean = |s: String| if secret.is_empty() { s } else { s.replace(secret, "[redacted]") };
        match self {
            Self::Connect(s) => Self::Connect(clean(s)),
            Self::Http { status, message, retry_after } => Self::Http { status, message: clean(message), retry_after },
            Self::Stream(s) => Self::Stream(clean(s)),
            Self::Malformed(s) => Self::Malformed(clean(s)),
            other => other,
        }
    }

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

/// How a successful continuation went.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CloudSummary {
    pub attempts: u32,
    /// From the call to the first continuation text.
    #[serde(skip)]
    pub first_token: Option<Duration>,
    pub finish_reason: Option<String>,
    pub completion_tokens: Option<u64>,
    pub prompt_tokens: Option<u64>,
}

/// A failure, and whether any text had already been passed on (then it was not retried).
#[derive(Debug)]
pub struct Failure {
    pub error: CloudError,
    pub forwarded: bool,
    pub attempts: u32,
}

pub struct CloudClient {
    http: reqwest::Client,
    cfg: CloudConfig,
    last_used: Mutex<Option<Instant>>,
}

/// Connections idle longer than this may have been dropped by a proxy: warm them again.
const WARM_AFTER: Duration = Duration::from_secs(30);
/// Retry-After values beyond this are not waited for: the user would rather have the fallback.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(10);

/// Installs the process-wide TLS crypto provider (idempotent). Call before building any
/// other reqwest client.
pub fn install_crypto() {
    // rustls needs one process-wide provider; ring keeps the build free of C toolchains.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl CloudClient {
    pub fn new(cfg: CloudConfig) -> Result<Self, String> {
        install_crypto();
        let http = reqwest::Client::builder()
            .connect_timeout(cfg.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(300))
            .tcp_keepalive(Duration::from_secs(30))
            .tcp_nodelay(true)
            .user_agent(concat!("mulmd/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Self { http, cfg, last_used: Mutex::new(None) })
    }

    /// Providers sometimes quote the key they were sent in an error body ("invalid key
    /// sk-…"); that text becomes a log line and a reply, so the key is cut out first.
    fn scrub(&self, e: CloudError) -> CloudError {
        match &self.cfg.api_key {
            Some(k) => e.without(k.expose()),
            None => e,
        }
    }

    pub fn config(&self) -> &CloudConfig {
        &self.cfg
    }

    /// Opens (or refreshes) a pooled connection, TLS included, if none was used recently.
    /// Cheap to call at the start of every request, concurrently with the opener.
    pub async fn warm(&self) {
        let stale = self.last_used.lock().unwrap().is_none_or(|t| t.elapsed() > WARM_AFTER);
        if !stale {
            return;
        }
        *self.last_used.lock().unwrap() = Some(Instant::now());
        let mut req = self.http.get(format!("{}/models", self.cfg.base_url)).timeout(self.cfg.connect_timeout * 2);
        if let Some(k) = &self.cfg.api_key {
            req = req.bearer_auth(k.expose());
        }
        if let Err(e) = req.send().await {
            tracing::debug!(error = %redact(&e.to_string()), "warming the cloud connection failed");
        }
    }

    /// Streams the continuation of `opener`, calling `on_delta` with each piece of text.
    /// Retries only while nothing has been passed on.
    pub async fn continue_answer(
        &self,
        query: &str,
        opener: &str,
        mode: RecoveryMode,
        cancel: &CancellationToken,
        mut on_delta: impl FnMut(&str) + Send,
    ) -> Result<CloudSummary, Failure> {
        let started = Instant::now();
        let deadline = started + self.cfg.total_timeout;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let mut forwarded = false;
            let mut forward = |t: &str| {
                forwarded = true;
                on_delta(t)
            };
            let result = self.attempt(query, opener, mode, cancel, deadline, started, &mut forward).await.map_err(|e| self.scrub(e));
            *self.last_used.lock().unwrap() = Some(Instant::now());
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
                    if wait > MAX_RETRY_WAIT || Instant::now() + wait >= deadline {
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

    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        &self,
        query: &str,
        opener: &str,
        mode: RecoveryMode,
        cancel: &CancellationToken,
        deadline: Instant,
        started: Instant,
        on_delta: &mut (dyn FnMut(&str) + Send),
    ) -> Result<CloudSummary, CloudError> {
        let total = self.cfg.total_timeout;
        let mut body = serde_json::json!({
            "model": self.cfg.model,
            "messages": messages(query, opener, mode),
            "stream": true,
            "max_tokens": self.cfg.max_tokens,
        });
        if let Some(t) = self.cfg.temperature {
            body["temperature"] = t.into();
        }
        if self.cfg.include_usage {
            body["stream_options"] = serde_json::json!({ "include_usage": true });
        }
        let mut req = self.http.post(format!("{}/chat/completions", self.cfg.base_url)).json(&body);
        if let Some(k) = &self.cfg.api_key {
            req = req.bearer_auth(k.expose());
        }
        for (name, value) in &self.cfg.extra_headers {
            req = req.header(name, value);
        }
        let first_deadline = (Instant::now() + self.cfg.first_token_timeout).min(deadline);
        let send = tokio::time::timeout_at(first_deadline.into(), req.send());
        let response = tokio::select! {
            _ = cancel.cancelled() => return Err(CloudError::Cancelled),
            r = send => match r {
                Err(_) => return Err(timeout_error(first_deadline, deadline, self.cfg.first_token_timeout, total)),
                Ok(Err(e)) => return Err(CloudError::Connect(redact(&e.to_string()))),
                Ok(Ok(r)) => r,
            },
        };
        let status = response.status();
        if !status.is_success() {
            let retry_after = retry_after(response.headers());
            let text = tokio::time::timeout(Duration::from_secs(2), response.text()).await.ok().and_then(|r| r.ok()).unwrap_or_default();
            return Err(CloudError::Http { status: status.as_u16(), message: error_message(&text), retry_after });
        }
        let mut events = response.bytes_stream().eventsource();
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
                Ok(Some(Err(e))) => return Err(CloudError::Malformed(redact(&e.to_string()))),
                Ok(Some(Ok(ev))) => ev,
            };
            let data = event.data.trim();
            if data.is_empty() {
                continue;
            }
            if data == "[DONE]" {
                return Ok(summary);
            }
            let v: serde_json::Value = serde_json::from_str(data)
                .map_err(|e| CloudError::Malformed(format!("{e} in {:?}", data.chars().take(80).collect::<String>())))?;
            if let Some(err) = v.get("error").filter(|e| !e.is_null()) {
                return Err(CloudError::Stream(error_text(err)));
            }
            if v.get("object").and_then(|o| o.as_str()) == Some("error") {
                return Err(CloudError::Stream(error_text(&v)));
            }
            if let Some(usage) = v.get("usage").filter(|u| u.is_object()) {
                summary.completion_tokens = usage.get("completion_tokens").and_then(|x| x.as_u64());
                summary.prompt_tokens = usage.get("prompt_tokens").and_then(|x| x.as_u64());
            }
            for choice in v.get("choices").and_then(|c| c.as_array()).into_iter().flatten() {
                if let Some(text) = choice.pointer("/delta/content").and_then(|c| c.as_str()).filter(|t| !t.is_empty()) {
                    if !got_text {
                        got_text = true;
                        summary.first_token = Some(started.elapsed());
                    }
                    on_delta(text);
                }
                if let Some(reason) = choice.get("finish_reason").and_then(|r| r.as_str()) {
                    summary.finish_reason = Some(reason.to_string());
                }
            }
        }
    }
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
    let base = 0.5 * 2f64.powi(attempt.saturating_sub(1) as i32);
    let jitter = 1.0 - 0.25 * rand::random::<f64>();
    Duration::from_secs_f64(base.min(8.0) * jitter)
}

/// `retry-after-ms`, else `Retry-After` in seconds.
fn retry_after(h: &reqwest::header::HeaderMap) -> Option<Duration> {
    let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::trim).and_then(|v| v.parse::<f64>().ok());
    get("retry-after-ms").map(|ms| Duration::from_secs_f64(ms / 1e3)).or_else(|| get("retry-after").map(Duration::from_secs_f64))
}

fn error_text(err: &serde_json::Value) -> String {
    match err {
        serde_json::Value::String(s) => s.clone(),
        v => {
            let msg = v.get("message").and_then(|m| m.as_str()).unwrap_or("(no message)");
            match v.get("code").or_else(|| v.get("type")).and_then(|c| c.as_str()) {
                Some(code) => format!("{msg} ({code})"),
                None => msg.to_string(),
            }
        }
    }
}

fn error_message(body: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(body) {
        Ok(v) if v.get("error").is_some() => error_text(&v["error"]),
        _ => body.chars().take(200).collect::<String>().trim().to_string(),
    }
}

/// reqwest errors may quote the URL; a key is never in it, but query strings could carry
/// one, so anything after '?' is cut.
fn redact(s: &str) -> String {
    match s.find('?') {
        Some(i) => format!("{}?…", &s[..i]),
        None => s.to_string(),
    }
}
