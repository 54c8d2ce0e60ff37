//! mulm.json, the manifest of a model directory (written by `export/mulm-export`).

use std::path::Path;

use serde::Deserialize;

use super::error::LoadError;

pub const FORMAT: &str = "mulmd-model/1";
pub const FILE: &str = "mulm.json";

#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub name: String,
    pub architecture: Architecture,
    pub precision: String,
    pub context_length: usize,
    pub special_tokens: SpecialTokens,
    pub chat_template: String,
    #[serde(default)]
    pub source: serde_json::Value,
    #[serde(default)]
    pub files: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Architecture {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SpecialTokens {
    pub bos: Option<String>,
    pub eos: String,
    #[serde(default)]
    pub add_bos: bool,
    #[serde(default)]
    pub stop: Vec<String>,
}

impl Manifest {
    /// Reads and checks `dir/mulm.json`.
    pub fn read(dir: &Path) -> Result<Self, LoadError> {
        let path = dir.join(FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| LoadError::MissingFile {
            path: path.clone(),
            problem: format!("cannot be read ({e})"),
        })?;
        let m: Manifest = serde_json::from_str(&text)
            .map_err(|e| LoadError::BadManifest { path: path.clone(), problem: format!("is not a valid manifest: {e}") })?;
        let bad = |problem: String| Err(LoadError::BadManifest { path: path.clone(), problem });
        if m.format != FORMAT {
            return bad(format!("format is {:?}, this mulmd reads {FORMAT:?}; re-export the model", m.format));
        }
        let a = &m.architecture;
        if a.num_layers == 0 || a.num_kv_heads == 0 || a.head_dim == 0 || a.vocab_size == 0 {
            return bad("architecture sizes must be positive".into());
        }
        if a.num_heads % a.num_kv_heads != 0 {
            return bad(format!("num_heads {} is not a multiple of num_kv_heads {}", a.num_heads, a.num_kv_heads));
        }
        if m.context_length < 16 {
            return bad(format!("context_length {} is too small for a prompt", m.context_length));
        }
        Ok(m)
    }
}
