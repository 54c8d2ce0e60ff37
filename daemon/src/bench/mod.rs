//! `mulmd bench`: the paper's measurement (appendix O). Per model: warm-up runs, an idle
//! baseline with the model loaded, then single-turn requests back to back through the engine
//! for a fixed window (90 s by default), then idle again; throughput, latency and energy
//! above idle are reported as JSON, Markdown and an SVG plot.

pub mod context;
pub mod energy;
pub mod meter;
pub mod monitor;
pub mod plot;
pub mod prompts;
pub mod report;
pub mod runs;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::engine::{Engine, EngineConfig, Model, OpenerOptions};
use meter::{CommandUnit, EnergyMeter, MeterError, Scope};
use monitor::Monitor;
use report::{BenchReport, ModelInfo, ModelResult, Protocol, TimelinePoint, Workload};

/// Which meter to use, as given on the command line.
#[derive(Debug, Clone, PartialEq)]
pub enum MeterSpec {
    None,
    /// RAPL if present, else a discharging battery, else none (hwmon sensors need naming:
    /// only the operator knows what a given chip measures).
    Auto,
    Powercap,
    Hwmon { chip: String, label: Option<String>, scope: Scope },
    Battery { name: Option<String> },
    Command { command: String, unit: CommandUnit, scope: Scope, resolution_j: f64 },
    Manual { resolution_j: f64 },
}

impl MeterSpec {
    /// The meter named by `--meter` (`auto`, `none`, `powercap`, `hwmon:CHIP[:LABEL]`,
    /// `battery[:NAME]`, `command:PROGRAM [ARGS]`, `manual`) with the flags that qualify it.
    pub fn parse(meter: &str, unit: CommandUnit, scope: Scope, resolution_j: f64) -> Result<Self, String> {
        if !(resolution_j.is_finite() && resolution_j >= 0.0) {
            return Err(format!("--meter-resolution {resolution_j} must be a non-negative number of joules"));
        }
        let (kind, rest) = meter.split_once(':').map(|(k, r)| (k, Some(r))).unwrap_or((meter, None));
        Ok(match (kind, rest) {
            ("none", None) => Self::None,
            ("auto", None) => Self::Auto,
            ("powercap", None) => Self::Powercap,
            ("hwmon", Some(r)) if !r.is_empty() => {
                let (chip, label) = r.split_once(':').map(|(c, l)| (c, Some(l.to_string()))).unwrap_or((r, None));
                Self::Hwmon { chip: chip.to_string(), label, scope }
            }
            ("battery", name) => Self::Battery { name: name.filter(|n| !n.is_empty()).map(str::to_string) },
            ("command", Some(cmd)) if !cmd.trim().is_empty() => Self::Command { command: cmd.to_string(), unit, scope, resolution_j },
            ("manual", None) => Self::Manual { resolution_j },
            _ => {
                return Err(format!(
                    "--meter {meter:?} is not understood; use auto, none, powercap, hwmon:CHIP[:LABEL], battery[:NAME], \
                     command:PROGRAM [ARGS] or manual"
                ))
            }
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Meter(#[from] MeterError),
    #[error(transparent)]
    Load(#[from] crate::engine::LoadError),
    #[error("{0}")]
    Other(String),
}

pub struct BenchOptions {
    pub models: Vec<PathBuf>,
    pub window: Duration,
    pub warmup: usize,
    pub idle: Duration,
    pub idle_after: bool,
    pub prompts: Vec<String>,
    pub prompt_set: String,
    pub opener: OpenerOptions,
    pub threads: usize,
    pub meter: MeterSpec,
    /// Filesystem root for sysfs and /proc ("/" except in tests).
    pub root: PathBuf,
    /// How often an automatic meter is read.
    pub poll: Duration,
    pub progress: bool,
}

/// Opens the meter; `None` for `MeterSpec::None` or when `Auto` finds nothing. The note says
/// what `Auto` chose or why it found nothing.
pub fn open_meter(spec: &MeterSpec, root: &Path) -> Result<(Option<Box<dyn EnergyMeter>>, Option<String>), MeterError> {
    if *spec == MeterSpec::Auto {
        let rapl = match meter::Powercap::open(root) {
            Ok(m) => return Ok((Some(Box::new(m)), Some("auto: RAPL package counters (CPU package only, not the board)".into()))),
            Err(e) => e,
        };
        let battery = match meter::Battery::open(root, None) {
            Ok(m) => return Ok((Some(Box::new(m)), Some("auto: battery fuel gauge".into()))),
            Err(e) => e,
        };
        return Ok((
            None,
            Some(format!(
                "auto: no energy meter found ({rapl}; {battery}); throughput only. Name one with --meter \
                 (hwmon:CHIP[:LABEL], command:PROGRAM, manual)"
            )),
        ));
    }
    Ok((open_explicit(spec, root)?, None))
}

fn open_explicit(spec: &MeterSpec, root: &Path) -> Result<Option<Box<dyn EnergyMeter>>, MeterError> {
    Ok(match spec {
        MeterSpec::None | MeterSpec::Auto => None,
        MeterSpec::Powercap => Some(Box::new(meter::Powercap::open(root)?)),
        MeterSpec::Hwmon { chip, label, scope } => Some(Box::new(meter::Hwmon::open(root, chip, label.as_deref(), *scope)?)),
        MeterSpec::Battery { name } => Some(Box::new(meter::Battery::open(root, name.as_deref())?)),
        MeterSpec::Command { command, unit, scope, resolution_j } => {
            Some(Box::new(meter::Command::open(command, *unit, *scope, *resolution_j)?))
        }
        MeterSpec::Manual { resolution_j } => Some(Box::new(meter::Manual::new(
            Box::new(std::io::BufReader::new(std::io::stdin())),
            Box::new(std::io::stderr()),
            *resolution_j,
        ))),
    })
}

/// Runs the whole protocol for every model in turn with the same settings and meter.
pub fn run(opts: &BenchOptions, mut meter: Option<Box<dyn EnergyMeter>>, meter_note: Option<String>) -> Result<BenchReport, BenchError> {
    let started_unix_s = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let machine = context::static_context(&opts.root);
    let meter_info = meter.as_ref().map(|m| m.info().clone());
    let mut models = Vec::new();
    for dir in &opts.models {
        let (result, m) = bench_model(opts, dir, meter)?;
        meter = m;
        models.push(result);
    }
    Ok(BenchReport {
        schema: report::SCHEMA,
        mulmd_version: env!("CARGO_PKG_VERSION"),
        started_unix_s,
        protocol: Protocol {
            window_s: opts.window.as_secs_f64(),
            warmup_runs: opts.warmup,
            idle_s: opts.idle.as_secs_f64(),
            idle_after: opts.idle_after,
            prompt_set: opts.prompt_set.clone(),
            prompts: opts.prompts.len(),
            min_words: opts.opener.min_words,
            max_words: opts.opener.max_words,
            max_tokens: opts.opener.max_tokens,
            temperature: opts.opener.sampling.temperature,
            seed: opts.opener.sampling.seed,
            threads: opts.threads,
        },
        machine,
        meter: meter_info,
        meter_note,
        models,
    })
}

/// Energy readings at chosen moments, for a manual meter (the operator types them).
fn manual_mark(meter: &mut Option<Box<dyn EnergyMeter>>, origin: Instant, marks: &mut Vec<(f64, f64)>, what: &str) -> Result<(), MeterError> {
    if let Some(m) = meter.as_mut().filter(|m| m.is_manual()) {
        // The operator reads the display when asked; typing takes a while but the reading
        // belongs to the moment of the prompt. Phases are timed between prompts, so the idle
        // seconds spent typing fall inside spans whose idle power is subtracted anyway.
        let at = origin.elapsed().as_secs_f64();
        eprintln!("\n[{what}]");
        let j = m.read()?;
        marks.push((at, j));
    }
    Ok(())
}

type BenchModelResult = Result<(ModelResult, Option<Box<dyn EnergyMeter>>), BenchError>;

fn bench_model(opts: &BenchOptions, dir: &Path, mut meter: Option<Box<dyn EnergyMeter>>) -> BenchModelResult {
    let model = Arc::new(Model::load(dir, opts.threads)?);
    let info = ModelInfo {
        name: model.manifest.name.clone(),
        dir: dir.display().to_string(),
        precision: model.manifest.precision.clone(),
        model_sha256: model.manifest.files.get("model.onnx").cloned(),
        load_ms: model.load_time.as_secs_f64() * 1e3,
    };
    let engine = Engine::start(model, EngineConfig { workers: 1, queue_depth: 1, ..EngineConfig::default() }).map_err(|e| BenchError::Other(e.to_string()))?;
    let origin = Instant::now();
    for prompt in opts.prompts.iter().cycle().take(opts.warmup) {
        let r = runs::run_one(&engine, prompt, &opts.opener, origin);
        if let Some(e) = r.error {
            return Err(BenchError::Other(format!("warm-up run failed: {e}")));
        }
    }
    let has_meter = meter.is_some();
    let manual = meter.as_ref().is_some_and(|m| m.is_manual());
    let mut marks = Vec::new();
    let monitor = Monitor::start(if manual { None } else { meter.take() }, opts.root.clone(), origin, opts.poll);
    let now = |o: Instant| o.elapsed().as_secs_f64();

    // Idle before: model loaded, no requests.
    let idle_before = if has_meter && !opts.idle.is_zero() {
        manual_mark(&mut meter, origin, &mut marks, "idle baseline starts")?;
        let t = now(origin);
        std::thread::sleep(opts.idle);
        manual_mark(&mut meter, origin, &mut marks, "idle baseline ends; the window starts after this reading")?;
        Some((t, now(origin)))
    } else {
        manual_mark(&mut meter, origin, &mut marks, "the window starts after this reading")?;
        None
    };

    let t0 = now(origin);
    let bar = progress_bar(opts);
    let mut last_report = Instant::now();
    let runs = runs::run_window(&engine, &opts.prompts, &opts.opener, origin, opts.window, |done| {
        let elapsed = now(origin) - t0;
        let generated: usize = done.iter().filter(|r| r.ok).map(|r| r.generated_tokens).sum();
        let power = current_power(&monitor.snapshot().energy);
        let msg = format!(
            "{} runs · {:.1} tok/s{}",
            done.len(),
            generated as f64 / elapsed.max(1e-9),
            power.map(|p| format!(" · {p:.2} W")).unwrap_or_default()
        );
        match &bar {
            Some(b) => {
                b.set_position((elapsed * 1e3) as u64);
                b.set_message(msg);
            }
            None if last_report.elapsed() >= Duration::from_secs(10) => {
                eprintln!("bench {}: {:.0}/{:.0} s · {msg}", info.name, elapsed, opts.window.as_secs_f64());
                last_report = Instant::now();
            }
            None => {}
        }
    });
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let t1 = runs.last().map(|r| r.end_s).unwrap_or_else(|| now(origin));
    manual_mark(&mut meter, origin, &mut marks, "the window has ended")?;

    let idle_after = if has_meter && opts.idle_after && !opts.idle.is_zero() {
        let t = now(origin);
        std::thread::sleep(opts.idle);
        manual_mark(&mut meter, origin, &mut marks, "idle after the window ends")?;
        Some((t, now(origin)))
    } else {
        None
    };
    let (returned, rec) = monitor.finish();
    if returned.is_some() {
        meter = returned;
    }
    engine.shutdown();

    let window_s = t1 - t0;
    // Energy spans: the run window and idle phases, or, for typed readings, the moments of
    // the readings themselves.
    let (energy_window, idle_before, idle_after) = if manual {
        let t: Vec<f64> = marks.iter().map(|m| m.0).collect();
        let k = usize::from(idle_before.is_some());
        ((t[k], t[k + 1]), idle_before.map(|_| (t[0], t[1])), idle_after.map(|_| (t[k + 1], t[k + 2])))
    } else {
        ((t0, t1), idle_before, idle_after)
    };
    let series: Vec<(f64, f64)> = if manual { marks } else { rec.energy.clone() };
    let ok: Vec<&runs::RunRecord> = runs.iter().filter(|r| r.ok).collect();
    let generated: usize = ok.iter().map(|r| r.generated_tokens).sum();
    let mut flags = Vec::new();
    let energy = if has_meter {
        let resolution_j = meter.as_ref().map(|m| m.info().resolution_j).unwrap_or(0.0);
        let idle = |span: Option<(f64, f64)>| {
            let (a, b) = span?;
            let mut s = energy::idle_stats(&series, a, b)?;
            if manual {
                s.std_w = None;
                s.samples = 1;
            }
            Some(s)
        };
        match (energy::energy_at(&series, energy_window.0), energy::energy_at(&series, energy_window.1)) {
            (Some(e0), Some(e1)) => {
                let f = energy::figures(energy::WindowEnergy {
                    window_s: energy_window.1 - energy_window.0,
                    window_j: e1 - e0,
                    idle_before: idle(idle_before),
                    idle_after: idle(idle_after),
                    resolution_j,
                    queries: ok.len(),
                    generated_tokens: generated,
                });
                if f.dynamic_j.abs() < 10.0 * resolution_j {
                    flags.push("below_resolution".to_string());
                }
                if let (Some(b), Some(a)) = (&f.idle_before, &f.idle_after) {
                    if (b.mean_w - a.mean_w).abs() > 0.1 * f.idle_power_w.max(1e-9) {
                        flags.push("idle_drift".to_string());
                    }
                }
                Some(f)
            }
            _ => {
                flags.push("energy_unavailable".to_string());
                None
            }
        }
    } else {
        None
    };
    if meter.as_ref().is_some_and(|m| m.wraps() > 0) {
        flags.push("counter_wrapped".to_string());
    }
    if !rec.errors.is_empty() {
        flags.push("sensor_errors".to_string());
    }
    if !manual && has_meter && max_gap(&series) > 3.0 * opts.poll.as_secs_f64() + 0.5 {
        flags.push("sample_gaps".to_string());
    }
    let system_samples: Vec<_> = rec.system.iter().filter(|(t, _)| *t >= t0 && *t <= t1 + 1.0).map(|(_, s)| s.clone()).collect();
    let system = context::summarize(&system_samples);
    if system.throttle_events > 0 {
        flags.push("throttled".to_string());
    }
    let failed = runs.len() - ok.len();
    if failed > 0 {
        flags.push("failed_runs".to_string());
    }
    let timeline = timeline(&runs, if manual { &[] } else { &series }, t0, t1);
    let d = |f: fn(&runs::RunRecord) -> Option<f64>| report::distribution(ok.iter().filter_map(|r| f(r)).collect());
    let run_ms: Vec<f64> = ok.iter().map(|r| r.total_ms).collect();
    let result = ModelResult {
        model: info,
        workload: Workload {
            window_s,
            runs_started: runs.len(),
            runs_valid: ok.len(),
            runs_failed: failed,
            prompt_tokens: ok.iter().map(|r| r.prompt_tokens).sum(),
            generated_tokens: generated,
        },
        throughput: report::throughput(&runs, window_s),
        latency: report::Latency {
            ttft_ms: d(|r| Some(r.ttft_ms)),
            words4_ms: d(|r| r.words4_ms),
            opener_ms: d(|r| Some(r.opener_ms)),
            run_ms: report::distribution(run_ms.clone()),
            run_histogram: report::histogram(&run_ms),
        },
        energy,
        system,
        timeline,
        flags,
        runs,
    };
    Ok((result, meter))
}

fn progress_bar(opts: &BenchOptions) -> Option<indicatif::ProgressBar> {
    if !opts.progress || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(opts.window.as_millis() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed:>4} [{bar:30}] {percent:>3}% {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    Some(bar)
}

/// Power over the last two energy samples, for the live display.
fn current_power(series: &[(f64, f64)]) -> Option<f64> {
    let [.., (ta, ea), (tb, eb)] = series else { return None };
    (tb > ta).then(|| (eb - ea) / (tb - ta))
}

fn max_gap(series: &[(f64, f64)]) -> f64 {
    series.windows(2).map(|w| w[1].0 - w[0].0).fold(0.0, f64::max)
}

/// Per second of the window: tokens generated (spread over each run's duration) and power.
fn timeline(runs: &[runs::RunRecord], series: &[(f64, f64)], t0: f64, t1: f64) -> Vec<TimelinePoint> {
    let seconds = ((t1 - t0).ceil() as usize).max(1);
    let mut tokens = vec![0.0f64; seconds];
    for r in runs.iter().filter(|r| r.ok) {
        let (a, b) = (r.start_s - t0, (r.end_s - t0).max(r.start_s - t0 + 1e-6));
        let rate = r.generated_tokens as f64 / (b - a);
        for (i, slot) in tokens.iter_mut().enumerate() {
            let overlap = (b.min(i as f64 + 1.0) - a.max(i as f64)).max(0.0);
            *slot += rate * overlap;
        }
    }
    tokens
        .into_iter()
        .enumerate()
        .map(|(i, tok)| {
            let (a, b) = (t0 + i as f64, (t0 + i as f64 + 1.0).min(t1));
            let power_w = match (energy::energy_at(series, a), energy::energy_at(series, b)) {
                (Some(ea), Some(eb)) if b > a => Some((eb - ea) / (b - a)),
                _ => None,
            };
            TimelinePoint { t_s: i as f64, generated_tok_s: tok / (b - a).max(1e-9), power_w }
        })
        .collect()
}
