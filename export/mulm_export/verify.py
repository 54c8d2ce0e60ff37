"""`verify`: onnxruntime against the numpy reference (and, for GGUF sources, llama.cpp)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import onnx_weights
from .reference import Reference
from .runner import OrtModel, greedy

# A prompt's logits may differ from the float64 reference by float32 rounding, which grows
# with the logit scale; this bound is relative to the largest logit magnitude (min 1).
RELATIVE_TOLERANCE = 1e-3

VERIFY_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def prompt_ids(directory: Path, text: str) -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(directory) / "tokenizer.json"))
    return tok.encode(text, add_special_tokens=False).ids


def against_reference(directory: Path, steps: int) -> dict:
    """Feeds the same tokens to onnxruntime and the reference: a prompt, then `steps` greedy
    decode steps chosen by the reference. Returns the worst error and its bound."""
    ort_model = OrtModel(directory)
    onnx_path = Path(directory) / "model.onnx"
    ref = Reference(ort_model.arch, onnx_weights.read(onnx_path, ort_model.arch), onnx_weights.int8_products(onnx_path))
    ids = prompt_ids(directory, VERIFY_PROMPT)
    worst, worst_rel, scale = 0.0, 0.0, 0.0
    feed = ids
    agree = 0
    for i in range(steps + 1):
        got = ort_model.step(feed)
        want = ref.forward(feed)
        err = float(np.max(np.abs(got - want)))
        s = max(1.0, float(np.max(np.abs(want))))
        worst, scale = max(worst, err), max(scale, s)
        worst_rel = max(worst_rel, err / s)
        agree += int(np.argmax(got) == np.argmax(want))
        feed = [int(np.argmax(want))]
    return {"prompt_tokens": len(ids), "steps": steps + 1, "max_abs_error": worst, "logit_scale": scale,
            "max_relative_error": worst_rel, "bound": RELATIVE_TOLERANCE, "argmax_agreement": agree,
            "ok": worst_rel <= RELATIVE_TOLERANCE}


def against_baseline(directory: Path, baseline: Path, steps: int) -> dict:
    """The logit error a precision costs: this model against a float32 export of the same
    weights, both in onnxruntime, fed the baseline's greedy tokens."""
    a, b = OrtModel(directory), OrtModel(baseline)
    ids = prompt_ids(baseline, VERIFY_PROMPT)
    base_tokens, base_logits = greedy(b.step, ids, steps)
    feed, errs, agree = ids, [], 0
    for tok, want in zip(base_tokens, base_logits):
        got = a.step(feed)
        errs.append(float(np.max(np.abs(got - want))))
        agree += int(np.argmax(got) == tok)
        feed = [tok]
    return {"steps": len(errs), "max_abs_error": max(errs), "mean_max_abs_error": float(np.mean(errs)),
            "argmax_agreement": agree}
