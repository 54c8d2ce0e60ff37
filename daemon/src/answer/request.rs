//! One request as every front hands it to the answer service: who asked, through which
//! front, for what, and within which choices. Built by `Admission::admit`, which checks it.

use std::time::Instant;

use serde_json::{Map, Value};

use super::conversation::Conversation;
use crate::config::RecoveryMode;
use crate::engine::OpenerOptions;

/// Which front end a request came through (a metrics label and a log field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Front {
    Grpc,
    Mqtt,
    Cli,
    /// The Ollama-compatible HTTP front (`/api/*`).
    Ollama,
    /// The OpenAI-compatible HTTP front (`/v1/*`).
    OpenAi,
}

impl Front {
    pub fn name(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::Mqtt => "mqtt",
            Self::Cli => "cli",
            Self::Ollama => "ollama",
            Self::OpenAi => "openai",
        }
    }
}

/// A fresh request id for callers that did not bring one: 16 hex digits.
pub fn new_request_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

#[derive(Debug, Clone)]
pub struct AnswerRequest {
    /// Names the request in logs and replies (chosen by the client or [`new_request_id`]).
    pub id: String,
    pub front: Front,
    /// When the request reached mulmd; every timing is measured from here.
    pub arrived: Instant,
    /// What the opener is written from (and the cloud continues); its last message is the
    /// turn to answer.
    pub conversation: Conversation,
    /// How the device opens the answer. None: no opener, the cloud answers the conversation
    /// as it would without mulmd (a tool result to read, structured output, several choices).
    pub opener: Option<OpenerOptions>,
    pub recovery: RecoveryMode,
    /// False keeps the whole answer on the device.
    pub use_cloud: bool,
    /// Fields of the cloud request as the client sent them (`tools`, `tool_choice`,
    /// `response_format`, `temperature`…), passed through.
    pub cloud_params: Map<String, Value>,
    /// The daemon keeps this conversation's turns under this id and puts them before the
    /// request's own (for clients that cannot keep history).
    pub conversation_id: Option<String>,
}

impl AnswerRequest {
    /// One question, with the given opener options and everything else plain.
    pub fn question(id: impl Into<String>, front: Front, query: impl Into<String>, opener: OpenerOptions) -> Self {
        Self {
            id: id.into(),
            front,
            arrived: Instant::now(),
            conversation: Conversation::question(query),
            opener: Some(opener),
            recovery: RecoveryMode::default(),
            use_cloud: true,
            cloud_params: Map::new(),
            conversation_id: None,
        }
    }
}
