//! What an opener is written from: a conversation (an optional system turn, earlier turns, the
//! new question) and, when the device finishes an answer itself, the text already shown.

/// Who said an earlier turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaker {
    User,
    Assistant,
}

impl Speaker {
    pub(crate) fn role(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Assistant => "assistant",
        }
    }
}

/// One earlier turn of the conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub speaker: Speaker,
    pub text: String,
}

/// What an opener is written from. When the whole does not fit the token budget the engine
/// keeps the most recent turns: it drops the oldest turns first, then the system turn; the
/// question itself must fit.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Prompt {
    /// A system turn placed before everything (None: the template's own default).
    pub system: Option<String>,
    /// Earlier turns, oldest first.
    pub history: Vec<Turn>,
    pub query: String,
    /// Text already shown as the start of the answer: generation continues after it and
    /// stops at the end of the current sentence (the next one, when the text ends one; at
    /// most `max_words` words). Used to finish an answer locally when the cloud cannot.
    pub continue_from: Option<String>,
}

impl Prompt {
    /// A question with the template's own system turn.
    pub fn question(query: impl Into<String>) -> Self {
        Self { query: query.into(), ..Default::default() }
    }
}
