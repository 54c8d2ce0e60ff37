//! The instructions that turn a cloud model into a continuator (paper §3.2): its words are
//! appended to an opener the user has already seen, so it must pick up mid-sentence, never
//! restate or remark on the opener, and repair a wrong start in the chosen style.

use serde_json::{json, Value};

use crate::config::RecoveryMode;

/// Put by the cloud model at the very start of its text when it had to redirect a wrong
/// opener; mulmd removes it and reports a correction event instead.
pub const CORRECTION_MARKER: &str = "[[redirect]]";

const RULES: &str = "You finish answers that another speaker has already started. The user has \
already heard the opening words of the reply below, and they cannot be taken back. Whatever you \
write is appended directly after those words, so the two together must read as one answer from \
one voice.

How to continue:
1. Pick up exactly where the opening stops. If it stops in the middle of a sentence, first \
complete that sentence so it is grammatical, then go on.
2. Never repeat, quote, summarize or comment on the opening. Do not greet the user, do not \
start the answer over, and never mention that part of the reply came from someone else.
3. Begin with a space when your first word is a new word; begin with no space when you start \
with punctuation.
4. Then give the rest of a helpful, accurate and reasonably short answer in the same tone.";

fn mode_rule(mode: RecoveryMode) -> String {
    let when = format!(
        "If the opening is wrong, misleading or heading somewhere unhelpful, start your text with \
         the exact marker {CORRECTION_MARKER} (it is removed before anyone sees it) and"
    );
    match mode {
        RecoveryMode::Natural => format!(
            "5. {when} steer away from the mistake smoothly, the way a fluent speaker changes course \
             mid-thought, without pointing the mistake out. Otherwise never use the marker."
        ),
        RecoveryMode::Explicit => format!(
            "5. {when} then write one short sentence that sets the record straight, without quoting \
             or arguing with the opening, followed by the complete answer. Otherwise never use the marker."
        ),
        RecoveryMode::Humor => format!(
            "5. {when} then turn the slip into a brief, friendly joke at the speaker's own expense \
             before giving the right answer. Otherwise never use the marker."
        ),
    }
}

/// The chat messages for one continuation: the client's own system instructions (if any)
/// with the continuation rules after them, the conversation's earlier messages as they came,
/// then the question and the opening as the last user turn. `conversation` is in OpenAI's
/// shape and ends with the user's turn.
pub fn messages(conversation: &[Value], opener: &str, mode: RecoveryMode) -> Vec<Value> {
    let role = |m: &Value| m.get("role").and_then(Value::as_str).unwrap_or("").to_string();
    let text = |m: &Value| m.get("content").and_then(Value::as_str).unwrap_or("").to_string();
    let theirs: Vec<String> = conversation.iter().filter(|m| role(m) == "system").map(text).filter(|t| !t.trim().is_empty()).collect();
    let rules = format!("{RULES}\n{}", mode_rule(mode));
    let system = if theirs.is_empty() { rules } else { format!("{}\n\n{rules}", theirs.join("\n\n")) };
    let last_user = conversation.iter().rposition(|m| role(m) == "user").unwrap_or(conversation.len());
    let query = conversation.get(last_user).map(text).unwrap_or_default();
    let mut out = vec![json!({ "role": "system", "content": system })];
    out.extend(conversation[..last_user].iter().filter(|m| role(m) != "system").cloned());
    out.push(json!({
        "role": "user",
        "content": format!("The user asked:\n{query}\n\nThe reply so far (continue right after its last character):\n{opener}"),
    }));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_carries_the_question_the_opener_and_the_mode() {
        let ask = |q: &str| vec![json!({"role": "user", "content": q})];
        for mode in [RecoveryMode::Natural, RecoveryMode::Explicit, RecoveryMode::Humor] {
            let m = messages(&ask("Why is the sky blue?"), "The sky looks blue because", mode);
            let system = m[0]["content"].as_str().unwrap();
            let user = m[1]["content"].as_str().unwrap();
            assert!(system.contains("Never repeat") && system.contains(CORRECTION_MARKER));
            assert!(user.contains("Why is the sky blue?") && user.ends_with("The sky looks blue because"));
        }
        let explicit = messages(&ask("q"), "o", RecoveryMode::Explicit)[0]["content"].as_str().unwrap().to_string();
        let humor = messages(&ask("q"), "o", RecoveryMode::Humor)[0]["content"].as_str().unwrap().to_string();
        assert!(explicit.contains("sets the record straight") && humor.contains("joke"));
    }

    #[test]
    fn a_conversation_keeps_its_instructions_and_turns_before_the_continuation() {
        let conversation = vec![
            json!({"role": "system", "content": "You are the house assistant. Lights: kitchen."}),
            json!({"role": "user", "content": "What is the capital of France?"}),
            json!({"role": "assistant", "content": "Paris."}),
            json!({"role": "user", "content": "And its population?"}),
        ];
        let m = messages(&conversation, "About two", RecoveryMode::Natural);
        assert_eq!(m.len(), 4);
        let system = m[0]["content"].as_str().unwrap();
        assert!(system.starts_with("You are the house assistant.") && system.contains("Never repeat"), "{system}");
        assert_eq!((m[1]["content"].as_str(), m[2]["content"].as_str()), (Some("What is the capital of France?"), Some("Paris.")));
        let last = m[3]["content"].as_str().unwrap();
        assert!(last.contains("And its population?") && last.ends_with("About two"), "{last}");
    }
}
