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


# A deep quantized model can be ill-conditioned: the activations' int8 scales and the block
# sums of Q4_1 weights let a float32 rounding early on grow over the layers (SmolLM2 q4: one
# ulp of noise on the embedding moves the float64 reference's logits by ~3% of their scale).
# Then onnxruntime's float32 arithmetic cannot match the reference to 1e-3 either, and the
# bound is widened to this many times what such noise moves the reference itself.
SENSITIVITY_FACTOR = 4
PERTURBATION = 2.0**-23  # one float32 ulp, relative


def against_reference(directory: Path, steps: int) -> dict:
    """Feeds the same tokens to onnxruntime and the reference: a prompt, then `steps` greedy
    decode steps chosen by the reference. Returns the worst error and its bound."""
    onnx_path = Path(directory) / "model.onnx"
    # An int8 product's codes on a rounding edge are rounded as onnxruntime rounded its input
    # (quant.int8_activation): over tens of layers, one value a float32 ulp from the edge
    # falling the other way grows into logit differences of several percent.
    product_inputs = onnx_weights.product_inputs(onnx_path)
    ort_model = OrtModel(directory, taps=tuple(sorted(set(product_inputs.values()))))
    weights = onnx_weights.read(onnx_path, ort_model.arch)
    products = onnx_weights.int8_products(onnx_path)
    ref = Reference(ort_model.arch, weights, products)
    ids = prompt_ids(directory, VERIFY_PROMPT)
    worst, worst_rel, scale = 0.0, 0.0, 0.0
    feed = ids
    agree = 0
    fed, wants = [], []
    for i in range(steps + 1):
        got = ort_model.step(feed)
        edges = {w: ort_model.tapped[v] for w, v in product_inputs.items()}
        want = ref.forward(feed, edges)
        fed.append((feed, edges))
        wants.append(want)
        err = float(np.max(np.abs(got - want)))
        s = max(1.0, float(np.max(np.abs(want))))
        worst, scale = max(worst, err), max(scale, s)
        worst_rel = max(worst_rel, err / s)
        agree += int(np.argmax(got) == np.argmax(want))
        feed = [int(np.argmax(want))]
    report = {"prompt_tokens": len(ids), "steps": steps + 1, "max_abs_error": worst, "logit_scale": scale,
              "max_relative_error": worst_rel, "bound": RELATIVE_TOLERANCE, "argmax_agreement": agree}
    if products and worst_rel > RELATIVE_TOLERANCE:
        report["sensitivity"] = _sensitivity(ort_model.arch, weights, products, fed, wants)
        report["bound"] = max(RELATIVE_TOLERANCE, SENSITIVITY_FACTOR * report["sensitivity"] / scale)
    report["ok"] = worst_rel <= report["bound"]
    return report


def _sensitivity(arch, weights: dict, products: dict, fed: list, wants: list) -> float:
    """How far the reference's own logits move when its embedding table carries one float32
    ulp of noise (the largest of two draws), fed the same tokens with the same rounding sides."""
    moved = 0.0
    for seed in (1, 2):
        table = weights["model.embed_tokens.weight"]
        noise = np.random.default_rng(seed).standard_normal(table.shape)
        ref = Reference(arch, {**weights, "model.embed_tokens.weight": table * (1 + PERTURBATION * noise)}, products)
        for (feed, edges), want in zip(fed, wants):
            moved = max(moved, float(np.max(np.abs(ref.forward(feed, edges) - want))))
    return moved


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
