"""report.json from a real `mulmd bench` run validates against bench/report.schema.json."""

import json
import os
import subprocess
from pathlib import Path

import jsonschema
import pytest

ROOT = Path(__file__).resolve().parents[2]


def mulmd() -> Path:
    exe = Path(os.environ.get("MULMD_BIN") or ROOT / "target/debug/mulmd")
    if not exe.exists():
        if os.environ.get("CI") in ("true", "1"):
            pytest.fail(f"{exe} is missing; scripts/test builds it before pytest")
        pytest.skip(f"{exe} is missing; run cargo build")
    return exe


def fixture(name: str) -> Path:
    p = Path(os.environ.get("MULMD_TEST_MODELS") or Path.home() / ".cache/mulmd/test-models") / name
    if not p.exists():
        if os.environ.get("CI") in ("true", "1"):
            pytest.fail(f"fixture {p} is missing")
        pytest.skip(f"fixture {p} is missing; run scripts/prepare-test-models")
    return p


@pytest.mark.parametrize("meter", [["--meter", "none"], ["--meter", "command:/bin/echo 1.5", "--meter-unit", "watts"]])
def test_report_matches_the_schema(tmp_path, meter):
    out = tmp_path / "out"
    subprocess.run([str(mulmd()), "bench", "--window", "1", "--idle", "0.5", "--warmup", "1", "--no-progress",
                    "--models", str(fixture("tiny")), str(fixture("tiny-q4")), "--out", str(out), *meter],
                   check=True, capture_output=True)
    schema = json.loads((ROOT / "bench/report.schema.json").read_text())
    report = json.loads((out / "report.json").read_text())
    jsonschema.validate(report, schema)
    assert len(report["models"]) == 2


def test_the_schema_rejects_a_report_missing_its_energy_fields():
    schema = json.loads((ROOT / "bench/report.schema.json").read_text())
    broken = {"schema": "mulmd-bench-report/1", "mulmd_version": "0", "started_unix_s": 0, "protocol": {},
              "machine": {}, "meter": None, "models": []}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
