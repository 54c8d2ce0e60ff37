//! Secrets (the cloud API key, the MQTT password, client tokens): read from a file or a
//! systemd credential, never from the configuration file, never printed.

use std::path::{Path, PathBuf};

/// A secret value. Its Debug output never shows it; read it with [`Secret::expose`] only
/// where it is sent.
#[derive(Clone, PartialEq, Eq)]
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

/// Why a secret could not be read; each names the file and the fix.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SecretError {
    #[error("{what} {path}: {reason}")]
    Unreadable { what: String, path: PathBuf, reason: String },
    #[error("{what} {path} is empty; put the secret on its first line")]
    Empty { what: String, path: PathBuf },
    #[error("{what} {path} holds more than one word; it must contain only the secret")]
    NotOneWord { what: String, path: PathBuf },
}

/// A secret from `file`, else from `$CREDENTIALS_DIRECTORY/<credential>` when that exists,
/// else none. Surrounding whitespace is dropped. An empty named file is an error naming the
/// file (`what` says what it is for); an empty credential is "no secret", because the Debian
/// package installs empty placeholders so that the unit's `LoadCredential=` always finds its
/// source.
pub fn load_secret(file: Option<&Path>, credential: &str, what: &str) -> Result<Option<Secret>, SecretError> {
    let (path, explicit) = match file {
        Some(f) => (f.to_path_buf(), true),
        None => match credential_path(credential) {
            Some(p) => (p, false),
            None => return Ok(None),
        },
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| SecretError::Unreadable { what: what.into(), path: path.clone(), reason: e.to_string() })?;
    let secret = text.trim();
    match (secret.is_empty(), explicit) {
        (true, true) => Err(SecretError::Empty { what: what.into(), path }),
        (true, false) => Ok(None),
        (false, _) => Ok(Some(Secret(secret.to_string()))),
    }
}

/// Like [`load_secret`], for secrets that are one word (keys, passwords, tokens).
pub fn load_word(file: Option<&Path>, credential: &str, what: &str) -> Result<Option<Secret>, SecretError> {
    let secret = load_secret(file, credential, what)?;
    if secret.as_ref().is_some_and(|s| s.0.contains(char::is_whitespace)) {
        let path = file.map(Path::to_path_buf).or_else(|| credential_path(credential)).unwrap_or_else(|| credential.into());
        return Err(SecretError::NotOneWord { what: what.into(), path });
    }
    Ok(secret)
}

/// `$CREDENTIALS_DIRECTORY/<name>` when systemd put a credential of that name there.
fn credential_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("CREDENTIALS_DIRECTORY").map(|d| PathBuf::from(d).join(name)).filter(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_file_is_read_trimmed_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("key");
        std::fs::write(&f, "sk-very-secret-123\n").unwrap();
        let key = load_word(Some(&f), "none", "API key file").unwrap().unwrap();
        assert_eq!(key.expose(), "sk-very-secret-123");
        assert!(!format!("{key:?}").contains("very-secret"));
        std::fs::write(&f, "  \n").unwrap();
        assert!(matches!(load_word(Some(&f), "none", "API key file"), Err(SecretError::Empty { .. })));
        std::fs::write(&f, "two words\n").unwrap();
        let e = load_word(Some(&f), "none", "API key file").unwrap_err();
        assert!(e.to_string().contains("only the secret") && !e.to_string().contains("two words"), "{e}");
        let e = load_word(Some(&dir.path().join("missing")), "none", "API key file").unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }
}
