"""Reading the weights back out of an exported model.onnx, for the numpy reference.

verify runs the reference on what the file holds, not on what the exporter meant to write, so
a wiring or layout mistake in the graph cannot hide behind shared code.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .arch import Arch, weight_names
from .quant import ACCURACY_LEVEL, QUANTIZERS, dequantize_q4_1


def read(path, arch: Arch) -> dict:
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    weights = {}
    for name in weight_names(arch):
        if name in inits:
            weights[name] = numpy_helper.to_array(inits[name])
        elif name + ".T" in inits:
            weights[name] = numpy_helper.to_array(inits[name + ".T"]).T
        elif (w := _dequantized(inits, name)) is not None:
            weights[name] = w
        else:
            raise ValueError(f"{path}: no initializer holds {name}")
    if (head := _dequantized(inits, "head")) is not None:
        weights["__head__"] = head
    return {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}


def _dequantized(inits: dict, name: str) -> np.ndarray | None:
    """The float weight a quantized `name` (codes `name.q4` or `name.q8`, with `name.offsets`
    where it keeps Q4_1 blocks) stands for, if any."""
    for precision, (_, _, dequantize) in QUANTIZERS.items():
        if f"{name}.{precision}" in inits:
            codes, scales = (numpy_helper.to_array(inits[f"{name}.{s}"]) for s in (precision, "scales"))
            if (offsets := _offsets(inits, name)) is not None:
                return dequantize_q4_1(codes, scales, offsets)
            return dequantize(codes, scales)
    return None


def _offsets(inits: dict, name: str) -> np.ndarray | None:
    """A Q4_1 weight's block offsets [N, K/32] (stored transposed, for the product), if any."""
    return numpy_helper.to_array(inits[name + ".offsets"]).T if name + ".offsets" in inits else None


def int8_products(path) -> dict[str, np.ndarray | None]:
    """The weights (as `read` keys them) whose products quantize their input to int8 —
    MatMulNBits at accuracy_level 4, the contract in quant.py — each with its blocks' offsets
    [N, K/32] where it keeps Q4_1 blocks (their term meets the activation unquantized), else
    None."""
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    products = {}
    for node in model.graph.node:
        level = next((a.i for a in node.attribute if a.name == "accuracy_level"), 0)
        if node.op_type == "MatMulNBits" and level == ACCURACY_LEVEL:
            weight = node.input[1].removesuffix(".q4").removesuffix(".q8")
            products["__head__" if weight == "head" else weight] = _offsets(inits, weight)
    return products


def product_inputs(path) -> dict[str, str]:
    """For each int8 product (as `int8_products` keys them), the name of the value it reads."""
    model = onnx.load(str(path), load_external_data=False)
    inputs = {}
    for node in model.graph.node:
        level = next((a.i for a in node.attribute if a.name == "accuracy_level"), 0)
        if node.op_type == "MatMulNBits" and level == ACCURACY_LEVEL:
            weight = node.input[1].removesuffix(".q4").removesuffix(".q8")
            inputs["__head__" if weight == "head" else weight] = node.input[0]
    return inputs
