//! The Ollama- and OpenAI-compatible HTTP front against a scripted opener and the fake cloud:
//! the shapes clients parse (lines, chunks, errors, statuses), tool loops, structured output,
//! tokens, and a client that hangs up. The opener comes from a scripted source: these tests
//! are about the front, not the model (`clients/python` runs the real `ollama` and `openai`
//! clients against the real daemon).

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::fake_cloud::{chunk, done, fake_cloud, finish, finish_with, tool_call, FakeCloud, Reply};
use mulmd::answer::{Admission, Answerer, ScriptedOpener};
use mulmd::cloud::{CloudClient, CloudConfig};
use mulmd::config::{Config, HttpSection};
use mulmd::engine::RequestError;
use mulmd::host::secrets::Tokens;
use mulmd::http::{HttpFront, ModelCard};
use serde_json::{json, Value};

const OPENER: &str = "Sprinkle baking soda inside them";
const FINISH: &str = "overnight.";

struct Front {
    url: String,
    source: Arc<ScriptedOpener>,
    http: reqwest::Client,
}

async fn front(cloud: Option<&FakeCloud>, tune: impl FnOnce(&mut HttpSection), tokens: Option<Tokens>) -> Front {
    let source = Arc::new(ScriptedOpener::new(OPENER, FINISH));
    let cloud = cloud.map(|c| {
        let mut cfg = CloudConfig::new(&c.url, "fake-model");
        cfg.idle_timeout = Duration::from_secs(2);
        cfg.max_retries = 0;
        Arc::new(CloudClient::new(cfg).unwrap())
    });
    let config = Config::default();
    let answerer = Arc::new(Answerer::new(source.clone(), cloud, Admission::from_config(&config)));
    let mut cfg = config.http.clone();
    cfg.enabled = true;
    tune(&mut cfg);
    let card = ModelCard { name: cfg.model.clone(), source: "scripted".into(), precision: "float32".into(), context_length: 8192, digest: "0".repeat(64), size: 1 };
    let router = mulmd::http::router(Arc::new(HttpFront::new(answerer, cfg, card, tokens.map(Arc::new))));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(mulmd::http::serve(router, listener, None, std::future::pending()));
    Front { url, source, http: reqwest::Client::new() }
}

impl Front {
    async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        self.http.post(format!("{}{path}", self.url)).json(&body).send().await.unwrap()
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(format!("{}{path}", self.url)).send().await.unwrap()
    }
}

/// The lines of an NDJSON body, parsed.
async fn ndjson(r: reqwest::Response) -> Vec<Value> {
    assert_eq!(r.headers()["content-type"], "application/x-ndjson");
    r.text().await.unwrap().lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
}

/// The `data:` events of an SSE body.
async fn sse(r: reqwest::Response) -> Vec<String> {
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let text = r.text().await.unwrap();
    text.split("\n\n").filter(|e| !e.is_empty()).map(|e| e.strip_prefix("data: ").unwrap_or_else(|| panic!("not an SSE data event: {e:?}")).to_string()).collect()
}

fn continuation() -> Reply {
    Reply::Stream(vec![chunk(" and leave it"), chunk(" overnight."), finish(), done()])
}

#[tokio::test]
async fn ollama_lists_the_model_and_streams_the_opener_first_then_one_done_line() {
    let cloud = fake_cloud(vec![continuation()]).await;
    let f = front(Some(&cloud), |_| {}, None).await;
    assert_eq!(f.get("/").await.text().await.unwrap(), "Ollama is running");
    let tags: Value = f.get("/api/tags").await.json().await.unwrap();
    assert_eq!(tags["models"][0]["model"], "mulmd:latest");
    assert!(tags["models"][0]["details"]["family"].is_string());
    let ps: Value = f.get("/api/ps").await.json().await.unwrap();
    assert_eq!(ps["models"][0]["name"], "mulmd:latest");
    let show: Value = f.post("/api/show", json!({"model": "mulmd"})).await.json().await.unwrap();
    assert!(show["capabilities"].as_array().unwrap().contains(&json!("tools")));
    let body = json!({"model": "mulmd", "messages": [
        {"role": "system", "content": "You are a helpful house assistant."},
        {"role": "user", "content": "My shoes smell."},
        {"role": "assistant", "content": "Let us fix that."},
        {"role": "user", "content": "How do I remove the odor?"},
    ]});
    let lines = ndjson(f.post("/api/chat", body).await).await;
    let texts: Vec<&str> = lines.iter().filter(|l| l["done"] == false).map(|l| l["message"]["content"].as_str().unwrap()).collect();
    assert_eq!(texts.concat(), format!("{OPENER} and leave it overnight."));
    assert_eq!(texts[0], "Sprinkle", "the first line is the device's first word");
    let last = lines.last().unwrap();
    assert_eq!((last["done"].as_bool(), last["done_reason"].as_str()), (Some(true), Some("stop")));
    for key in ["total_duration", "prompt_eval_count", "eval_count", "eval_duration", "load_duration"] {
        assert!(last[key].is_u64(), "{key}: {last}");
    }
    assert_eq!(lines.iter().filter(|l| l["done"] == true).count(), 1);
    // The device wrote from the conversation; the cloud got all of it.
    let prompt = f.source.prompts().remove(0);
    assert_eq!((prompt.system.as_deref(), prompt.history.len(), prompt.query.as_str()), (Some("You are a helpful house assistant."), 2, "How do I remove the odor?"));
    let sent = cloud.bodies.lock().unwrap()[0]["messages"].clone();
    assert!(sent[0]["content"].as_str().unwrap().starts_with("You are a helpful house assistant."));
    assert_eq!(sent[1]["content"], "My shoes smell.");
}

#[tokio::test]
async fn a_home_assistant_tool_loop_passes_through_with_object_arguments() {
    let cloud = fake_cloud(vec![
        Reply::Stream(vec![tool_call("call_9", "HassTurnOn", r#"{"name": "kitchen light"}"#), finish_with("tool_calls"), done()]),
        Reply::Stream(vec![chunk("The kitchen light is on."), finish(), done()]),
    ])
    .await;
    let f = front(Some(&cloud), |_| {}, None).await;
    let tools = json!([{"type": "function", "function": {"name": "HassTurnOn", "description": "Turns on a device", "parameters": {"type": "object", "properties": {"name": {"type": "string"}}}}}]);
    let mut messages = vec![json!({"role": "system", "content": "You control the house."}), json!({"role": "user", "content": "Turn on the kitchen light"})];
    let lines = ndjson(f.post("/api/chat", json!({"model": "mulmd", "messages": messages, "tools": tools})).await).await;
    let call = lines.iter().find(|l| l["message"]["tool_calls"].is_array()).expect("a tool call line");
    assert_eq!(call["message"]["tool_calls"][0]["function"]["arguments"], json!({"name": "kitchen light"}), "arguments are an object");
    assert_eq!(cloud.bodies.lock().unwrap()[0]["tools"], tools, "the tools reached the cloud");
    // The second leg: the tool's result. No opener: the device has nothing to say first.
    let served = f.source.served();
    messages.push(json!({"role": "assistant", "content": "", "tool_calls": call["message"]["tool_calls"]}));
    messages.push(json!({"role": "tool", "content": "{\"success\": true}", "tool_name": "HassTurnOn"}));
    let lines = ndjson(f.post("/api/chat", json!({"model": "mulmd", "messages": messages, "tools": tools})).await).await;
    let text: String = lines.iter().filter_map(|l| l["message"]["content"].as_str()).collect();
    assert_eq!(text, "The kitchen light is on.");
    assert_eq!(f.source.served(), served, "no opener for a tool result");
    let sent = cloud.bodies.lock().unwrap()[1]["messages"].clone();
    let n = sent.as_array().unwrap().len();
    assert_eq!(sent[n - 1]["role"], "tool");
    assert_eq!(sent[n - 1]["tool_call_id"], sent[n - 2]["tool_calls"][0]["id"], "the result names its call");
    assert!(sent[n - 2]["tool_calls"][0]["function"]["arguments"].is_string(), "arguments go to the cloud as JSON text");
}

#[tokio::test]
async fn structured_output_gets_no_opener_and_reaches_the_cloud_as_asked() {
    let cloud = fake_cloud(vec![Reply::Stream(vec![chunk(r#"{"done": true}"#), finish(), done()])]).await;
    let f = front(Some(&cloud), |_| {}, None).await;
    let r: Value = f.post("/api/chat", json!({"model": "mulmd", "stream": false, "format": "json", "messages": [{"role": "user", "content": "Status?"}]})).await.json().await.unwrap();
    assert_eq!(r["message"]["content"], r#"{"done": true}"#);
    assert_eq!(r["done"], true);
    assert_eq!(f.source.served(), 0);
    assert_eq!(cloud.bodies.lock().unwrap()[0]["response_format"], json!({"type": "json_object"}));
}

#[tokio::test]
async fn ollama_errors_are_statuses_with_an_error_field() {
    let f = front(None, |_| {}, None).await;
    let r = f.post("/api/chat", json!({"model": "llama3", "messages": [{"role": "user", "content": "Hi"}]})).await;
    assert_eq!(r.status(), 404);
    assert!(r.json::<Value>().await.unwrap()["error"].as_str().unwrap().contains("mulmd"));
    let r = f.http.post(format!("{}/api/chat", f.url)).body("{not json").send().await.unwrap();
    assert_eq!(r.status(), 400);
    let r = f.post("/api/chat", json!({"model": "mulmd", "messages": [{"role": "user", "content": "  "}]})).await;
    assert_eq!(r.status(), 400);
    let r = f.post("/api/pull", json!({"model": "llama3"})).await;
    assert_eq!(r.status(), 404);
    assert_eq!(f.post("/api/pull", json!({"model": "mulmd", "stream": false})).await.json::<Value>().await.unwrap()["status"], "success");
    f.source.refuse(Some(RequestError::Busy { capacity: 8 }));
    let r = f.post("/api/chat", json!({"model": "mulmd", "messages": [{"role": "user", "content": "Hi"}]})).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
}

#[tokio::test]
async fn openai_streams_a_role_chunk_words_a_finish_reason_usage_when_asked_and_done() {
    let cloud = fake_cloud(vec![continuation(), continuation()]).await;
    let f = front(Some(&cloud), |_| {}, None).await;
    let models: Value = f.get("/v1/models").await.json().await.unwrap();
    assert_eq!((models["object"].as_str(), models["data"][0]["id"].as_str()), (Some("list"), Some("mulmd")));
    let ask = |usage: bool| json!({"model": "mulmd", "stream": true, "stream_options": {"include_usage": usage}, "messages": [{"role": "user", "content": "How do I remove the odor?"}]});
    for usage in [true, false] {
        let events = sse(f.post("/v1/chat/completions", ask(usage)).await).await;
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
        let ids: std::collections::BTreeSet<&str> = chunks.iter().map(|c| c["id"].as_str().unwrap()).collect();
        assert_eq!(ids.len(), 1, "one id for the answer");
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(chunks[1]["choices"][0]["delta"]["content"], "Sprinkle", "the device's first word first");
        let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
        assert_eq!(text, format!("{OPENER} and leave it overnight."));
        let finishes: Vec<&Value> = chunks.iter().filter(|c| c["choices"][0]["finish_reason"].is_string()).collect();
        assert_eq!(finishes.len(), 1);
        assert_eq!(finishes[0]["choices"][0]["finish_reason"], "stop");
        assert_eq!(finishes[0]["mulmd"]["opener"], OPENER, "mulmd's own fields ride along");
        let usage_chunks: Vec<&Value> = chunks.iter().filter(|c| c["usage"].is_object()).collect();
        if usage {
            assert_eq!(usage_chunks.len(), 1);
            assert_eq!(usage_chunks[0]["choices"], json!([]));
            assert!(chunks.iter().all(|c| c.get("usage").is_some()), "with include_usage every chunk carries usage");
        } else {
            assert!(usage_chunks.is_empty() && chunks.iter().all(|c| c.get("usage").is_none()));
        }
    }
}

#[tokio::test]
async fn openai_answers_whole_and_refuses_what_it_cannot_do() {
    let cloud = fake_cloud(vec![continuation(), Reply::Stream(vec![tool_call("c1", "lights", "{}"), finish_with("tool_calls"), done()])]).await;
    let f = front(Some(&cloud), |_| {}, None).await;
    let r: Value = f.post("/v1/chat/completions", json!({"model": "mulmd", "messages": [{"role": "user", "content": "Odor?"}]})).await.json().await.unwrap();
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(r["choices"][0]["message"]["content"], format!("{OPENER} and leave it overnight."));
    assert!(r["usage"]["total_tokens"].as_u64().unwrap() > 0);
    let r: Value = f.post("/v1/chat/completions", json!({"model": "mulmd", "tools": [{"type": "function", "function": {"name": "lights"}}], "messages": [{"role": "user", "content": "Lights on"}]})).await.json().await.unwrap();
    assert_eq!(r["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(r["choices"][0]["message"]["tool_calls"][0]["function"]["name"], "lights");
    for (body, status, needle) in [
        (json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}), 404, "gpt-4o"),
        (json!({"model": "mulmd", "n": 2, "messages": [{"role": "user", "content": "Hi"}]}), 400, "n above 1"),
        (json!({"model": "mulmd", "logprobs": true, "messages": [{"role": "user", "content": "Hi"}]}), 400, "logprobs"),
        (json!({"model": "mulmd", "messages": "Hi"}), 400, "messages"),
    ] {
        let r = f.post("/v1/chat/completions", body).await;
        assert_eq!(r.status(), status);
        let e: Value = r.json().await.unwrap();
        assert!(e["error"]["message"].as_str().unwrap().contains(needle), "{e}");
        assert!(e["error"]["type"].is_string());
    }
}

#[tokio::test]
async fn with_tokens_only_a_known_bearer_token_gets_in() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    std::fs::write(&file, "phone tok-phone-0123456789abcdef\n").unwrap();
    let tokens = Tokens::load(Some(&file), "none").unwrap();
    let f = front(None, |_| {}, tokens).await;
    for path in ["/api/tags", "/v1/models"] {
        let r = f.get(path).await;
        assert_eq!(r.status(), 401, "{path}");
        let body = r.text().await.unwrap();
        assert!(body.contains("Authorization: Bearer") && !body.contains("tok-phone"), "{body}");
        let r = f.http.get(format!("{}{path}", f.url)).bearer_auth("tok-phone-0123456789abcdeX").send().await.unwrap();
        assert_eq!(r.status(), 401, "a near miss is a miss");
        let r = f.http.get(format!("{}{path}", f.url)).bearer_auth("tok-phone-0123456789abcdef").send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    assert_eq!(f.get("/").await.status(), 200, "the liveness probe says nothing");
}

#[tokio::test]
async fn a_client_that_hangs_up_stops_the_cloud_stream() {
    let cloud = fake_cloud(vec![Reply::Trickle(chunk(" more"))]).await;
    let f = front(Some(&cloud), |_| {}, None).await;
    let mut r = f.post("/api/chat", json!({"model": "mulmd", "messages": [{"role": "user", "content": "Talk."}]})).await;
    // Read until the cloud's text flows, then go away.
    let mut seen = String::new();
    while !seen.contains(" more") {
        seen.push_str(&String::from_utf8_lossy(&r.chunk().await.unwrap().unwrap()));
    }
    drop(r);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while cloud.closed.load(Ordering::Relaxed) == 0 {
        assert!(std::time::Instant::now() < deadline, "the cloud stream was not dropped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
