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
    /// Log filter (tracing's EnvFilter syntax), e.g. "info" or "mulmd=debug". Default: "warn",
    /// or for `serve` the config's log.level.
    #[arg(long, global = true, env = "MULMD_LOG")]
    log: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the opener for one question and print it word by word, then its timings.
    Open(OpenArgs),
    /// Answer a question: the opener on the device, then the cloud's continuation (or the
    /// local model finishing the sentence when the cloud is off or fails).
    Ask(AskArgs),
    /// Run the daemon: load the configuration and the model, serve gRPC until SIGTERM/SIGINT.
    Serve {
        /// Configuration file (default /etc/mulmd/mulmd.toml when it exists, else defaults).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print the full default configuration, with comments.
    PrintConfig,
    /// Check a configuration file and list every problem with its key and the fix
    /// (exit 0 when valid, 78 otherwise).
    CheckConfig {
        #[arg(default_value = mulmd::config::DEFAULT_PATH)]
        file: PathBuf,
    },
    /// Ask a running daemon's gRPC health service whether it is serving (exit 0 when it is,
    /// 1 otherwise): for deploy scripts, monitoring and a quick check after install.
    Health {
        /// Address of the daemon's gRPC API (default: grpc.listen of /etc/mulmd/mulmd.toml
        /// when it exists, else 127.0.0.1:50051).
        #[arg(long)]
        addr: Option<String>,
        /// Seconds to keep trying while the daemon starts.
        #[arg(long, default_value_t = 0.0)]
        wait: f64,
    },
    /// The paper's benchmark: a fixed window of back-to-back requests per model, with
    /// throughput, latency, and energy above an idle baseline from a meter.
    Bench(Box<BenchArgs>),
    /// Measure raw engine speed (greedy, fixed token count) and print JSON; used by
    /// bench/compare_runtimes.py to set mulmd against onnxruntime and llama.cpp.
    Probe(ProbeArgs),
}

#[derive(Args)]
struct AskArgs {
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

#[derive(Args)]
struct BenchArgs {
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
    /// Start each run from the prefilled chat-template head, as the daemon does (default: a
    /// cold prompt, fed whole, as the peers in bench/compare_runtimes.py are measured).
    #[arg(long)]
    reuse_head: bool,
    /// Time every op (by tract's op name) in the prompt pass and the decode steps: added to
    /// each run's JSON, and the last run printed as a table on stderr.
    #[arg(long)]
    profile: bool,
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
    // `serve` sets up logging itself, once its configuration is read.
    if !matches!(cli.command, Command::Serve { .. }) {
        init_logging(cli.log.as_deref().unwrap_or("warn"), false);
    }
    match cli.command {
        Command::Open(args) => open(args),
        Command::Probe(args) => probe(args),
        Command::Bench(args) => bench(*args),
        Command::Ask(args) => ask(args),
        Command::Serve { config } => serve(config, cli.log),
        Command::PrintConfig => {
            print!("{}", mulmd::config::TEMPLATE);
            ExitCode::SUCCESS
        }
        Command::Health { addr, wait } => health(addr, wait),
        Command::CheckConfig { file } => match mulmd::config::load(&file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(problems) => {
                report_config_problems(&file, &problems);
                ExitCode::from(EXIT_CONFIG)
            }
        },
    }
}

fn health(addr: Option<String>, wait: f64) -> ExitCode {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let addr = addr.unwrap_or_else(|| {
        mulmd::config::load(std::path::Path::new(mulmd::config::DEFAULT_PATH))
            .ok()
            .map(|c| c.grpc.listen)
            .filter(|l| !l.is_empty())
            .unwrap_or_else(|| "127.0.0.1:50051".into())
    });
    let url = if addr.starts_with("http://") { addr.clone() } else { format!("http://{addr}") };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mulmd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let until = Instant::now() + std::time::Duration::from_secs_f64(wait.max(0.0));
    rt.block_on(async move {
        loop {
            let result = async {
                let channel = tonic::transport::Endpoint::from_shared(url.clone())
                    .map_err(|e| format!("{addr} is not an address: {e}"))?
                    .connect()
                    .await
                    .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
                let mut client = HealthClient::new(channel);
                let r = client
                    .check(HealthCheckRequest { service: "mulm.v1.Answerer".into() })
                    .await
                    .map_err(|s| format!("{addr}: {}", s.message()))?;
                Ok::<_, String>(r.into_inner().status())
            }
            .await;
            match result {
                Ok(ServingStatus::Serving) => {
                    println!("{addr}: SERVING");
                    return ExitCode::SUCCESS;
                }
                Ok(other) if Instant::now() >= until => {
                    println!("{addr}: {}", other.as_str_name());
                    return ExitCode::FAILURE;
                }
                Err(e) if Instant::now() >= until => {
                    eprintln!("mulmd: {e}; is the service running? (systemctl status mulmd)");
                    return ExitCode::FAILURE;
                }
                _ => tokio::time::sleep(std::time::Duration::from_millis(250)).await,
            }
        }
    })
}

/// Logs go to stderr (journald under systemd): text without colours unless on a terminal,
/// or one JSON object per line.
fn init_logging(filter: &str, json: bool) {
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

fn serve(path: Option<PathBuf>, log: Option<String>) -> ExitCode {
    use mulmd::server::{self, StartError};
    let path = path.or_else(|| Some(PathBuf::from(mulmd::config::DEFAULT_PATH)).filter(|p| p.exists()));
    let config = match &path {
        Some(p) => match mulmd::config::load(p) {
            Ok(c) => c,
            Err(problems) => {
                init_logging("warn", false);
                report_config_problems(p, &problems);
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        None => mulmd::config::Config::default(),
    };
    init_logging(log.as_deref().unwrap_or(&config.log.level), config.log.format == "json");
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("mulmd-io").enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mulmd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        let prepared = tokio::task::spawn_blocking(move || server::prepare(config))
            .await
            .map_err(|e| StartError::Runtime(e.to_string()))??;
        // Where it listens is in the "serving ..." log line (and systemd's STATUS).
        let listeners = server::bind(&prepared.config).await?;
        server::run(prepared, listeners, server::signals()).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ (StartError::Model(_) | StartError::Config(_))) => {
            eprintln!("mulmd: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            eprintln!("mulmd: {e}");
            ExitCode::FAILURE
        }
    }
}

fn report_config_problems(file: &std::path::Path, problems: &[mulmd::config::Problem]) {
    eprintln!("{}: {} problem(s)", file.display(), problems.len());
    for p in problems {
        eprintln!("  {p}");
    }
}

fn ask(a: AskArgs) -> ExitCode {
    use mulmd::cloud::{load_api_key, CloudClient, CloudConfig};
    use mulmd::pipeline::{answer, AnswerEvent, AnswerRequest};
    use std::time::Duration;
    let file = match &a.config {
        Some(path) => match mulmd::config::load(path) {
            Ok(c) => Some(c),
            Err(problems) => {
                report_config_problems(path, &problems);
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        None => None,
    };
    let model_dir = a.model.clone().or_else(|| file.as_ref().map(|c| c.model.dir.clone()).filter(|d| !d.as_os_str().is_empty()));
    let model = match load_model(model_dir.as_ref(), a.threads) {
        Ok(m) => m,
        Err(code) => return code,
    };
    // Flags first, then the file's [cloud] section when it is enabled.
    let from_file = file.as_ref().map(|c| &c.cloud).filter(|c| c.enabled);
    let url = a.cloud_url.clone().or_else(|| from_file.map(|c| c.base_url.clone()));
    let cloud = match url {
        Some(url) if !a.no_cloud => {
            // The file's [cloud] section when it supplied the endpoint; the flags otherwise.
            let (mut cfg, mut key_file) = match (from_file, &a.cloud_url) {
                (Some(c), None) => (c.client_config(), c.key_file().map(PathBuf::from)),
                _ => {
                    let mut cfg = CloudConfig::new(&url, &a.cloud_model);
                    cfg.first_token_timeout = Duration::from_secs_f64(a.first_token_timeout.max(0.1));
                    cfg.total_timeout = Duration::from_secs_f64(a.total_timeout.max(0.1));
                    (cfg, None)
                }
            };
            if a.api_key_file.is_some() {
                key_file = a.api_key_file.clone();
            }
            match load_api_key(key_file.as_deref()).and_then(|k| {
                cfg.api_key = k;
                CloudClient::new(cfg)
            }) {
                Ok(c) => Some(Arc::new(c)),
                Err(e) => {
                    eprintln!("mulmd: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            }
        }
        _ => None,
    };
    let engine = match Engine::start(model, EngineConfig { workers: 1, queue_depth: 1 }) {
        Ok(e) => Arc::new(e),
        Err(e) => {
            eprintln!("mulmd: {e}");
            return ExitCode::FAILURE;
        }
    };
    let req = AnswerRequest {
        id: mulmd::pipeline::new_request_id(),
        front: mulmd::pipeline::Front::Cli,
        query: a.query.clone(),
        opener: OpenerOptions { min_words: a.min_words, max_words: a.max_words, ..Default::default() },
        recovery: a.recovery.parse().unwrap_or_default(),
        use_cloud: !a.no_cloud,
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mulmd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let cancel = tokio_util::sync::CancellationToken::new();
        tokio::spawn(answer(engine, cloud, req, Instant::now(), tx, cancel.clone()));
        let mut out = std::io::stdout().lock();
        while let Some(ev) = rx.recv().await {
            match ev {
                AnswerEvent::Word(w) if !a.json => {
                    let _ = write!(out, "{}{}", if w.index == 0 { "" } else { w.leading.as_str() }, w.text);
                }
                AnswerEvent::Delta { text, .. } if !a.json => {
                    let _ = write!(out, "{text}");
                }
                AnswerEvent::Done(ans) => {
                    if a.json {
                        let _ = writeln!(out, "{}", serde_json::to_string(&ans).unwrap_or_default());
                    } else {
                        let _ = writeln!(out);
                        let t = &ans.timings;
                        eprintln!(
                            "opener {:.1} ms (first token {:.1} ms) · cloud first text {} · total {:.1} ms{}{}",
                            t.opener_ms,
                            t.ttft_ms,
                            t.cloud_first_token_ms.map(|x| format!("{x:.1} ms after the opener")).unwrap_or_else(|| "none".into()),
                            t.total_ms,
                            if ans.corrected { " · corrected" } else { "" },
                            ans.fallback.as_ref().map(|f| format!(" · fallback: {} ({})", f.reason, f.message)).unwrap_or_default()
                        );
                    }
                    return ExitCode::SUCCESS;
                }
                AnswerEvent::Error(e) => {
                    let _ = writeln!(out);
                    eprintln!("mulmd: {e}");
                    return ExitCode::FAILURE;
                }
                _ => {}
            }
            let _ = out.flush();
        }
        eprintln!("mulmd: the answer ended without a terminal event");
        ExitCode::FAILURE
    })
}

fn meter_spec(a: &BenchArgs) -> Result<mulmd::bench::MeterSpec, String> {
    use mulmd::bench::meter::{CommandUnit, Scope};
    use mulmd::bench::MeterSpec;
    let scope = match a.meter_scope.as_str() {
        "wall" => Scope::WallSocket,
        "cpu" => Scope::CpuPackage,
        "battery" => Scope::Battery,
        _ => Scope::BoardInput,
    };
    let (kind, rest) = a.meter.split_once(':').map(|(k, r)| (k, Some(r))).unwrap_or((a.meter.as_str(), None));
    if !(a.meter_resolution.is_finite() && a.meter_resolution >= 0.0) {
        return Err(format!("--meter-resolution {} must be a non-negative number of joules", a.meter_resolution));
    }
    Ok(match (kind, rest) {
        ("none", None) => MeterSpec::None,
        ("auto", None) => MeterSpec::Auto,
        ("powercap", None) => MeterSpec::Powercap,
        ("hwmon", Some(r)) if !r.is_empty() => {
            let (chip, label) = r.split_once(':').map(|(c, l)| (c, Some(l.to_string()))).unwrap_or((r, None));
            MeterSpec::Hwmon { chip: chip.to_string(), label, scope }
        }
        ("battery", name) => MeterSpec::Battery { name: name.filter(|n| !n.is_empty()).map(str::to_string) },
        ("command", Some(cmd)) if !cmd.trim().is_empty() => MeterSpec::Command {
            command: cmd.to_string(),
            unit: if a.meter_unit == "watts" { CommandUnit::Watts } else { CommandUnit::Joules },
            scope,
            resolution_j: a.meter_resolution,
        },
        ("manual", None) => MeterSpec::Manual { resolution_j: a.meter_resolution },
        _ => {
            return Err(format!(
                "--meter {:?} is not understood; use auto, none, powercap, hwmon:CHIP[:LABEL], battery[:NAME], \
                 command:PROGRAM [ARGS] or manual",
                a.meter
            ))
        }
    })
}

fn bench(a: BenchArgs) -> ExitCode {
    let spec = match meter_spec(&a) {
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
        Some(p) => match mulmd::bench::prompts::from_file(p) {
            Ok(v) => (v, p.display().to_string()),
            Err(e) => {
                eprintln!("mulmd: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        None => (mulmd::bench::prompts::BUILT_IN.iter().map(|s| s.to_string()).collect(), "built-in".to_string()),
    };
    let opener = OpenerOptions { min_words: a.min_words, max_words: a.max_words, max_tokens: a.max_tokens, ..Default::default() };
    if let Err(e) = opener.validate() {
        eprintln!("mulmd: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let opts = mulmd::bench::BenchOptions {
        models: if a.models.is_empty() { vec![mulmd::paths::default_model_dir()] } else { a.models.clone() },
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
    let (meter, note) = match mulmd::bench::open_meter(&spec, &opts.root) {
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
    let report = match mulmd::bench::run(&opts, meter, note) {
        Ok(r) => r,
        Err(e @ mulmd::bench::BenchError::Load(_)) => {
            eprintln!("mulmd: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
        Err(e) => {
            eprintln!("mulmd: bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let out = a.out.clone().unwrap_or_else(|| PathBuf::from("mulmd-bench").join(report.started_unix_s.to_string()));
    let summary = mulmd::bench::report::markdown(&report);
    let written = std::fs::create_dir_all(&out).and_then(|_| {
        std::fs::write(out.join("report.json"), serde_json::to_string_pretty(&report).unwrap_or_default())?;
        std::fs::write(out.join("summary.md"), &summary)?;
        std::fs::write(out.join("plot.svg"), mulmd::bench::plot::svg(&report))
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
        let opts = mulmd::engine::ProbeOptions { tokens: args.tokens, reuse_head: args.reuse_head, profile: args.profile };
        match mulmd::engine::probe(&model, &mut session, &args.query, opts) {
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
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let rss = status_mb(&status, "VmRSS:");
    // Linux folds the resident count into VmHWM only at some events, so VmHWM can trail the
    // current VmRSS by what the last moments added; the peak is at least the current size.
    let peak_rss = status_mb(&status, "VmHWM:").map(|hwm| rss.map_or(hwm, |rss| hwm.max(rss)));
    let report = serde_json::json!({
        "runtime": "mulmd",
        "model": model.manifest.name,
        "precision": model.manifest.precision,
        "threads": args.threads,
        "reuse_head": args.reuse_head,
        "load_ms": ms(model.load_time),
        "warmup": warmup,
        "runs": runs,
        "peak_rss_mb": peak_rss,
        "rss_mb": rss,
    });
    println!("{report}");
    ExitCode::SUCCESS
}

/// The per-op table of `mulmd probe --profile`: the prompt pass, and decode per step.
fn print_profile(p: &mulmd::engine::RunProfile) {
    let steps = p.decode.passes.max(1) as f64;
    eprintln!("{:<28} {:>12} {:>16} {:>12} {:>7}", "op", "prompt ms", "decode ms/step", "calls/step", "decode");
    let none = mulmd::engine::OpTime::default();
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

/// A memory figure in MB from the text of /proc/self/status (VmHWM: the peak resident set;
/// VmRSS: the current one), where /proc provides it.
fn status_mb(status: &str, key: &str) -> Option<f64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
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
        continue_from: None,
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
