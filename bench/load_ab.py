#!/usr/bin/env python3
"""mulmd builds' load time, each from its plan cache and from the model file, rounds interleaved.

A load-time change is measured here before it is set against the peers' loads
(bench/compare_runtimes.py): every build runs `mulmd probe` in a fresh process, once from a
plan cache of its own (a restart: MULMD_PLAN_CACHE, a temporary directory; a first round,
not timed, stores each plan) and, with `--file`, once with the cache off (every load reads
model.onnx: a first start). The order rotates every round. The table gives medians of load,
first token and decode, peak RSS, each load as a ratio to the first row's, and whether every
variant generated the same greedy tokens.

    bench/load_ab.py --build before=/tmp/mulmd-a --build after=target/release/mulmd --file \\
        --kernels avx2 --rounds 5 --models smollm2-f32 smollm2-q4 mulm-28m-q4
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from compare_runtimes import cpu_name, prepare
from prefill_ab import decode_rate, parse_builds

QUERY = "How do I remove odor from inside my shoes?"


def probe(binary: str, model: Path, kernels: str, plans: str) -> dict:
    env = dict(os.environ, MULMD_KERNELS=kernels, MULMD_PLAN_CACHE=plans)
    cmd = [binary, "probe", "--model", str(model), "--query", QUERY, "--tokens", "32", "--runs", "2"]
    return json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--build", action="append", required=True, help="NAME=PATH of a mulmd binary; the first is the base")
    p.add_argument("--file", action="store_true", help="also load every build with the plan cache off")
    p.add_argument("--models", nargs="+", default=["smollm2-f32", "smollm2-q4", "mulm-28m-q4"])
    p.add_argument("--kernels", default="auto", help="MULMD_KERNELS for every build: auto, portable, avx2, avx-vnni, avx512")
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    builds = parse_builds(p, a.build)
    dirs = prepare(Path(os.environ.get("MULMD_BENCH_MODELS", Path.home() / ".cache/mulmd/bench-models")), a.models)
    root = tempfile.mkdtemp(prefix="mulmd-load-ab-")
    try:
        # Each variant: (build, plan cache directory or "off").
        variants = {f"{b} cached": (path, os.path.join(root, b)) for b, path in builds.items()}
        if a.file:
            variants |= {f"{b} from file": (path, "off") for b, path in builds.items()}
        rows = []
        for name in a.models:
            runs: dict[str, list[dict]] = {v: [] for v in variants}
            for r in range(a.rounds + 1):
                order = list(variants)[r % len(variants):] + list(variants)[: r % len(variants)]
                for v in order:
                    out = probe(*variants[v][:1], dirs[name], a.kernels, variants[v][1])
                    if r > 0:  # round 0 stores the plans
                        runs[v].append(out)
            base = None
            for v in variants:
                loads = [o["load_ms"] for o in runs[v]]
                load = statistics.median(loads)
                base = base or load
                rows.append((name, v, load, base / load,
                             statistics.median(o["runs"][0]["token_ms"][0] for o in runs[v]),
                             statistics.median(decode_rate(x) for o in runs[v] for x in o["runs"]),
                             max(o["peak_rss_mb"] for o in runs[v]),
                             sorted({o["plan_cache"] for o in runs[v]})))
            tokens = {tuple(o["runs"][0]["tokens"]) for v in variants for o in runs[v]}
            rows.append((name, "same greedy tokens", "yes" if len(tokens) == 1 else "NO"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"== {cpu_name()}; MULMD_KERNELS={a.kernels}; {a.rounds} rounds, medians; "
          "load ratio: the first row's load over this one's (>1: faster)\n")
    print("| model | variant | load ms | load ratio | first token ms | decode tok/s | peak RSS MB | plan |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        if len(row) == 3:
            print(f"| {row[0]} | {row[1]}: {row[2]} | | | | | | |")
            continue
        name, v, load, ratio, ttft, dec, rss, plan = row
        print(f"| {name} | {v} | {load:.0f} | {ratio:.2f}x | {ttft:.1f} | {dec:.1f} | {rss:.0f} | {'/'.join(plan)} |")


if __name__ == "__main__":
    main()
