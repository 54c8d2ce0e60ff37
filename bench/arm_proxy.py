"""A proxy for the board's speed without a board: mulmd and llama.cpp, both built for aarch64,
run under qemu-user emulating a Cortex-A76 (the RK3588's big core), with a plugin counting what
they execute. The figure per generated token is the difference between two runs of different
lengths divided by the tokens between them, so loading and the prompt pass cancel out.

    ~/.cache/mulmd/venv/bin/python bench/arm_proxy.py [--models mulm-28m-q4 smollm2-q4 ...]

Builds what it needs on first use: the plugin (bench/arm/qemu_counts.c, with gcc), mulmd for
aarch64 (`scripts/cross-build --release`), and llama.cpp's `llama-completion` for
ARMv8.2-A + dot product (`scripts/build-llama-cpp-arm`). Models and GGUFs are those of
bench/compare_runtimes.py, the same weights on both sides.

What it measures, and what it does not:
- Instructions, loads and stores executed per decode step, one thread, greedy, each runtime on
  the kernels it picks for the CPU qemu reports (mulmd: `dotprod`; llama.cpp: its dot-product
  kernels, with its Arm weight repacking where it has one).
- Not time. A board's time per token also depends on how many of those instructions retire per
  cycle, how wide their vectors are (both use 128-bit NEON here), and, for the larger models,
  on memory bandwidth, which an instruction count does not see. A runtime that executes fewer
  instructions per token is very likely faster on a core that is not waiting on memory, and
  the count shows where a kernel does needless work; only a board says by how much.
- Both runtimes also pay for the prompt, here cancelled out; `scripts/bench-speed` on a board
  measures time, prompt included.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import compare_runtimes  # noqa: E402  (the shared models and GGUFs)

QUERY = "How do I remove odor from inside my shoes?"  # `mulmd probe`'s own default
CPU = "cortex-a76"
MODELS = ["mulm-28m-q4", "mulm-28m-q8", "smollm2-q4", "mulm-28m-f32"]


def plugin(cache: Path) -> Path:
    """The counting plugin, built for this qemu (a host shared object) when its source changes."""
    source = ROOT / "bench" / "arm" / "qemu_counts.c"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    out = cache / f"qemu_counts-{digest}.so"
    if not out.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-Wall", "-o", str(out), str(source)], check=True)
    return out


def built(script: str, *args: str) -> Path:
    """The path a build script prints last."""
    out = subprocess.run([str(ROOT / "scripts" / script), *args], check=True, stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def counted(so: Path, argv: list[str]) -> tuple[dict[str, int], str]:
    """Runs `argv` under qemu with the plugin: its counts and its standard output and error."""
    with tempfile.TemporaryDirectory() as tmp:
        counts = Path(tmp) / "counts"
        cmd = ["qemu-aarch64", "-cpu", CPU, "-plugin", f"{so},out={counts}", *argv]
        run = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=3600)
        if run.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({run.returncode}):\n{run.stdout[-3000:]}")
        words = counts.read_text().split()
        return {words[i]: int(words[i + 1]) for i in range(0, len(words), 2)}, run.stdout


def mulmd_run(so: Path, exe: Path, model: Path, tokens: int) -> tuple[dict[str, int], dict]:
    counts, out = counted(so, [str(exe), "probe", "--model", str(model), "--tokens", str(tokens), "--runs", "0", "--threads", "1", "--query", QUERY])
    report = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    run = report["warmup"]
    if len(run["tokens"]) != tokens:
        raise SystemExit(f"mulmd wrote {len(run['tokens'])} tokens, asked for {tokens}")
    return counts, {"kernels": report["kernels"], "prompt_tokens": run["prompt_tokens"], "tokens": run["tokens"]}


def prompt_text(model: Path) -> str:
    """The question as the model's chat template renders it: the text mulmd feeds, handed to
    llama.cpp whole (it matches the template's special-token text as tokens, as mulmd does)."""
    import jinja2

    manifest = json.loads((model / "mulm.json").read_text())
    return jinja2.Environment().from_string(manifest["chat_template"]).render(messages=[{"role": "user", "content": QUERY}], add_generation_prompt=True)


def llama_run(so: Path, exe: Path, gguf: Path, prompt: str, tokens: int) -> tuple[dict[str, int], dict]:
    argv = [str(exe), "-m", str(gguf), "-t", "1", "-n", str(tokens), "--temp", "0", "--ignore-eos", "-no-cnv", "--no-warmup", "--no-display-prompt", "-c", "512", "-p", prompt]
    counts, out = counted(so, argv)
    # llama.cpp's closing timings: "eval time = ... / N runs" is the decode steps it ran.
    evals = re.search(r"\beval time =.*?/\s*(\d+) runs", out)
    prompt = re.search(r"prompt eval time =.*?/\s*(\d+) tokens", out)
    features = re.search(r"system_info:.*", out)
    if not evals:
        raise SystemExit(f"llama-completion printed no timings:\n{out[-3000:]}")
    return counts, {"decode_steps": int(evals.group(1)), "prompt_tokens": int(prompt.group(1)) if prompt else None, "features": features.group(0) if features else ""}


def per_token(a: dict[str, int], b: dict[str, int], steps: int) -> dict[str, float]:
    return {k: (b[k] - a[k]) / steps for k in a}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=MODELS, choices=list(compare_runtimes.MODELS))
    p.add_argument("--tokens", nargs=2, type=int, default=[8, 24], metavar=("SHORT", "LONG"), help="the two run lengths whose difference is measured (default 8 24)")
    args = p.parse_args()
    short, long = args.tokens
    if not 1 <= short < long:
        p.error("--tokens needs 1 <= SHORT < LONG")
    if not shutil.which("qemu-aarch64"):
        raise SystemExit("qemu-aarch64 is missing: run scripts/cross-build once (it installs qemu-user), or apt-get install qemu-user")
    cache = Path.home() / ".cache" / "mulmd"
    so = plugin(cache / "qemu-plugins")
    mulmd = built("cross-build", "--release")
    llama = built("build-llama-cpp-arm")
    bench_models = Path(compare_runtimes.os.environ.get("MULMD_BENCH_MODELS") or cache / "bench-models")
    dirs = compare_runtimes.prepare(bench_models, args.models)
    print(f"== qemu-aarch64 -cpu {CPU} on {compare_runtimes.cpu_name()}; 1 thread; per decode step, from runs of {short} and {long} tokens")
    print("| model | what | mulmd | llama.cpp | llama.cpp / mulmd |")
    print("|---|---|---|---|---|")
    for name in args.models:
        gguf = compare_runtimes.gguf_for(bench_models, name)
        m1, info = mulmd_run(so, mulmd, dirs[name], short)
        m2, _ = mulmd_run(so, mulmd, dirs[name], long)
        prompt = prompt_text(dirs[name])
        l1, linfo1 = llama_run(so, llama, gguf, prompt, short)
        l2, linfo2 = llama_run(so, llama, gguf, prompt, long)
        m = per_token(m1, m2, long - short)
        l = per_token(l1, l2, linfo2["decode_steps"] - linfo1["decode_steps"])
        for key, label in (("insns", "instructions"), ("loads", "loads"), ("stores", "stores")):
            print(f"| {name} | {label} (M) | {m[key] / 1e6:.2f} | {l[key] / 1e6:.2f} | {l[key] / m[key]:.2f}x |")
        print(
            f"<!-- {name}: mulmd kernels {info['kernels']}, prompt {info['prompt_tokens']} tokens (chat template); "
            f"llama.cpp prompt {linfo1['prompt_tokens']} tokens, decode steps {linfo1['decode_steps']} and {linfo2['decode_steps']}; "
            f"{linfo1['features']} -->",
            flush=True,
        )


if __name__ == "__main__":
    main()
