//! `mulmd serve`: configuration → model (loaded and warmed) → engine → cloud → listeners,
//! then serving until the shutdown future resolves, then an ordered stop: health
//! NOT_SERVING, stop accepting, let in-flight answers finish within the grace period, stop
//! the workers.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, UnixListener};

use crate::cloud::{load_api_key, CloudClient};
use crate::config::Config;
use crate::engine::{CancelToken, Engine, EngineConfig, Job, LoadError, Model, OpenerEvent, OpenerOptions};
use crate::grpc::{self, AnswerService, Limits};

/// Why the daemon could not start: configuration (exit code for "do not restart") or runtime.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Model(#[from] LoadError),
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Runtime(String),
}

/// Everything built before binding: the loaded, warmed model and the engine.
pub struct Prepared {
    pub engine: Arc<Engine>,
    pub cloud: Option<Arc<CloudClient>>,
    pub config: Config,
}

/// Loads the model, starts the workers and runs one warm-up opener (the first generation
/// after load is the slowest), so readiness means ready to answer fast.
pub fn prepare(config: Config) -> Result<Prepared, StartError> {
    let dir = if config.model.dir.as_os_str().is_empty() { crate::paths::default_model_dir() } else { config.model.dir.clone() };
    let model = Arc::new(Model::load(&dir, config.model.threads)?);
    let engine = Engine::start(model, EngineConfig { workers: config.engine.workers, queue_depth: config.engine.queue_depth })
        .map_err(|e| StartError::Runtime(e.to_string()))?;
    let (tx, rx) = std::sync::mpsc::channel();
    engine
        .submit(Job {
            query: "Hello!".into(),
            options: OpenerOptions::default(),
            arrived: Instant::now(),
            cancel: CancelToken::default(),
            sink: Box::new(move |ev| {
                if !matches!(ev, OpenerEvent::Word(_)) {
                    let _ = tx.send(ev);
                }
            }),
        })
        .map_err(|(e, _)| StartError::Runtime(format!("warm-up: {e}")))?;
    match rx.recv() {
        Ok(OpenerEvent::Done(_)) => {}
        other => return Err(StartError::Runtime(format!("warm-up failed: {other:?}"))),
    }
    let cloud = if config.cloud.enabled {
        let mut cfg = config.cloud.client_config();
        cfg.api_key = load_api_key(config.cloud.key_file()).map_err(StartError::Config)?;
        Some(Arc::new(CloudClient::new(cfg).map_err(StartError::Runtime)?))
    } else {
        None
    };
    Ok(Prepared { engine: Arc::new(engine), cloud, config })
}

/// The bound sockets (bound before serving so readiness can be announced truthfully).
pub struct Listeners {
    pub tcp: Option<TcpListener>,
    pub unix: Option<(UnixListener, PathBuf)>,
}

pub async fn bind(config: &Config) -> Result<Listeners, StartError> {
    let g = &config.grpc;
    let tcp = if g.listen.is_empty() {
        None
    } else {
        Some(TcpListener::bind(&g.listen).await.map_err(|e| StartError::Runtime(format!("grpc.listen {}: {e}", g.listen)))?)
    };
    let unix = if g.unix_socket.as_os_str().is_empty() {
        None
    } else {
        let path = g.unix_socket.clone();
        // A socket file left by a previous run would make bind fail.
        if std::fs::symlink_metadata(&path).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type())) {
            let _ = std::fs::remove_file(&path);
        }
        let l = UnixListener::bind(&path).map_err(|e| StartError::Runtime(format!("grpc.unix_socket {}: {e}", path.display())))?;
        let mode = u32::from_str_radix(&g.unix_socket_mode, 8).unwrap_or(0o660);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| StartError::Runtime(format!("grpc.unix_socket_mode on {}: {e}", path.display())))?;
        Some((l, path))
    };
    Ok(Listeners { tcp, unix })
}

/// Serves until `shutdown` resolves, then stops in order. Returns when everything is down.
pub async fn run(prepared: Prepared, listeners: Listeners, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let Prepared { engine, cloud, config } = prepared;
    let limits = Limits {
        defaults: OpenerOptions {
            min_words: config.opener.min_words,
            max_words: config.opener.max_words,
            max_tokens: config.opener.max_tokens,
            ..Default::default()
        },
        max_words_limit: config.opener.max_words_limit,
        max_query_chars: config.opener.max_query_chars,
        recovery: config.cloud.recovery,
    };
    let service = AnswerService::new(engine.clone(), cloud, limits);
    let stop = tokio_util::sync::CancellationToken::new();
    let mut servers = tokio::task::JoinSet::new();
    let mut health_reporters = Vec::new();
    if let Some(l) = listeners.tcp {
        let (router, health) = grpc::router(service.clone()).await.map_err(StartError::Runtime)?;
        health_reporters.push(health);
        let s = stop.clone();
        servers.spawn(async move { grpc::serve_tcp(router, l, s.cancelled_owned()).await });
    }
    let mut socket_path = None;
    if let Some((l, path)) = listeners.unix {
        let (router, health) = grpc::router(service.clone()).await.map_err(StartError::Runtime)?;
        health_reporters.push(health);
        let s = stop.clone();
        socket_path = Some(path);
        servers.spawn(async move { grpc::serve_unix(router, l, s.cancelled_owned()).await });
    }
    tracing::info!("serving");
    tokio::select! {
        _ = shutdown => tracing::info!("shutting down"),
        Some(r) = servers.join_next() => {
            // A server stopped on its own: that is a failure.
            return Err(StartError::Runtime(match r { Ok(Err(e)) => e, _ => "a gRPC server stopped unexpectedly".into() }));
        }
    }
    for h in &health_reporters {
        h.set_not_serving::<grpc::pb::answerer_server::AnswererServer<AnswerService>>().await;
        h.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    }
    stop.cancel();
    let grace = Duration::from_millis(config.grpc.grace_period_ms);
    if tokio::time::timeout(grace, async { while servers.join_next().await.is_some() {} }).await.is_err() {
        tracing::warn!(grace_ms = grace.as_millis() as u64, "in-flight requests outlived the grace period");
        servers.abort_all();
    }
    if let Some(p) = socket_path {
        let _ = std::fs::remove_file(p);
    }
    drop(service);
    // The workers finish whatever they hold, then exit.
    if let Ok(engine) = Arc::try_unwrap(engine) {
        tokio::task::spawn_blocking(move || engine.shutdown()).await.ok();
    }
    Ok(())
}

/// SIGTERM (systemd's stop) or SIGINT (Ctrl-C).
pub async fn signals() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
