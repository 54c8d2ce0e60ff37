//! Ollama's API as Home Assistant's Ollama integration (and the `ollama` client library) call
//! it: the model listed by `/api/tags` and `/api/ps`, `/api/chat` streaming NDJSON lines
//! (opener words first, then the cloud's continuation, then one `done` line with Ollama's
//! counts and nanosecond durations), tool calls with object arguments, and errors as
//! `{"error": …}` (a last line of the stream when the answer fails mid-way).
//!
//! No opener when the last message is a tool result (the second leg of a tool loop) or the
//! request asks for structured output (`format`): then the cloud answers as it is asked.

use std::sync::Arc;
use std::time::SystemTime;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Map, Value};

use super::{collect, json, ns, parse_body, request_id, rfc3339, start, status_of, stream_body, with_retry, HttpFront};
use crate::answer::{Answer, AnswerEvent, Conversation, Front, Message, RequestOptions, Role, ToolCall};
use crate::engine::RequestError;

/// The Ollama API version these routes follow (what `/api/version` says).
const API_VERSION: &str = "0.12.0";

pub(super) fn routes() -> Router<Arc<HttpFront>> {
    Router::new()
        .route("/", get(|| async { "Ollama is running" }))
        .route("/api/version", get(version))
        .route("/api/tags", get(tags))
        .route("/api/ps", get(ps))
        .route("/api/show", post(show))
        .route("/api/pull", post(pull))
        .route("/api/chat", post(chat))
        .route("/api/generate", post(generate))
}

/// `{"error": message}` with `status`.
pub(crate) fn error_response(status: StatusCode, message: &str) -> Response {
    json(status, json!({ "error": message }))
}

fn request_error(e: &RequestError) -> Response {
    with_retry(error_response(status_of(e), &e.to_string()), e)
}

async fn version() -> Response {
    json(StatusCode::OK, json!({ "version": API_VERSION }))
}

/// The model as Ollama lists one.
fn model_entry(front: &HttpFront) -> Value {
    let m = &front.model;
    json!({
        "name": format!("{}:latest", m.name),
        "model": format!("{}:latest", m.name),
        "modified_at": rfc3339(front.started),
        "size": m.size,
        "digest": m.digest,
        "details": details(front),
    })
}

fn details(front: &HttpFront) -> Value {
    let m = &front.model;
    json!({
        "parent_model": "",
        "format": "onnx",
        "family": "llama",
        "families": ["llama"],
        "parameter_size": "",
        "quantization_level": m.precision.to_uppercase(),
    })
}

async fn tags(State(front): State<Arc<HttpFront>>) -> Response {
    json(StatusCode::OK, json!({ "models": [model_entry(&front)] }))
}

async fn ps(State(front): State<Arc<HttpFront>>) -> Response {
    let mut entry = model_entry(&front);
    // Always loaded: it was warmed before the listener opened and never unloads.
    entry["expires_at"] = "9999-12-31T23:59:59.000Z".into();
    entry["size_vram"] = 0.into();
    json(StatusCode::OK, json!({ "models": [entry] }))
}

/// The `model` field of a request, checked to be the one served.
fn asked_model<'a>(front: &HttpFront, body: &'a Value) -> Result<&'a str, Response> {
    let name = body.get("model").or_else(|| body.get("name")).and_then(Value::as_str).unwrap_or("");
    if front.serves(name) {
        Ok(name)
    } else {
        Err(error_response(StatusCode::NOT_FOUND, &format!("model \"{name}\" not found; this server serves \"{}\"", front.model.name)))
    }
}

async fn show(State(front): State<Arc<HttpFront>>, body: Bytes) -> Response {
    let body = match parse_body(&body) {
        Ok(b) => b,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, &e),
    };
    if let Err(r) = asked_model(&front, &body) {
        return r;
    }
    let m = &front.model;
    json(
        StatusCode::OK,
        json!({
            "modelfile": format!("# mulmd: {} ({}) opens every answer on the device; a cloud model continues it\nFROM {}\n", m.source, m.precision, m.name),
            "parameters": "",
            "template": "",
            "details": details(&front),
            "model_info": { "general.architecture": "llama", "llama.context_length": m.context_length },
            "capabilities": ["completion", "tools"],
            "modified_at": rfc3339(front.started),
        }),
    )
}

/// Succeeds for the model served (it is always present), refuses any other: mulmd does not
/// download models.
async fn pull(State(front): State<Arc<HttpFront>>, body: Bytes) -> Response {
    let body = match parse_body(&body) {
        Ok(b) => b,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, &e),
    };
    let name = body.get("model").or_else(|| body.get("name")).and_then(Value::as_str).unwrap_or("");
    if !front.serves(name) {
        return error_response(
            StatusCode::NOT_FOUND,
            &format!("mulmd pulls no models: it serves only \"{}\" (its model directory is set in mulmd.toml)", front.model.name),
        );
    }
    let done = json!({ "status": "success" });
    if body.get("stream").and_then(Value::as_bool) == Some(false) {
        return json(StatusCode::OK, done);
    }
    let lines = format!("{}\n{done}\n", json!({ "status": "pulling manifest" }));
    ([(axum::http::header::CONTENT_TYPE, "application/x-ndjson")], lines).into_response()
}

/// Ollama's messages as a conversation in OpenAI's shape: tool calls get ids (Ollama has
/// none) and their arguments become JSON text; a tool result is matched to its call by name.
fn conversation(body: &Value) -> Result<Conversation, String> {
    let Some(list) = body.get("messages").and_then(Value::as_array) else {
        return Err("`messages` must be a list of {\"role\", \"content\"} objects".into());
    };
    let mut messages = Vec::with_capacity(list.len());
    // Calls not yet answered: (name, id).
    let mut open_calls: Vec<(String, String)> = Vec::new();
    let mut next_call = 0usize;
    for (i, m) in list.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).and_then(Role::parse).ok_or_else(|| format!("messages[{i}].role must be system, user, assistant or tool"))?;
        let content = match m.get("content") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(format!("messages[{i}].content must be text")),
        };
        let mut msg = Message::new(role, content);
        if let Some(calls) = m.get("tool_calls").and_then(Value::as_array) {
            let mut out = Vec::with_capacity(calls.len());
            for c in calls {
                let name = c.pointer("/function/name").and_then(Value::as_str).unwrap_or("").to_string();
                let arguments = match c.pointer("/function/arguments") {
                    Some(Value::String(s)) => s.clone(),
                    Some(v) => v.to_string(),
                    None => "{}".into(),
                };
                let id = format!("call_{next_call}");
                next_call += 1;
                open_calls.push((name.clone(), id.clone()));
                out.push(json!({ "id": id, "type": "function", "function": { "name": name, "arguments": arguments } }));
            }
            msg.extra.insert("tool_calls".into(), Value::Array(out));
        }
        if role == Role::Tool {
            let name = m.get("tool_name").or_else(|| m.get("name")).and_then(Value::as_str).unwrap_or("");
            let at = open_calls.iter().position(|(n, _)| n == name).unwrap_or(0);
            if at < open_calls.len() {
                let (_, id) = open_calls.remove(at);
                msg.extra.insert("tool_call_id".into(), id.into());
            }
        }
        messages.push(msg);
    }
    Ok(Conversation { messages })
}

/// The request's sampling options and output format as cloud request fields.
fn cloud_params(body: &Value) -> Map<String, Value> {
    let mut p = Map::new();
    if let Some(tools) = body.get("tools").filter(|t| t.as_array().is_some_and(|a| !a.is_empty())) {
        p.insert("tools".into(), tools.clone());
    }
    match body.get("format") {
        Some(Value::String(s)) if s == "json" => {
            p.insert("response_format".into(), json!({ "type": "json_object" }));
        }
        Some(schema @ Value::Object(_)) => {
            p.insert("response_format".into(), json!({ "type": "json_schema", "json_schema": { "name": "answer", "schema": schema } }));
        }
        _ => {}
    }
    if let Some(o) = body.get("options").and_then(Value::as_object) {
        for (ours, theirs) in [("temperature", "temperature"), ("top_p", "top_p"), ("seed", "seed"), ("stop", "stop"), ("num_predict", "max_tokens")] {
            if let Some(v) = o.get(ours).filter(|v| !v.is_null()) {
                p.insert(theirs.into(), v.clone());
            }
        }
    }
    p
}

/// A chat request checked and admitted; its response, or the response refusing it.
async fn chat(State(front): State<Arc<HttpFront>>, headers: HeaderMap, body: Bytes) -> Response {
    let arrived = super::now();
    let body = match parse_body(&body) {
        Ok(b) => b,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, &e),
    };
    let model = match asked_model(&front, &body) {
        Ok(m) => m.to_string(),
        Err(r) => return r,
    };
    let conversation = match conversation(&body) {
        Ok(c) => c,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, &e),
    };
    let params = cloud_params(&body);
    let options = RequestOptions { voice: Some(front.cfg.ollama_voice), ..Default::default() };
    let mut req = match front.answerer.admit_conversation(request_id(&headers), Front::Ollama, arrived, conversation, None, &options) {
        Ok(r) => r,
        Err(e) => return request_error(&e),
    };
    if params.contains_key("response_format") {
        req.opener = None;
    }
    req.cloud_params = params;
    respond(&front, req, model, body.get("stream").and_then(Value::as_bool).unwrap_or(true), Shape::Chat).await
}

/// `/api/generate`: a prompt (and optional system text) instead of messages.
async fn generate(State(front): State<Arc<HttpFront>>, headers: HeaderMap, body: Bytes) -> Response {
    let arrived = super::now();
    let body = match parse_body(&body) {
        Ok(b) => b,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, &e),
    };
    let model = match asked_model(&front, &body) {
        Ok(m) => m.to_string(),
        Err(r) => return r,
    };
    let Some(prompt) = body.get("prompt").and_then(Value::as_str) else {
        return error_response(StatusCode::BAD_REQUEST, "`prompt` must be text");
    };
    let mut messages = Vec::new();
    if let Some(system) = body.get("system").and_then(Value::as_str).filter(|s| !s.trim().is_empty()) {
        messages.push(Message::new(Role::System, system));
    }
    messages.push(Message::new(Role::User, prompt));
    let options = RequestOptions { voice: Some(front.cfg.ollama_voice), ..Default::default() };
    let mut req = match front.answerer.admit_conversation(request_id(&headers), Front::Ollama, arrived, Conversation { messages }, None, &options) {
        Ok(r) => r,
        Err(e) => return request_error(&e),
    };
    let params = cloud_params(&body);
    if params.contains_key("response_format") {
        req.opener = None;
    }
    req.cloud_params = params;
    respond(&front, req, model, body.get("stream").and_then(Value::as_bool).unwrap_or(true), Shape::Generate).await
}

/// Which of Ollama's line shapes a response uses.
#[derive(Clone, Copy)]
enum Shape {
    /// `{"message": {"role": "assistant", "content": …}}`
    Chat,
    /// `{"response": …}`
    Generate,
}

async fn respond(front: &HttpFront, req: crate::answer::AnswerRequest, model: String, stream: bool, shape: Shape) -> Response {
    let (first, events) = match start(&front.answerer, req).await {
        Ok(started) => started,
        Err(e) => return request_error(&e),
    };
    if !stream {
        return whole(collect(first, events).await, &model, shape);
    }
    let body = stream_body(first, events, move |ev| lines(ev, &model, shape));
    ([(axum::http::header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
}

/// One line of the stream: the common fields, and `fields` over them.
fn line(model: &str, fields: Value) -> Value {
    let mut v = json!({ "model": model, "created_at": rfc3339(SystemTime::now()), "done": false });
    if let (Some(o), Value::Object(f)) = (v.as_object_mut(), fields) {
        o.extend(f);
    }
    v
}

fn text_fields(text: &str, shape: Shape) -> Value {
    match shape {
        Shape::Chat => json!({ "message": { "role": "assistant", "content": text } }),
        Shape::Generate => json!({ "response": text }),
    }
}

/// The NDJSON lines of one event.
fn lines(ev: AnswerEvent, model: &str, shape: Shape) -> Vec<Bytes> {
    let v = match ev {
        AnswerEvent::Word(w) => line(model, text_fields(&if w.index == 0 { w.text } else { format!("{}{}", w.leading, w.text) }, shape)),
        AnswerEvent::Delta { text, .. } => line(model, text_fields(&text, shape)),
        AnswerEvent::ToolCalls(calls) => line(model, json!({ "message": { "role": "assistant", "content": "", "tool_calls": tool_calls(&calls) } })),
        AnswerEvent::Done(a) => final_line(&a, model, shape, ""),
        AnswerEvent::Error(e) => json!({ "error": e.to_string() }),
        AnswerEvent::OpenerDone { .. } | AnswerEvent::Correction => return Vec::new(),
    };
    vec![Bytes::from(format!("{v}\n"))]
}

/// Tool calls as Ollama writes them: arguments as a JSON object (text that is not one is
/// kept as `{"value": text}` rather than lost).
fn tool_calls(calls: &[ToolCall]) -> Value {
    calls
        .iter()
        .map(|c| {
            let arguments = match serde_json::from_str::<Value>(&c.arguments) {
                Ok(Value::Object(o)) => Value::Object(o),
                Ok(_) | Err(_) if c.arguments.trim().is_empty() => json!({}),
                _ => json!({ "value": c.arguments }),
            };
            json!({ "function": { "name": c.name, "arguments": arguments } })
        })
        .collect::<Vec<_>>()
        .into()
}

/// The `done` line: why it ended and Ollama's counts and durations (nanoseconds), with
/// mulmd's own timings beside them for clients that look.
fn final_line(a: &Answer, model: &str, shape: Shape, text: &str) -> Value {
    let t = &a.timings;
    let eval_count = a.local_tokens as u64 + a.cloud_tokens.unwrap_or(0);
    let done_reason = match a.finish_reason.as_str() {
        "length" | "output_cap" => "length",
        _ => "stop",
    };
    let mut v = line(model, text_fields(text, shape));
    v["done"] = true.into();
    v["done_reason"] = done_reason.into();
    v["total_duration"] = ns(t.total_ms).into();
    v["load_duration"] = 0.into();
    v["prompt_eval_count"] = (a.prompt_tokens as u64).max(a.cloud_prompt_tokens.unwrap_or(0)).into();
    v["prompt_eval_duration"] = ns(t.ttft_ms).into();
    v["eval_count"] = eval_count.into();
    v["eval_duration"] = ns(t.total_ms - t.ttft_ms).into();
    v["mulmd"] = super::openai::timings(a);
    v
}

/// The whole answer as one object (`"stream": false`).
fn whole(events: Vec<AnswerEvent>, model: &str, shape: Shape) -> Response {
    let mut calls = Vec::new();
    for ev in events {
        match ev {
            AnswerEvent::ToolCalls(c) => calls = c,
            AnswerEvent::Done(a) => {
                let mut v = final_line(&a, model, shape, &a.text);
                if !calls.is_empty() {
                    v["message"]["tool_calls"] = tool_calls(&calls);
                }
                return json(StatusCode::OK, v);
            }
            AnswerEvent::Error(e) => return request_error(&e),
            _ => {}
        }
    }
    error_response(StatusCode::INTERNAL_SERVER_ERROR, "the answer ended without a result")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_home_assistant_tool_loop_becomes_openai_messages() {
        let body = json!({"messages": [
            {"role": "system", "content": "You control the house."},
            {"role": "user", "content": "Turn on the kitchen light"},
            {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "HassTurnOn", "arguments": {"name": "kitchen"}}}]},
            {"role": "tool", "content": "{\"success\": true}", "tool_name": "HassTurnOn"},
        ]});
        let c = conversation(&body).unwrap();
        let cloud = c.to_cloud();
        assert_eq!(cloud[2]["tool_calls"][0]["function"]["arguments"], "{\"name\":\"kitchen\"}");
        assert_eq!(cloud[2]["tool_calls"][0]["id"], cloud[3]["tool_call_id"]);
        assert_eq!(c.last_role(), Some(Role::Tool));
        assert!(conversation(&json!({"messages": [{"role": "wizard", "content": "hi"}]})).unwrap_err().contains("role"));
    }

    #[test]
    fn tool_call_arguments_go_back_as_objects() {
        let calls = [ToolCall { id: "c".into(), name: "HassTurnOn".into(), arguments: "{\"name\": \"kitchen\"}".into() }, ToolCall { id: "d".into(), name: "Ping".into(), arguments: String::new() }];
        let v = tool_calls(&calls);
        assert_eq!(v[0]["function"]["arguments"]["name"], "kitchen");
        assert_eq!(v[1]["function"]["arguments"], json!({}));
    }

    #[test]
    fn format_and_options_become_cloud_fields() {
        let p = cloud_params(&json!({"format": {"type": "object"}, "options": {"temperature": 0.2, "num_predict": 50, "num_ctx": 8192}, "tools": []}));
        assert_eq!(p["response_format"]["type"], "json_schema");
        assert_eq!((p["temperature"].as_f64(), p["max_tokens"].as_u64()), (Some(0.2), Some(50)));
        assert!(!p.contains_key("tools") && !p.contains_key("num_ctx"));
    }
}
