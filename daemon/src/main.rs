//! The `mulmd` command: parse the command line, set up logging, run one subcommand.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use mulmd::engine::{CancelToken, Engine, EngineConfig, Job, Model, Opener, OpenerEvent, OpenerOptions, Sampling};

/// Exit code for a missing or invalid model or configuration (sysexits' EX_CONFIG): restarting
/// will not help, so the systemd unit lists it in RestartPreventExitStatus.
const EXIT_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(name = "mulmd", version, about = "Instant openers from a micro language model, continued by a cloud model")]
struct Cli {
    /// Log filter (tracing's EnvFilter syntax), e.g. "info" or "mulmd=debug".
    #[arg(long, global = true, env = "MULMD_LOG", default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the opener for one question and print it word by word, then its timings.
    Open(OpenArgs),
    /// Measure raw engine speed (greedy, fixed token count) and print JSON; used by
    /// bench/compare_runtimes.py to set mulmd against onnxruntime and llama.cpp.
    Probe(ProbeArgs),
}

#[derive(Args)]
struct ProbeArgs {
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, default_value = "How do I remove odor from inside my shoes?")]
    query: String,
    /// Tokens to generate per run (end-of-text is ignored).
    #[arg(long, default_value_t = 32)]
    tokens: usize,
    /// Timed runs after one warm-up run.
    #[arg(long, default_value_t = 2)]
    runs: usize,
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

#[derive(Args)]
struct OpenArgs {
    /// The question.
    query: String,
    /// Model directory (default: $MULMD_MODEL_DIR or ~/.cache/mulmd/models/smollm2-135m-instruct).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, default_value_t = 4)]
    min_words: usize,
    #[arg(long, default_value_t = 8)]
    max_words: usize,
    #[arg(long, default_value_t = 48)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long)]
    seed: Option<u64>,
    /// A system turn before the question (default: the model template's own).
    #[arg(long)]
    system: Option<String>,
    /// Matrix-multiply threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    match cli.command {
        Command::Open(args) => open(args),
        Command::Probe(args) => probe(args),
    }
}

/// Loads `--model` or the default model directory; a failure is reported and mapped to the
/// configuration exit code.
fn load_model(explicit: Option<&PathBuf>, threads: usize) -> Result<Arc<Model>, ExitCode> {
    let dir = explicit.cloned().unwrap_or_else(mulmd::paths::default_model_dir);
    Model::load(&dir, threads).map(Arc::new).map_err(|e| {
        eprintln!("mulmd: {e}");
        if explicit.is_none() && !dir.exists() {
            eprintln!("mulmd: prepare the default model first: see the README's first command");
        }
        ExitCode::from(EXIT_CONFIG)
    })
}

fn probe(args: ProbeArgs) -> ExitCode {
    let model = match load_model(args.model.as_ref(), args.threads) {
        Ok(m) => m,
        Err(code) => return code,
    };
    let mut session = match model.session() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mulmd: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut runs = Vec::new();
    for _ in 0..=args.runs {
        match mulmd::engine::probe(&model, &mut session, &args.query, args.tokens) {
            Ok(r) => runs.push(r),
            Err(e) => {
                eprintln!("mulmd: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let warmup = runs.remove(0);
    let report = serde_json::json!({
        "runtime": "mulmd",
        "model": model.manifest.name,
        "precision": model.manifest.precision,
        "threads": args.threads,
        "load_ms": ms(model.load_time),
        "warmup": warmup,
        "runs": runs,
        "peak_rss_mb": peak_rss_mb(),
    });
    println!("{report}");
    ExitCode::SUCCESS
}

/// The process's peak resident set (VmHWM) in MB, where /proc provides it.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn open(args: OpenArgs) -> ExitCode {
    let model = match load_model(args.model.as_ref(), args.threads) {
        Ok(m) => m,
        Err(code) => return code,
    };
    let options = OpenerOptions {
        min_words: args.min_words,
        max_words: args.max_words,
        max_tokens: args.max_tokens,
        sampling: Sampling { temperature: args.temperature, top_k: args.top_k, top_p: args.top_p, seed: args.seed },
        system_prompt: args.system.clone(),
    };
    let engine = match Engine::start(model.clone(), EngineConfig { workers: 1, queue_depth: 1 }) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("mulmd: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let job = Job {
        query: args.query.clone(),
        options,
        arrived: Instant::now(),
        cancel: CancelToken::default(),
        sink: Box::new(move |ev| {
            let _ = tx.send(ev);
        }),
    };
    if let Err((e, _)) = engine.submit(job) {
        eprintln!("mulmd: {e}");
        return ExitCode::FAILURE;
    }
    let mut out = std::io::stdout().lock();
    for ev in rx {
        match ev {
            OpenerEvent::Word(w) if !args.json => {
                let _ = write!(out, "{}{}", if w.index == 0 { "" } else { w.leading.as_str() }, w.text);
                let _ = out.flush();
            }
            OpenerEvent::Word(_) => {}
            OpenerEvent::Done(opener) => {
                if args.json {
                    let _ = writeln!(out, "{}", opener_json(&model, &opener));
                } else {
                    let _ = writeln!(out);
                    print_timings(&model, &opener);
                }
                return ExitCode::SUCCESS;
            }
            OpenerEvent::Error(e) => {
                let _ = writeln!(out);
                eprintln!("mulmd: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    eprintln!("mulmd: the engine stopped without finishing the request");
    ExitCode::FAILURE
}

fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 1e2
}

fn opener_json(model: &Model, o: &Opener) -> serde_json::Value {
    let t = &o.timings;
    serde_json::json!({
        "opener": o.text,
        "words": o.words,
        "stop": o.stop,
        "ttft_ms": ms(t.ttft),
        "opener_ms": ms(t.opener),
        "tokenize_ms": ms(t.tokenize),
        "prefill_ms": ms(t.prefill),
        "queued_ms": ms(t.queued),
        "total_ms": ms(t.total),
        "prompt_tokens": o.prompt_tokens,
        "generated_tokens": o.generated_tokens,
        "model": model.manifest.name,
        "precision": model.manifest.precision,
        "load_ms": ms(model.load_time),
    })
}

fn print_timings(model: &Model, o: &Opener) {
    let t = &o.timings;
    eprintln!(
        "model {} ({}), loaded in {:.0} ms",
        model.manifest.name,
        model.manifest.precision,
        ms(model.load_time)
    );
    eprintln!(
        "tokenize {:.2} ms · prefill {:.2} ms ({} prompt tokens) · time to first token {:.2} ms",
        ms(t.tokenize),
        ms(t.prefill),
        o.prompt_tokens,
        ms(t.ttft)
    );
    let words: Vec<String> = o.words.iter().map(|w| format!("{} {:.1}", w.text, ms(w.at))).collect();
    eprintln!("words (ms since arrival): {}", words.join(" · "));
    eprintln!(
        "opener {:.2} ms · total {:.2} ms · {} generated tokens · stopped: {:?}",
        ms(t.opener),
        ms(t.total),
        o.generated_tokens,
        o.stop
    );
}
