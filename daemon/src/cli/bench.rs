//! `mulmd bench`: the paper's measurement (see `crate::bench`): flags to options, the meter,
//! the run, and the report written and printed.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::EXIT_CONFIG;
use crate::bench::meter::{CommandUnit, Scope};
use crate::bench::{self, MeterSpec};
use crate::engine::OpenerOptions;

#[derive(Args)]
pub struct BenchArgs {
    /// Model directories, measured in turn under identical settings (default: the default model).
    #[arg(long, num_args = 1..)]
    models: Vec<PathBuf>,
    /// Measurement window per model, seconds.
    #[arg(long, default_value_t = 90.0)]
    window: f64,
    /// Warm-up requests before the idle baseline.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Idle baseline before (and after) the window, seconds; used only with a meter.
    #[arg(long, default_value_t = 30.0)]
    idle: f64,
    /// Skip the idle baseline after the window (no drift check).
    #[arg(long)]
    no_idle_after: bool,
    /// Questions, one per line (default: the built-in set of short assistant questions).
    #[arg(long)]
    prompts: Option<PathBuf>,
    #[arg(long, default_value_t = 4)]
    min_words: usize,
    #[arg(long, default_value_t = 8)]
    max_words: usize,
    #[arg(long, default_value_t = 48)]
    max_tokens: usize,
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Energy meter: auto | none | powercap | hwmon:CHIP[:LABEL] | battery[:NAME] | command:PROGRAM [ARGS] | manual
    #[arg(long, default_value = "auto")]
    meter: String,
    /// What a command meter prints: joules (cumulative) or watts (instantaneous).
    #[arg(long, value_parser = ["joules", "watts"], default_value = "joules")]
    meter_unit: String,
    /// What an hwmon, command or manual meter measures: board | wall | cpu | battery.
    #[arg(long, value_parser = ["board", "wall", "cpu", "battery"], default_value = "board")]
    meter_scope: String,
    /// The meter's resolution in joules (command and manual meters; a UM24C's 1 mWh is 3.6).
    #[arg(long, default_value_t = 3.6)]
    meter_resolution: f64,
    /// How often an automatic meter is read, milliseconds.
    #[arg(long, default_value_t = 100)]
    poll_ms: u64,
    /// Results directory (default: mulmd-bench/<unix time>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Filesystem root for /sys and /proc (for testing against a fake tree).
    #[arg(long, default_value = "/", hide = true)]
    sysfs_root: PathBuf,
    #[arg(long)]
    no_progress: bool,
}

pub fn run(a: BenchArgs) -> ExitCode {
    let unit = if a.meter_unit == "watts" { CommandUnit::Watts } else { CommandUnit::Joules };
    let scope = match a.meter_scope.as_str() {
        "wall" => Scope::WallSocket,
        "cpu" => Scope::CpuPackage,
        "battery" => Scope::Battery,
        _ => Scope::BoardInput,
    };
    let spec = match MeterSpec::parse(&a.meter, unit, scope, a.meter_resolution) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mulmd: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if !(a.window.is_finite() && a.window > 0.0 && a.idle.is_finite() && a.idle >= 0.0) {
        eprintln!("mulmd: --window must be positive and --idle non-negative (seconds)");
        return ExitCode::from(EXIT_CONFIG);
    }
    let (prompts, prompt_set) = match &a.prompts {
        Some(p) => match bench::prompts::from_file(p) {
            Ok(v) => (v, p.display().to_string()),
            Err(e) => {
                eprintln!("mulmd: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        None => (bench::prompts::BUILT_IN.iter().map(|s| s.to_string()).collect(), "built-in".to_string()),
    };
    let opener = OpenerOptions { min_words: a.min_words, max_words: a.max_words, max_tokens: a.max_tokens, ..Default::default() };
    if let Err(e) = opener.validate() {
        eprintln!("mulmd: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let opts = bench::BenchOptions {
        models: if a.models.is_empty() { vec![crate::host::paths::default_model_dir()] } else { a.models.clone() },
        window: std::time::Duration::from_secs_f64(a.window),
        warmup: a.warmup,
        idle: std::time::Duration::from_secs_f64(a.idle),
        idle_after: !a.no_idle_after,
        prompts,
        prompt_set,
        opener,
        threads: a.threads,
        meter: spec.clone(),
        root: a.sysfs_root.clone(),
        poll: std::time::Duration::from_millis(a.poll_ms.max(10)),
        progress: !a.no_progress,
    };
    let (meter, note) = match bench::open_meter(&spec, &opts.root) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("mulmd: energy meter: {e}");
            eprintln!("mulmd: choose another with --meter (none measures throughput only)");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(n) = &note {
        eprintln!("mulmd: {n}");
    }
    let report = match bench::run(&opts, meter, note) {
        Ok(r) => r,
        Err(e @ bench::BenchError::Load(_)) => {
            eprintln!("mulmd: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
        Err(e) => {
            eprintln!("mulmd: bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let out = a.out.clone().unwrap_or_else(|| PathBuf::from("mulmd-bench").join(report.started_unix_s.to_string()));
    let summary = bench::report::markdown(&report);
    let written = std::fs::create_dir_all(&out).and_then(|_| {
        std::fs::write(out.join("report.json"), serde_json::to_string_pretty(&report).unwrap_or_default())?;
        std::fs::write(out.join("summary.md"), &summary)?;
        std::fs::write(out.join("plot.svg"), bench::plot::svg(&report))
    });
    print!("{summary}");
    match written {
        Ok(()) => {
            println!("Results: {0}/report.json, {0}/summary.md, {0}/plot.svg", out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mulmd: writing results to {}: {e}", out.display());
            ExitCode::FAILURE
        }
    }
}
