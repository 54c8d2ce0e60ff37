//! The cloud side: the only module that speaks HTTP to the continuation model. Prompts for the
//! recovery modes in two layouts (and the probe that picks one), the streaming client (a
//! bounded stream of deltas), what the provider's text and headers may do, and the seam
//! between opener and continuation.

mod client;
mod config;
mod probe;
mod prompt;
mod provider;
mod seam;

pub use client::{BuildError, CloudClient, CloudError, CloudEvent, CloudSummary, Continuation, ContinuationRequest, Failure, ToolCall};
pub use config::{load_api_key, CloudConfig, CREDENTIAL_NAME};
pub use prompt::{messages, Layout, CORRECTION_MARKER};
pub use seam::{Repair, Seam, SeamOutput};
