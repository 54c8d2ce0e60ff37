//! The one place a request is observed: a [`Tap`] sees every event of an answer (or the result
//! of an opener-only call) on its way to the front, and records the outcome once — in the
//! request span's `answered` log line, in Prometheus (`crate::metrics`) and in [`Stats`], the
//! figures Home Assistant's state topic publishes. Nothing else on the request path records.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::events::{Answer, AnswerEvent};
use super::request::Front;
use crate::engine::{Opener, RequestError};
use crate::metrics::{self, Outcome};

/// Watches one request: counts it in flight from creation to drop, and records its outcome
/// once, from its terminal event (or as cancelled when dropped without one).
pub struct Tap {
    front: Front,
    span: tracing::Span,
    stats: Arc<Stats>,
    /// Opener tokens per second of decoding, from `OpenerDone`.
    opener_speed: Option<f64>,
    finished: bool,
}

impl Tap {
    pub fn new(front: Front, span: tracing::Span, stats: Arc<Stats>, queue_depth: usize) -> Self {
        metrics::request_started(queue_depth);
        Self { front, span, stats, opener_speed: None, finished: false }
    }

    /// One event of an answer, on its way out.
    pub fn see(&mut self, ev: &AnswerEvent) {
        match ev {
            AnswerEvent::OpenerDone { timings, tokens, .. } => {
                let decode = timings.opener.saturating_sub(timings.ttft).as_secs_f64();
                self.opener_speed = (*tokens > 1 && decode > 0.0).then(|| (*tokens - 1) as f64 / decode);
            }
            AnswerEvent::Done(a) => self.answered(a),
            AnswerEvent::Error(e) => self.failed(e),
            _ => {}
        }
    }

    /// The outcome of an opener-only request.
    pub fn opened(&mut self, result: &Result<Opener, RequestError>) {
        let o = match result {
            Err(e) => return self.failed(e),
            Ok(o) => o,
        };
        self.finished = true;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let (ttft_ms, opener_ms, total_ms) = (ms(o.timings.ttft), ms(o.timings.opener), ms(o.timings.total));
        self.span.in_scope(|| tracing::info!(ttft_ms, opener_ms, total_ms, words = o.words.len(), "opened"));
        let outcome = Outcome {
            code: "done",
            ttft_ms: Some(ttft_ms),
            opener_ms: Some(opener_ms),
            total_ms: Some(total_ms),
            prompt_tokens: o.prompt_tokens,
            reused_prompt_tokens: o.reused_tokens,
            ..Default::default()
        };
        metrics::record(self.front.name(), &outcome);
    }

    fn answered(&mut self, a: &Answer) {
        self.finished = true;
        let t = &a.timings;
        let fallback = a.fallback.as_ref().map(|f| f.reason.as_str());
        self.span.in_scope(|| {
            tracing::info!(
                ttft_ms = t.ttft_ms,
                opener_ms = t.opener_ms,
                cloud_first_token_ms = t.cloud_first_token_ms,
                total_ms = t.total_ms,
                corrected = a.corrected,
                fallback,
                finish_reason = a.finish_reason.as_str(),
                repairs = ?a.repairs,
                prompt_tokens = a.prompt_tokens,
                reused_prompt_tokens = a.reused_prompt_tokens,
                "answered"
            )
        });
        let outcome = Outcome {
            code: "done",
            ttft_ms: Some(t.ttft_ms),
            opener_ms: Some(t.opener_ms),
            cloud_first_token_ms: t.cloud_first_token_ms,
            total_ms: Some(t.total_ms),
            corrected: a.corrected,
            fallback,
            capped: a.finish_reason == "output_cap",
            repairs: &a.repairs,
            prompt_tokens: a.prompt_tokens,
            reused_prompt_tokens: a.reused_prompt_tokens,
        };
        metrics::record(self.front.name(), &outcome);
        self.stats.record(a, self.opener_speed);
    }

    fn failed(&mut self, e: &RequestError) {
        self.finished = true;
        self.span.in_scope(|| tracing::info!(code = e.code(), error = %e, "request failed"));
        metrics::record(self.front.name(), &Outcome { code: e.code(), ..Default::default() });
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        metrics::request_ended();
        if !self.finished {
            // The caller went away before the end.
            metrics::record(self.front.name(), &Outcome { code: "cancelled", ..Default::default() });
        }
    }
}

/// The figures of the last answers, as Home Assistant's state topic publishes them.
pub struct Stats {
    cloud_configured: bool,
    last: Mutex<StatsSnapshot>,
}

/// One reading of [`Stats`]; its field names are the state topic's JSON keys.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct StatsSnapshot {
    pub requests: u64,
    pub ttft_ms: Option<f64>,
    pub opener_ms: Option<f64>,
    /// Opener tokens per second of decoding (after the first token).
    pub tokens_per_s: Option<f64>,
    /// "ok", "off", or the last fallback's reason.
    pub cloud: String,
    pub cloud_first_token_ms: Option<f64>,
    /// When the last answer finished (not published).
    #[serde(skip)]
    pub at: Option<Instant>,
}

impl Stats {
    pub fn new(cloud_configured: bool) -> Self {
        let cloud = if cloud_configured { "ok" } else { "off" }.to_string();
        Self { cloud_configured, last: Mutex::new(StatsSnapshot { cloud, ..Default::default() }) }
    }

    fn record(&self, a: &Answer, opener_speed: Option<f64>) {
        let mut s = self.last.lock().unwrap_or_else(|p| p.into_inner());
        s.requests += 1;
        s.ttft_ms = Some(a.timings.ttft_ms);
        s.opener_ms = Some(a.timings.opener_ms);
        s.tokens_per_s = opener_speed.or(s.tokens_per_s);
        s.cloud_first_token_ms = a.timings.cloud_first_token_ms.or(s.cloud_first_token_ms);
        s.cloud = match (&a.fallback, self.cloud_configured) {
            (None, _) => "ok".into(),
            (Some(_), false) => "off".into(),
            (Some(f), true) => metrics::fallback_label(&f.reason).into(),
        };
        s.at = Some(Instant::now());
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
