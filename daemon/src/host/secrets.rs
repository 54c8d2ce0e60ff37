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

/// Bearer tokens that clients present, each under a name (so one can be revoked by deleting
/// its line). Debug output never shows a token.
pub struct Tokens {
    /// (name, SHA-256 of the token): comparing digests takes the same time whatever the
    /// token's length or where it differs.
    entries: Vec<(String, [u8; 32])>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.entries.iter().map(|(name, _)| name)).finish()
    }
}

/// Why a token file is refused; never quotes a token.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TokenError {
    #[error(transparent)]
    File(#[from] SecretError),
    #[error("{path} line {line}: {problem}; write one \"name token\" per line, the token at least 16 characters of letters, digits and -_.~+/=")]
    Line { path: PathBuf, line: usize, problem: &'static str },
    #[error("{path} holds no token; put one \"name token\" per line, or remove the file to ask for none")]
    NoToken { path: PathBuf },
}

const MIN_TOKEN: usize = 16;

impl Tokens {
    /// The tokens in `file`, else in `$CREDENTIALS_DIRECTORY/<credential>`, else None (no
    /// token is asked for). Lines are `name token`; `#` starts a comment line.
    pub fn load(file: Option<&Path>, credential: &str) -> Result<Option<Self>, TokenError> {
        let Some(text) = load_secret(file, credential, "token file")? else { return Ok(None) };
        let path = file.map(Path::to_path_buf).or_else(|| credential_path(credential)).unwrap_or_else(|| credential.into());
        let mut entries = Vec::new();
        for (i, line) in text.expose().lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |problem| TokenError::Line { path: path.clone(), line: i + 1, problem };
            let mut words = line.split_whitespace();
            let (Some(name), Some(token), None) = (words.next(), words.next(), words.next()) else {
                return Err(bad("not a name and a token"));
            };
            if token.len() < MIN_TOKEN || !token.chars().all(|c| c.is_ascii_alphanumeric() || "-_.~+/=".contains(c)) {
                return Err(bad("the token is too short or has characters a header cannot carry"));
            }
            entries.push((name.to_string(), digest(token)));
        }
        if entries.is_empty() {
            return Err(TokenError::NoToken { path });
        }
        Ok(Some(Self { entries }))
    }

    /// The name of the token `presented` is, if it is one. Every token is compared, each in
    /// constant time, so the time taken says nothing about how close a guess was.
    pub fn check(&self, presented: &str) -> Option<&str> {
        use subtle::ConstantTimeEq;
        let d = digest(presented);
        let mut found = None;
        for (name, known) in &self.entries {
            if bool::from(known.ct_eq(&d)) {
                found = Some(name.as_str());
            }
        }
        found
    }

    /// Checks an `authorization` header value: the token's name when it is `Bearer <one of
    /// ours>`, else why not, in words a client's user can act on (never which token was close).
    pub fn authorize(&self, header: Option<&str>) -> Result<&str, &'static str> {
        let presented = header.and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer "))).map(str::trim);
        match presented {
            Some(t) => self.check(t).ok_or("the bearer token is not one this server accepts; check the token configured in the client"),
            None => Err("this server asks for a bearer token: send `Authorization: Bearer <token>` (an API key setting in most clients)"),
        }
    }

    /// The names, for logs.
    pub fn names(&self) -> Vec<&str> {
        self.entries.iter().map(|(n, _)| n.as_str()).collect()
    }
}

fn digest(s: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The systemd credential name of the client token file (`auth.tokens_file` when empty).
pub const TOKENS_CREDENTIAL: &str = "tokens";

/// Where the packaged unit loads the `tokens` credential from (systemd/mulmd.service).
pub const PACKAGED_TOKENS: &str = "/etc/mulmd/credentials/tokens";

/// Whether systemd passes a credential called `name` that holds something (the package's
/// empty placeholders hold nothing). Outside the service (`mulmd check-config` run by hand or
/// by the deploy script), `packaged` is where the unit would load it from.
pub fn credential_given(name: &str, packaged: &Path) -> bool {
    let path = match std::env::var_os("CREDENTIALS_DIRECTORY") {
        Some(_) => credential_path(name),
        None => Some(packaged.to_path_buf()),
    };
    path.and_then(|p| std::fs::read_to_string(p).ok()).is_some_and(|t| !t.trim().is_empty())
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

    #[test]
    fn named_tokens_are_checked_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tokens");
        std::fs::write(&f, "# the companion apps\nphone  tok-phone-0123456789abcdef\nkitchen tok-kitchen-0123456789ab\n").unwrap();
        let t = Tokens::load(Some(&f), "none").unwrap().unwrap();
        assert_eq!(t.check("tok-phone-0123456789abcdef"), Some("phone"));
        assert_eq!(t.check("tok-phone-0123456789abcde"), None);
        assert_eq!(t.check(""), None);
        assert_eq!(t.names(), ["phone", "kitchen"]);
        assert!(!format!("{t:?}").contains("tok-"));
        std::fs::write(&f, "phone x7q\n").unwrap();
        let e = Tokens::load(Some(&f), "none").unwrap_err().to_string();
        assert!(e.contains("line 1") && !e.contains("x7q"), "a refusal never quotes the token: {e}");
        std::fs::write(&f, "# nothing\n").unwrap();
        assert!(matches!(Tokens::load(Some(&f), "none"), Err(TokenError::NoToken { .. })));
        assert_eq!(Tokens::load(None, "no-such-credential").unwrap().map(|t| t.names().len()), None);
    }
}
