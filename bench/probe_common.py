"""What the Python probes of compare_runtimes.py share: the options, the measurement `mulmd
probe` makes (template + tokenizer, prefill, greedy tokens with a timestamp each), and the
JSON they print. A runtime supplies only `reset()` and `step(ids) -> last logits`."""

import argparse
import json
import resource
import time
from pathlib import Path
from typing import Callable

import numpy as np


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="the model directory (template and tokenizer)")
    p.add_argument("--query", default="How do I remove odor from inside my shoes?")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    return p


def peak_rss_mb() -> float:
    """This process's own high-water mark (VmHWM). Not ru_maxrss: Linux carries that over
    from the parent across fork and exec, so a big parent would inflate every probe."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(a, runtime: str, precision: str, load_ms: float, reset: Callable[[], None],
            step: Callable[[list[int]], np.ndarray]) -> None:
    """One warm-up and `a.runs` timed generations; prints the probe JSON. Loading the
    tokenizer and template counts as loading, as it does in `mulmd probe`."""
    import jinja2
    from tokenizers import Tokenizer

    t = time.perf_counter()
    manifest = json.loads((Path(a.model) / "mulm.json").read_text())
    tok = Tokenizer.from_file(str(Path(a.model) / "tokenizer.json"))
    template = jinja2.Environment().from_string(manifest["chat_template"])
    load_ms += (time.perf_counter() - t) * 1e3

    def run():
        start = time.perf_counter()
        ms = lambda: (time.perf_counter() - start) * 1e3  # noqa: E731
        text = template.render(messages=[{"role": "user", "content": a.query}], add_generation_prompt=True)
        ids = tok.encode(text, add_special_tokens=False).ids
        tokenize_ms = ms()
        reset()
        t0 = time.perf_counter()
        token = int(np.argmax(step(ids)))
        prefill_ms = (time.perf_counter() - t0) * 1e3
        token_ms, tokens = [ms()], [token]
        while len(tokens) < a.tokens:
            token = int(np.argmax(step([token])))
            token_ms.append(ms())
            tokens.append(token)
        return {"prompt_tokens": len(ids), "tokenize_ms": tokenize_ms, "prefill_ms": prefill_ms,
                "token_ms": token_ms, "tokens": tokens}

    warmup = run()
    runs = [run() for _ in range(a.runs)]
    print(json.dumps({"runtime": runtime, "model": manifest["name"], "precision": precision, "threads": a.threads,
                      "load_ms": load_ms, "warmup": warmup, "runs": runs, "peak_rss_mb": peak_rss_mb()}))
