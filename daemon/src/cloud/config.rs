//! Settings of the OpenAI-compatible endpoint, and where its API key comes from (a file or a
//! systemd credential, never the config file, never printed).

use std::path::Path;
use std::time::Duration;

use crate::config::{CloudSection, PromptLayout};
use crate::host::secrets::{load_word, Secret, SecretError};

#[derive(Debug, Clone)]
pub struct CloudConfig {
    /// Up to and including the API version, e.g. `https://api.example.com/v1`.
    pub base_url: String,
    pub model: String,
    pub api_key: Option<Secret>,
    pub connect_timeout: Duration,
    /// From sending the request to the first continuation text.
    pub first_token_timeout: Duration,
    /// Longest silence between two chunks once text flows.
    pub idle_timeout: Duration,
    /// The whole continuation, retries included.
    pub total_timeout: Duration,
    /// Retries before the first continuation token (never after).
    pub max_retries: u32,
    pub extra_headers: Vec<(String, String)>,
    pub max_tokens: u32,
    pub temperature: Option<f32>,
    /// Ask for the usage chunk (`stream_options.include_usage`); some providers reject it.
    pub include_usage: bool,
    /// The most continuation text passed on, in bytes: the stream is dropped at the cap.
    pub max_output_bytes: usize,
    /// The most continuation chunks (about one token each) passed on.
    pub max_output_chunks: usize,
    /// How the opener is put to the model.
    pub prompt: PromptLayout,
}

impl CloudConfig {
    pub fn new(base_url: &str, model: &str) -> Self {
        Self {
            base_url: base_url.trim_end_matches('/').to_string(),
            model: model.to_string(),
            api_key: None,
            connect_timeout: Duration::from_secs(3),
            first_token_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(10),
            total_timeout: Duration::from_secs(60),
            max_retries: 2,
            extra_headers: Vec::new(),
            max_tokens: 400,
            temperature: None,
            include_usage: true,
            max_output_bytes: 16384,
            max_output_chunks: 1600,
            prompt: PromptLayout::Auto,
        }
    }

    /// The settings a `[cloud]` section describes (the key is loaded separately, see
    /// [`load_api_key`]).
    pub fn from_section(s: &CloudSection) -> Self {
        let ms = Duration::from_millis;
        Self {
            connect_timeout: ms(s.connect_timeout_ms),
            first_token_timeout: ms(s.first_token_timeout_ms),
            idle_timeout: ms(s.idle_timeout_ms),
            total_timeout: ms(s.total_timeout_ms),
            max_retries: s.max_retries,
            max_tokens: s.max_tokens,
            include_usage: s.include_usage,
            extra_headers: s.headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            max_output_bytes: s.max_output_bytes,
            max_output_chunks: s.max_output_chunks,
            prompt: s.prompt,
            ..Self::new(&s.base_url, &s.model)
        }
    }
}

/// The credential name mulmd reads from `$CREDENTIALS_DIRECTORY` (systemd LoadCredential).
pub const CREDENTIAL_NAME: &str = "cloud_api_key";

/// The key from `file`, else from `$CREDENTIALS_DIRECTORY/cloud_api_key`, else none.
pub fn load_api_key(file: Option<&Path>) -> Result<Option<Secret>, SecretError> {
    load_word(file, CREDENTIAL_NAME, "API key file")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_never_shows_in_debug_output() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("key");
        std::fs::write(&f, "sk-very-secret-123\n").unwrap();
        let mut cfg = CloudConfig::from_section(&crate::config::Config::default().cloud);
        cfg.api_key = load_api_key(Some(&f)).unwrap();
        assert_eq!(cfg.api_key.as_ref().unwrap().expose(), "sk-very-secret-123");
        assert!(!format!("{cfg:?}").contains("very-secret"));
        assert_eq!((cfg.max_output_bytes, cfg.max_output_chunks), (16384, 1600));
    }
}
