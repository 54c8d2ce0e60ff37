//! Request payloads in, reply payloads out. A request is one JSON object:
//!
//! ```json
//! {"id": "kitchen-42", "query": "How long do I boil an egg?",
//!  "reply_to": "home/assistant/answers", "stream": true,
//!  "options": {"max_words": 6, "recovery": "natural", "cloud": true}}
//! ```
//!
//! Every reply is a JSON object with `id`, `node` and `type`: `word` (only with
//! `mqtt.stream_words`), `opener`, `delta`, `correction`, then exactly one `final` or `error`.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::answer::{AnswerEvent, Conversation, Message, RequestOptions, Role, Source};

/// A request that parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// None when the client sent none (allowed with an MQTT 5 response topic).
    pub id: Option<String>,
    /// The system text, earlier turns and question.
    pub conversation: Conversation,
    /// Turns the daemon keeps for the asker under this id.
    pub conversation_id: Option<String>,
    pub reply_to: Option<String>,
    pub options: RequestOptions,
    /// False: only the final (or error) reply.
    pub stream: bool,
}

/// An earlier turn as a payload carries it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireTurn {
    role: WireRole,
    content: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum WireRole {
    User,
    Assistant,
}

/// A payload that could not be taken, with whatever route fields could still be read from
/// it, so the error can go where the answer would have gone.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub id: Option<String>,
    pub reply_to: Option<String>,
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    #[serde(default)]
    id: Option<Value>,
    query: String,
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    history: Vec<WireTurn>,
    #[serde(default)]
    conversation_id: Option<String>,
    #[serde(default)]
    reply_to: Option<String>,
    #[serde(default)]
    options: Option<RequestOptions>,
    #[serde(default)]
    stream: Option<bool>,
}

const SHAPE: &str = r#"send {"id": "abc", "query": "your question"} with optional "reply_to", "stream", "options", "system", "history" ([{"role": "user"|"assistant", "content": "..."}]) and "conversation_id""#;

/// An id usable as a topic level: 1–64 of `A-Z a-z 0-9 _ - . :`, or a non-negative integer.
fn id_of(v: &Value) -> Result<String, String> {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) if n.is_u64() => n.to_string(),
        other => return Err(format!("id must be a string or a non-negative integer, not {other}")),
    };
    if s.is_empty() || s.len() > 64 || !s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':')) {
        return Err(format!("id {s:?} must be 1 to 64 letters, digits or _-.: (it becomes part of the reply topic)"));
    }
    Ok(s)
}

/// Parses one request payload of at most `max_bytes`.
pub fn parse(payload: &[u8], max_bytes: usize) -> Result<Request, Rejected> {
    let reject = |id, reply_to, message: String| Rejected { id, reply_to, message };
    if payload.len() > max_bytes {
        // Not answered, but its route fields are still read (the broker bounds the payload at
        // mqtt.max_packet_bytes), so the error reaches the asker where it can.
        let (id, reply_to) = route_fields(payload);
        return Err(reject(id, reply_to, format!("the request is {} bytes, more than the {max_bytes} allowed (mqtt.max_request_bytes)", payload.len())));
    }
    let text = std::str::from_utf8(payload)
        .map_err(|e| reject(None, None, format!("the request is not valid UTF-8 (byte {}); {SHAPE}", e.valid_up_to())))?;
    let value: Value = serde_json::from_str(text).map_err(|e| reject(None, None, format!("the request is not JSON ({e}); {SHAPE}")))?;
    let Value::Object(map) = &value else {
        return Err(reject(None, None, format!("the request must be a JSON object; {SHAPE}")));
    };
    // Route fields first, leniently, so even a request with other faults can be answered.
    let id = map.get("id").and_then(|v| id_of(v).ok());
    let reply_to = map.get("reply_to").and_then(|v| v.as_str()).map(str::to_string);
    let wire: Wire = serde_json::from_value(value.clone()).map_err(|e| reject(id.clone(), reply_to.clone(), format!("the request is malformed: {e}; {SHAPE}")))?;
    let id = match &wire.id {
        Some(v) => Some(id_of(v).map_err(|m| reject(None, reply_to.clone(), m))?),
        None => None,
    };
    let mut messages = Vec::with_capacity(wire.history.len() + 2);
    if let Some(system) = wire.system.filter(|s| !s.trim().is_empty()) {
        messages.push(Message::new(Role::System, system));
    }
    for t in wire.history {
        let role = match t.role {
            WireRole::User => Role::User,
            WireRole::Assistant => Role::Assistant,
        };
        messages.push(Message::new(role, t.content));
    }
    messages.push(Message::new(Role::User, wire.query));
    Ok(Request {
        id,
        conversation: Conversation { messages },
        conversation_id: wire.conversation_id,
        reply_to: wire.reply_to,
        options: wire.options.unwrap_or_default(),
        stream: wire.stream.unwrap_or(true),
    })
}

/// `id` and `reply_to` of a payload, read leniently (each only when present and usable).
fn route_fields(payload: &[u8]) -> (Option<String>, Option<String>) {
    #[derive(Deserialize)]
    struct Route {
        id: Option<Value>,
        reply_to: Option<Value>,
    }
    match serde_json::from_slice::<Route>(payload) {
        Ok(r) => (r.id.as_ref().and_then(|v| id_of(v).ok()), r.reply_to.and_then(|v| v.as_str().map(str::to_string))),
        Err(_) => (None, None),
    }
}

/// The reply for one answer event, or None when this request does not get that event.
/// The bool is true for the terminal reply (sent with QoS 1).
pub fn reply(id: &str, node: &str, ev: &AnswerEvent, stream: bool, words: bool) -> Option<(Value, bool)> {
    let mut body = match ev {
        AnswerEvent::Word(w) if stream && words => json!({"type": "word", "index": w.index, "text": w.text, "leading": w.leading, "at_ms": w.at.as_secs_f64() * 1e3}),
        AnswerEvent::OpenerDone { text, stop, timings, tokens } if stream => json!({
            "type": "opener", "text": text, "stop_reason": stop, "tokens": tokens,
            "ttft_ms": timings.ttft.as_secs_f64() * 1e3, "opener_ms": timings.opener.as_secs_f64() * 1e3,
        }),
        AnswerEvent::Delta { text, source } if stream => json!({"type": "delta", "text": text, "source": match source { Source::Cloud => "cloud", Source::Local => "local" }}),
        AnswerEvent::Correction if stream => json!({"type": "correction"}),
        AnswerEvent::Done(a) => {
            let mut v = serde_json::to_value(a.as_ref()).unwrap_or_else(|_| json!({}));
            v["type"] = "final".into();
            v
        }
        AnswerEvent::Error(e) => return Some((error_body(id, node, e.code(), &e.to_string()), true)),
        // MQTT requests name no tools, so no function calls come back.
        _ => return None,
    };
    body["id"] = id.into();
    body["node"] = node.into();
    Some((body, matches!(ev, AnswerEvent::Done(_))))
}

/// `body` as JSON text of at most `limit` bytes. A reply that would be longer (only a final
/// or a delta of a cloud at its caps, escaped to several times its size) loses first the
/// copies a final repeats (`opener`, `continuation`: `text` holds both), then the end of its
/// `text`, and says so with `"cut": true`.
pub fn encode(mut body: Value, limit: usize) -> String {
    let text = body.to_string();
    if text.len() <= limit {
        return text;
    }
    if let Some(map) = body.as_object_mut() {
        map.remove("opener");
        map.remove("continuation");
        map.insert("cut".into(), true.into());
    }
    loop {
        let text = body.to_string();
        let over = text.len().saturating_sub(limit);
        if over == 0 {
            return text;
        }
        if !matches!(body.get("text"), Some(Value::String(t)) if !t.is_empty()) {
            let message = "the reply does not fit mqtt.max_packet_bytes";
            return json!({"type": "error", "code": "too_large", "message": message, "id": body.get("id"), "node": body.get("node")}).to_string();
        }
        if let Some(Value::String(t)) = body.get_mut("text") {
            // Keep the share of the text that fits, as if it were escaped evenly, less 5%;
            // at least one character goes each round.
            let chars = t.chars().count();
            let share = limit as f64 / text.len() as f64 * 0.95;
            let keep = ((chars as f64 * share) as usize).min(chars - 1);
            *t = t.chars().take(keep).collect();
        }
    }
}

/// An error reply: `code` is stable (`bad_request`, `busy`, `shutting_down`, ...).
pub fn error_body(id: &str, node: &str, code: &str, message: &str) -> Value {
    json!({"type": "error", "id": id, "node": node, "code": code, "message": message})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_request_parses() {
        let r = parse(br#"{"id": 42, "query": "Hi?", "reply_to": "home/a", "stream": false, "options": {"max_words": 5, "recovery": "humor"}}"#, 8192).unwrap();
        assert_eq!(r.id.as_deref(), Some("42"));
        assert_eq!(r.reply_to.as_deref(), Some("home/a"));
        assert!(!r.stream);
        assert_eq!(r.options.max_words, Some(5));
        let r = parse(br#"{"id": 1, "query": "And tomorrow?", "system": "Be brief.", "history": [{"role": "user", "content": "Weather today?"}, {"role": "assistant", "content": "Sunny."}], "conversation_id": "hall"}"#, 8192).unwrap();
        let roles: Vec<Role> = r.conversation.messages.iter().map(|m| m.role).collect();
        assert_eq!(roles, [Role::System, Role::User, Role::Assistant, Role::User]);
        assert_eq!(r.conversation_id.as_deref(), Some("hall"));
        let e = parse(br#"{"id": 1, "query": "x", "history": [{"role": "tool", "content": "?"}]}"#, 8192).unwrap_err();
        assert!(e.message.contains("history"), "{}", e.message);
    }

    #[test]
    fn faults_keep_the_route_when_they_can() {
        let e = parse(br#"{"id": "a1", "reply_to": "home/a", "query": 5}"#, 8192).unwrap_err();
        assert_eq!((e.id.as_deref(), e.reply_to.as_deref()), (Some("a1"), Some("home/a")));
        assert!(e.message.contains("malformed"), "{}", e.message);
        let e = parse(br#"{"id": "a1", "query": "x", "options": {"max_wrods": 3}}"#, 8192).unwrap_err();
        assert!(e.message.contains("max_wrods") && e.id.is_some(), "{}", e.message);
        let e = parse(br#"{"id": "a/b", "query": "x"}"#, 8192).unwrap_err();
        assert!(e.message.contains("reply topic"), "{}", e.message);
        assert!(parse(b"\xff\xfe", 8192).unwrap_err().message.contains("UTF-8"));
        assert!(parse(b"{not json", 8192).unwrap_err().message.contains("not JSON"));
        assert!(parse(b"[1, 2]", 8192).unwrap_err().message.contains("object"));
        assert!(parse(&[b' '; 100], 10).unwrap_err().message.contains("mqtt.max_request_bytes"));
        let big = format!(r#"{{"id": "q9", "reply_to": "home/a", "query": "{}"}}"#, "x".repeat(100));
        let e = parse(big.as_bytes(), 50).unwrap_err();
        assert!(e.message.contains("mqtt.max_request_bytes"));
        assert_eq!((e.id.as_deref(), e.reply_to.as_deref()), (Some("q9"), Some("home/a")), "an oversize request keeps its route");
    }

    #[test]
    fn a_reply_never_passes_the_packet_limit() {
        let small = json!({"type": "delta", "text": "hi", "id": "a", "node": "n"});
        assert_eq!(encode(small.clone(), 1000), small.to_string());
        let text = "\u{1}".repeat(10_000); // escaped to six bytes each
        let fin = json!({"type": "final", "text": text, "opener": "o", "continuation": text, "id": "a", "node": "n"});
        let out = encode(fin, 4096);
        assert!(out.len() <= 4096, "{}", out.len());
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!((v["type"].as_str(), v["cut"].as_bool()), (Some("final"), Some(true)));
        assert!(v.get("opener").is_none() && v["text"].as_str().unwrap().len() > 100);
    }

    proptest::proptest! {
        #[test]
        fn any_payload_is_taken_or_refused_without_a_panic(payload in proptest::collection::vec(proptest::num::u8::ANY, 0..512), max in 1usize..600) {
            if let Ok(r) = parse(&payload, max) {
                proptest::prop_assert!(payload.len() <= max);
                if let Some(id) = r.id {
                    proptest::prop_assert!(id_of(&Value::String(id)).is_ok());
                }
            }
        }

        #[test]
        fn any_json_object_is_taken_or_refused_without_a_panic(
            id in proptest::option::of(".{0,70}"),
            query in ".{0,40}",
            reply_to in proptest::option::of(".{0,20}"),
            extra in proptest::option::of("[a-z_]{1,8}"),
            max_words in proptest::option::of(proptest::num::i64::ANY),
        ) {
            let mut v = json!({"query": query});
            if let Some(id) = &id { v["id"] = id.clone().into(); }
            if let Some(r) = &reply_to { v["reply_to"] = r.clone().into(); }
            if let Some(k) = &extra { v[k.as_str()] = 1.into(); }
            if let Some(n) = max_words { v["options"] = json!({"max_words": n}); }
            let text = v.to_string();
            match parse(text.as_bytes(), 8192) {
                Ok(r) => proptest::prop_assert_eq!(r.conversation.query(), query),
                Err(e) => proptest::prop_assert!(!e.message.is_empty()),
            }
        }

        #[test]
        fn an_encoded_reply_is_json_within_its_limit(text in ".{0,3000}", limit in 256usize..4096) {
            let body = json!({"type": "final", "text": text, "opener": "o", "continuation": text, "id": "a", "node": "n"});
            let out = encode(body, limit);
            proptest::prop_assert!(out.len() <= limit, "{} > {}", out.len(), limit);
            proptest::prop_assert!(serde_json::from_str::<Value>(&out).is_ok());
        }
    }
}
