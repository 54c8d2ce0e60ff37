//! What an opener is written from: the question, an optional system turn, and (when the
//! device finishes an answer itself) the text already shown.

/// What an opener is written from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Prompt {
    /// A system turn placed before the question (None: the template's own default).
    pub system: Option<String>,
    pub query: String,
    /// Text already shown as the start of the answer: generation continues after it and
    /// stops at the end of the current sentence (at most `max_words` words). Used to finish
    /// a sentence locally when the cloud cannot.
    pub continue_from: Option<String>,
}

impl Prompt {
    /// A question with the template's own system turn.
    pub fn question(query: impl Into<String>) -> Self {
        Self { query: query.into(), ..Default::default() }
    }
}
