//! Settings of the OpenAI-compatible endpoint, and the API key (from a file or a systemd
//! credential, never from the config file and never printed).

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The API key. Its Debug and Display never show it.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(redacted)")
    }
}

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
        }
    }
}

/// The credential name mulmd reads from `$CREDENTIALS_DIRECTORY` (systemd LoadCredential).
pub const CREDENTIAL_NAME: &str = "cloud_api_key";

/// The key from `file`, else from `$CREDENTIALS_DIRECTORY/cloud_api_key`, else none.
pub fn load_api_key(file: Option<&Path>) -> Result<Option<Secret>, String> {
    let key = load_secret(file, CREDENTIAL_NAME, "API key file")?;
    if key.as_ref().is_some_and(|k| k.0.contains(char::is_whitespace)) {
        let path = file.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from(CREDENTIAL_NAME));
        return Err(format!("API key file {} holds more than one word; it must contain only the key", path.display()));
    }
    Ok(key)
}

/// A secret from `file`, else from `$CREDENTIALS_DIRECTORY/<credential>` when that exists,
/// else none. The line ending is dropped. An empty named file is an error naming the file
/// (`what` says what it is for); an empty credential is "no secret", because the Debian
/// package installs empty placeholders so that the unit's `LoadCredential=` always finds
/// its source.
pub fn load_secret(file: Option<&Path>, credential: &str, what: &str) -> Result<Option<Secret>, String> {
    let (path, explicit) = match file {
        Some(f) => (f.to_path_buf(), true),
        None => match std::env::var_os("CREDENTIALS_DIRECTORY").map(|d| PathBuf::from(d).join(credential)).filter(|p| p.is_file()) {
            Some(p) => (p, false),
            None => return Ok(None),
        },
    };
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{what} {}: {e}", path.display()))?;
    let secret = text.trim_end_matches(['\n', '\r']).trim();
    match (secret.is_empty(), explicit) {
        (true, true) => Err(format!("{what} {} is empty; put the secret on its first line", path.display())),
        (true, false) => Ok(None),
        (false, _) => Ok(Some(Secret(secret.to_string()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_never_shows_in_debug_output() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("key");
        std::fs::write(&f, "sk-very-secret-123\n").unwrap();
        let key = load_api_key(Some(&f)).unwrap().unwrap();
        assert_eq!(key.expose(), "sk-very-secret-123");
        let mut cfg = CloudConfig::new("http://x/v1", "m");
        cfg.api_key = Some(key);
        assert!(!format!("{cfg:?}").contains("very-secret"));
        std::fs::write(&f, "  \n").unwrap();
        assert!(load_api_key(Some(&f)).unwrap_err().contains("empty"));
    }
}
