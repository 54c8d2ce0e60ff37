//! `mulmd probe`: raw engine speed as JSON (and, with `--profile`, where the time goes), for
//! bench/compare_runtimes.py and for a look at a board.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::{load_model, ms};

#[derive(Args)]
pub struct ProbeArgs {
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
    /// Start each run from the prefilled chat-template head, as the daemon does (default: a
    /// cold prompt, fed whole, as the peers in bench/compare_runtimes.py are measured).
    #[arg(long)]
    reuse_head: bool,
    /// Time every op (by tract's op name) in the prompt pass and the decode steps: added to
    /// each run's JSON, and the last run printed as a table on stderr.
    #[arg(long)]
    profile: bool,
}

pub fn run(args: ProbeArgs) -> ExitCode {
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
        let opts = crate::engine::ProbeOptions { tokens: args.tokens, reuse_head: args.reuse_head, profile: args.profile };
        match crate::engine::probe(&model, &mut session, &args.query, opts) {
            Ok(r) => runs.push(r),
            Err(e) => {
                eprintln!("mulmd: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let warmup = runs.remove(0);
    if let Some(p) = runs.last().and_then(|r| r.profile.as_ref()) {
        print_profile(p);
    }
    let memory = crate::host::sys::process_memory();
    let report = serde_json::json!({
        "runtime": "mulmd",
        "model": model.manifest.name,
        "precision": model.manifest.precision,
        "threads": args.threads,
        // The engine kernels' instruction-set level (MULMD_KERNELS, or the best here).
        "kernels": crate::engine::kernels::in_use().name(),
        "reuse_head": args.reuse_head,
        "load_ms": ms(model.load_time),
        // "hit": the plan came from the plan cache; "stored", "unstored", "off": it did not.
        "plan_cache": model.plan_cache,
        "warmup": warmup,
        "runs": runs,
        "peak_rss_mb": memory.peak_rss_mb,
        "rss_mb": memory.rss_mb,
    });
    println!("{report}");
    ExitCode::SUCCESS
}

/// The per-op table of `mulmd probe --profile`: the prompt pass, and decode per step.
fn print_profile(p: &crate::engine::RunProfile) {
    let steps = p.decode.passes.max(1) as f64;
    eprintln!("{:<28} {:>12} {:>16} {:>12} {:>7}", "op", "prompt ms", "decode ms/step", "calls/step", "decode");
    let none = crate::engine::OpTime::default();
    let decoded = p.decode.ranked();
    // Ops the decode steps never ran (if any) follow, so the prompt column still adds up.
    let prompt_only = p.prefill.ranked().into_iter().filter(|(op, _)| !p.decode.ops.contains_key(*op)).map(|(op, _)| (op, &none));
    for (op, t) in decoded.into_iter().chain(prompt_only) {
        let prompt = p.prefill.ops.get(op).map_or(0.0, |x| x.ms);
        let share = 100.0 * t.ms / p.decode.total_ms().max(f64::MIN_POSITIVE);
        eprintln!("{op:<28} {prompt:>12.3} {:>16.3} {:>12.1} {share:>6.1}%", t.ms / steps, t.calls as f64 / steps);
    }
    eprintln!("{:<28} {:>12.3} {:>16.3}", "all ops", p.prefill.total_ms(), p.decode.total_ms() / steps);
}
