//! What a Prometheus scrape shows: the metrics described in `describe`, recorded from each
//! request's [`Outcome`] by the tap on the answer stream (`answer::tap`). The endpoint is
//! opt-in (`[metrics] listen`); without it the `metrics` macros record into nothing.
//!
//! Label values are fixed names (front, outcome, fallback reason) — never request text, ids
//! or anything that came from the cloud, so nothing secret or unbounded reaches a label.

use std::future::Future;
use std::time::Duration;

use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tokio::net::TcpListener;

use crate::cloud::{CloudError, Repair};

/// Latency buckets in seconds: an opener is milliseconds, a cloud first token up to seconds.
const LATENCY_BUCKETS: &[f64] = &[0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0];

/// How often histogram samples are folded into their buckets when nobody scrapes; without
/// it they would pile up between scrapes. The exporter's own listener uses the same period.
const UPKEEP: Duration = Duration::from_secs(5);

/// Prometheus' text exposition format, as scrapers ask for it.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Makes this process's `metrics` recorder the one the endpoint reads, and returns the
/// endpoint: `GET /metrics` in Prometheus text format on `listener`, served until `shutdown`
/// resolves. `queue_depth` is read at each scrape, so the gauge is live when nothing moves.
///
/// mulmd binds the listener itself (in `server::bind`, with the gRPC sockets), so a taken
/// port fails the start before anything is announced, and `listen = "127.0.0.1:0"` works:
/// the bound address is in the "serving" log line. Fails if a recorder is already set.
pub fn install(
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    queue_depth: impl Fn() -> usize + Send + Sync + 'static,
    tokens: Option<std::sync::Arc<crate::host::secrets::Tokens>>,
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
) -> Result<impl Future<Output = Result<(), EndpointError>> + Send + 'static, EndpointError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .map_err(|e| EndpointError::Recorder(e.to_string()))?
        .install_recorder()
        .map_err(|e| EndpointError::Recorder(e.to_string()))?;
    describe();
    Ok(async move {
        let upkeep = handle.clone();
        let upkeep = tokio::spawn(async move {
            let mut tick = tokio::time::interval(UPKEEP);
            loop {
                tick.tick().await;
                upkeep.run_upkeep();
            }
        });
        let queue_depth = std::sync::Arc::new(queue_depth);
        let render = move |headers: HeaderMap| {
            // A scrape shows request counts and timings: with tokens configured, only a
            // scraper holding one (Prometheus' `authorization` setting) sees them.
            if let Some(t) = &tokens {
                if let Err(why) = t.authorize(headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok())) {
                    let refused = (StatusCode::UNAUTHORIZED, [(CONTENT_TYPE, "text/plain; charset=utf-8"), (WWW_AUTHENTICATE, "Bearer")], format!("{why}\n"));
                    return std::future::ready(refused.into_response());
                }
            }
            metrics::gauge!("mulmd_queue_depth").set(queue_depth() as f64);
            std::future::ready(([(CONTENT_TYPE, TEXT_FORMAT)], handle.render()).into_response())
        };
        let app = Router::new().route("/metrics", get(render));
        let served = crate::http::server::serve(app, listener, tls, shutdown).await;
        upkeep.abort();
        served.map_err(|e| EndpointError::Serve(e.to_string()))
    })
}

/// Why the metrics endpoint could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("metrics: {0}")]
    Recorder(String),
    #[error("metrics endpoint: {0}")]
    Serve(String),
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!("mulmd_requests_total", "Answers finished, by front end and outcome (done or an error code).");
    describe_histogram!("mulmd_ttft_seconds", Unit::Seconds, "From a request's arrival to the opener's first token.");
    describe_histogram!("mulmd_opener_seconds", Unit::Seconds, "From a request's arrival to the complete opener.");
    describe_histogram!("mulmd_cloud_first_token_seconds", Unit::Seconds, "From the opener's end to the cloud's first shown text.");
    describe_histogram!("mulmd_answer_seconds", Unit::Seconds, "From a request's arrival to its final event.");
    describe_counter!("mulmd_corrections_total", "Answers in which the cloud flagged and corrected the opener.");
    describe_counter!("mulmd_fallbacks_total", "Answers finished on the device, by reason.");
    describe_gauge!("mulmd_queue_depth", "Requests waiting for an inference worker.");
    describe_gauge!("mulmd_requests_in_flight", "Answers being produced now.");
    describe_counter!("mulmd_seam_repairs_total", "Repairs where opener and continuation meet, by kind: restated, scaffold, restart, finished.");
    describe_counter!("mulmd_prompt_tokens_total", "Prompt tokens of the local model's prompts.");
    describe_counter!("mulmd_prompt_tokens_reused_total", "Of those, tokens taken from a prompt cache (template head or engine.prefix_cache_mb) instead of computed.");
    describe_counter!("mulmd_output_caps_total", "Answers whose cloud continuation was cut at cloud.max_output_bytes or max_output_chunks.");
}

/// How one request ended, in the terms metrics record.
#[derive(Debug, Clone, Default)]
pub struct Outcome<'a> {
    /// "done", or the request error's code.
    pub code: &'static str,
    pub ttft_ms: Option<f64>,
    pub opener_ms: Option<f64>,
    pub cloud_first_token_ms: Option<f64>,
    pub total_ms: Option<f64>,
    pub corrected: bool,
    /// The fallback reason, when the device finished the answer.
    pub fallback: Option<&'a str>,
    /// The answer was cut at one of the cloud output caps.
    pub capped: bool,
    /// Seam repairs made.
    pub repairs: &'a [Repair],
    /// The local model's prompt tokens, and how many of them came from a cache.
    pub prompt_tokens: usize,
    pub reused_prompt_tokens: usize,
}

/// A request began (the in-flight gauge rises until [`request_ended`]).
pub fn request_started(queue_depth: usize) {
    metrics::gauge!("mulmd_requests_in_flight").increment(1.0);
    metrics::gauge!("mulmd_queue_depth").set(queue_depth as f64);
}

/// A request ended, whether or not it reached an [`Outcome`].
pub fn request_ended() {
    metrics::gauge!("mulmd_requests_in_flight").decrement(1.0);
}

/// Records how a request through `front` ended.
pub fn record(front: &'static str, o: &Outcome) {
    metrics::counter!("mulmd_requests_total", "front" => front, "outcome" => o.code).increment(1);
    let seconds = |ms: Option<f64>| ms.map(|ms| ms / 1e3);
    if let Some(s) = seconds(o.ttft_ms) {
        metrics::histogram!("mulmd_ttft_seconds").record(s);
    }
    if let Some(s) = seconds(o.opener_ms) {
        metrics::histogram!("mulmd_opener_seconds").record(s);
    }
    if let Some(s) = seconds(o.total_ms) {
        metrics::histogram!("mulmd_answer_seconds").record(s);
    }
    if let Some(s) = seconds(o.cloud_first_token_ms) {
        metrics::histogram!("mulmd_cloud_first_token_seconds").record(s);
    }
    if o.corrected {
        metrics::counter!("mulmd_corrections_total").increment(1);
    }
    if let Some(f) = o.fallback {
        metrics::counter!("mulmd_fallbacks_total", "reason" => fallback_label(f)).increment(1);
    }
    if o.capped {
        metrics::counter!("mulmd_output_caps_total").increment(1);
    }
    for r in o.repairs {
        metrics::counter!("mulmd_seam_repairs_total", "kind" => r.name()).increment(1);
    }
    if o.prompt_tokens > 0 {
        metrics::counter!("mulmd_prompt_tokens_total").increment(o.prompt_tokens as u64);
        metrics::counter!("mulmd_prompt_tokens_reused_total").increment(o.reused_prompt_tokens as u64);
    }
}

/// Fallback reasons are a fixed set of names; anything else is folded so a label can never
/// carry unexpected text.
pub fn fallback_label(reason: &str) -> &'static str {
    const LOCAL: &[&str] = &["not_configured", "disabled"];
    LOCAL.iter().chain(CloudError::CODES).find(|k| **k == reason).copied().unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_counts_its_corrections_and_each_seam_repair_by_kind() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let outcome = Outcome { code: "done", corrected: true, repairs: &[Repair::Restated, Repair::Finished, Repair::Restated], ..Default::default() };
        metrics::with_local_recorder(&recorder, || record("grpc", &outcome));
        let text = handle.render();
        assert!(text.contains(r#"mulmd_seam_repairs_total{kind="restated"} 2"#), "{text}");
        assert!(text.contains(r#"mulmd_seam_repairs_total{kind="finished"} 1"#), "{text}");
        assert!(!text.contains(r#"kind="restart""#), "{text}");
        assert!(text.contains("mulmd_corrections_total 1"), "{text}");
    }
}
