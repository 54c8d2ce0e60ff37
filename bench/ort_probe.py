"""onnxruntime's side of compare_runtimes.py: the same measurement `mulmd probe` makes, on the
same model.onnx, printed as the same JSON. Run in a fresh process per configuration."""

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))


def peak_rss_mb() -> float:
    """This process's own high-water mark (VmHWM). Not ru_maxrss: Linux carries that over
    from the parent across fork and exec, so a big parent would inflate every probe."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--query", default="How do I remove odor from inside my shoes?")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()

    import jinja2
    from tokenizers import Tokenizer

    from mulm_export.runner import OrtModel

    t = time.perf_counter()
    model = OrtModel(Path(a.model), threads=a.threads)
    tok = Tokenizer.from_file(str(Path(a.model) / "tokenizer.json"))
    template = jinja2.Environment().from_string(model.manifest["chat_template"])
    load_ms = (time.perf_counter() - t) * 1e3

    def run():
        start = time.perf_counter()
        ms = lambda: (time.perf_counter() - start) * 1e3  # noqa: E731
        text = template.render(messages=[{"role": "user", "content": a.query}], add_generation_prompt=True)
        ids = tok.encode(text, add_special_tokens=False).ids
        tokenize_ms = ms()
        model.reset()
        t0 = time.perf_counter()
        logits = model.step(ids)
        prefill_ms = (time.perf_counter() - t0) * 1e3
        token = int(np.argmax(logits))
        token_ms, tokens = [ms()], [token]
        while len(tokens) < a.tokens:
            token = int(np.argmax(model.step([token])))
            token_ms.append(ms())
            tokens.append(token)
        return {"prompt_tokens": len(ids), "tokenize_ms": tokenize_ms, "prefill_ms": prefill_ms,
                "token_ms": token_ms, "tokens": tokens}

    warmup = run()
    runs = [run() for _ in range(a.runs)]
    print(json.dumps({"runtime": "onnxruntime", "model": model.manifest["name"], "precision": model.manifest["precision"],
                      "threads": a.threads, "load_ms": load_ms, "warmup": warmup, "runs": runs,
                      "peak_rss_mb": peak_rss_mb()}))


if __name__ == "__main__":
    main()
