//! Values of the configuration that are more than a number or a string, parsed once when the
//! file is read (CPU affinity is `host::cpus::Affinity`).

use serde::{Deserialize, Serialize};

/// How the cloud model repairs an opener that went wrong (paper §3.2).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecoveryMode {
    /// Steer away from the error without flagging it (the paper's users preferred this).
    #[default]
    Natural,
    /// One short corrective sentence, then the answer.
    Explicit,
    /// Treat the slip as a light joke, then answer properly.
    Humor,
}

impl std::str::FromStr for RecoveryMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "natural" => Ok(Self::Natural),
            "explicit" => Ok(Self::Explicit),
            "humor" => Ok(Self::Humor),
            other => Err(format!("recovery mode {other:?} is not natural, explicit or humor")),
        }
    }
}

/// How the opener is put to the cloud model (see `cloud::Layout`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptLayout {
    /// Probe the endpoint once: prefill where it continues an assistant's message, else
    /// instruct. The answer is remembered for the daemon's life.
    #[default]
    Auto,
    /// The opener as the assistant's unfinished message (the server must support prefill).
    Prefill,
    /// The opener quoted in the instructions; works with any chat endpoint.
    Instruct,
}

/// Log lines as plain text (journald) or one JSON object per line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

/// Permission bits of a file mulmd creates, written in octal ("660").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct FileMode(pub u32);

impl TryFrom<String> for FileMode {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match u32::from_str_radix(&s, 8) {
            Ok(m) if m <= 0o777 && !s.is_empty() => Ok(Self(m)),
            _ => Err(format!("{s:?} is not octal permission bits like \"660\"")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_once_and_say_what_is_expected() {
        assert_eq!(FileMode::try_from("660".to_string()), Ok(FileMode(0o660)));
        for bad in ["", "999", "1000", "rw", "-1"] {
            assert!(FileMode::try_from(bad.to_string()).unwrap_err().contains("octal"), "{bad}");
        }
        assert_eq!("humor".parse::<RecoveryMode>().unwrap(), RecoveryMode::Humor);
        assert!("loud".parse::<RecoveryMode>().is_err());
    }
}
