//! `mulmd serve`: configuration → model (loaded and warmed) → engine → answer service →
//! listeners, then READY to systemd and serving until the shutdown future resolves, then an
//! ordered stop: STOPPING, health NOT_SERVING, stop accepting (gRPC and MQTT), let in-flight
//! answers finish within the grace period, MQTT `offline` and disconnect, stop the workers
//! (which end whatever is still running within one forward pass).

pub mod discovery;
pub mod systemd;

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

use crate::answer::{Admission, Answerer, Conversations};
use crate::cloud::{load_api_key, CloudClient, CloudConfig};
use crate::config::Config;
use crate::engine::{Engine, EngineConfig, LoadError, Model, OpenerOptions, Prompt};
use crate::grpc::{self, AnswerService};
use crate::host::cpus;
use crate::host::secrets::{SecretError, TokenError, Tokens};
use crate::host::tls::ServerTls;
use crate::http::{HttpFront, ModelCard};
use crate::mqtt::{MqttError, MqttFront};

const CPU_SYSFS: &str = "/sys/devices/system/cpu";

/// Why the daemon could not start or stopped serving. [`StartError::is_config`] tells the ones
/// a restart cannot fix (the binary exits 78 for those, so systemd stops retrying).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Model(#[from] LoadError),
    #[error("{setting}: {problem}")]
    Config { setting: &'static str, problem: String },
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error(transparent)]
    Mqtt(#[from] MqttError),
    #[error(transparent)]
    Tokens(#[from] TokenError),
    #[error(transparent)]
    Http(#[from] crate::http::HttpError),
    #[error("{setting} {addr}: {source}{fix}")]
    Bind { setting: &'static str, addr: String, source: std::io::Error, fix: &'static str },
    #[error(transparent)]
    Grpc(#[from] grpc::GrpcError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::EndpointError),
    #[error("{0}")]
    Exposure(crate::config::Problem),
    #[error("{0}")]
    Tls(String),
    #[error("{0}")]
    Runtime(String),
}

impl StartError {
    /// True when the configuration (or a file it names) is at fault: restarting won't help.
    pub fn is_config(&self) -> bool {
        matches!(self, Self::Model(_) | Self::Config { .. } | Self::Secret(_) | Self::Mqtt(_) | Self::Tokens(_) | Self::Exposure(_) | Self::Tls(_))
    }
}

/// Everything built before binding: the loaded, warmed model, the engine and the answer
/// service.
pub struct Prepared {
    pub engine: Arc<Engine>,
    pub answerer: Arc<Answerer>,
    pub mqtt: Option<Arc<MqttFront>>,
    pub http: Option<Arc<HttpFront>>,
    /// The bearer tokens every TCP listener asks for; None: no token is asked for.
    pub tokens: Option<Arc<Tokens>>,
    /// TLS for every TCP listener; None: plain TCP.
    pub tls: Option<ServerTls>,
    pub config: Config,
    /// How long the warm-up opener took (for the status line).
    pub warm_up: Duration,
}

/// Loads the model, starts the workers and runs one warm-up opener (the first generation
/// after load is the slowest), so readiness means ready to answer fast.
pub fn prepare(config: Config) -> Result<Prepared, StartError> {
    // Tokens before the model: a refusal to serve should not wait for a load.
    let tokens = Tokens::load(config.auth.file(), crate::host::secrets::TOKENS_CREDENTIAL)?.map(Arc::new);
    if let Some(problem) = crate::config::exposure(&config, tokens.is_some()).0.into_iter().next() {
        return Err(StartError::Exposure(problem));
    }
    if let Some(t) = &tokens {
        tracing::info!(tokens = ?t.names(), "gRPC, HTTP and /metrics ask for a bearer token");
    }
    let t = &config.tls;
    let tls = ServerTls::load(&t.cert_file, &t.key_file, &t.client_ca_file).map_err(StartError::Tls)?;
    if let Some(tls) = &tls {
        tracing::info!(fingerprint = %tls.fingerprint, client_certificates = tls.mutual(), "TCP listeners speak TLS");
    }
    let engine = Arc::new(start_engine(&config)?);
    let warm_start = Instant::now();
    engine
        .submit(&Prompt::question("Hello!"), OpenerOptions::default(), Instant::now(), CancellationToken::new())
        .and_then(|events| events.wait(|_| {}))
        .map_err(|e| StartError::Runtime(format!("warm-up opener: {e}")))?;
    let cloud = if config.cloud.enabled {
        let mut cfg = CloudConfig::from_section(&config.cloud);
        cfg.api_key = load_api_key(config.cloud.key_file())?;
        Some(Arc::new(CloudClient::new(cfg).map_err(|e| StartError::Runtime(e.to_string()))?))
    } else {
        None
    };
    let answerer = Answerer::new(engine.clone(), cloud, Admission::from_config(&config)).with_memory(Conversations::new(&config.conversation));
    let answerer = Arc::new(answerer);
    let mqtt = if config.mqtt.enabled { Some(Arc::new(MqttFront::new(&config.mqtt, answerer.clone())?)) } else { None };
    let http = if config.http.enabled {
        Some(Arc::new(HttpFront::new(answerer.clone(), config.http.clone(), model_card(&engine, &config), tokens.clone())))
    } else {
        None
    };
    Ok(Prepared { engine, answerer, mqtt, http, tokens, tls, config, warm_up: warm_start.elapsed() })
}

/// What the HTTP APIs list about the model.
fn model_card(engine: &Engine, config: &Config) -> ModelCard {
    let model = engine.model();
    let m = &model.manifest;
    let size = std::fs::metadata(model.dir.join("model.onnx")).map(|f| f.len()).unwrap_or(0);
    let digest = m.files.get("model.onnx").cloned().unwrap_or_default();
    ModelCard { name: config.http.model.clone(), source: m.name.clone(), precision: m.precision.clone(), context_length: m.context_length, digest, size }
}

/// The model and its workers, placed on the configured cores. Inference threads inherit the
/// affinity of the thread that starts them: this one is pinned while they start, then put back.
fn start_engine(config: &Config) -> Result<Engine, StartError> {
    let cores = cpus::resolve(&config.engine.cpu_affinity, Path::new(CPU_SYSFS));
    let previous = match &cores {
        Some(c) => Some(cpus::pin_current_thread(c).map_err(|e| StartError::Config { setting: "engine.cpu_affinity", problem: format!("cores {c:?}: {e}") })?),
        None => None,
    };
    let threads = match config.model.threads {
        0 => cores.as_ref().map(Vec::len).unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
        n => n,
    };
    tracing::info!(cores = ?cores, threads, kernels = crate::engine::kernels::in_use().name(), "inference placement");
    let engine_config = EngineConfig {
        workers: config.engine.workers,
        queue_depth: config.engine.queue_depth,
        max_prompt_tokens: config.opener.max_prompt_tokens,
        prefill_chunk: config.engine.prefill_chunk_tokens,
        prefix_cache_bytes: config.engine.prefix_cache_mb.saturating_mul(1 << 20),
    };
    let started = Model::load_with_cache(&config.model.dir(), threads, &config.model.plan_cache())
        .map_err(StartError::from)
        .and_then(|model| Engine::start(Arc::new(model), engine_config).map_err(|e| StartError::Runtime(e.to_string())));
    if let Some(p) = previous {
        let _ = cpus::pin_current_thread(&p);
    }
    started
}

/// The bound sockets (bound before serving so readiness can be announced truthfully).
pub struct Listeners {
    pub tcp: Option<TcpListener>,
    pub unix: Option<(UnixListener, PathBuf)>,
    /// The Prometheus endpoint's (`[metrics] listen`).
    pub metrics: Option<TcpListener>,
    /// The HTTP APIs' (`[http] listen`, when enabled).
    pub http: Option<TcpListener>,
}

pub async fn bind(config: &Config) -> Result<Listeners, StartError> {
    let g = &config.grpc;
    let tcp = match g.listen.as_str() {
        "" => None,
        addr => Some(TcpListener::bind(addr).await.map_err(|e| bind_error("grpc.listen", addr, e))?),
    };
    let unix = if g.unix_socket.as_os_str().is_empty() {
        None
    } else {
        let path = g.unix_socket.clone();
        // A socket file left by a previous run would make bind fail.
        if std::fs::symlink_metadata(&path).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type())) {
            let _ = std::fs::remove_file(&path);
        }
        let l = UnixListener::bind(&path).map_err(|e| bind_error("grpc.unix_socket", &path.display().to_string(), e))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(g.unix_socket_mode.0))
            .map_err(|e| bind_error("grpc.unix_socket_mode", &path.display().to_string(), e))?;
        Some((l, path))
    };
    let metrics = match config.metrics.listen.as_str() {
        "" => None,
        addr => Some(TcpListener::bind(addr).await.map_err(|e| bind_error("metrics.listen", addr, e))?),
    };
    let http = match (config.http.enabled, config.http.listen.as_str()) {
        (true, addr) => Some(TcpListener::bind(addr).await.map_err(|e| bind_error("http.listen", addr, e))?),
        (false, _) => None,
    };
    Ok(Listeners { tcp, unix, metrics, http })
}

/// An address that could not be bound, with the setting, the cause and what to do.
fn bind_error(setting: &'static str, addr: &str, source: std::io::Error) -> StartError {
    use std::io::ErrorKind::*;
    let fix = match source.kind() {
        AddrInUse => "; another process holds the port: choose another (port 0 takes a free one) or stop that process",
        AddrNotAvailable => "; no interface here has that address: use 127.0.0.1, 0.0.0.0 or one of this machine's own",
        PermissionDenied => "; ports below 1024 and some directories need privileges: choose another",
        _ => "",
    };
    StartError::Bind { setting, addr: addr.to_string(), source, fix }
}

/// How long, after the grace period, the servers get to deliver the ShuttingDown status of the
/// answers that were ended: one forward pass plus a write, with room for a loaded board.
const STATUS_FLUSH: Duration = Duration::from_secs(2);

/// Serves until `shutdown` resolves, then stops in order. Returns when everything is down.
pub async fn run(prepared: Prepared, listeners: Listeners, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let Prepared { engine, answerer, mqtt, http, tokens, tls, config, warm_up } = prepared;
    let web_tls = tls.as_ref().map(ServerTls::rustls).transpose().map_err(StartError::Tls)?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let service = AnswerService::new(answerer.clone());
    let grace = Duration::from_millis(config.grpc.grace_period_ms);
    let stop = CancellationToken::new();
    for w in crate::config::warnings(&config) {
        tracing::warn!("{w}");
    }
    // The recorder first: should it fail, no front has started yet.
    let metrics = match listeners.metrics {
        Some(l) => {
            let front = format!("metrics {scheme}://{}/metrics", l.local_addr().map(|a| a.to_string()).unwrap_or_default());
            let a = answerer.clone();
            Some((front, crate::metrics::install(l, stop.clone().cancelled_owned(), move || a.queue_depth(), tokens.clone(), web_tls.clone())?))
        }
        None => None,
    };
    let mut servers = tokio::task::JoinSet::new();
    let mut health_reporters = Vec::new();
    let mut fronts = Vec::new();
    let grpc_addr = listeners.tcp.as_ref().and_then(|l| l.local_addr().ok());
    let http_addr = if http.is_some() { listeners.http.as_ref().and_then(|l| l.local_addr().ok()) } else { None };
    if let Some(l) = listeners.tcp {
        let over = if tls.is_some() { " (TLS)" } else { "" };
        fronts.push(format!("gRPC {}{over}", l.local_addr().map(|a| a.to_string()).unwrap_or_default()));
        let access = grpc::Access { tokens: tokens.clone(), tls: tls.as_ref().map(ServerTls::tonic), web: config.grpc.web, cors_origins: config.grpc.cors_origins.clone() };
        let (router, health) = grpc::router(service.clone(), access).await?;
        health_reporters.push(health);
        let s = stop.clone();
        servers.spawn(async move { grpc::serve_tcp(router, l, s.cancelled_owned()).await.map_err(StartError::from) });
    }
    let mut socket_path = None;
    if let Some((l, path)) = listeners.unix {
        fronts.push(format!("gRPC unix:{}", path.display()));
        // The socket's file mode decides who connects (grpc.unix_socket_mode): no token.
        let (router, health) = grpc::router(service.clone(), grpc::Access::default()).await?;
        health_reporters.push(health);
        let s = stop.clone();
        socket_path = Some(path);
        servers.spawn(async move { grpc::serve_unix(router, l, s.cancelled_owned()).await.map_err(StartError::from) });
    }
    let mqtt_stop = CancellationToken::new();
    // A JoinSet, so that dropping this future (a crash of the caller) also drops the MQTT
    // connection, and the broker publishes the Last Will.
    let mut mqtt_task = tokio::task::JoinSet::new();
    if let Some(front) = mqtt {
        fronts.push(format!("MQTT {}", front.topics().request));
        mqtt_task.spawn(front.run(mqtt_stop.clone(), grace));
    }
    if let (Some(front), Some(l)) = (http, listeners.http) {
        let apis = [(front.cfg_ollama(), "Ollama"), (front.cfg_openai(), "OpenAI")].iter().filter(|(on, _)| *on).map(|(_, n)| *n).collect::<Vec<_>>().join("+");
        fronts.push(format!("HTTP ({apis}) {scheme}://{}", l.local_addr().map(|a| a.to_string()).unwrap_or_default()));
        let s = stop.clone();
        let router = crate::http::router(front);
        let web_tls = web_tls.clone();
        servers.spawn(async move { crate::http::serve(router, l, web_tls, s.cancelled_owned()).await.map_err(StartError::from) });
    }
    if let Some((front, endpoint)) = metrics {
        fronts.push(front);
        servers.spawn(async move { endpoint.await.map_err(StartError::from) });
    }
    let loaded = engine.model();
    tracing::info!(load_ms = loaded.load_time.as_millis() as u64, plan_cache = ?loaded.plan_cache, "model loaded");
    let model = &loaded.manifest;
    let offer = discovery::Offer {
        grpc: grpc_addr,
        http: http_addr,
        tls_fingerprint: tls.as_ref().map(|t| t.fingerprint.as_str()),
        tokens: tokens.is_some(),
        model: &model.name,
    };
    let advert = discovery::announce(&config.discovery, &offer);
    if let Some(a) = &advert {
        fronts.push(format!("mDNS {}", a.name()));
    }
    let status = format!("serving {} ({}) on {}; warm-up opener {} ms", model.name, model.precision, fronts.join(", "), warm_up.as_millis());
    tracing::info!("{status}");
    systemd::ready(&status);
    let watchdog_stop = CancellationToken::new();
    systemd::spawn_watchdog(engine.clone(), watchdog_stop.clone());
    let _stop_watchdog = watchdog_stop.drop_guard();
    tokio::select! {
        _ = shutdown => tracing::info!("shutting down"),
        Some(r) = servers.join_next() => {
            // A server stopped on its own: that is a failure.
            return Err(match r {
                Ok(Err(e)) => e,
                _ => StartError::Runtime("a gRPC or metrics server stopped unexpectedly".into()),
            });
        }
    }
    systemd::stopping();
    if let Some(a) = advert {
        // Gone from the apps' lists before the listeners close.
        tokio::task::spawn_blocking(move || a.withdraw()).await.ok();
    }
    for h in &health_reporters {
        h.set_not_serving::<grpc::pb::answerer_server::AnswererServer<AnswerService>>().await;
        h.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    }
    stop.cancel();
    mqtt_stop.cancel();
    if tokio::time::timeout(grace, async { while servers.join_next().await.is_some() {} }).await.is_err() {
        tracing::warn!(grace_ms = grace.as_millis() as u64, "in-flight gRPC requests outlived the grace period");
        // End those answers first, with ShuttingDown (decoding stops within one forward pass),
        // and let the servers send that status: aborting them at once would cut the clients'
        // streams with a broken pipe instead of a status they can act on.
        answerer.stop_all();
        if tokio::time::timeout(STATUS_FLUSH, async { while servers.join_next().await.is_some() {} }).await.is_err() {
            tracing::warn!("connections still open after their answers ended; closing them");
            servers.abort_all();
        }
    }
    // Whatever still runs (MQTT answers) ends now, with ShuttingDown.
    answerer.stop_all();
    if let Some(result) = mqtt_task.join_next().await {
        // The MQTT front drains within the same grace period, then says offline.
        match result {
            Ok(Err(e)) => tracing::warn!(error = %e, "the MQTT front stopped with an error"),
            Err(e) => tracing::warn!(error = %e, "the MQTT front failed"),
            Ok(Ok(())) => {}
        }
    }
    if let Some(p) = socket_path {
        let _ = std::fs::remove_file(p);
    }
    drop(service);
    drop(answerer);
    // Whatever is still running is cancelled; the workers stop within one forward pass.
    let stopping = tokio::task::spawn_blocking(move || match Arc::try_unwrap(engine) {
        Ok(engine) => engine.shutdown(),
        // An answer task still holds the engine (an MQTT answer past the grace period): its
        // own drop will stop the workers; do not wait for it here.
        Err(_) => tracing::warn!("answers still hold the engine at exit; their workers are left to stop with the process"),
    });
    let _ = stopping.await;
    Ok(())
}

/// SIGTERM (systemd's stop) or SIGINT (Ctrl-C). Fails only if the handlers cannot be installed.
pub fn signals() -> Result<impl Future<Output = ()>, StartError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| StartError::Runtime(format!("installing the SIGTERM handler: {e}")))?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    })
}
