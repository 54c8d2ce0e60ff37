//! What an answer produces, in order: opener `Word`s, `OpenerDone`, continuation `Delta`s
//! (at most one `Correction`, just before the cloud text that redirects a wrong opener),
//! `ToolCalls` when the cloud made any, then exactly one `Done` or `Error`. An answer without
//! an opener (a tool result to read) has no `Word` and no `OpenerDone`. Fronts translate
//! these; the tap (`tap.rs`) watches them for logs and metrics.

use serde::Serialize;

pub use crate::cloud::{Repair, ToolCall};
use crate::engine::{OpenerTimings, RequestError, StopReason, WordEvent};

/// Who wrote a piece of the continuation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Cloud,
    Local,
}

/// Why the answer was finished locally.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fallback {
    /// A stable name: not_configured, disabled, or the cloud error's code.
    pub reason: String,
    pub message: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AnswerTimings {
    pub ttft_ms: f64,
    pub opener_ms: f64,
    /// From the opener's end to the first continuation text from the cloud.
    pub cloud_first_token_ms: Option<f64>,
    /// From arrival to the end of the answer's first sentence (its closing punctuation shown):
    /// when a voice pipeline can speak it.
    pub first_sentence_ms: Option<f64>,
    pub total_ms: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Answer {
    /// Everything the user was shown, in order.
    pub text: String,
    pub opener: String,
    pub continuation: String,
    pub corrected: bool,
    pub fallback: Option<Fallback>,
    /// Why the answer ended: `stop` (the cloud or the device finished it), `length` (the
    /// cloud stopped at its max_tokens), `tool_calls` (the cloud asked for function calls), or
    /// `output_cap` (mulmd stopped reading the cloud at one of its caps; `finish_detail` says
    /// which).
    pub finish_reason: String,
    pub finish_detail: Option<String>,
    pub timings: AnswerTimings,
    /// The local model's prompt, in its tokens.
    pub prompt_tokens: usize,
    /// Of those, how many came from a cache (the template head, or an earlier prompt that
    /// started the same way) rather than being computed for this answer.
    pub reused_prompt_tokens: usize,
    /// Tokens the local model generated (opener plus any local finish).
    pub local_tokens: usize,
    pub cloud_tokens: Option<u64>,
    /// Prompt tokens the cloud counted, when it said.
    pub cloud_prompt_tokens: Option<u64>,
    /// Function calls the cloud asked for (with the request's `tools`).
    pub tool_calls: Vec<ToolCall>,
    /// What was repaired where the opener and the continuation meet, and at the end.
    pub repairs: Vec<Repair>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AnswerEvent {
    Word(WordEvent),
    /// `tokens`: how many the opener generated (for speed figures).
    OpenerDone { text: String, stop: StopReason, timings: OpenerTimings, tokens: usize },
    Delta { text: String, source: Source },
    Correction,
    /// The cloud asked for function calls (after any text, before `Done`).
    ToolCalls(Vec<ToolCall>),
    Done(Box<Answer>),
    Error(RequestError),
}

impl AnswerEvent {
    /// `Done` or `Error`: the last event of an answer.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Done(_) | Self::Error(_))
    }
}
