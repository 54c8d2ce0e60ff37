//! The measurement loop: single-turn requests back to back through the engine, the same path
//! the daemon serves, until the window closes.

use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::engine::{Engine, OpenerOptions, Prompt};

/// One request's outcome, times in seconds since the bench origin and milliseconds within.
#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    pub start_s: f64,
    pub end_s: f64,
    pub ok: bool,
    pub error: Option<String>,
    pub prompt_tokens: usize,
    /// Of those, taken from the prefilled template head (not fed, not in `prefill_ms`).
    pub reused_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_ms: f64,
    pub ttft_ms: f64,
    pub words4_ms: Option<f64>,
    pub opener_ms: f64,
    pub total_ms: f64,
}

/// Sends one request and waits for its terminal event.
pub fn run_one(engine: &Engine, query: &str, options: &OpenerOptions, origin: Instant) -> RunRecord {
    let arrived = Instant::now();
    let start_s = arrived.duration_since(origin).as_secs_f64();
    let failed = |error: String| RunRecord {
        start_s,
        end_s: origin.elapsed().as_secs_f64(),
        ok: false,
        error: Some(error),
        prompt_tokens: 0,
        reused_tokens: 0,
        generated_tokens: 0,
        prefill_ms: 0.0,
        ttft_ms: 0.0,
        words4_ms: None,
        opener_ms: 0.0,
        total_ms: 0.0,
    };
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let result = engine.submit(&Prompt::question(query), options.clone(), arrived, CancellationToken::new()).and_then(|events| events.wait(|_| {}));
    match result {
        Ok(o) => RunRecord {
            start_s,
            end_s: origin.elapsed().as_secs_f64(),
            ok: true,
            error: None,
            prompt_tokens: o.prompt_tokens,
            reused_tokens: o.reused_tokens,
            generated_tokens: o.generated_tokens,
            prefill_ms: ms(o.timings.prefill),
            ttft_ms: ms(o.timings.ttft),
            words4_ms: o.words.get(3).map(|w| ms(w.at)),
            opener_ms: ms(o.timings.opener),
            total_ms: ms(o.timings.total),
        },
        Err(e) => failed(e.to_string()),
    }
}

/// Runs prompts in turn until `window` has passed since `start`; a run in flight at the
/// deadline finishes and counts, so the window ends at the last completion.
pub fn run_window(
    engine: &Engine,
    prompts: &[String],
    options: &OpenerOptions,
    origin: Instant,
    window: Duration,
    mut progress: impl FnMut(&[RunRecord]),
) -> Vec<RunRecord> {
    let deadline = Instant::now() + window;
    let mut runs = Vec::new();
    for prompt in prompts.iter().cycle() {
        if Instant::now() >= deadline {
            break;
        }
        runs.push(run_one(engine, prompt, options, origin));
        progress(&runs);
    }
    runs
}
