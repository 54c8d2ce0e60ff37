//! Errors the engine reports. Each message names the file or value at fault and what to do.

use std::path::PathBuf;

/// Why a model directory could not be loaded. Loading errors are fatal for the daemon (a
/// distinct exit code), so every variant says which file is wrong and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {problem}; prepare a model directory with `export/mulm-export` (see README)")]
    MissingFile { path: PathBuf, problem: String },
    #[error("{path}: {problem}")]
    BadManifest { path: PathBuf, problem: String },
    #[error("{path}: cannot be loaded as an ONNX model ({detail}); re-export it with `export/mulm-export`")]
    BadOnnx { path: PathBuf, detail: String },
    #[error("{path}: {problem}; the model does not match its manifest, re-export the directory")]
    ShapeMismatch { path: PathBuf, problem: String },
    #[error("{path}: cannot be loaded as a tokenizer ({detail})")]
    BadTokenizer { path: PathBuf, detail: String },
    #[error("{path}: {problem}")]
    VocabularyMismatch { path: PathBuf, problem: String },
    #[error("chat template in {path}: {detail}")]
    BadTemplate { path: PathBuf, detail: String },
    /// `MULMD_KERNELS` names a level this machine cannot run.
    #[error("{0}")]
    Kernels(String),
}

/// Why one request failed. The request's other events (words already sent) stay valid.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum RequestError {
    #[error("the query is empty; send the user's question as text")]
    EmptyQuery,
    #[error("the query has {chars} characters, more than the {limit} allowed (opener.max_query_chars); shorten it")]
    QueryTooLong { chars: usize, limit: usize },
    #[error("the prompt is {tokens} tokens, more than the {limit} allowed ({setting}); shorten the query")]
    PromptTooLong { tokens: usize, limit: usize, setting: &'static str },
    #[error("invalid options: {0}")]
    InvalidOptions(String),
    #[error("all {capacity} queue places are taken; retry shortly or raise engine.queue_depth")]
    Busy { capacity: usize },
    #[error("the request was cancelled")]
    Cancelled,
    #[error("the engine is shutting down")]
    ShuttingDown,
    #[error("inference failed: {0}")]
    Inference(String),
    /// The cloud could not answer a request the device cannot answer in its place.
    #[error("{0}")]
    Upstream(String),
}

impl RequestError {
    /// A stable name for machines (MQTT error replies, metrics labels, logs).
    pub fn code(&self) -> &'static str {
        match self {
            Self::EmptyQuery => "empty_query",
            Self::QueryTooLong { .. } => "query_too_long",
            Self::PromptTooLong { .. } => "prompt_too_long",
            Self::InvalidOptions(_) => "invalid_options",
            Self::Busy { .. } => "busy",
            Self::Cancelled => "cancelled",
            Self::ShuttingDown => "shutting_down",
            Self::Inference(_) => "inference",
            Self::Upstream(_) => "upstream",
        }
    }
}
