//! `mulmd serve`: configuration → model (loaded and warmed) → engine → cloud → listeners,
//! then READY to systemd and serving until the shutdown future resolves, then an ordered
//! stop: STOPPING, health NOT_SERVING, stop accepting (gRPC and MQTT), let in-flight answers
//! finish within the grace period, MQTT `offline` and disconnect, stop the workers.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, UnixListener};

use crate::cloud::{load_api_key, CloudClient};
use crate::config::Config;
use crate::engine::{CancelToken, Engine, EngineConfig, Job, LoadError, Model, OpenerEvent, OpenerOptions};
use crate::grpc::{self, AnswerService};
use crate::limits::Limits;
use crate::mqtt::MqttFront;

const CPU_SYSFS: &str = "/sys/devices/system/cpu";

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
    pub mqtt: Option<Arc<MqttFront>>,
    pub config: Config,
    /// How long the warm-up opener took (for the status line).
    pub warm_up: Duration,
}

/// Loads the model, starts the workers and runs one warm-up opener (the first generation
/// after load is the slowest), so readiness means ready to answer fast.
pub fn prepare(config: Config) -> Result<Prepared, StartError> {
    let dir = if config.model.dir.as_os_str().is_empty() { crate::paths::default_model_dir() } else { config.model.dir.clone() };
    // Inference threads inherit the affinity of the thread that starts them: pin this one
    // while the model and workers start, then put it back.
    let affinity: crate::cpus::Affinity = config.engine.cpu_affinity.parse().map_err(StartError::Config)?;
    let cores = crate::cpus::resolve(&affinity, std::path::Path::new(CPU_SYSFS));
    let previous = match &cores {
        Some(c) => Some(crate::cpus::pin_current_thread(c).map_err(|e| StartError::Config(format!("engine.cpu_affinity {c:?}: {e}")))?),
        None => None,
    };
    let threads = match config.model.threads {
        0 => cores.as_ref().map(Vec::len).unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
        n => n,
    };
    tracing::info!(cores = ?cores, threads, "inference placement");
    let started = Model::load(&dir, threads).map_err(StartError::from).and_then(|model| {
        Engine::start(Arc::new(model), EngineConfig { workers: config.engine.workers, queue_depth: config.engine.queue_depth })
            .map_err(|e| StartError::Runtime(e.to_string()))
    });
    if let Some(p) = previous {
        let _ = crate::cpus::pin_current_thread(&p);
    }
    let engine = started?;
    let (tx, rx) = std::sync::mpsc::channel();
    let warm_start = Instant::now();
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
    let engine = Arc::new(engine);
    let mqtt = if config.mqtt.enabled {
        let front = MqttFront::new(&config.mqtt, engine.clone(), cloud.clone(), Limits::from_config(&config)).map_err(StartError::Config)?;
        Some(Arc::new(front))
    } else {
        None
    };
    Ok(Prepared { engine, cloud, mqtt, config, warm_up: warm_start.elapsed() })
}

/// The bound sockets (bound before serving so readiness can be announced truthfully).
pub struct Listeners {
    pub tcp: Option<TcpListener>,
    pub unix: Option<(UnixListener, PathBuf)>,
    /// The Prometheus endpoint's (`[metrics] listen`).
    pub metrics: Option<TcpListener>,
}

pub async fn bind(config: &Config) -> Result<Listeners, StartError> {
    let g = &config.grpc;
    let tcp = if g.listen.is_empty() {
        None
    } else {
        Some(TcpListener::bind(&g.listen).await.map_err(|e| bind_error("grpc.listen", &g.listen, e))?)
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
    let metrics = if config.metrics.listen.is_empty() {
        None
    } else {
        let l = &config.metrics.listen;
        Some(TcpListener::bind(l).await.map_err(|e| bind_error("metrics.listen", l, e))?)
    };
    Ok(Listeners { tcp, unix, metrics })
}

/// A TCP address that could not be bound, with the setting, the cause and what to do.
fn bind_error(setting: &str, addr: &str, e: std::io::Error) -> StartError {
    use std::io::ErrorKind::*;
    let fix = match e.kind() {
        AddrInUse => "; another process holds the port: choose another (port 0 takes a free one) or stop that process",
        AddrNotAvailable => "; no interface here has that address: use 127.0.0.1, 0.0.0.0 or one of this machine's own",
        PermissionDenied => "; ports below 1024 need privileges: choose a higher port",
        _ => "",
    };
    StartError::Runtime(format!("{setting} {addr}: {e}{fix}"))
}

/// Serves until `shutdown` resolves, then stops in order. Returns when everything is down.
pub async fn run(prepared: Prepared, listeners: Listeners, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let Prepared { engine, cloud, mqtt, config, warm_up } = prepared;
    let service = AnswerService::new(engine.clone(), cloud, Limits::from_config(&config));
    let grace = Duration::from_millis(config.grpc.grace_period_ms);
    let stop = tokio_util::sync::CancellationToken::new();
    // The recorder first: should it fail, no front has started yet.
    let metrics = match listeners.metrics {
        Some(l) => {
            let front = format!("metrics http://{}/metrics", l.local_addr().map(|a| a.to_string()).unwrap_or_default());
            Some((front, crate::observe::install(l, stop.clone().cancelled_owned()).map_err(StartError::Runtime)?))
        }
        None => None,
    };
    let mut servers = tokio::task::JoinSet::new();
    let mut health_reporters = Vec::new();
    let mut fronts = Vec::new();
    if let Some(l) = listeners.tcp {
        fronts.push(format!("gRPC {}", l.local_addr().map(|a| a.to_string()).unwrap_or_default()));
        let (router, health) = grpc::router(service.clone()).await.map_err(StartError::Runtime)?;
        health_reporters.push(health);
        let s = stop.clone();
        servers.spawn(async move { grpc::serve_tcp(router, l, s.cancelled_owned()).await });
    }
    let mut socket_path = None;
    if let Some((l, path)) = listeners.unix {
        fronts.push(format!("gRPC unix:{}", path.display()));
        let (router, health) = grpc::router(service.clone()).await.map_err(StartError::Runtime)?;
        health_reporters.push(health);
        let s = stop.clone();
        socket_path = Some(path);
        servers.spawn(async move { grpc::serve_unix(router, l, s.cancelled_owned()).await });
    }
    let mqtt_stop = tokio_util::sync::CancellationToken::new();
    // A JoinSet, so that dropping this future (a crash of the caller) also drops the MQTT
    // connection, and the broker publishes the Last Will.
    let mut mqtt_task = tokio::task::JoinSet::new();
    if let Some(front) = mqtt {
        fronts.push(format!("MQTT {}", front.topics().request));
        mqtt_task.spawn(front.run(mqtt_stop.clone(), grace));
    }
    if let Some((front, endpoint)) = metrics {
        fronts.push(front);
        servers.spawn(endpoint);
    }
    let model = &engine.model().manifest;
    let status = format!("serving {} ({}) on {}; warm-up opener {} ms", model.name, model.precision, fronts.join(", "), warm_up.as_millis());
    tracing::info!("{status}");
    crate::systemd::ready(&status);
    let watchdog_stop = tokio_util::sync::CancellationToken::new();
    crate::systemd::spawn_watchdog(engine.clone(), watchdog_stop.clone());
    let _stop_watchdog = watchdog_stop.drop_guard();
    tokio::select! {
        _ = shutdown => tracing::info!("shutting down"),
        Some(r) = servers.join_next() => {
            // A server stopped on its own: that is a failure.
            return Err(StartError::Runtime(match r { Ok(Err(e)) => e, _ => "a gRPC or metrics server stopped unexpectedly".into() }));
        }
    }
    crate::systemd::stopping();
    for h in &health_reporters {
        h.set_not_serving::<grpc::pb::answerer_server::AnswererServer<AnswerService>>().await;
        h.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    }
    stop.cancel();
    mqtt_stop.cancel();
    if tokio::time::timeout(grace, async { while servers.join_next().await.is_some() {} }).await.is_err() {
        tracing::warn!(grace_ms = grace.as_millis() as u64, "in-flight gRPC requests outlived the grace period");
        servers.abort_all();
    }
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
