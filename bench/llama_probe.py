"""llama.cpp's side of compare_runtimes.py (llama-cpp-python from PyPI): the measurement
`mulmd probe` makes, on a GGUF of the same weights, printed as the same JSON. The prompt is
rendered with the model directory's chat template and tokenized with its tokenizer, so all
runtimes are fed the very same ids (export's `verify --llama-cpp` checks the tokenizers
agree). Run in a fresh process per configuration."""

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
    p.add_argument("--model", required=True, help="the model directory (template and tokenizer)")
    p.add_argument("--gguf", required=True)
    p.add_argument("--query", default="How do I remove odor from inside my shoes?")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()

    import jinja2
    from llama_cpp import Llama
    from tokenizers import Tokenizer

    from mulm_export.llamacpp import _last_logits

    manifest = json.loads((Path(a.model) / "mulm.json").read_text())
    t = time.perf_counter()
    llama = Llama(model_path=a.gguf, n_ctx=512, n_batch=512, n_threads=a.threads, n_threads_batch=a.threads, verbose=False)
    tok = Tokenizer.from_file(str(Path(a.model) / "tokenizer.json"))
    template = jinja2.Environment().from_string(manifest["chat_template"])
    load_ms = (time.perf_counter() - t) * 1e3

    def run():
        start = time.perf_counter()
        ms = lambda: (time.perf_counter() - start) * 1e3  # noqa: E731
        text = template.render(messages=[{"role": "user", "content": a.query}], add_generation_prompt=True)
        ids = tok.encode(text, add_special_tokens=False).ids
        tokenize_ms = ms()
        llama.reset()
        t0 = time.perf_counter()
        llama.eval(ids)
        prefill_ms = (time.perf_counter() - t0) * 1e3
        token = int(np.argmax(_last_logits(llama)))
        token_ms, tokens = [ms()], [token]
        while len(tokens) < a.tokens:
            llama.eval([token])
            token = int(np.argmax(_last_logits(llama)))
            token_ms.append(ms())
            tokens.append(token)
        return {"prompt_tokens": len(ids), "tokenize_ms": tokenize_ms, "prefill_ms": prefill_ms,
                "token_ms": token_ms, "tokens": tokens}

    warmup = run()
    runs = [run() for _ in range(a.runs)]
    print(json.dumps({"runtime": "llama.cpp", "model": manifest["name"], "precision": Path(a.gguf).name,
                      "threads": a.threads, "load_ms": load_ms, "warmup": warmup, "runs": runs,
                      "peak_rss_mb": peak_rss_mb()}))


if __name__ == "__main__":
    main()
