"""Reading the weights back out of an exported model.onnx, for the numpy reference.

verify runs the reference on what the file holds, not on what the exporter meant to write, so
a wiring or layout mistake in the graph cannot hide behind shared code.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .arch import Arch, weight_names
from .quant import ACCURACY_LEVEL, QUANTIZERS


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
    """The float weight a quantized `name` (codes `name.q4` or `name.q8`) stands for, if any."""
    for precision, (_, _, dequantize) in QUANTIZERS.items():
        if f"{name}.{precision}" in inits:
            return dequantize(numpy_helper.to_array(inits[f"{name}.{precision}"]), numpy_helper.to_array(inits[name + ".scales"]))
    return None


def int8_products(path) -> frozenset[str]:
    """Names of the weights (as `read` keys them) whose products quantize their input to int8:
    MatMulNBits at accuracy_level 4, the contract in quant.py."""
    model = onnx.load(str(path), load_external_data=False)
    names = set()
    for node in model.graph.node:
        level = next((a.i for a in node.attribute if a.name == "accuracy_level"), 0)
        if node.op_type == "MatMulNBits" and level == ACCURACY_LEVEL:
            weight = node.input[1].removesuffix(".q4").removesuffix(".q8")
            names.add("__head__" if weight == "head" else weight)
    return frozenset(names)
