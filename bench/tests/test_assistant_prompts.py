"""bench/assistant_prompts.py's inputs and the instruction-set flags its peers are built with."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import assistant_prompts  # noqa: E402


def test_the_home_prompt_reaches_its_size_in_home_assistants_shape():
    words = lambda text: len(text.split())  # noqa: E731  (a stand-in tokenizer)
    for size in (200, 1000, 3000):
        text = assistant_prompts.home_prompt(size, words, "abc")
        assert size <= words(text) < size + 20, "the prompt stops within one device of its size"
        assert text.startswith("Session abc.") and "An overview of the areas and the devices" in text
        assert "- names: Kitchen Ceiling Light\n  domain: light\n  state: 'on'\n  areas: Kitchen\n" in text
    assert assistant_prompts.home_prompt(500, words, "x") != assistant_prompts.home_prompt(500, words, "y"), \
        "a new nonce makes a prompt no cache has seen"


def flags(level: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "scripts" / "llama-cpp-flags"), level], capture_output=True, text=True)


@pytest.mark.skipif(subprocess.run(["uname", "-m"], capture_output=True, text=True).stdout.strip() != "x86_64", reason="levels are x86-64 only")
def test_llama_cpp_is_built_for_the_level_mulmd_is_forced_to():
    cpu = open("/proc/cpuinfo").read()
    avx2 = flags("avx2")
    if " avx2 " not in cpu.split("flags", 1)[1].split("\n", 1)[0] + " ":
        assert avx2.returncode != 0 and "lacks avx2" in avx2.stderr
        return
    on = set(f for f in avx2.stdout.split() if f.endswith("=ON"))
    assert {"-DGGML_AVX2=ON", "-DGGML_FMA=ON"} <= on
    assert not any(f.startswith(("-DGGML_AVX512", "-DGGML_AVX_VNNI")) for f in on), avx2.stdout
    portable = flags("portable").stdout.split()
    assert "-DGGML_AVX2=OFF" in portable and "-DGGML_AVX=OFF" in portable
    assert "-DGGML_AMX_TILE=ON" not in flags("auto").stdout, "never AMX (it crashes in these VMs)"
    bad = flags("sse9")
    assert bad.returncode == 2 and "one of auto, portable, avx2" in bad.stderr
