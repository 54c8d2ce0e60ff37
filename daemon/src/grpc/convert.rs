//! Translations between the pipeline's types and the wire types.

use std::time::Duration;

use tonic::Status;

use super::pb;
use crate::answer::{Answer, AnswerEvent, Conversation, Message, RequestOptions, Role, Source};
use crate::config::RecoveryMode;
use crate::engine::{OpenerTimings, RequestError, StopReason, WordEvent};

/// A count as the wire's u32 (counts here are far below, but never wrap).
pub fn saturate(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Wire options as every front end's options (unset stays unset).
pub fn options(o: &pb::Options) -> RequestOptions {
    RequestOptions {
        min_words: o.min_words,
        max_words: o.max_words,
        recovery: match pb::RecoveryMode::try_from(o.recovery).unwrap_or(pb::RecoveryMode::Unspecified) {
            pb::RecoveryMode::Unspecified => None,
            pb::RecoveryMode::Natural => Some(RecoveryMode::Natural),
            pb::RecoveryMode::Explicit => Some(RecoveryMode::Explicit),
            pb::RecoveryMode::Humor => Some(RecoveryMode::Humor),
        },
        cloud: o.cloud,
        temperature: o.temperature,
        top_k: o.top_k,
        top_p: o.top_p,
        seed: o.seed,
        voice: o.voice,
    }
}

pub fn word(w: &WordEvent) -> pb::Word {
    pb::Word { index: saturate(w.index), text: w.text.clone(), leading: w.leading.clone(), at_ms: ms(w.at) }
}

pub fn opener_timings(t: &OpenerTimings) -> pb::OpenerTimings {
    pb::OpenerTimings {
        queued_ms: ms(t.queued),
        tokenize_ms: ms(t.tokenize),
        prefill_ms: ms(t.prefill),
        ttft_ms: ms(t.ttft),
        opener_ms: ms(t.opener),
        total_ms: ms(t.total),
    }
}

pub fn stop_reason(s: StopReason) -> String {
    serde_json::to_value(s).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

fn final_message(a: &Answer) -> pb::Final {
    pb::Final {
        text: a.text.clone(),
        opener: a.opener.clone(),
        continuation: a.continuation.clone(),
        corrected: a.corrected,
        fallback: a.fallback.as_ref().map(|f| pb::Fallback { reason: f.reason.clone(), message: f.message.clone() }),
        timings: Some(pb::Timings {
            ttft_ms: a.timings.ttft_ms,
            opener_ms: a.timings.opener_ms,
            cloud_first_token_ms: a.timings.cloud_first_token_ms,
            total_ms: a.timings.total_ms,
            first_sentence_ms: a.timings.first_sentence_ms,
        }),
        prompt_tokens: saturate(a.prompt_tokens),
        local_tokens: saturate(a.local_tokens),
        cloud_tokens: a.cloud_tokens,
        finish_reason: a.finish_reason.clone(),
        finish_detail: a.finish_detail.clone().unwrap_or_default(),
        repairs: a.repairs.iter().map(|r| r.name().to_string()).collect(),
    }
}

/// The request's conversation: its system text, earlier turns and question.
pub fn conversation(system: &str, history: &[pb::Turn], query: &str) -> Conversation {
    let mut messages = Vec::with_capacity(history.len() + 2);
    if !system.trim().is_empty() {
        messages.push(Message::new(Role::System, system));
    }
    for t in history {
        let role = match pb::Speaker::try_from(t.speaker).unwrap_or(pb::Speaker::Unspecified) {
            pb::Speaker::Assistant => Role::Assistant,
            pb::Speaker::User | pb::Speaker::Unspecified => Role::User,
        };
        messages.push(Message::new(role, t.text.clone()));
    }
    messages.push(Message::new(Role::User, query));
    Conversation { messages }
}

/// An event on the wire, the status that ends the stream, or None for what gRPC does not
/// carry (function calls: a gRPC request names no tools, so none come).
pub fn event(ev: AnswerEvent) -> Option<Result<pb::AnswerEvent, Status>> {
    use pb::answer_event::Event;
    let e = match ev {
        AnswerEvent::Word(w) => Event::Word(word(&w)),
        AnswerEvent::OpenerDone { text, stop, timings, .. } => {
            Event::OpenerDone(pb::OpenerDone { text, stop_reason: stop_reason(stop), timings: Some(opener_timings(&timings)) })
        }
        AnswerEvent::Delta { text, source } => Event::Delta(pb::Delta {
            text,
            source: match source {
                Source::Cloud => pb::Source::Cloud,
                Source::Local => pb::Source::Local,
            } as i32,
        }),
        AnswerEvent::Correction => Event::Correction(pb::Correction {}),
        AnswerEvent::Done(a) => Event::Final(final_message(&a)),
        AnswerEvent::ToolCalls(_) => return None,
        AnswerEvent::Error(e) => return Some(Err(status(&e))),
    };
    Some(Ok(pb::AnswerEvent { event: Some(e) }))
}

/// The gRPC status for a request error; the message says what to do.
pub fn status(e: &RequestError) -> Status {
    let msg = e.to_string();
    match e {
        RequestError::EmptyQuery | RequestError::QueryTooLong { .. } | RequestError::PromptTooLong { .. } | RequestError::InvalidOptions(_) => Status::invalid_argument(msg),
        RequestError::Busy { .. } => Status::resource_exhausted(msg),
        RequestError::Cancelled => Status::cancelled(msg),
        RequestError::ShuttingDown | RequestError::Upstream(_) => Status::unavailable(msg),
        RequestError::Inference(_) => Status::internal(msg),
    }
}
