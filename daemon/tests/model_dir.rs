//! Loading model directories: the chat template as the reference renders it, and clear errors
//! (naming the file and the problem) for every way a directory can be wrong.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use mulmd::engine::{LoadError, Model};

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// A scratch copy of the tiny model to break.
fn broken_copy() -> Option<(tempfile::TempDir, PathBuf)> {
    let src = common::fixture("tiny")?;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    copy_dir(&src, &dir);
    Some((tmp, dir))
}

fn load_err(dir: &Path) -> (LoadError, String) {
    let e = Model::load(dir, 1).expect_err("a broken model directory must not load");
    let msg = e.to_string();
    (e, msg)
}

#[derive(serde::Deserialize)]
struct Rendering {
    system: Option<String>,
    query: String,
    rendered: String,
}

fn renders_as_jinja2_does(name: &str) {
    let (Some(model), Some(path)) = (common::load(name), common::fixture(&format!("{name}.template.json"))) else { return };
    let cases: Vec<Rendering> = serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap();
    assert!(!cases.is_empty());
    for c in cases {
        assert_eq!(model.render_prompt(c.system.as_deref(), &c.query).unwrap(), c.rendered, "{name}: query {:?}", c.query);
    }
}

#[test]
fn the_chat_template_renders_as_jinja2_does() {
    renders_as_jinja2_does("smollm2");
}

/// The Swen authors' template sets a variable and supplies a system prompt of its own.
#[test]
fn the_swen_chat_template_renders_as_jinja2_does() {
    renders_as_jinja2_does("swen-demo");
}

#[test]
fn a_missing_directory_is_named() {
    let (_, msg) = load_err(Path::new("/nonexistent/mulmd-model"));
    assert!(msg.contains("/nonexistent/mulmd-model") && msg.contains("not a directory"), "{msg}");
}

#[test]
fn a_missing_onnx_file_is_named() {
    let Some((_tmp, dir)) = broken_copy() else { return };
    fs::remove_file(dir.join("model.onnx")).unwrap();
    let (e, msg) = load_err(&dir);
    assert!(matches!(e, LoadError::MissingFile { .. }));
    assert!(msg.contains("model.onnx") && msg.contains("missing"), "{msg}");
}

#[test]
fn a_missing_tokenizer_is_named() {
    let Some((_tmp, dir)) = broken_copy() else { return };
    fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let (_, msg) = load_err(&dir);
    assert!(msg.contains("tokenizer.json") && msg.contains("missing"), "{msg}");
}

#[test]
fn a_missing_manifest_is_named() {
    let Some((_tmp, dir)) = broken_copy() else { return };
    fs::remove_file(dir.join("mulm.json")).unwrap();
    let (_, msg) = load_err(&dir);
    assert!(msg.contains("mulm.json"), "{msg}");
}

#[test]
fn a_corrupt_onnx_file_is_reported() {
    let Some((_tmp, dir)) = broken_copy() else { return };
    let bytes = fs::read(dir.join("model.onnx")).unwrap();
    fs::write(dir.join("model.onnx"), &bytes[..bytes.len() / 3]).unwrap();
    let (e, msg) = load_err(&dir);
    assert!(matches!(e, LoadError::BadOnnx { .. }), "{msg}");
    assert!(msg.contains("model.onnx") && msg.contains("re-export"), "{msg}");
}

#[test]
fn shapes_that_disagree_with_the_manifest_are_reported() {
    let Some((_tmp, dir)) = broken_copy() else { return };
    let path = dir.join("mulm.json");
    let mut m: serde_json::Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    m["architecture"]["num_kv_heads"] = 1.into();
    fs::write(&path, m.to_string()).unwrap();
    let (e, msg) = load_err(&dir);
    assert!(matches!(e, LoadError::ShapeMismatch { .. }), "{msg}");
    assert!(msg.contains("model.onnx") && msg.contains("KV-cache"), "{msg}");
}

#[test]
fn a_tokenizer_from_another_model_is_reported() {
    let (Some((_tmp, dir)), Some(smol)) = (broken_copy(), common::fixture("smollm2")) else { return };
    fs::copy(smol.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    let (e, msg) = load_err(&dir);
    assert!(matches!(e, LoadError::VocabularyMismatch { .. }), "{msg}");
    assert!(msg.contains("tokenizer.json") && msg.contains("49152") && msg.contains("12288"), "{msg}");
}

#[test]
fn a_manifest_that_is_not_json_is_reported() {
    let Some((_tmp, dir)) = broken_copy() else { return };
    fs::write(dir.join("mulm.json"), "{ not json").unwrap();
    let (e, msg) = load_err(&dir);
    assert!(matches!(e, LoadError::BadManifest { .. }), "{msg}");
    assert!(msg.contains("mulm.json"), "{msg}");
}
