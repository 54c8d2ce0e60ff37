//! The `mulmd open` command as a user runs it.

mod common;

use std::process::Command;

fn mulmd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mulmd"))
}

#[test]
fn open_json_reports_the_opener_and_its_timings() {
    let Some(dir) = common::fixture("smollm2") else { return };
    let out = mulmd()
        .args(["open", "--json", "--model"])
        .arg(&dir)
        .arg("How do I remove odor from inside my shoes?")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json prints one JSON object");
    assert_eq!(v["opener"], "Removing odor from inside your shoes is a");
    assert_eq!(v["words"].as_array().unwrap().len(), 8);
    for key in ["ttft_ms", "opener_ms", "prefill_ms", "tokenize_ms", "total_ms"] {
        assert!(v[key].as_f64().is_some_and(|x| x >= 0.0), "{key} missing: {v}");
    }
    assert!(v["prompt_tokens"].as_u64().unwrap() > 10);
    assert!(v["generated_tokens"].as_u64().unwrap() >= 8);
}

#[test]
fn open_streams_words_then_prints_timings() {
    let Some(dir) = common::fixture("smollm2") else { return };
    let out = mulmd()
        .args(["open", "--max-words", "4", "--model"])
        .arg(&dir)
        .arg("How do I remove odor from inside my shoes?")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "Removing odor from inside\n");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("time to first token") && err.contains("prefill"), "{err}");
}

#[test]
fn a_missing_model_exits_with_the_config_code_and_a_reason() {
    let out = mulmd().args(["open", "--model", "/nonexistent/model", "hi"]).output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("/nonexistent/model"), "{err}");
}

#[test]
fn bad_options_are_refused_with_the_option_named() {
    let Some(dir) = common::fixture("tiny") else { return };
    let out = mulmd().args(["open", "--min-words", "9", "--max-words", "3", "--model"]).arg(&dir).arg("hi").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8(out.stderr).unwrap().contains("min_words"));
}

#[test]
fn the_printed_config_checks_clean_and_a_bad_one_lists_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let printed = mulmd().arg("print-config").output().unwrap();
    assert!(printed.status.success());
    let good = dir.path().join("good.toml");
    std::fs::write(&good, &printed.stdout).unwrap();
    let out = mulmd().arg("check-config").arg(&good).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[engine]\nworkers = 0\nqueue = 3\n[cloud]\nenabled = true\nbase_url = \"localhost\"\n").unwrap();
    let out = mulmd().arg("check-config").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(78), "config problems use the configuration exit code");
    let err = String::from_utf8(out.stderr).unwrap();
    for key in ["engine.workers", "engine.queue", "cloud.base_url"] {
        assert!(err.contains(key), "{key} not reported: {err}");
    }
}
