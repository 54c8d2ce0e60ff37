//! `mulmd bench` end to end on the tiny model with short windows: the report's numbers follow
//! from what the meter showed, and its files are written.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

fn write_script(dir: &Path, body: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join("meter.sh");
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p.display().to_string()
}

fn bench(model: &Path, out: &Path, extra: &[&str], stdin: Option<&str>) -> serde_json::Value {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mulmd"));
    cmd.args(["bench", "--window", "2", "--warmup", "1", "--no-progress", "--models"])
        .arg(model)
        .arg("--out")
        .arg(out)
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    if let Some(text) = stdin {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    } else {
        drop(child.stdin.take());
    }
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "bench failed: {}", String::from_utf8_lossy(&output.stderr));
    let summary = String::from_utf8(output.stdout).unwrap();
    assert!(summary.contains("# mulmd bench"), "{summary}");
    for f in ["report.json", "summary.md", "plot.svg"] {
        assert!(out.join(f).is_file(), "{f} was not written");
    }
    let svg = std::fs::read_to_string(out.join("plot.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("polyline"));
    serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap()
}

#[test]
fn a_constant_power_meter_gives_idle_equal_to_window_power() {
    let Some(model) = common::fixture("tiny") else { return };
    let dir = tempfile::tempdir().unwrap();
    let meter = format!("command:{}", write_script(dir.path(), "echo 2.5"));
    let r = bench(&model, &dir.path().join("out"), &["--idle", "1", "--meter", &meter, "--meter-unit", "watts", "--meter-resolution", "0.01"], None);
    assert_eq!(r["schema"], "mulmd-bench-report/1");
    let m = &r["models"][0];
    let w = &m["workload"];
    assert!(w["runs_valid"].as_u64().unwrap() > 0);
    assert_eq!(w["runs_started"], w["runs_valid"]);
    let e = &m["energy"];
    let window_s = e["window_s"].as_f64().unwrap();
    // The meter always shows 2.5 W: idle and window power are 2.5 W and nothing is dynamic.
    // (The meter's integration clock and the sample timestamps differ by the command's run
    // time, hence a relative tolerance.)
    assert!((e["idle_power_w"].as_f64().unwrap() - 2.5).abs() < 2.5e-3, "{e}");
    assert!((e["window_j"].as_f64().unwrap() - 2.5 * window_s).abs() < 2.5e-3 * window_s, "{e}");
    assert!(e["dynamic_j"].as_f64().unwrap().abs() < 2.5e-3 * window_s, "{e}");
    assert!(e["idle_before"]["samples"].as_u64().unwrap() >= 1 && !e["idle_after"].is_null());
    let flags: Vec<&str> = m["flags"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
    assert!(flags.contains(&"below_resolution"), "zero dynamic energy is below any resolution: {flags:?}");
    assert_eq!(r["meter"]["scope"], "board_input");
    assert_eq!(r["meter"]["method"], "integrated");
}

#[test]
fn without_a_meter_the_report_says_so_and_skips_idle() {
    let Some(model) = common::fixture("tiny") else { return };
    let dir = tempfile::tempdir().unwrap();
    let r = bench(&model, &dir.path().join("out"), &["--idle", "30"], None);
    assert!(r["meter"].is_null());
    assert!(r["models"][0]["energy"].is_null());
    let t = &r["models"][0]["throughput"];
    assert!(t["end_to_end_tok_s"].as_f64().unwrap() > 0.0 && t["prompt_tok_s"].as_f64().unwrap() > 0.0);
    assert!(std::fs::read_to_string(dir.path().join("out/summary.md")).unwrap().contains("no meter"));
}

#[test]
fn manual_readings_are_differenced_exactly() {
    let Some(model) = common::fixture("tiny") else { return };
    let dir = tempfile::tempdir().unwrap();
    // Idle start, idle end (window start), window end, idle after: 100, 101, 105, 106 mWh.
    let typed = "100 mWh\n101 mWh\n105 mWh\n106 mWh\n";
    let r = bench(&model, &dir.path().join("out"), &["--idle", "1", "--meter", "manual", "--meter-resolution", "3.6"], Some(typed));
    let e = &r["models"][0]["energy"];
    assert!((e["window_j"].as_f64().unwrap() - 4.0 * 3.6).abs() < 1e-9, "{e}");
    assert!((e["idle_before"]["energy_j"].as_f64().unwrap() - 3.6).abs() < 1e-9, "{e}");
    assert!((e["idle_after"]["energy_j"].as_f64().unwrap() - 3.6).abs() < 1e-9, "{e}");
    assert!(e["idle_before"]["std_w"].is_null());
    assert_eq!(r["meter"]["method"], "manual");
}

#[test]
fn two_models_get_a_comparison_table() {
    let (Some(a), Some(b)) = (common::fixture("tiny"), common::fixture("tiny-q4")) else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let output = Command::new(env!("CARGO_BIN_EXE_mulmd"))
        .args(["bench", "--window", "1", "--warmup", "1", "--no-progress", "--models"])
        .arg(&a)
        .arg(&b)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let summary = String::from_utf8(output.stdout).unwrap();
    assert!(summary.contains("## Comparison") && summary.contains("End-to-end (tok/s)") && summary.contains("×"), "{summary}");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(r["models"].as_array().unwrap().len(), 2);
    assert_eq!(r["models"][1]["model"]["precision"], "q4");
}

#[test]
fn a_bad_meter_exits_with_the_config_code_and_a_reason() {
    let out = Command::new(env!("CARGO_BIN_EXE_mulmd")).args(["bench", "--meter", "thermometer"]).output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--meter"));
    let out = Command::new(env!("CARGO_BIN_EXE_mulmd"))
        .args(["bench", "--meter", "powercap", "--sysfs-root", "/nonexistent-root"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("RAPL"));
}

#[test]
fn auto_finds_rapl_in_a_fake_tree_and_says_plainly_when_nothing_is_there() {
    let Some(model) = common::fixture("tiny") else { return };
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty-root");
    std::fs::create_dir_all(&empty).unwrap();
    let r = bench(&model, &dir.path().join("a"), &["--idle", "0", "--sysfs-root", empty.to_str().unwrap()], None);
    assert!(r["meter"].is_null());
    assert!(r["meter_note"].as_str().unwrap().contains("no energy meter found"), "{}", r["meter_note"]);

    let rapl = dir.path().join("rapl-root/sys/class/powercap/intel-rapl:0");
    std::fs::create_dir_all(&rapl).unwrap();
    std::fs::write(rapl.join("name"), "package-0\n").unwrap();
    std::fs::write(rapl.join("energy_uj"), "1000\n").unwrap();
    let root = dir.path().join("rapl-root");
    let r = bench(&model, &dir.path().join("b"), &["--idle", "0", "--sysfs-root", root.to_str().unwrap()], None);
    assert_eq!(r["meter"]["backend"], "powercap");
    assert_eq!(r["meter"]["scope"], "cpu_package");
}
