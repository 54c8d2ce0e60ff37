//! The `mulmd` command line: one file per subcommand, sharing what every subcommand needs
//! here (logging, the async runtime, reading a configuration or a model, printing words).
//! `main.rs` only parses, sets up logging and calls [`run`].

mod ask;
mod bench;
mod config;
mod health;
mod open;
mod probe;
mod serve;
mod tls;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::engine::{Model, WordEvent};

/// Exit code for a missing or invalid model or configuration (sysexits' EX_CONFIG): restarting
/// will not help, so the systemd unit lists it in RestartPreventExitStatus.
pub const EXIT_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(name = "mulmd", version, about = "Instant openers from a micro language model, continued by a cloud model")]
pub struct Cli {
    /// Log filter (tracing's EnvFilter syntax), e.g. "info" or "mulmd=debug". Default: "warn",
    /// or for `serve` the config's log.level.
    #[arg(long, global = true, env = "MULMD_LOG")]
    pub log: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Write the opener for one question and print it word by word, then its timings.
    Open(open::OpenArgs),
    /// Answer a question: the opener on the device, then the cloud's continuation (or the
    /// local model finishing the sentence when the cloud is off or fails).
    Ask(ask::AskArgs),
    /// Run the daemon: load the configuration and the model, serve gRPC until SIGTERM/SIGINT.
    Serve(serve::ServeArgs),
    /// Print the full default configuration, with comments.
    PrintConfig,
    /// Check a configuration file and list every problem with its key and the fix
    /// (exit 0 when valid, 78 otherwise); warnings are printed but do not fail.
    CheckConfig(config::CheckArgs),
    /// Ask a running daemon's gRPC health service whether it is serving (exit 0 when it is,
    /// 1 otherwise): for deploy scripts, monitoring and a quick check after install.
    Health(health::HealthArgs),
    /// The paper's benchmark: a fixed window of back-to-back requests per model, with
    /// throughput, latency, and energy above an idle baseline from a meter.
    Bench(Box<bench::BenchArgs>),
    /// Measure raw engine speed (greedy, fixed token count) and print JSON; used by
    /// bench/compare_runtimes.py to set mulmd against onnxruntime and llama.cpp.
    Probe(probe::ProbeArgs),
    /// TLS for the LAN: `tls init` makes a self-signed certificate for this machine and
    /// prints the fingerprint an app pins.
    Tls(tls::TlsArgs),
}

impl Command {
    /// `serve` sets up logging itself, once its configuration is read.
    pub fn logs_itself(&self) -> bool {
        matches!(self, Self::Serve(_))
    }
}

/// Runs one subcommand to its exit code.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Open(a) => open::run(a),
        Command::Ask(a) => ask::run(a),
        Command::Serve(a) => serve::run(a, cli.log),
        Command::PrintConfig => config::print(),
        Command::CheckConfig(a) => config::check(a),
        Command::Health(a) => health::run(a),
        Command::Bench(a) => bench::run(*a),
        Command::Probe(a) => probe::run(a),
        Command::Tls(a) => tls::run(a),
    }
}

/// Logs go to stderr (journald under systemd): text without colours unless on a terminal,
/// or one JSON object per line.
pub fn init_logging(filter: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|e| {
        eprintln!("mulmd: log filter {filter:?} is invalid ({e}); using \"warn\"");
        tracing_subscriber::EnvFilter::new("warn")
    });
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().with_current_span(true).init();
    } else {
        builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init();
    }
}

/// The async runtime a subcommand runs its fronts on. Two I/O threads: the model work runs on
/// its own threads, so these only move bytes, and a board's other cores stay free for it.
fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("mulmd-io").enable_all().build().map_err(|e| {
        eprintln!("mulmd: cannot start the async runtime: {e}");
        ExitCode::FAILURE
    })
}

/// Prints every problem of a configuration file.
fn report_config_problems(file: &Path, problems: &[crate::config::Problem]) {
    eprintln!("{}: {} problem(s)", file.display(), problems.len());
    for p in problems {
        eprintln!("  {p}");
    }
}

/// Reads and parses a configuration file (the files it names are not checked: a flag may
/// stand in for them); problems are reported and mapped to the configuration exit code.
fn read_config(path: &Path) -> Result<crate::config::Config, ExitCode> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        eprintln!("mulmd: cannot read {}: {e}", path.display());
        ExitCode::from(EXIT_CONFIG)
    })?;
    crate::config::parse(&text).map_err(|problems| {
        report_config_problems(path, &problems);
        ExitCode::from(EXIT_CONFIG)
    })
}

/// Loads `explicit` or the default model directory; a failure is reported and mapped to the
/// configuration exit code.
fn load_model(explicit: Option<&PathBuf>, threads: usize) -> Result<Arc<Model>, ExitCode> {
    let dir = explicit.cloned().unwrap_or_else(crate::host::paths::default_model_dir);
    Model::load(&dir, threads).map(Arc::new).map_err(|e| {
        eprintln!("mulmd: {e}");
        if explicit.is_none() && !dir.exists() {
            eprintln!("mulmd: prepare the default model first: see the README's first command");
        }
        ExitCode::from(EXIT_CONFIG)
    })
}

/// Writes an opener word as it reads in running text (its leading whitespace unless first).
fn print_word(out: &mut impl Write, w: &WordEvent) {
    let _ = write!(out, "{}{}", if w.index == 0 { "" } else { w.leading.as_str() }, w.text);
    let _ = out.flush();
}

/// Milliseconds, rounded to hundredths, for printed timings.
fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 1e2
}
