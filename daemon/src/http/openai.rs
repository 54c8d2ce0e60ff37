//! OpenAI's Chat Completions API as its clients (the `openai` library, LiteLLM, Open WebUI)
//! call it: `/v1/models`, and `/v1/chat/completions` streamed as SSE (one id for the answer, a
//! first chunk with the assistant role, the opener's words as the first content deltas, the
//! cloud's after them, `finish_reason` on the last chunk, the usage chunk only when
//! `stream_options.include_usage` asks, then `data: [DONE]`) or as one object. mulmd's own
//! timings ride along as a `mulmd` field, which clients ignore. Errors are OpenAI's error
//! objects (one `data: {"error": …}` event when an answer fails mid-stream).
//!
//! No opener when the last message is not the user's (a tool result, an assistant's own
//! start) or structured output is asked (`response_format`); `n > 1` and `logprobs` are
//! refused: mulmd streams one choice and returns no log probabilities.

use std::sync::Arc;
use std::time::SystemTime;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Map, Value};

use super::{collect, json, parse_body, request_id, start, status_of, stream_body, unix_seconds, with_retry, HttpFront};
use crate::answer::{Answer, AnswerEvent, Conversation, Front, Message, RequestOptions, Role, ToolCall};
use crate::engine::RequestError;

/// Request fields passed to the cloud as the client sent them.
const PASSED: &[&str] = &[
    "tools", "tool_choice", "parallel_tool_calls", "response_format", "temperature", "top_p", "seed", "stop", "max_tokens",
    "max_completion_tokens", "presence_penalty", "frequency_penalty", "user",
];

pub(super) fn routes() -> Router<Arc<HttpFront>> {
    Router::new().route("/v1/models", get(models)).route("/v1/chat/completions", post(completions))
}

/// An OpenAI error object with `status`.
pub(crate) fn error_response(status: StatusCode, kind: &str, message: &str) -> Response {
    let code = match status {
        StatusCode::UNAUTHORIZED => json!("invalid_api_key"),
        StatusCode::NOT_FOUND => json!("model_not_found"),
        _ => Value::Null,
    };
    json(status, json!({ "error": { "message": message, "type": kind, "param": null, "code": code } }))
}

fn invalid(message: &str) -> Response {
    error_response(StatusCode::BAD_REQUEST, "invalid_request_error", message)
}

fn error_kind(e: &RequestError) -> &'static str {
    match status_of(e) {
        StatusCode::BAD_REQUEST => "invalid_request_error",
        _ => "server_error",
    }
}

fn request_error(e: &RequestError) -> Response {
    with_retry(error_response(status_of(e), error_kind(e), &e.to_string()), e)
}

async fn models(State(front): State<Arc<HttpFront>>) -> Response {
    let created = unix_seconds(front.started);
    json(StatusCode::OK, json!({ "object": "list", "data": [{ "id": front.model.name, "object": "model", "created": created, "owned_by": "mulmd" }] }))
}

/// The message text: a string, or the text parts of a list of content parts.
fn text_of(content: Option<&Value>, at: usize) -> Result<String, String> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => Ok(parts
            .iter()
            .filter(|p| p.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("")),
        Some(_) => Err(format!("messages[{at}].content must be text or a list of content parts")),
    }
}

fn conversation(body: &Value) -> Result<Conversation, String> {
    let Some(list) = body.get("messages").and_then(Value::as_array) else {
        return Err("`messages` must be a list of messages".into());
    };
    let mut messages = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).and_then(Role::parse).ok_or_else(|| format!("messages[{i}].role must be system, developer, user, assistant or tool"))?;
        let mut msg = Message::new(role, text_of(m.get("content"), i)?);
        for key in ["tool_calls", "tool_call_id", "name"] {
            if let Some(v) = m.get(key).filter(|v| !v.is_null()) {
                msg.extra.insert(key.into(), v.clone());
            }
        }
        messages.push(msg);
    }
    Ok(Conversation { messages })
}

async fn completions(State(front): State<Arc<HttpFront>>, headers: HeaderMap, body: Bytes) -> Response {
    let arrived = super::now();
    let body = match parse_body(&body) {
        Ok(b) => b,
        Err(e) => return invalid(&e),
    };
    let model = body.get("model").and_then(Value::as_str).unwrap_or("");
    if !front.serves(model) {
        return error_response(StatusCode::NOT_FOUND, "invalid_request_error", &format!("the model `{model}` does not exist; this server serves `{}`", front.model.name));
    }
    if body.get("n").and_then(Value::as_u64).is_some_and(|n| n > 1) {
        return invalid("n above 1 is not supported: mulmd streams one choice; ask again for another");
    }
    if body.get("logprobs").and_then(Value::as_bool) == Some(true) {
        return invalid("logprobs are not supported: the opener's tokens come from a different model than the rest");
    }
    let conversation = match conversation(&body) {
        Ok(c) => c,
        Err(e) => return invalid(&e),
    };
    let params: Map<String, Value> = PASSED.iter().filter_map(|k| body.get(*k).filter(|v| !v.is_null()).map(|v| (k.to_string(), v.clone()))).collect();
    let options = RequestOptions { voice: Some(front.cfg.openai_voice), ..Default::default() };
    let id = request_id(&headers);
    let mut req = match front.answerer.admit_conversation(id.clone(), Front::OpenAi, arrived, conversation, None, &options) {
        Ok(r) => r,
        Err(e) => return request_error(&e),
    };
    if params.get("response_format").is_some_and(|f| f.get("type").and_then(Value::as_str) != Some("text")) {
        req.opener = None;
    }
    req.cloud_params = params;
    let head = Head { id: format!("chatcmpl-{id}"), created: unix_seconds(SystemTime::now()), model: model.to_string() };
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let usage = body.pointer("/stream_options/include_usage").and_then(Value::as_bool).unwrap_or(false);
    let (first, events) = match start(&front.answerer, req).await {
        Ok(started) => started,
        Err(e) => return request_error(&e),
    };
    if !stream {
        return whole(collect(first, events).await, &head);
    }
    let mut sse = Sse { head, usage, started: false };
    let body = stream_body(first, events, move |ev| sse.events(ev));
    ([(axum::http::header::CONTENT_TYPE, "text/event-stream"), (axum::http::header::CACHE_CONTROL, "no-cache")], body).into_response()
}

/// What every chunk of one answer shares.
struct Head {
    id: String,
    created: u64,
    model: String,
}

impl Head {
    fn chunk(&self, choices: Value, usage: Option<Value>) -> Value {
        let mut v = json!({ "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model, "choices": choices });
        if let Some(u) = usage {
            v["usage"] = u;
        }
        v
    }
}

/// The SSE rendering of an answer's events.
struct Sse {
    head: Head,
    /// `stream_options.include_usage`: every chunk carries `usage` (null but the last).
    usage: bool,
    /// The role chunk has gone out.
    started: bool,
}

impl Sse {
    fn events(&mut self, ev: AnswerEvent) -> Vec<Bytes> {
        let mut out = Vec::new();
        if !self.started && !matches!(ev, AnswerEvent::Error(_)) {
            self.started = true;
            out.push(self.delta(json!({ "role": "assistant", "content": "" })));
        }
        match ev {
            AnswerEvent::Word(w) => out.push(self.delta(json!({ "content": if w.index == 0 { w.text } else { format!("{}{}", w.leading, w.text) } }))),
            AnswerEvent::Delta { text, .. } => out.push(self.delta(json!({ "content": text }))),
            AnswerEvent::ToolCalls(calls) => out.push(self.delta(json!({ "tool_calls": stream_calls(&calls) }))),
            AnswerEvent::Done(a) => {
                let mut last = self.head.chunk(json!([{ "index": 0, "delta": {}, "logprobs": null, "finish_reason": finish_reason(&a) }]), self.usage.then_some(Value::Null));
                last["mulmd"] = timings(&a);
                out.push(event(&last));
                if self.usage {
                    out.push(event(&self.head.chunk(json!([]), Some(usage(&a)))));
                }
                out.push(Bytes::from_static(b"data: [DONE]\n\n"));
            }
            AnswerEvent::Error(e) => {
                out.push(event(&json!({ "error": { "message": e.to_string(), "type": error_kind(&e), "param": null, "code": e.code() } })));
            }
            AnswerEvent::OpenerDone { .. } | AnswerEvent::Correction => {}
        }
        out
    }

    fn delta(&self, delta: Value) -> Bytes {
        let chunk = self.head.chunk(json!([{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": null }]), self.usage.then_some(Value::Null));
        event(&chunk)
    }
}

fn event(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

fn stream_calls(calls: &[ToolCall]) -> Value {
    calls
        .iter()
        .enumerate()
        .map(|(i, c)| json!({ "index": i, "id": c.id, "type": "function", "function": { "name": c.name, "arguments": c.arguments } }))
        .collect::<Vec<_>>()
        .into()
}

/// OpenAI's finish reason: the cloud's (`stop`, `length`, `tool_calls`); a cut at mulmd's
/// output cap reads as `length`; a device-finished answer as `stop`.
fn finish_reason(a: &Answer) -> &'static str {
    match a.finish_reason.as_str() {
        "length" | "output_cap" => "length",
        "tool_calls" => "tool_calls",
        _ => "stop",
    }
}

/// OpenAI's usage object. The prompt is the cloud's count when it gave one, else the device
/// model's; only in the second case does `prompt_tokens_details.cached_tokens` (the device's
/// reused prompt tokens) describe the same prompt, so only then is it set.
fn usage(a: &Answer) -> Value {
    let prompt = a.cloud_prompt_tokens.unwrap_or(a.prompt_tokens as u64);
    let completion = a.local_tokens as u64 + a.cloud_tokens.unwrap_or(0);
    let mut v = json!({ "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion });
    if a.cloud_prompt_tokens.is_none() {
        v["prompt_tokens_details"] = json!({ "cached_tokens": a.reused_prompt_tokens });
    }
    v
}

/// mulmd's timings and hand-off facts, as an extension field clients ignore.
pub(crate) fn timings(a: &Answer) -> Value {
    let t = &a.timings;
    json!({
        "ttft_ms": t.ttft_ms,
        "opener_ms": t.opener_ms,
        "cloud_first_token_ms": t.cloud_first_token_ms,
        "first_sentence_ms": t.first_sentence_ms,
        "total_ms": t.total_ms,
        "opener": a.opener,
        "corrected": a.corrected,
        "fallback": a.fallback.as_ref().map(|f| json!({ "reason": f.reason, "message": f.message })),
        "finish_detail": a.finish_detail,
        "prompt_tokens": a.prompt_tokens,
        "reused_prompt_tokens": a.reused_prompt_tokens,
    })
}

/// The whole answer as one `chat.completion` (`stream` false or absent).
fn whole(events: Vec<AnswerEvent>, head: &Head) -> Response {
    let mut calls = Vec::new();
    for ev in events {
        match ev {
            AnswerEvent::ToolCalls(c) => calls = c,
            AnswerEvent::Done(a) => {
                let mut message = json!({ "role": "assistant", "content": if a.text.is_empty() && !calls.is_empty() { Value::Null } else { a.text.clone().into() } });
                if !calls.is_empty() {
                    message["tool_calls"] = stream_calls(&calls);
                    for c in message["tool_calls"].as_array_mut().into_iter().flatten() {
                        c.as_object_mut().map(|o| o.remove("index"));
                    }
                }
                let body = json!({
                    "id": head.id,
                    "object": "chat.completion",
                    "created": head.created,
                    "model": head.model,
                    "choices": [{ "index": 0, "message": message, "logprobs": null, "finish_reason": finish_reason(&a) }],
                    "usage": usage(&a),
                    "mulmd": timings(&a),
                });
                return json(StatusCode::OK, body);
            }
            AnswerEvent::Error(e) => return request_error(&e),
            _ => {}
        }
    }
    error_response(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "the answer ended without a result")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_parts_and_tool_fields_are_read() {
        let body = json!({"messages": [
            {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
            {"role": "user", "content": "Lights?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "on", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "ok"},
        ]});
        let c = conversation(&body).unwrap();
        assert_eq!(c.messages[0].role, Role::System);
        assert_eq!(c.messages[0].content, "Be brief.");
        assert_eq!(c.messages[3].extra["tool_call_id"], "c1");
        assert!(conversation(&json!({"messages": [{"role": "user", "content": 5}]})).is_err());
    }
}
