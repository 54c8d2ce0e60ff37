#!/usr/bin/env python3
"""Two or more mulmd builds on the same long prompt, rounds interleaved: prefill and decode.

An engine change that moves prefill by 10-50% is measured here before it is set against the
peers (bench/assistant_prompts.py, bench/compare_runtimes.py): each build runs `mulmd probe`
in a fresh process on a Home-Assistant-shaped prompt (bench/assistant_prompts.py's), the
builds' order alternating between rounds; the table gives medians, each build's prefill and
decode speed as ratios to the first build's, and whether every build generated the same
greedy tokens. Decode runs at the prompt's length, so `--generate 64` measures a decode step
against a long cache.

    bench/prefill_ab.py --build before=/tmp/mulmd-a --build after=target/release/mulmd \\
        --kernels avx2 --tokens 1000 --rounds 3 --models smollm2-q4 mulm-28m-q4
"""

import argparse
import json
import os
import statistics
import subprocess
from pathlib import Path

from assistant_prompts import home_prompt
from compare_runtimes import cpu_name, prepare


def probe(binary: str, model: Path, query: str, kernels: str, tokens: int, threads: int = 1) -> dict:
    env = dict(os.environ, MULMD_KERNELS=kernels)
    cmd = [binary, "probe", "--model", str(model), "--query", query, "--tokens", str(tokens), "--runs", "1",
           "--threads", str(threads)]
    return json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)["runs"][0]


def decode_rate(run: dict) -> float:
    t = run["token_ms"]
    return (len(t) - 1) / ((t[-1] - t[0]) / 1000)


def parse_builds(parser: argparse.ArgumentParser, values: list[str]) -> dict[str, str]:
    """`--build NAME=PATH` values as {name: path}, in order; a value without `=` is a usage error."""
    if bad := [b for b in values if "=" not in b]:
        parser.error(f"--build takes NAME=PATH, e.g. --build after=target/release/mulmd; got {bad[0]!r}")
    return dict(b.split("=", 1) for b in values)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--build", action="append", required=True, help="NAME=PATH of a mulmd binary; the first is the base")
    p.add_argument("--models", nargs="+", default=["smollm2-f32", "smollm2-q4", "mulm-28m-q4"])
    p.add_argument("--kernels", default="auto", help="MULMD_KERNELS for every build: auto, portable, avx2, avx-vnni, avx512")
    p.add_argument("--tokens", type=int, default=1000, help="prompt size, about (counted by the model's tokenizer)")
    p.add_argument("--generate", type=int, default=8, help="tokens generated after the prompt")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="mulmd's --threads for every build")
    a = p.parse_args()
    builds = parse_builds(p, a.build)
    cache = Path(os.environ.get("MULMD_BENCH_MODELS", Path.home() / ".cache/mulmd/bench-models"))
    dirs = prepare(cache, a.models)
    from tokenizers import Tokenizer

    rows = []
    for name in a.models:
        tokenizer = Tokenizer.from_file(str(dirs[name] / "tokenizer.json"))
        query = home_prompt(a.tokens, lambda text: len(tokenizer.encode(text).ids), "prefill-ab")
        runs: dict[str, list[dict]] = {b: [] for b in builds}
        for r in range(a.rounds):
            for b in (list(builds) if r % 2 == 0 else list(reversed(builds))):
                runs[b].append(probe(builds[b], dirs[name], query, a.kernels, a.generate, a.threads))
        base = statistics.median(x["prefill_ms"] for x in runs[next(iter(builds))])
        base_decode = statistics.median(map(decode_rate, runs[next(iter(builds))]))
        tokens = {b: {tuple(x["tokens"]) for x in runs[b]} for b in builds}
        for b, rs in runs.items():
            prefill = statistics.median(x["prefill_ms"] for x in rs)
            decode = statistics.median(map(decode_rate, rs))
            rows.append((name, rs[0]["prompt_tokens"], b, prefill, base / prefill, decode, decode / base_decode,
                         tokens[b] == tokens[next(iter(builds))]))
    print(f"\n{cpu_name()}, {os.cpu_count()} cores; MULMD_KERNELS={a.kernels}, {a.threads} thread{'s' if a.threads > 1 else ''}, {a.rounds} rounds, medians")
    print("| model | prompt tokens | build | prefill ms | base / build | decode tok/s | build / base | tokens as the base's |")
    print("|---|---|---|---|---|---|---|---|")
    for name, n, b, prefill, ratio, decode, decode_ratio, same in rows:
        print(f"| {name} | {n} | {b} | {prefill:.0f} | {ratio:.2f}× | {decode:.1f} | {decode_ratio:.2f}× | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
