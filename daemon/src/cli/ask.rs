//! `mulmd ask`: one whole answer in the terminal, as a client would receive it: the opener
//! from the device, then the cloud's continuation (or the device's own finish), then the
//! timings on stderr (or the final answer as one JSON object with `--json`).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;

use super::{load_model, print_word, read_config, runtime, EXIT_CONFIG};
use crate::answer::{new_request_id, Admission, AnswerEvent, Answerer, Front, GivenOpener, OpenerSource, RequestOptions};
use crate::cloud::{load_api_key, CloudClient, CloudConfig};
use crate::config::{Config, PromptLayout};
use crate::engine::{Engine, EngineConfig, OpenerOptions};

#[derive(Args)]
pub struct AskArgs {
    query: String,
    /// Configuration file ([model] and [cloud] are used; flags override it).
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    model: Option<PathBuf>,
    /// OpenAI-compatible endpoint up to the API version, e.g. http://127.0.0.1:8080/v1.
    #[arg(long, env = "MULMD_CLOUD_URL")]
    cloud_url: Option<String>,
    #[arg(long, env = "MULMD_CLOUD_MODEL", default_value = "default")]
    cloud_model: String,
    /// File holding the API key (default: $CREDENTIALS_DIRECTORY/cloud_api_key if present).
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// How the cloud repairs a wrong opener.
    #[arg(long, value_parser = ["natural", "explicit", "humor"], default_value = "natural")]
    recovery: String,
    /// How the opener is put to the cloud (default: the file's cloud.prompt, else auto).
    #[arg(long, value_parser = ["auto", "prefill", "instruct"])]
    prompt: Option<String>,
    /// Show this opener instead of the model's, to try how the cloud continues (or repairs)
    /// a given start; the model still finishes what the cloud leaves open.
    #[arg(long, value_name = "TEXT")]
    opener: Option<String>,
    /// Keep the whole answer on the device.
    #[arg(long)]
    no_cloud: bool,
    #[arg(long, default_value_t = 4)]
    min_words: usize,
    #[arg(long, default_value_t = 8)]
    max_words: usize,
    #[arg(long, default_value_t = 10.0)]
    first_token_timeout: f64,
    #[arg(long, default_value_t = 60.0)]
    total_timeout: f64,
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Print one JSON object (the final answer) instead of streaming text.
    #[arg(long)]
    json: bool,
}

pub fn run(a: AskArgs) -> ExitCode {
    let file = match &a.config {
        Some(path) => match read_config(path) {
            Ok(c) => Some(c),
            Err(code) => return code,
        },
        None => None,
    };
    let model_dir = a.model.clone().or_else(|| file.as_ref().map(|c| c.model.dir.clone()).filter(|d| !d.as_os_str().is_empty()));
    let model = match load_model(model_dir.as_ref(), a.threads) {
        Ok(m) => m,
        Err(code) => return code,
    };
    let cloud = match cloud(&a, file.as_ref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mulmd: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let base = file.clone().unwrap_or_default();
    let config = EngineConfig { workers: 1, queue_depth: 1, max_prompt_tokens: base.opener.max_prompt_tokens, prefill_chunk: base.engine.prefill_chunk_tokens, prefix_cache_bytes: 0 };
    let engine = match Engine::start(model, config) {
        Ok(e) => Arc::new(e),
        Err(e) => {
            eprintln!("mulmd: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The flags choose the opener's length within the engine's own bounds.
    let mut admission = Admission::from_config(&base);
    admission.defaults = OpenerOptions { min_words: a.min_words, max_words: a.max_words, ..Default::default() };
    admission.max_words_limit = 64;
    let source: Arc<dyn OpenerSource> = match a.opener.as_deref().map(str::trim) {
        Some("") => {
            eprintln!("mulmd: --opener is empty; give the words the answer should start with");
            return ExitCode::from(EXIT_CONFIG);
        }
        Some(text) => Arc::new(GivenOpener::new(text, engine)),
        None => engine,
    };
    let answerer = Answerer::new(source, cloud, admission);
    let options = RequestOptions { recovery: a.recovery.parse().ok(), cloud: Some(!a.no_cloud), ..Default::default() };
    let request = match answerer.admit(new_request_id(), Front::Cli, Instant::now(), a.query.clone(), &options) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mulmd: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async move {
        let mut events = answerer.answer(request);
        let mut out = std::io::stdout().lock();
        while let Some(ev) = events.next().await {
            match ev {
                AnswerEvent::Word(w) if !a.json => print_word(&mut out, &w),
                AnswerEvent::Delta { text, .. } if !a.json => {
                    let _ = write!(out, "{text}");
                    let _ = out.flush();
                }
                AnswerEvent::Done(ans) if a.json => {
                    let _ = writeln!(out, "{}", serde_json::to_string(&ans).unwrap_or_default());
                    return ExitCode::SUCCESS;
                }
                AnswerEvent::Done(ans) => {
                    let _ = writeln!(out);
                    let t = &ans.timings;
                    eprintln!(
                        "opener {:.1} ms (first token {:.1} ms) · cloud first text {} · total {:.1} ms{}{}{}",
                        t.opener_ms,
                        t.ttft_ms,
                        t.cloud_first_token_ms.map(|x| format!("{x:.1} ms after the opener")).unwrap_or_else(|| "none".into()),
                        t.total_ms,
                        if ans.corrected { " · corrected" } else { "" },
                        ans.fallback.as_ref().map(|f| format!(" · fallback: {} ({})", f.reason, f.message)).unwrap_or_default(),
                        ans.finish_detail.as_ref().map(|d| format!(" · cut short: {d}")).unwrap_or_default(),
                    );
                    return ExitCode::SUCCESS;
                }
                AnswerEvent::Error(e) => {
                    let _ = writeln!(out);
                    eprintln!("mulmd: {e}");
                    return ExitCode::FAILURE;
                }
                _ => {}
            }
        }
        ExitCode::FAILURE
    })
}

/// The cloud client the flags and the file ask for: the flags' endpoint when given, else the
/// file's [cloud] section when it is enabled; none with `--no-cloud` or when neither names one.
fn cloud(a: &AskArgs, file: Option<&Config>) -> Result<Option<Arc<CloudClient>>, String> {
    let from_file = file.map(|c| &c.cloud).filter(|c| c.enabled);
    if a.no_cloud || (a.cloud_url.is_none() && from_file.is_none()) {
        return Ok(None);
    }
    let (mut cfg, mut key_file) = match (from_file, &a.cloud_url) {
        (Some(c), None) => (CloudConfig::from_section(c), c.key_file().map(PathBuf::from)),
        (_, Some(url)) => {
            let mut cfg = CloudConfig::new(url, &a.cloud_model);
            cfg.first_token_timeout = seconds(a.first_token_timeout);
            cfg.total_timeout = seconds(a.total_timeout);
            (cfg, None)
        }
        (None, None) => return Ok(None),
    };
    if a.api_key_file.is_some() {
        key_file = a.api_key_file.clone();
    }
    cfg.prompt = match a.prompt.as_deref() {
        Some("prefill") => PromptLayout::Prefill,
        Some("instruct") => PromptLayout::Instruct,
        Some(_) => PromptLayout::Auto,
        None => cfg.prompt,
    };
    cfg.api_key = load_api_key(key_file.as_deref()).map_err(|e| e.to_string())?;
    CloudClient::new(cfg).map(|c| Some(Arc::new(c))).map_err(|e| e.to_string())
}

/// A timeout flag in seconds, kept within 0.1 s and a day whatever was typed.
fn seconds(s: f64) -> Duration {
    Duration::from_secs_f64(if s.is_finite() { s.clamp(0.1, 86_400.0) } else { 86_400.0 })
}
