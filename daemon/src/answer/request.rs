//! One request as every front hands it to the answer service: who asked, through which
//! front, for what, and within which choices. Built by `Admission::admit`, which checks it.

use std::time::Instant;

use crate::config::RecoveryMode;
use crate::engine::{OpenerOptions, Prompt};

/// Which front end a request came through (a metrics label and a log field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Front {
    Grpc,
    Mqtt,
    Cli,
}

impl Front {
    pub fn name(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::Mqtt => "mqtt",
            Self::Cli => "cli",
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
    /// What the opener is written from (and the cloud continues).
    pub prompt: Prompt,
    pub opener: OpenerOptions,
    pub recovery: RecoveryMode,
    /// False keeps the whole answer on the device.
    pub use_cloud: bool,
}
