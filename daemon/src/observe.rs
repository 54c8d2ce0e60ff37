//! Counters and histograms of the answers mulmd gives, exported on an opt-in Prometheus
//! endpoint (`[metrics] listen`). Without the endpoint the `metrics` macros record into
//! nothing, so the request path never branches on it.
//!
//! Label values are fixed names (front, outcome, fallback reason) — never request text, ids
//! or anything that came from the cloud, so nothing secret or unbounded reaches a label.

use std::future::Future;
use std::time::Duration;

use axum::http::header::CONTENT_TYPE;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tokio::net::TcpListener;

use crate::engine::RequestError;
use crate::pipeline::{Answer, Front};

/// Latency buckets in seconds: an opener is milliseconds, a cloud first token up to seconds.
const LATENCY_BUCKETS: &[f64] = &[0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0];

/// How often histogram samples are folded into their buckets when nobody scrapes; without
/// it they would pile up between scrapes. The exporter's own listener uses the same period.
const UPKEEP: Duration = Duration::from_secs(5);

/// Prometheus' text exposition format, as scrapers ask for it.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Makes this process's `metrics` recorder the one the endpoint reads, and returns the
/// endpoint: `GET /metrics` in Prometheus text format on `listener`, served until `shutdown`
/// resolves.
///
/// mulmd binds the listener itself (in `server::bind`, with the gRPC sockets), so a taken
/// port fails the start before anything is announced, and `listen = "127.0.0.1:0"` works:
/// the bound address is in the "serving" log line. Fails if a recorder is already set.
pub fn install(
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<impl Future<Output = Result<(), String>> + Send + 'static, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| format!("metrics: {e}"))?;
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
        let render = move || std::future::ready(([(CONTENT_TYPE, TEXT_FORMAT)], handle.render()));
        let app = Router::new().route("/metrics", get(render));
        let served = axum::serve(listener, app).with_graceful_shutdown(shutdown).await;
        upkeep.abort();
        served.map_err(|e| format!("metrics endpoint: {e}"))
    })
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
}

/// A request entered the pipeline.
pub fn started(queue_depth: usize) {
    metrics::gauge!("mulmd_requests_in_flight").increment(1.0);
    metrics::gauge!("mulmd_queue_depth").set(queue_depth as f64);
}

/// A request's terminal event.
pub fn finished(front: Front, outcome: Result<&Answer, &RequestError>) {
    metrics::gauge!("mulmd_requests_in_flight").decrement(1.0);
    let label = match outcome {
        Ok(_) => "done",
        Err(e) => e.code(),
    };
    metrics::counter!("mulmd_requests_total", "front" => front.name(), "outcome" => label).increment(1);
    let Ok(a) = outcome else { return };
    let t = &a.timings;
    metrics::histogram!("mulmd_ttft_seconds").record(t.ttft_ms / 1e3);
    metrics::histogram!("mulmd_opener_seconds").record(t.opener_ms / 1e3);
    metrics::histogram!("mulmd_answer_seconds").record(t.total_ms / 1e3);
    if let Some(ms) = t.cloud_first_token_ms {
        metrics::histogram!("mulmd_cloud_first_token_seconds").record(ms / 1e3);
    }
    if a.corrected {
        metrics::counter!("mulmd_corrections_total").increment(1);
    }
    if let Some(f) = &a.fallback {
        metrics::counter!("mulmd_fallbacks_total", "reason" => fallback_label(&f.reason)).increment(1);
    }
}

/// Fallback reasons are a fixed set of names; anything else is folded so a label can never
/// carry unexpected text.
fn fallback_label(reason: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "not_configured", "disabled", "connect", "rate_limited", "http_error", "first_token_timeout", "stalled",
        "total_timeout", "truncated", "stream_error", "malformed_event", "cancelled",
    ];
    KNOWN.iter().find(|k| **k == reason).copied().unwrap_or("other")
}
