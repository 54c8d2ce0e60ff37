//! `mulmd serve` as a process, the way systemd runs it: JSON logs, the Prometheus endpoint,
//! a cloud that rejects the key while quoting it, and SIGTERM.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use mulmd::grpc::pb::answer_event::Event;
use mulmd::grpc::pb::answerer_client::AnswererClient;
use mulmd::grpc::pb::AnswerRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const KEY: &str = "sk-test-LEAKY-0123456789";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// An endpoint that refuses every request the way some providers do: quoting the key.
async fn key_quoting_cloud() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let _ = sock.read(&mut buf).await;
                let body = serde_json::json!({"error": {"message": format!("Incorrect API key provided: {KEY}."), "type": "invalid_request_error"}}).to_string();
                let head = format!("HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len());
                let _ = sock.write_all(format!("{head}{body}").as_bytes()).await;
            });
        }
    });
    url
}

async fn http_get(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn the_key_never_reaches_logs_replies_or_metrics_and_sigterm_stops_cleanly() {
    let Some(model) = common::fixture("smollm2") else { return };
    let cloud = key_quoting_cloud().await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, format!("{KEY}\n")).unwrap();
    let (grpc_port, metrics_port) = (free_port(), free_port());
    let socket = dir.path().join("api.sock");
    let config = dir.path().join("mulmd.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[model]
dir = "{}"
[cloud]
enabled = true
base_url = "{cloud}"
api_key_file = "{}"
max_retries = 0
[grpc]
listen = "127.0.0.1:{grpc_port}"
unix_socket = "{}"
[metrics]
listen = "127.0.0.1:{metrics_port}"
[log]
format = "json"
level = "debug"
"#,
            model.display(),
            key_file.display(),
            socket.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mulmd"))
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut client = None;
    for _ in 0..600 {
        if let Ok(c) = AnswererClient::connect(format!("http://127.0.0.1:{grpc_port}")).await {
            client = Some(c);
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("mulmd serve exited early ({status}): {}", log.join().unwrap());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut client = client.expect("mulmd serve listens");

    let mut req = tonic::Request::new(AnswerRequest { query: "How do I remove odor from inside my shoes?".into(), options: None });
    req.metadata_mut().insert("x-request-id", "trace-me-42".parse().unwrap());
    let mut stream = client.answer(req).await.unwrap().into_inner();
    let mut last = None;
    while let Some(ev) = stream.message().await.unwrap() {
        last = ev.event;
    }
    let Some(Event::Final(f)) = last else { panic!("no final event") };
    let fallback = f.fallback.expect("the rejected key makes the device finish");
    assert_eq!(fallback.reason, "http_error");
    assert!(fallback.message.contains("401") && fallback.message.contains("[redacted]"), "{}", fallback.message);
    assert!(!fallback.message.contains(KEY), "the key reached a reply: {}", fallback.message);

    let metrics = http_get(metrics_port, "/metrics").await;
    assert!(metrics.contains(r#"mulmd_requests_total{front="grpc",outcome="done"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"mulmd_fallbacks_total{reason="http_error"} 1"#), "{metrics}");
    assert!(metrics.contains("mulmd_ttft_seconds_bucket"), "{metrics}");
    assert!(metrics.contains("mulmd_opener_seconds_count 1"), "{metrics}");
    assert!(!metrics.contains(KEY));

    // systemd's stop: SIGTERM, then an orderly exit with the socket file removed.
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    assert!(exit.success(), "exit status {exit}");
    assert!(!socket.exists(), "the Unix socket file is removed on exit");
    let log = log.join().unwrap();
    assert!(!log.contains(KEY), "the key reached the log:\n{log}");
    let lines: Vec<serde_json::Value> = log.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}"))).collect();
    let answered = lines.iter().find(|l| l["fields"]["message"] == "answered").expect("an 'answered' line");
    assert_eq!(answered["span"]["id"], "trace-me-42", "{answered}");
    assert_eq!(answered["fields"]["fallback"], "http_error");
    assert!(lines.iter().any(|l| l["fields"]["message"] == "shutting down"));
}

/// systemd's side of `Type=notify`: a datagram socket in `$NOTIFY_SOCKET` and a watchdog
/// interval in `$WATCHDOG_USEC`. READY comes with a status line once serving, WATCHDOG pings
/// follow while idle, and STOPPING on SIGTERM.
#[test]
fn systemd_hears_ready_status_watchdog_pings_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let Some(model) = common::fixture("smollm2") else { return };
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let config = dir.path().join("mulmd.toml");
    std::fs::write(&config, format!("[model]\ndir = \"{}\"\n[grpc]\nlisten = \"127.0.0.1:{}\"\n", model.display(), free_port())).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mulmd"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify)
        .env("WATCHDOG_USEC", "600000")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let recv = || {
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).expect("a notification from mulmd");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let first = recv();
    assert!(first.contains("READY=1") && first.contains("STATUS=serving SmolLM2"), "{first}");
    let pings = (0..3).map(|_| recv()).filter(|m| m.contains("WATCHDOG=1")).count();
    assert_eq!(pings, 3, "an idle, healthy daemon keeps pinging the watchdog");
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    loop {
        let m = recv();
        if m.contains("STOPPING=1") {
            break;
        }
        assert!(m.contains("WATCHDOG=1"), "unexpected notification {m}");
    }
    assert!(child.wait().unwrap().success());
}
