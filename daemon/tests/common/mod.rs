//! Shared by the integration tests: where the model fixtures are, and the no-silent-skip rule.

#![allow(dead_code)]

pub mod broker;
pub mod fake_cloud;

use std::path::PathBuf;
use std::sync::Arc;

use mulmd::engine::Model;

/// `$MULMD_TEST_MODELS`, else ~/.cache/mulmd/test-models (made by scripts/prepare-test-models).
pub fn fixtures() -> PathBuf {
    std::env::var_os("MULMD_TEST_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/mulmd/test-models"))
}

/// The fixture at `name`, or None when it is absent outside CI. Under `CI=true` a missing
/// fixture fails the test: CI must never pass by skipping.
pub fn fixture(name: &str) -> Option<PathBuf> {
    let p = fixtures().join(name);
    if p.exists() {
        return Some(p);
    }
    if std::env::var("CI").map(|v| v == "true" || v == "1").unwrap_or(false) {
        panic!("fixture {} is missing; CI must run scripts/prepare-test-models first", p.display());
    }
    eprintln!("SKIPPED: fixture {} is missing; run scripts/prepare-test-models", p.display());
    None
}

pub fn load(name: &str) -> Option<Arc<Model>> {
    let dir = fixture(name)?;
    Some(Arc::new(Model::load(&dir, 1).unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()))))
}

/// onnxruntime's output for one prompt: the ids fed at each step and the logits that came back.
#[derive(serde::Deserialize)]
pub struct Reference {
    pub prompt_ids: Vec<u32>,
    pub greedy_tokens: Vec<u32>,
    pub steps: Vec<RefStep>,
}

#[derive(serde::Deserialize)]
pub struct RefStep {
    pub fed: Vec<u32>,
    pub logits: Vec<f32>,
}

pub fn reference(name: &str) -> Option<Reference> {
    let p = fixture(&format!("{name}.logits.json"))?;
    Some(serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap())
}
