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
    // The defaults name the default model directory: it must exist to check clean.
    let out = mulmd().arg("check-config").arg(&good).env("MULMD_MODEL_DIR", dir.path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = mulmd().arg("check-config").arg(&good).env("MULMD_MODEL_DIR", dir.path().join("no-model")).output().unwrap();
    assert_eq!(out.status.code(), Some(78), "a missing model directory is a problem");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("model.dir") && err.contains("mulm-export default-model"), "{err}");
    // A listener open to the network needs tokens; explicitly allowed without, it is said to be so.
    let no_credentials = dir.path().join("no-credentials");
    std::fs::create_dir(&no_credentials).unwrap();
    std::fs::write(&good, "[grpc]\nlisten = \"0.0.0.0:50051\"\n").unwrap();
    let out = mulmd().arg("check-config").arg(&good).env("MULMD_MODEL_DIR", dir.path()).env("CREDENTIALS_DIRECTORY", &no_credentials).output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("grpc.listen") && err.contains("auth.tokens_file"), "{err}");
    std::fs::write(&good, "[grpc]\nlisten = \"0.0.0.0:50051\"\n[auth]\nallow_unauthenticated_lan = true\n").unwrap();
    let out = mulmd().arg("check-config").arg(&good).env("MULMD_MODEL_DIR", dir.path()).env("CREDENTIALS_DIRECTORY", &no_credentials).output().unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("warning: grpc.listen") && err.contains("reachable from other machines"), "{err}");
    // The systemd credential counts as tokens (its contents are checked when the daemon loads it).
    std::fs::write(&good, "[grpc]\nlisten = \"0.0.0.0:50051\"\n").unwrap();
    std::fs::write(dir.path().join("tokens"), "phone tok-phone-0123456789abcdef\n").unwrap();
    let out = mulmd().arg("check-config").arg(&good).env("MULMD_MODEL_DIR", dir.path()).env("CREDENTIALS_DIRECTORY", dir.path()).output().unwrap();
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

/// `mulmd probe` is what bench/compare_runtimes.py reads: one timestamp per token, and with
/// `--reuse-head` the daemon's start from the prefilled template head, which must pick the
/// tokens a cold prompt picks.
#[test]
fn probe_reports_per_token_times_cold_and_from_the_prefilled_head() {
    let Some(dir) = common::fixture("smollm2") else { return };
    let run = |extra: &[&str]| -> serde_json::Value {
        let out = mulmd()
            .args(["probe", "--tokens", "8", "--runs", "1", "--model"])
            .arg(&dir)
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("probe prints one JSON object")
    };
    let (cold, warm) = (run(&[]), run(&["--reuse-head"]));
    for v in [&cold, &warm] {
        let r = &v["runs"][0];
        assert_eq!(r["token_ms"].as_array().unwrap().len(), 8);
        assert!(r["prefill_ms"].as_f64().unwrap() > 0.0);
        assert!(v["peak_rss_mb"].as_f64().unwrap() >= v["rss_mb"].as_f64().unwrap());
    }
    assert_eq!(cold["runs"][0]["reused_tokens"], 0);
    // SmolLM2's default system prompt and the user marker: 24 of the 40 prompt tokens.
    assert_eq!(warm["runs"][0]["reused_tokens"], 24);
    assert_eq!(warm["runs"][0]["prompt_tokens"], 40);
    assert_eq!(cold["runs"][0]["tokens"], warm["runs"][0]["tokens"]);
}

/// `--profile` accounts for each pass by op: one prompt pass, one per further token, with the
/// matrix products in both (what bench/RESULTS.md's limits are read from).
#[test]
fn probe_profile_times_every_pass_by_op() {
    let Some(dir) = common::fixture("tiny") else { return };
    let out = mulmd()
        .args(["probe", "--tokens", "6", "--runs", "1", "--profile", "--model"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let p = &v["runs"][0]["profile"];
    assert_eq!(p["prefill"]["passes"], 1);
    assert_eq!(p["decode"]["passes"], 5);
    // The tiny model is float32: its weight products, the rotary embedding and attention (its
    // two products and the softmax between them, fused) run on the engine's ops.
    for pass in ["prefill", "decode"] {
        for op in ["F32MatMul", "Rope", "Attention"] {
            let timed = &p[pass]["ops"][op];
            assert!(timed["ms"].as_f64().is_some_and(|ms| ms > 0.0) && timed["calls"].as_u64().is_some_and(|c| c > 0), "{pass}, {op}: {p}");
        }
        // Residual adds and SwiGLU's product on tract's vectorized kernels, not its generic
        // broadcasting loop (named plainly "Add" and "Mul"), which took a sixth of a prompt.
        assert!(p[pass]["ops"]["OptAddUnicast"]["calls"].as_u64().is_some_and(|c| c > 0), "{pass}: {p}");
        for generic in ["Add", "Mul"] {
            assert!(p[pass]["ops"][generic].is_null(), "{pass}: tract's generic {generic} ran: {p}");
        }
    }
    let table = String::from_utf8_lossy(&out.stderr);
    assert!(table.contains("F32MatMul") && table.contains("all ops"), "{table}");
}

/// `MULMD_KERNELS` forces a lower kernel level (how an AVX2 machine's path is measured on an
/// AVX-512 one): every level this CPU offers writes the tokens the best one writes, through
/// the float32, 8-bit and 4-bit kernels (Q4_1 blocks too), the probe reports the level, and a level this machine
/// cannot run stops the load naming the choices. (The tiny fixtures' top logits are 0.3 of
/// their scale apart, so a kernel's rounding cannot flip a token; a wrong kernel would.)
#[test]
fn every_kernel_level_this_cpu_offers_writes_the_same_tokens() {
    let levels: &[&str] = if cfg!(target_arch = "x86_64") { &["portable", "avx2", "avx-vnni", "avx512"] } else { &["portable", "neon", "dotprod"] };
    for name in ["tiny", "tiny-q8", "tiny-q4", "tiny-q4_1"] {
        let Some(dir) = common::fixture(name) else { return };
        let run = |level: &str| {
            mulmd().args(["probe", "--tokens", "8", "--runs", "1", "--model"]).arg(&dir).env("MULMD_KERNELS", level).output().unwrap()
        };
        let json = |out: &std::process::Output| -> serde_json::Value {
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            serde_json::from_slice(&out.stdout).unwrap()
        };
        let best = json(&run("auto"));
        let mut ran = Vec::new();
        for level in levels {
            let out = run(level);
            if !out.status.success() {
                let err = String::from_utf8_lossy(&out.stderr);
                assert!(err.contains("lacks the instructions") && err.contains("portable"), "{level}: {err}");
                continue;
            }
            let v = json(&out);
            assert_eq!(v["kernels"], *level);
            assert_eq!(v["runs"][0]["tokens"], best["runs"][0]["tokens"], "{name}: {level} wrote other tokens than {}", best["kernels"]);
            ran.push(*level);
        }
        assert!(ran.contains(&"portable") && ran.len() >= 2, "ran {ran:?}");
        assert!(ran.contains(&best["kernels"].as_str().unwrap()), "auto uses a level the switch offers");
        let out = run("sse9");
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("MULMD_KERNELS=sse9") && err.contains("portable"), "{err}");
    }
}

/// A second start reads the plan the first stored (`plan_cache` in the probe's JSON) and
/// writes the same tokens; a forced kernel level gets a plan of its own, since weights are
/// laid out for the kernels that read them.
#[test]
fn a_second_probe_reads_the_stored_plan_and_each_kernel_level_has_its_own() {
    let Some(dir) = common::fixture("tiny-q4") else { return };
    let plans = tempfile::tempdir().unwrap();
    let run = |level: &str| -> serde_json::Value {
        let out = mulmd()
            .args(["probe", "--tokens", "8", "--runs", "1", "--model"])
            .arg(&dir)
            .env("MULMD_PLAN_CACHE", plans.path())
            .env("MULMD_KERNELS", level)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let (first, second) = (run("auto"), run("auto"));
    assert_eq!((first["plan_cache"].as_str(), second["plan_cache"].as_str()), (Some("stored"), Some("hit")));
    assert_eq!(first["runs"][0]["tokens"], second["runs"][0]["tokens"]);
    let portable = run("portable");
    assert_eq!(portable["plan_cache"], "stored", "the portable kernels must not be given a plan laid out for another level");
    assert_eq!(portable["runs"][0]["tokens"], first["runs"][0]["tokens"]);
    assert_eq!(run("portable")["plan_cache"], "hit");
    let off = mulmd().args(["probe", "--tokens", "2", "--runs", "1", "--model"]).arg(&dir).env("MULMD_PLAN_CACHE", "off").output().unwrap();
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&off.stdout).unwrap()["plan_cache"], "off");
}
