"""llama.cpp's side of compare_runtimes.py (llama-cpp-python from PyPI): the measurement
`mulmd probe` makes, on a GGUF of the same weights, printed as the same JSON. The prompt is
rendered with the model directory's chat template and tokenized with its tokenizer, so all
runtimes are fed the very same ids (export's `verify --llama-cpp` checks the tokenizers
agree). Run in a fresh process per configuration."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))

from probe_common import measure, parser  # noqa: E402


def main() -> None:
    p = parser()
    p.add_argument("--gguf", required=True)
    a = p.parse_args()
    from llama_cpp import Llama

    from mulm_export.llamacpp import _last_logits

    t = time.perf_counter()
    llama = Llama(model_path=a.gguf, n_ctx=512, n_batch=512, n_threads=a.threads, n_threads_batch=a.threads, verbose=False)
    load_ms = (time.perf_counter() - t) * 1e3

    def step(ids):
        llama.eval(ids)
        return _last_logits(llama)

    measure(a, "llama.cpp", Path(a.gguf).name, load_ms, llama.reset, step)


if __name__ == "__main__":
    main()
