//! The prompt set: short single-turn assistant questions, the kind an opener answers.

/// Built-in questions (written for mulmd): everyday requests of a home assistant.
pub const BUILT_IN: &[&str] = &[
    "How do I remove odor from inside my shoes?",
    "What is a good way to fall asleep faster?",
    "Can you suggest a quick vegetarian dinner?",
    "Why is the sky blue?",
    "How long should I boil an egg for a soft yolk?",
    "What should I pack for a weekend hiking trip?",
    "How do I keep basil fresh for longer?",
    "What is the difference between weather and climate?",
    "Give me a tip for remembering people's names.",
    "How can I make my phone battery last longer?",
    "What are the benefits of drinking water in the morning?",
    "How do I explain fractions to a child?",
    "What is a fun indoor activity for a rainy day?",
    "How often should I water a cactus?",
    "What causes hiccups?",
    "How do I politely decline an invitation?",
];

/// Reads one prompt per line; blank lines and lines starting with '#' are skipped.
pub fn from_file(path: &std::path::Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let prompts: Vec<String> =
        text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_string).collect();
    if prompts.is_empty() {
        return Err(format!("{}: no prompts (one question per line; # starts a comment)", path.display()));
    }
    Ok(prompts)
}
