//! `mulmd open`: one opener, printed word by word as it is written, then its timings (or one
//! JSON object with `--json`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Args;
use tokio_util::sync::CancellationToken;

use super::{load_model, ms, print_word};
use crate::engine::{Engine, EngineConfig, Model, Opener, OpenerOptions, Prompt, Sampling};

#[derive(Args)]
pub struct OpenArgs {
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
    /// The voice policy: end at the first sentence end after N characters (still at most
    /// --max-words words) instead of the first clause boundary after --min-words.
    #[arg(long)]
    sentence_chars: Option<usize>,
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

pub fn run(args: OpenArgs) -> ExitCode {
    let model = match load_model(args.model.as_ref(), args.threads) {
        Ok(m) => m,
        Err(code) => return code,
    };
    let options = OpenerOptions {
        min_words: args.min_words,
        max_words: args.max_words,
        max_tokens: args.max_tokens,
        sampling: Sampling { temperature: args.temperature, top_k: args.top_k, top_p: args.top_p, seed: args.seed },
        sentence_chars: args.sentence_chars,
    };
    let config = EngineConfig { workers: 1, queue_depth: 1, max_prompt_tokens: model.context_length(), ..EngineConfig::default() };
    let engine = match Engine::start(model.clone(), config) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("mulmd: {e}");
            return ExitCode::FAILURE;
        }
    };
    let prompt = Prompt { system: args.system.clone(), ..Prompt::question(args.query.clone()) };
    let mut out = std::io::stdout().lock();
    let result = engine.submit(&prompt, options, Instant::now(), CancellationToken::new()).and_then(|events| {
        events.wait(|w| {
            if !args.json {
                print_word(&mut out, w);
            }
        })
    });
    use std::io::Write;
    match result {
        Ok(opener) if args.json => {
            let _ = writeln!(out, "{}", opener_json(&model, &opener));
            ExitCode::SUCCESS
        }
        Ok(opener) => {
            let _ = writeln!(out);
            print_timings(&model, &opener);
            ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = writeln!(out);
            eprintln!("mulmd: {e}");
            ExitCode::FAILURE
        }
    }
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
        "reused_tokens": o.reused_tokens,
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
        "tokenize {:.2} ms · prefill {:.2} ms ({} prompt tokens, {} from the prefilled template head) · \
         time to first token {:.2} ms",
        ms(t.tokenize),
        ms(t.prefill),
        o.prompt_tokens,
        o.reused_tokens,
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
