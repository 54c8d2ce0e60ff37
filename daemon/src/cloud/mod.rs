//! The cloud side: the only module that speaks HTTP to the continuation model. Prompts for the
//! recovery modes, the streaming client, and the seam between opener and continuation.

mod client;
mod config;
mod prompt;
mod seam;

pub use client::{install_crypto, CloudClient, CloudError, CloudSummary, Failure};
pub use config::{load_api_key, load_secret, CloudConfig, Secret, CREDENTIAL_NAME};
pub use prompt::{messages, RecoveryMode, CORRECTION_MARKER};
pub use seam::{Seam, SeamOutput};
