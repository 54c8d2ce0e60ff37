//! Choosing the prompt layout for an endpoint: as configured, or (`auto`) by asking it once
//! whether it continues an assistant's unfinished message. The answer is kept for the
//! client's life; a probe the endpoint could not answer (down, overloaded, a timeout) is not
//! an answer, and is tried again after [`RETRY_AFTER`], with the instruct layout meanwhile.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::config::CloudConfig;
use super::prompt::{prefill_fields, probe_continued, Layout, PROBE_OPENING, PROBE_QUESTION, PROBE_TOKENS};
use crate::config::PromptLayout;

/// How long after an unanswered probe the next request probes again.
const RETRY_AFTER: Duration = Duration::from_secs(60);
/// The most of the probe's reply read.
const MAX_REPLY_BYTES: usize = 64 * 1024;

/// The layout in use, or what is known of it.
#[derive(Debug, Default)]
pub struct LayoutChoice {
    state: tokio::sync::Mutex<Probed>,
}

#[derive(Debug, Default)]
struct Probed {
    settled: Option<Layout>,
    last_try: Option<Instant>,
}

/// What one probe found.
#[derive(Debug, PartialEq)]
enum Verdict {
    /// The endpoint answered: use this layout from now on.
    Settled(Layout),
    /// It could not answer (why); ask again later.
    Unknown(String),
}

impl LayoutChoice {
    /// Whether the layout is known without asking the endpoint: fixed by the config, or settled
    /// by an earlier probe.
    pub fn known(&self, cfg: &CloudConfig) -> bool {
        !matches!(cfg.prompt, PromptLayout::Auto) || self.state.try_lock().is_ok_and(|s| s.settled.is_some())
    }

    /// The layout for the next continuation. With `auto`, the first caller probes and the
    /// callers at the same time wait for its answer (bounded by the first-token timeout).
    pub async fn layout(&self, http: &reqwest::Client, cfg: &CloudConfig) -> Layout {
        match cfg.prompt {
            PromptLayout::Prefill => return Layout::Prefill,
            PromptLayout::Instruct => return Layout::Instruct,
            PromptLayout::Auto => {}
        }
        let mut state = self.state.lock().await;
        if let Some(layout) = state.settled {
            return layout;
        }
        if state.last_try.is_some_and(|t| t.elapsed() < RETRY_AFTER) {
            return Layout::Instruct;
        }
        state.last_try = Some(Instant::now());
        match probe(http, cfg).await {
            Verdict::Settled(layout) => {
                tracing::info!(layout = layout.name(), "chose how to put the opener to the cloud (cloud.prompt = \"auto\")");
                state.settled = Some(layout);
                layout
            }
            Verdict::Unknown(why) => {
                tracing::warn!(
                    error = %why,
                    "could not ask the cloud whether it continues a reply; using the instruct layout and asking again in a minute (set cloud.prompt to skip the probe)"
                );
                Layout::Instruct
            }
        }
    }
}

/// Asks the endpoint to continue [`PROBE_OPENING`], a reply cut inside a word.
async fn probe(http: &reqwest::Client, cfg: &CloudConfig) -> Verdict {
    let mut body = json!({
        "model": cfg.model,
        "messages": [{"role": "user", "content": PROBE_QUESTION}, {"role": "assistant", "content": PROBE_OPENING}],
        "max_tokens": PROBE_TOKENS,
        "temperature": 0,
        "stream": false,
    });
    for (k, v) in prefill_fields() {
        body[k] = v;
    }
    let mut request = http.post(format!("{}/chat/completions", cfg.base_url)).json(&body).timeout(cfg.first_token_timeout);
    if let Some(k) = &cfg.api_key {
        request = request.bearer_auth(k.expose());
    }
    for (name, value) in &cfg.extra_headers {
        request = request.header(name, value);
    }
    let mut response = match request.send().await {
        Ok(r) => r,
        Err(e) => return Verdict::Unknown(if e.is_timeout() { "no reply in time".into() } else { "cannot reach the endpoint".into() }),
    };
    let status = response.status();
    let mut reply = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        reply.extend_from_slice(&chunk[..chunk.len().min(MAX_REPLY_BYTES - reply.len())]);
        if reply.len() >= MAX_REPLY_BYTES {
            break;
        }
    }
    verdict(status.as_u16(), &reply)
}

/// What a probe's reply says. A request refused as such (400, 404, 422: the endpoint rejects
/// the prefill fields or a last assistant message) settles on instruct; auth, rate limits and
/// server errors say nothing about the endpoint's abilities.
fn verdict(status: u16, reply: &[u8]) -> Verdict {
    match status {
        200..=299 => {
            let text = serde_json::from_slice::<Value>(reply).ok().and_then(|v| v.pointer("/choices/0/message/content").and_then(Value::as_str).map(str::to_string));
            Verdict::Settled(if text.is_some_and(|t| probe_continued(&t)) { Layout::Prefill } else { Layout::Instruct })
        }
        400 | 404 | 405 | 415 | 422 => Verdict::Settled(Layout::Instruct),
        other => Verdict::Unknown(format!("HTTP {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(content: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({"choices": [{"message": {"role": "assistant", "content": content}}]})).unwrap()
    }

    #[test]
    fn a_reply_settles_the_layout_and_a_failure_does_not() {
        assert_eq!(verdict(200, &reply("is.")), Verdict::Settled(Layout::Prefill));
        assert_eq!(verdict(200, &reply("The capital of France is Paris.")), Verdict::Settled(Layout::Prefill), "llama.cpp's server");
        assert_eq!(verdict(200, &reply("The capital")), Verdict::Settled(Layout::Instruct), "two tokens of a fresh answer");
        assert_eq!(verdict(200, b"data: {}\n\n"), Verdict::Settled(Layout::Instruct), "a reply that is not the JSON asked for");
        assert_eq!(verdict(400, b"{\"error\": \"unknown field continue_final_message\"}"), Verdict::Settled(Layout::Instruct));
        for status in [401, 403, 429, 500, 503] {
            assert!(matches!(verdict(status, b""), Verdict::Unknown(_)), "{status}");
        }
    }
}
