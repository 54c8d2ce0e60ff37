//! A scriptable OpenAI-compatible server for the faults a real one cannot produce on demand:
//! each streamed chat-completions request gets the next scripted reply. A GET, as for
//! warming, gets `{}`; mulmd's layout probe (`"stream": false`) is answered as a server with
//! assistant prefill answers it, outside the script.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What the fake server does for one chat-completions request.
#[derive(Clone)]
pub enum Reply {
    /// 200 with these SSE lines (each written as its own chunk), then close.
    Stream(Vec<String>),
    /// An HTTP error with extra headers and a body.
    Status(u16, Vec<(String, String)>, String),
    /// Accept, read the request, say nothing.
    Stall,
    /// Send these SSE lines, then stay silent with the connection open.
    StallAfter(Vec<String>),
    /// 200, then this SSE event again and again until the client goes away.
    Endless(String),
    /// 200, then this SSE event every 50 ms until the client goes away.
    Trickle(String),
    /// 200, then these raw bytes (a body that need not be SSE at all), then close.
    Raw(Vec<u8>),
}

pub fn chunk(text: &str) -> String {
    format!("data: {}\n\n", serde_json::json!({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]}))
}
pub fn finish() -> String {
    format!("data: {}\n\n", serde_json::json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
}
/// A streamed function call: its id, name and whole arguments in one chunk.
pub fn tool_call(id: &str, name: &str, arguments: &str) -> String {
    let call = serde_json::json!({"index": 0, "id": id, "type": "function", "function": {"name": name, "arguments": arguments}});
    format!("data: {}\n\n", serde_json::json!({"choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": null}]}))
}
pub fn finish_with(reason: &str) -> String {
    format!("data: {}\n\n", serde_json::json!({"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]}))
}
pub fn done() -> String {
    "data: [DONE]\n\n".into()
}

pub struct FakeCloud {
    pub url: String,
    pub completions: Arc<AtomicUsize>,
    pub auth: Arc<Mutex<Vec<String>>>,
    /// Bytes written by `Endless` and `Raw` replies.
    pub written: Arc<AtomicUsize>,
    /// `Endless` and `Trickle` replies that ended because the client stopped reading.
    pub closed: Arc<AtomicUsize>,
    /// Every streamed chat-completions request body, in order.
    pub bodies: Arc<Mutex<Vec<serde_json::Value>>>,
    /// Layout probes answered (requests with `"stream": false`, outside the script).
    pub probes: Arc<AtomicUsize>,
}

pub async fn fake_cloud(script: Vec<Reply>) -> FakeCloud {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let completions = Arc::new(AtomicUsize::new(0));
    let auth = Arc::new(Mutex::new(Vec::new()));
    let written = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let probes = Arc::new(AtomicUsize::new(0));
    let (count, seen, wrote, ended, kept, probed) = (completions.clone(), auth.clone(), written.clone(), closed.clone(), bodies.clone(), probes.clone());
    let script = Arc::new(script);
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { return };
            let (count, seen, script, wrote, ended, kept, probed) =
                (count.clone(), seen.clone(), script.clone(), wrote.clone(), ended.clone(), kept.clone(), probed.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut tmp = [0u8; 4096];
                // Read the head and the body (Content-Length).
                let head_end = loop {
                    let n = sock.read(&mut tmp).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&tmp[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
                    .unwrap_or(0);
                while buf.len() < head_end + len {
                    let n = sock.read(&mut tmp).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&tmp[..n]);
                }
                if head.starts_with("GET") {
                    let _ = sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}").await;
                    return;
                }
                if let Some(a) = head.lines().find(|l| l.to_ascii_lowercase().starts_with("authorization:")) {
                    seen.lock().unwrap().push(a.to_string());
                }
                let body: serde_json::Value = serde_json::from_slice(&buf[head_end..]).unwrap_or_default();
                if body["stream"] == false {
                    // mulmd asks whether a reply cut inside a word is continued: like
                    // llama.cpp's server, this one continues it.
                    probed.fetch_add(1, Ordering::SeqCst);
                    let reply = r#"{"choices":[{"index":0,"message":{"role":"assistant","content":"is."},"finish_reason":"length"}]}"#;
                    let head = format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", reply.len());
                    let _ = sock.write_all(format!("{head}{reply}").as_bytes()).await;
                    return;
                }
                if !body.is_null() {
                    kept.lock().unwrap().push(body);
                }
                let i = count.fetch_add(1, Ordering::SeqCst);
                let reply = script.get(i).cloned().unwrap_or_else(|| Reply::Status(500, vec![], "script exhausted".into()));
                let sse_head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\nconnection: close\r\n\r\n";
                match reply {
                    Reply::Stream(lines) => {
                        let _ = sock.write_all(sse_head).await;
                        for l in lines {
                            let _ = sock.write_all(l.as_bytes()).await;
                            let _ = sock.flush().await;
                        }
                    }
                    Reply::Status(code, headers, body) => {
                        let mut r = format!("HTTP/1.1 {code} Error\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n", body.len());
                        for (k, v) in headers {
                            r.push_str(&format!("{k}: {v}\r\n"));
                        }
                        r.push_str("\r\n");
                        r.push_str(&body);
                        let _ = sock.write_all(r.as_bytes()).await;
                    }
                    Reply::Stall => tokio::time::sleep(Duration::from_secs(60)).await,
                    Reply::StallAfter(lines) => {
                        let _ = sock.write_all(sse_head).await;
                        for l in lines {
                            let _ = sock.write_all(l.as_bytes()).await;
                        }
                        let _ = sock.flush().await;
                        tokio::time::sleep(Duration::from_secs(60)).await;
                    }
                    Reply::Endless(event) => {
                        let _ = sock.write_all(sse_head).await;
                        while sock.write_all(event.as_bytes()).await.is_ok() {
                            wrote.fetch_add(event.len(), Ordering::Relaxed);
                        }
                        ended.fetch_add(1, Ordering::Relaxed);
                    }
                    Reply::Trickle(event) => {
                        let _ = sock.write_all(sse_head).await;
                        while sock.write_all(event.as_bytes()).await.is_ok() && sock.flush().await.is_ok() {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        ended.fetch_add(1, Ordering::Relaxed);
                    }
                    Reply::Raw(bytes) => {
                        let _ = sock.write_all(sse_head).await;
                        let _ = sock.write_all(&bytes).await;
                        wrote.fetch_add(bytes.len(), Ordering::Relaxed);
                    }
                }
            });
        }
    });
    FakeCloud { url, completions, auth, written, closed, bodies, probes }
}

