//! `mulmd serve` as a process, the way systemd runs it: JSON logs, the Prometheus endpoint,
//! a cloud that rejects the key while quoting it, and SIGTERM.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mulmd::grpc::pb::answer_event::Event;
use mulmd::grpc::pb::answerer_client::AnswererClient;
use mulmd::grpc::pb::{AnswerRequest, OpenRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const KEY: &str = "sk-test-LEAKY-0123456789";

/// `mulmd serve --config <config>` as a child process, its stderr (the log) collected line
/// by line. Every port is `:0` in the tests' configs: the daemon binds, and the test reads
/// the bound addresses from the "serving" line, so no other test's daemon can take them
/// between a probe and the bind.
struct Serve {
    child: Child,
    log: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
    /// The "serving ... on ..." line.
    serving: String,
}

impl Serve {
    /// Starts the daemon and waits for its "serving" line; panics with the log if it exits
    /// first.
    fn start(config: &Path) -> Serve {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mulmd"))
            .args(["serve", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in stderr.lines().map_while(Result::ok) {
                    log.lock().unwrap().push_str(&format!("{line}\n"));
                    let _ = tx.send(line);
                }
            })
        };
        // The sender goes with the reader thread, so the end of stderr (an exit) ends the wait.
        let serving = rx.iter().find(|l| l.contains("serving "));
        let mut serve = Serve { child, log, reader: Some(reader), serving: String::new() };
        match serving {
            Some(line) => serve.serving = line,
            None => panic!("mulmd serve exited before serving ({:?}):\n{}", serve.child.wait(), serve.log()),
        }
        serve
    }

    /// The address after `front` ("gRPC ", "metrics http://") in the "serving" line.
    fn addr(&self, front: &str) -> String {
        let at = self.serving.find(front).unwrap_or_else(|| panic!("no {front:?} in {}", self.serving)) + front.len();
        self.serving[at..].split([',', ';', '/']).next().unwrap().to_string()
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// systemd's stop: SIGTERM, then the exit status and the whole log.
    fn stop(mut self) -> (ExitStatus, String) {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
        let exit = self.child.wait().unwrap();
        self.reader.take().unwrap().join().unwrap();
        (exit, self.log())
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        // A failed test must not leave a daemon behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An endpoint that refuses every request the way some providers do: quoting the key, here
/// twice: whole, and again where the 300-character cap on a provider's text cuts it.
async fn key_quoting_cloud() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let _ = sock.read(&mut buf).await;
                let quoted = format!("Incorrect API key provided: {KEY}. ");
                let message = format!("{quoted}{}{KEY}", "-".repeat(297 - quoted.len()));
                let body = serde_json::json!({"error": {"message": message, "type": "invalid_request_error"}}).to_string();
                let head = format!("HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len());
                let _ = sock.write_all(format!("{head}{body}").as_bytes()).await;
            });
        }
    });
    url
}

async fn http_get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
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
listen = "127.0.0.1:0"
unix_socket = "{}"
[metrics]
listen = "127.0.0.1:0"
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
    let serve = Serve::start(&config);
    let mut client = AnswererClient::connect(format!("http://{}", serve.addr("gRPC "))).await.unwrap();
    // Whatever fails from here on, the daemon's log says why.
    let log = || serve.log();

    let mut req = tonic::Request::new(AnswerRequest { query: "How do I remove odor from inside my shoes?".into(), options: None, ..Default::default() });
    req.metadata_mut().insert("x-request-id", "trace-me-42".parse().unwrap());
    let mut stream = client.answer(req).await.unwrap_or_else(|e| panic!("{e:?}; mulmd's log:\n{}", log())).into_inner();
    let mut last = None;
    while let Some(ev) = stream.message().await.unwrap_or_else(|e| panic!("{e:?}; mulmd's log:\n{}", log())) {
        last = ev.event;
    }
    let Some(Event::Final(f)) = last else { panic!("no final event; mulmd's log:\n{}", log()) };
    let fallback = f.fallback.expect("the rejected key makes the device finish");
    assert_eq!(fallback.reason, "http_error");
    assert!(fallback.message.contains("401") && fallback.message.contains("[redacted]"), "{}", fallback.message);
    assert_no_key(&fallback.message, "a reply");

    // An opener-only call is a request like any other: counted, and logged with its id.
    let mut open = tonic::Request::new(OpenRequest { query: "What is the capital of France?".into(), options: None, ..Default::default() });
    open.metadata_mut().insert("x-request-id", "open-7".parse().unwrap());
    let opened = client.open(open).await.unwrap_or_else(|e| panic!("{e:?}; mulmd's log:\n{}", log())).into_inner();
    assert_eq!(opened.opener, "The capital of France is Paris.");

    let metrics = http_get(&serve.addr("metrics http://"), "/metrics").await;
    assert!(metrics.starts_with("HTTP/1.1 200") && metrics.contains("content-type: text/plain; version=0.0.4"), "{metrics}");
    assert!(metrics.contains(r#"mulmd_requests_total{front="grpc",outcome="done"} 2"#), "the answer and the opener: {metrics}");
    assert!(metrics.contains(r#"mulmd_fallbacks_total{reason="http_error"} 1"#), "{metrics}");
    assert!(metrics.contains("mulmd_ttft_seconds_bucket"), "{metrics}");
    assert!(metrics.contains("mulmd_opener_seconds_count 2"), "{metrics}");
    assert!(metrics.contains("mulmd_queue_depth 0"), "{metrics}");
    assert_no_key(&metrics, "/metrics");

    // systemd's stop: SIGTERM, then an orderly exit with the socket file removed.
    let (exit, log) = tokio::task::spawn_blocking(move || serve.stop()).await.unwrap();
    assert!(exit.success(), "exit status {exit}:\n{log}");
    assert!(!socket.exists(), "the Unix socket file is removed on exit");
    assert_no_key(&log, "the log");
    let lines: Vec<serde_json::Value> = log.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}"))).collect();
    let answered = lines.iter().find(|l| l["fields"]["message"] == "answered").expect("an 'answered' line");
    assert_eq!(answered["span"]["id"], "trace-me-42", "{answered}");
    assert_eq!(answered["fields"]["fallback"], "http_error");
    let opened = lines.iter().find(|l| l["fields"]["message"] == "opened").expect("an 'opened' line");
    assert_eq!(opened["span"]["id"], "open-7", "{opened}");
    assert!(lines.iter().any(|l| l["fields"]["message"] == "shutting down"));
}

/// No run of six or more of the key's first characters in `text`.
fn assert_no_key(text: &str, what: &str) {
    for n in 6..=KEY.len() {
        assert!(!text.contains(&KEY[..n]), "{:?} of the key reached {what}:\n{text}", &KEY[..n]);
    }
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
    std::fs::write(&config, format!("[model]\ndir = \"{}\"\n[grpc]\nlisten = \"127.0.0.1:0\"\n", model.display())).unwrap();
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

/// A metrics port another process holds stops the start with the setting and the cause named,
/// before the daemon announces anything.
#[test]
fn a_taken_metrics_port_fails_the_start_and_names_the_setting() {
    let Some(model) = common::fixture("tiny") else { return };
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mulmd.toml");
    std::fs::write(&config, format!("[model]\ndir = \"{}\"\n[grpc]\nlisten = \"127.0.0.1:0\"\n[metrics]\nlisten = \"{addr}\"\n", model.display())).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mulmd")).args(["serve", "--config"]).arg(&config).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("metrics.listen {addr}")) && stderr.contains("in use"), "{stderr}");
    assert!(stderr.contains("choose another"), "the error says what to do:\n{stderr}");
    assert!(!stderr.contains("serving "), "announced before failing:\n{stderr}");
}

/// SIGTERM while a long request runs: after the grace period the daemon ends it (between two
/// prefill chunks or two tokens) with UNAVAILABLE and exits cleanly, instead of finishing the
/// work first.
#[tokio::test]
async fn sigterm_ends_a_long_request_after_the_grace_period_and_exits() {
    let Some(model) = common::fixture("smollm2") else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mulmd.toml");
    std::fs::write(
        &config,
        format!(
            "[model]\ndir = \"{}\"\n[engine]\nprefill_chunk_tokens = 16\n[opener]\nmax_words_limit = 64\n[grpc]\nlisten = \"127.0.0.1:0\"\ngrace_period_ms = 300\n",
            model.display()
        ),
    )
    .unwrap();
    let serve = Serve::start(&config);
    let mut client = AnswererClient::connect(format!("http://{}", serve.addr("gRPC "))).await.unwrap();
    // A prompt of several hundred tokens and 64 words to write: seconds of work.
    let query = format!("{} Now tell me a long story about it.", "The quick brown fox jumps over the lazy dog. ".repeat(40));
    let options = mulmd::grpc::pb::Options { min_words: Some(64), max_words: Some(64), cloud: Some(false), ..Default::default() };
    let req = AnswerRequest { query, options: Some(options), ..Default::default() };
    let mut stream = client.answer(req).await.unwrap_or_else(|e| panic!("{e:?}:\n{}", serve.log())).into_inner();
    let stopping = tokio::task::spawn_blocking(move || serve.stop());
    let mut ended = None;
    loop {
        match stream.message().await {
            Ok(Some(ev)) => assert!(!matches!(ev.event, Some(Event::Final(_))), "the request ran to its end instead of being stopped"),
            Ok(None) => break,
            Err(s) => {
                ended = Some(s);
                break;
            }
        }
    }
    let (exit, log) = stopping.await.unwrap();
    assert!(exit.success(), "exit status {exit}:\n{log}");
    let status = ended.unwrap_or_else(|| panic!("the stream ended without a status:\n{log}"));
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}\n{log}");
    assert!(status.message().contains("shutting down"), "{status:?}");
}
