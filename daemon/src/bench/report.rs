//! The bench report: its JSON shape (documented in bench/report.schema.json), the Markdown
//! summary and the Table-3-style comparison of several models.

use serde::Serialize;

use super::context::{StaticContext, SystemSummary};
use super::energy::EnergyFigures;
use super::meter::MeterInfo;
use super::runs::RunRecord;

pub const SCHEMA: &str = "mulmd-bench-report/1";

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub schema: &'static str,
    pub mulmd_version: &'static str,
    /// Seconds since the Unix epoch when the bench started.
    pub started_unix_s: u64,
    pub protocol: Protocol,
    pub machine: StaticContext,
    /// The meter used (null for `none`), with its scope and resolution.
    pub meter: Option<MeterInfo>,
    /// How the meter was chosen, or why there is none (for `--meter auto`).
    pub meter_note: Option<String>,
    pub models: Vec<ModelResult>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Protocol {
    pub window_s: f64,
    pub warmup_runs: usize,
    pub idle_s: f64,
    pub idle_after: bool,
    pub prompt_set: String,
    pub prompts: usize,
    pub min_words: usize,
    pub max_words: usize,
    pub max_tokens: usize,
    pub temperature: f32,
    pub seed: Option<u64>,
    pub threads: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    pub name: String,
    pub dir: String,
    pub precision: String,
    pub model_sha256: Option<String>,
    pub load_ms: f64,
}

impl ModelInfo {
    /// Name and precision: two exports of one model differ only in the latter.
    pub fn label(&self) -> String {
        format!("{} ({})", self.name, self.precision)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    pub window_s: f64,
    pub runs_started: usize,
    pub runs_valid: usize,
    pub runs_failed: usize,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    /// Prompt tokens over the time spent in prefill.
    pub prompt_tok_s: f64,
    /// Tokens after the first over the time spent decoding them.
    pub generation_tok_s: f64,
    /// Generated tokens over the window's wall-clock time (what a user gets back to back).
    pub end_to_end_tok_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Distribution {
    pub p50: f64,
    pub p95: f64,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    pub n: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub ttft_ms: Option<Distribution>,
    pub words4_ms: Option<Distribution>,
    pub opener_ms: Option<Distribution>,
    /// Whole requests, arrival to terminal event.
    pub run_ms: Option<Distribution>,
    /// Run latency histogram: (upper bound ms, count), bounds doubling from 10 ms.
    pub run_histogram: Vec<(f64, usize)>,
}

/// A point of the timeline: one second of the window.
#[derive(Debug, Clone, Serialize)]
pub struct TimelinePoint {
    pub t_s: f64,
    pub generated_tok_s: f64,
    pub power_w: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelResult {
    pub model: ModelInfo,
    pub workload: Workload,
    pub throughput: Throughput,
    pub latency: Latency,
    /// Null when no meter was used.
    pub energy: Option<EnergyFigures>,
    pub system: SystemSummary,
    pub timeline: Vec<TimelinePoint>,
    /// Warnings: counter_wrapped, sample_gaps, sensor_errors, below_resolution, idle_drift,
    /// throttled, failed_runs.
    pub flags: Vec<String>,
    pub runs: Vec<RunRecord>,
}

pub fn distribution(mut v: Vec<f64>) -> Option<Distribution> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    Some(Distribution { p50: q(0.5), p95: q(0.95), min: v[0], max: v[v.len() - 1], mean: v.iter().sum::<f64>() / v.len() as f64, n: v.len() })
}

pub fn histogram(values: &[f64]) -> Vec<(f64, usize)> {
    let Some(max) = values.iter().cloned().reduce(f64::max) else { return Vec::new() };
    let mut bounds = vec![10.0];
    while *bounds.last().unwrap() < max {
        bounds.push(bounds.last().unwrap() * 2.0);
    }
    bounds.iter().enumerate().map(|(i, &b)| {
        let lo = if i == 0 { f64::NEG_INFINITY } else { bounds[i - 1] };
        (b, values.iter().filter(|&&v| v > lo && v <= b).count())
    }).collect()
}

pub fn throughput(runs: &[RunRecord], window_s: f64) -> Throughput {
    let ok: Vec<&RunRecord> = runs.iter().filter(|r| r.ok).collect();
    let prefill_s: f64 = ok.iter().map(|r| r.prefill_ms / 1e3).sum();
    let decode_s: f64 = ok.iter().map(|r| (r.total_ms - r.ttft_ms) / 1e3).sum();
    let decoded: usize = ok.iter().map(|r| r.generated_tokens.saturating_sub(1)).sum();
    let rate = |n: f64, s: f64| if s > 0.0 { n / s } else { 0.0 };
    Throughput {
        // Tokens the prefill actually fed: the reused template head costs it nothing.
        prompt_tok_s: rate(ok.iter().map(|r| r.prompt_tokens - r.reused_tokens).sum::<usize>() as f64, prefill_s),
        generation_tok_s: rate(decoded as f64, decode_s),
        end_to_end_tok_s: rate(ok.iter().map(|r| r.generated_tokens).sum::<usize>() as f64, window_s),
    }
}

fn f(x: Option<f64>, digits: usize) -> String {
    x.map(|v| format!("{v:.digits$}")).unwrap_or_else(|| "n/a".into())
}

/// The Markdown summary: the machine, the protocol, one section per model, and the
/// comparison table when there are several models.
pub fn markdown(r: &BenchReport) -> String {
    let mut s = String::new();
    s.push_str(&format!("# mulmd bench\n\nmulmd {} · {} · engine kernels {} · {} CPUs online (allowed: {}) · kernel {} · governor {}\n\n",
        r.mulmd_version,
        r.machine.board.clone().or(r.machine.cpu_model.clone()).unwrap_or_else(|| "unknown machine".into()),
        r.machine.kernels,
        r.machine.cpus_online,
        r.machine.cpus_allowed.clone().unwrap_or_else(|| "?".into()),
        r.machine.kernel.clone().unwrap_or_else(|| "?".into()),
        if r.machine.governors.is_empty() { "n/a".into() } else { r.machine.governors.join(",") }));
    let p = &r.protocol;
    s.push_str(&format!(
        "Window {} s after {} warm-up runs; {} prompts ({}); openers of {}–{} words (≤{} tokens), temperature {}; {} thread(s).\n\n",
        p.window_s, p.warmup_runs, p.prompts, p.prompt_set, p.min_words, p.max_words, p.max_tokens, p.temperature, p.threads
    ));
    match &r.meter {
        Some(m) => s.push_str(&format!("Energy: {} meter, scope **{:?}**, {:?}, resolution {} J ({}).\n\n", m.backend, m.scope, m.method, m.resolution_j, m.source)),
        None => s.push_str("Energy: **no meter**: throughput only, no energy figures.\n\n"),
    }
    if let Some(note) = &r.meter_note {
        s.push_str(&format!("Meter selection: {note}\n\n"));
    }
    for m in &r.models {
        let w = &m.workload;
        s.push_str(&format!("## {}\n\n", m.model.label()));
        s.push_str(&format!("- runs: {} started, {} valid, {} failed in {:.1} s; {} prompt and {} generated tokens\n",
            w.runs_started, w.runs_valid, w.runs_failed, w.window_s, w.prompt_tokens, w.generated_tokens));
        s.push_str(&format!("- throughput: prompt {:.0} tok/s, generation {:.1} tok/s, end-to-end {:.1} tok/s\n",
            m.throughput.prompt_tok_s, m.throughput.generation_tok_s, m.throughput.end_to_end_tok_s));
        let d = |x: &Option<Distribution>| x.as_ref().map(|d| format!("p50 {:.1} / p95 {:.1} ms", d.p50, d.p95)).unwrap_or_else(|| "n/a".into());
        s.push_str(&format!("- TTFT {}; 4 words {}; opener {}; whole run {}\n", d(&m.latency.ttft_ms), d(&m.latency.words4_ms), d(&m.latency.opener_ms), d(&m.latency.run_ms)));
        if let Some(e) = &m.energy {
            s.push_str(&format!("- energy: window {:.2} J ({:.3} W), idle {:.3} W → dynamic {:.2} J ± {:.2} (95%); {} mJ/token dynamic (± {}), {} mJ/token total; {} J/query dynamic\n",
                e.window_j, e.mean_power_w, e.idle_power_w, e.dynamic_j, e.ci95_dynamic_j,
                f(e.dynamic_mj_per_generated_token, 2), f(e.ci95_mj_per_generated_token, 2), f(e.total_mj_per_generated_token, 2), f(e.dynamic_j_per_query, 4)));
        }
        s.push_str(&format!("- system: CPU {}–{} MHz, temperature {}→{} °C (max {}), throttle events {}\n",
            f(m.system.cpu_min_mhz, 0), f(m.system.cpu_max_mhz, 0), f(m.system.temp_start_c, 1), f(m.system.temp_end_c, 1), f(m.system.temp_max_c, 1), m.system.throttle_events));
        if !m.flags.is_empty() {
            s.push_str(&format!("- **flags: {}**\n", m.flags.join(", ")));
        }
        s.push('\n');
    }
    if r.models.len() > 1 {
        s.push_str(&comparison(r));
    }
    s
}

/// The paper's Table 3 layout: one column per model, then each model's ratio to the first.
pub fn comparison(r: &BenchReport) -> String {
    let base = &r.models[0];
    let mut s = String::from("## Comparison\n\n| | ");
    s.push_str(&r.models.iter().map(|m| m.model.label()).collect::<Vec<_>>().join(" | "));
    for m in &r.models[1..] {
        s.push_str(&format!(" | {} / {}", m.model.label(), base.model.label()));
    }
    s.push_str(" |\n|---|");
    s.push_str(&"---|".repeat(2 * r.models.len() - 1));
    s.push('\n');
    type Metric = (&'static str, fn(&ModelResult) -> Option<f64>, usize);
    let rows: [Metric; 6] = [
        ("End-to-end (tok/s)", |m| Some(m.throughput.end_to_end_tok_s), 1),
        ("Generation (tok/s)", |m| Some(m.throughput.generation_tok_s), 1),
        ("Prompt (tok/s)", |m| Some(m.throughput.prompt_tok_s), 0),
        ("Time to 1st token (ms, p50)", |m| m.latency.ttft_ms.as_ref().map(|d| d.p50), 1),
        ("Time to 4 words (ms, p50)", |m| m.latency.words4_ms.as_ref().map(|d| d.p50), 1),
        ("Energy (mJ/token, dynamic)", |m| m.energy.as_ref().and_then(|e| e.dynamic_mj_per_generated_token), 2),
    ];
    for (label, get, digits) in rows {
        s.push_str(&format!("| {label} | "));
        s.push_str(&r.models.iter().map(|m| f(get(m), digits)).collect::<Vec<_>>().join(" | "));
        for m in &r.models[1..] {
            let ratio = match (get(m), get(base)) {
                (Some(a), Some(b)) if b != 0.0 => format!("{:.2}×", a / b),
                _ => "n/a".into(),
            };
            s.push_str(&format!(" | {ratio}"));
        }
        s.push_str(" |\n");
    }
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_histogram() {
        let d = distribution((1..=100).map(|x| x as f64).collect()).unwrap();
        assert_eq!((d.p50, d.p95, d.min, d.max), (51.0, 95.0, 1.0, 100.0));
        assert_eq!(histogram(&[5.0, 12.0, 19.0, 35.0]), vec![(10.0, 1), (20.0, 2), (40.0, 1)]);
        assert!(distribution(vec![]).is_none());
    }

    #[test]
    fn prompt_rate_counts_only_the_tokens_the_prefill_fed() {
        let run = RunRecord {
            start_s: 0.0,
            end_s: 1.0,
            ok: true,
            error: None,
            prompt_tokens: 40,
            reused_tokens: 24,
            generated_tokens: 11,
            prefill_ms: 20.0,
            ttft_ms: 25.0,
            words4_ms: None,
            opener_ms: 100.0,
            total_ms: 125.0,
        };
        let t = throughput(&[run], 1.0);
        assert_eq!(t.prompt_tok_s, 800.0, "16 fed tokens in 20 ms, not 40");
        assert_eq!(t.generation_tok_s, 100.0);
    }
}
