//! Where mulmd looks for things by default.

use std::path::PathBuf;

/// The directory name the set-up exports SmolLM2-135M-Instruct into.
pub const DEFAULT_MODEL_NAME: &str = "smollm2-135m-instruct";

/// The default model directory: `$MULMD_MODEL_DIR`, else
/// `$XDG_CACHE_HOME/mulmd/models/smollm2-135m-instruct` (`~/.cache/...` without XDG), the
/// place `export/mulm-export default-model` writes to.
pub fn default_model_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MULMD_MODEL_DIR").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    cache.join("mulmd").join("models").join(DEFAULT_MODEL_NAME)
}
