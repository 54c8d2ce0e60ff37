//! The instructions that turn a cloud model into a continuator (paper §3.2): its words are
//! appended to an opener the user has already seen, so it must pick up mid-sentence, never
//! restate or remark on the opener, and repair a wrong start in the chosen style.

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

/// The chat messages for one continuation: system rules, then the question and the opening.
pub fn messages(query: &str, opener: &str, mode: RecoveryMode) -> serde_json::Value {
    serde_json::json!([
        { "role": "system", "content": format!("{RULES}\n{}", mode_rule(mode)) },
        { "role": "user", "content": format!(
            "The user asked:\n{query}\n\nThe reply so far (continue right after its last character):\n{opener}"
        ) },
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_carries_the_question_the_opener_and_the_mode() {
        for mode in [RecoveryMode::Natural, RecoveryMode::Explicit, RecoveryMode::Humor] {
            let m = messages("Why is the sky blue?", "The sky looks blue because", mode);
            let system = m[0]["content"].as_str().unwrap();
            let user = m[1]["content"].as_str().unwrap();
            assert!(system.contains("Never repeat") && system.contains(CORRECTION_MARKER));
            assert!(user.contains("Why is the sky blue?") && user.ends_with("The sky looks blue because"));
        }
        let explicit = messages("q", "o", RecoveryMode::Explicit)[0]["content"].as_str().unwrap().to_string();
        let humor = messages("q", "o", RecoveryMode::Humor)[0]["content"].as_str().unwrap().to_string();
        assert!(explicit.contains("sets the record straight") && humor.contains("joke"));
    }
}
