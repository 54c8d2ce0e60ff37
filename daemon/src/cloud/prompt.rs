//! The instructions that turn a cloud model into a continuator (paper §3.2): its words are
//! appended to an opener the user has already seen, so it must pick up mid-sentence, never
//! restate or remark on the opener, and repair a wrong start in the chosen style.

use serde_json::{json, Value};

use crate::config::RecoveryMode;

/// Put by the cloud model at the very start of its text when it had to redirect a wrong
/// opener; mulmd removes it and reports a correction event instead.
pub const CORRECTION_MARKER: &str = "[[redirect]]";

/// How the opener is put to the cloud model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// The opener is the assistant's unfinished last message, and the server continues it
    /// (llama.cpp's server, vLLM's `continue_final_message`, other servers with assistant
    /// prefill). Nothing of mulmd's prompt sits where the answer goes, so nothing can leak.
    Prefill,
    /// For endpoints that cannot continue a message: the model is asked to begin its reply
    /// with the opener word for word and carry on from it. Small models restart an answer
    /// rather than continue one, so the layout asks for the restart and the seam cuts the
    /// repeated opener precisely; the reminder rides on the user's last message (a message
    /// of its own would break templates that need turns to alternate).
    Instruct,
}

impl Layout {
    /// The name `cloud.prompt` and the logs use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Prefill => "prefill",
            Self::Instruct => "instruct",
        }
    }
}

const PREFILL_RULES: &str = "You are finishing a spoken answer that has already begun: your reply \
below already holds its opening words, which the listener has heard and which cannot be taken \
back. Continue it from its last character, so that the whole reads as one answer in one voice.

- If the opening stops in the middle of a sentence, first complete that sentence so it is \
grammatical, then go on.
- Never repeat, summarize or comment on the opening, never start the answer over, and never \
mention that part of it came from someone else.
- Give the rest of a helpful, accurate and short answer in the same tone.";

const INSTRUCT_RULES: &str = "You are finishing a spoken answer that has already begun. The \
listener has heard its opening words, given after the question, and they cannot be taken back.

- Begin your reply with the opening, word for word, then carry on from its last word so that the \
whole reads as one answer in one voice. If the opening stops in the middle of a sentence, \
complete that sentence first.
- Do not greet the listener, do not comment on the opening, and never mention that part of the \
answer came from someone else.
- Give the rest of a helpful, accurate and short answer in the same tone.";

/// What the instruct layout adds to the user's last message.
fn reminder(opener: &str) -> String {
    format!("\n\n(Begin your reply with: {opener})")
}

fn mode_rule(mode: RecoveryMode, layout: Layout) -> String {
    let place = match layout {
        Layout::Prefill => "begin your continuation with",
        Layout::Instruct => "write right after the opening",
    };
    let when = format!(
        "- If the opening is wrong, misleading or heading somewhere unhelpful, {place} the exact \
         marker {CORRECTION_MARKER} (it is removed before anyone hears it) and"
    );
    match mode {
        RecoveryMode::Natural => format!(
            "{when} steer away from the mistake smoothly, the way a fluent speaker changes course \
             mid-thought, without pointing the mistake out. Otherwise never use the marker."
        ),
        RecoveryMode::Explicit => format!(
            "{when} then write one short sentence that sets the record straight, without quoting \
             or arguing with the opening, followed by the complete answer. Otherwise never use the marker."
        ),
        RecoveryMode::Humor => format!(
            "{when} then turn the slip into a brief, friendly joke at the speaker's own expense \
             before giving the right answer. Otherwise never use the marker."
        ),
    }
}

/// The chat messages for one continuation of `opener` in `layout`: the client's own system
/// instructions (if any) with the continuation rules after them, then the conversation's
/// messages as they came; [`Layout::Prefill`] adds the opener as the assistant's unfinished
/// message, [`Layout::Instruct`] a reminder of it to the user's last message. `conversation`
/// is in OpenAI's shape and ends with the user's turn.
pub fn messages(conversation: &[Value], opener: &str, mode: RecoveryMode, layout: Layout) -> Vec<Value> {
    let is_system = |m: &Value| m.get("role").and_then(Value::as_str) == Some("system");
    let theirs: Vec<&str> =
        conversation.iter().filter(|m| is_system(m)).filter_map(|m| m.get("content").and_then(Value::as_str)).filter(|t| !t.trim().is_empty()).collect();
    let rules = match layout {
        Layout::Prefill => PREFILL_RULES,
        Layout::Instruct => INSTRUCT_RULES,
    };
    let rules = format!("{rules}\n{}", mode_rule(mode, layout));
    let system = if theirs.is_empty() { rules } else { format!("{}\n\n{rules}", theirs.join("\n\n")) };
    let mut out = vec![json!({ "role": "system", "content": system })];
    out.extend(conversation.iter().filter(|m| !is_system(m)).cloned());
    match layout {
        Layout::Prefill => out.push(json!({ "role": "assistant", "content": opener })),
        Layout::Instruct => {
            if let Some(last) = out.iter_mut().rev().find(|m| m.get("role").and_then(Value::as_str) == Some("user")) {
                remind(last, opener);
            }
        }
    }
    out
}

/// Adds the instruct layout's reminder to a user message, whose content is text or a list of
/// parts.
fn remind(message: &mut Value, opener: &str) {
    match message.get_mut("content") {
        Some(Value::String(text)) => text.push_str(&reminder(opener)),
        Some(Value::Array(parts)) => parts.push(json!({ "type": "text", "text": reminder(opener) })),
        _ => message["content"] = reminder(opener).trim_start().into(),
    }
}

/// Request fields that ask a server to continue the last message rather than answer it
/// (vLLM's names; llama.cpp's server reads them too, and continues a last assistant message
/// unasked).
pub fn prefill_fields() -> [(&'static str, Value); 2] {
    [("continue_final_message", Value::Bool(true)), ("add_generation_prompt", Value::Bool(false))]
}

/// The probe that tells whether an endpoint continues an assistant's message: an opening cut
/// inside a word, and room for two tokens. A server that continues it writes the rest of the
/// word (llama.cpp's server, unstreamed, returns the opening with it); one that answers afresh
/// gets no further than two tokens of its own sentence.
pub const PROBE_QUESTION: &str = "What is the capital of France?";
pub const PROBE_OPENING: &str = "The capital of France is Par";
pub const PROBE_TOKENS: u32 = 2;

/// Whether `reply` to the probe continued [`PROBE_OPENING`].
pub fn probe_continued(reply: &str) -> bool {
    let rest = reply.strip_prefix(PROBE_OPENING).unwrap_or(reply);
    rest.starts_with("is") && !rest.starts_with("is the")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(q: &str) -> Vec<Value> {
        vec![json!({"role": "user", "content": q})]
    }

    fn system(m: &[Value]) -> &str {
        m[0]["content"].as_str().unwrap()
    }

    #[test]
    fn each_layout_carries_the_question_the_opener_and_the_mode() {
        for mode in [RecoveryMode::Natural, RecoveryMode::Explicit, RecoveryMode::Humor] {
            let m = messages(&ask("Why is the sky blue?"), "The sky looks blue because", mode, Layout::Prefill);
            assert!(system(&m).contains("Never repeat") && system(&m).contains(CORRECTION_MARKER) && !system(&m).contains("sky"));
            assert_eq!(m[1], json!({"role": "user", "content": "Why is the sky blue?"}), "the question as it was asked");
            assert_eq!(m[2], json!({"role": "assistant", "content": "The sky looks blue because"}), "the opener is the reply to continue");
            assert_eq!(m.len(), 3);

            let m = messages(&ask("Why is the sky blue?"), "The sky looks blue because", mode, Layout::Instruct);
            assert!(system(&m).contains("word for word") && system(&m).contains(CORRECTION_MARKER));
            assert_eq!(m[1]["content"], "Why is the sky blue?\n\n(Begin your reply with: The sky looks blue because)");
            assert_eq!(m.len(), 2, "no turn of its own: roles still alternate");
        }
        let rules = |mode| system(&messages(&ask("q"), "o", mode, Layout::Instruct)).to_string();
        assert!(rules(RecoveryMode::Explicit).contains("sets the record straight") && rules(RecoveryMode::Humor).contains("joke"));
        assert!(rules(RecoveryMode::Natural).contains("without pointing the mistake out"));
    }

    #[test]
    fn a_conversation_keeps_its_instructions_and_turns_before_the_continuation() {
        let conversation = vec![
            json!({"role": "system", "content": "You are the house assistant. Lights: kitchen."}),
            json!({"role": "user", "content": "What is the capital of France?"}),
            json!({"role": "assistant", "content": "Paris."}),
            json!({"role": "user", "content": [{"type": "text", "text": "And its population?"}]}),
        ];
        for layout in [Layout::Instruct, Layout::Prefill] {
            let m = messages(&conversation, "About two", RecoveryMode::Natural, layout);
            assert!(system(&m).starts_with("You are the house assistant.") && system(&m).contains("never mention"), "{}", system(&m));
            assert_eq!(&m[1..3], &conversation[1..3], "earlier turns as they came");
            assert_eq!(m[3]["content"][0], conversation[3]["content"][0], "the question's own parts");
            match layout {
                Layout::Prefill => assert_eq!(m[4]["content"], "About two"),
                Layout::Instruct => assert_eq!(m[3]["content"][1]["text"], "\n\n(Begin your reply with: About two)"),
            }
        }
    }

    #[test]
    fn the_probe_tells_a_continued_word_from_a_fresh_answer() {
        assert!(probe_continued("is."));
        assert!(probe_continued("is, of course"));
        assert!(probe_continued("The capital of France is Paris."), "the opening returned with its continuation");
        for fresh in ["The capital", "Paris.", " is", "is the capital", "", "The capital of France is Par"] {
            assert!(!probe_continued(fresh), "{fresh:?}");
        }
    }
}
