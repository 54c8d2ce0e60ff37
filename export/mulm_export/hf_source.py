"""Reading a Llama-family model in the layouts people publish it in.

* **Hugging Face folder**: `config.json`, `model*.safetensors` (or a `.pth`/`.bin` state dict),
  `tokenizer.json` and `tokenizer_config.json`. This covers the model-hub release of the paper
  authors' Swen-28M (`model_type: "swen"`, remote-code `auto_map`).
* **Training checkpoint**: a `.pth` whose `model` entry is the state dict, with no config at all,
  and the tokenizer in a folder of its own. This is the authors' demo repository
  (`models/swen_28m.pth`, `models/tokenizer/`); pass its root, its `models/` folder, or the
  checkpoint and tokenizer separately.

What a config leaves out (or sets to null) is inferred from the tensors' shapes, then from the
defaults of the config class its `model_type` names: the authors' `SwenConfig` (heads 8, KV
heads 2, θ 1e6, intermediate size by the 8/3 rule rounded up to 64, tied head) or Transformers'
`LlamaConfig`. As in Transformers, an absent `tie_word_embeddings` means tied.

PyTorch checkpoints are read by [`torch_checkpoint`]: no torch, and no code from the file runs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .arch import Arch, check_weights, weight_names
from . import torch_checkpoint

# The defaults of each config class, for the entries a config.json or a bare checkpoint lacks.
# Swen: the authors' SwenConfig and their demo's settings; llama: transformers' LlamaConfig.
_DEFAULTS = {
    "swen": {"num_attention_heads": 8, "num_key_value_heads": 2, "rope_theta": 1e6, "rms_norm_eps": 1e-5,
             "max_position_embeddings": 32768, "tie_word_embeddings": True},
    "llama": {"num_attention_heads": 32, "num_key_value_heads": None, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
              "max_position_embeddings": 2048, "tie_word_embeddings": True},
}
# The exported graph holds a RoPE table per position; beyond this a long-context config would
# make the table, not the weights, the bulk of a small model's file. --context-length overrides.
DEFAULT_MAX_CONTEXT = 8192
_CHECKPOINT_GLOBS = ("*.safetensors", "*.pth", "*.pt", "pytorch_model*.bin")
_IGNORED = re.compile(r"(^|\.)(rotary_emb\.inv_freq|freqs_cos|freqs_sin)$")


class SourceError(ValueError):
    pass


@dataclass
class Layout:
    """Where a model's parts are: the weight files, an optional config.json, the tokenizer folder."""
    weights: list[Path]
    config: Path | None
    tokenizer: Path

    @property
    def kind(self) -> str:
        return "checkpoint" if self.config is None else "hf"


def locate(directory: Path | None, checkpoint: Path | None = None, tokenizer: Path | None = None) -> Layout:
    """Finds the parts from what the user passed: a folder (a Hugging Face folder, the demo
    repository's root or its `models/` folder), or a checkpoint file and a tokenizer folder."""
    if checkpoint is not None:
        if not checkpoint.is_file():
            raise SourceError(f"{checkpoint} does not exist")
        base = checkpoint.parent
        config = base / "config.json"
        tok = tokenizer or _tokenizer_dir(base)
        if tok is None:
            raise SourceError(f"no tokenizer.json beside {checkpoint} or in {base / 'tokenizer'}; pass --tokenizer DIR")
        return Layout([checkpoint], config if config.is_file() else None, _check_tokenizer(tok))
    if directory is None:
        raise SourceError("name a model folder, or --checkpoint FILE (with --tokenizer DIR)")
    if not directory.is_dir():
        raise SourceError(f"{directory} is not a folder")
    for base in (directory, directory / "models"):
        files = _weight_files(base)
        if files:
            config = base / "config.json"
            tok = tokenizer or _tokenizer_dir(base)
            if tok is None:
                raise SourceError(f"{base} holds weights but no tokenizer.json (looked in {base} and "
                                  f"{base / 'tokenizer'}); pass --tokenizer DIR")
            return Layout(files, config if config.is_file() else None, _check_tokenizer(tok))
    raise SourceError(f"{directory} holds no weights: looked for {', '.join(_CHECKPOINT_GLOBS)} "
                      f"in it and in {directory / 'models'}")


def _weight_files(base: Path) -> list[Path]:
    for pattern in _CHECKPOINT_GLOBS:
        files = sorted(base.glob(pattern))
        if files:
            if pattern != "*.safetensors" and len(files) > 1:
                raise SourceError(f"{base} holds several checkpoints ({', '.join(f.name for f in files)}); "
                                  "choose one with --checkpoint FILE")
            return files
    return []


def _tokenizer_dir(base: Path) -> Path | None:
    for d in (base, base / "tokenizer"):
        if (d / "tokenizer.json").is_file():
            return d
    return None


def _check_tokenizer(d: Path) -> Path:
    if not (d / "tokenizer.json").is_file():
        raise SourceError(f"{d / 'tokenizer.json'} is missing; the model needs the tokenizer it was trained with")
    return d


def read(layout: Layout, context_length: int | None = None) -> tuple[Arch, dict, dict, dict]:
    """(arch, float32 weights by HF Llama name, tokenizer files, facts for the manifest)."""
    cfg = json.loads(layout.config.read_text()) if layout.config else {}
    if not isinstance(cfg, dict):
        raise SourceError(f"{layout.config} is not a JSON object")
    model_type = cfg.get("model_type") or ("swen" if layout.config is None else "llama")
    if model_type not in _DEFAULTS:
        raise SourceError(f"{layout.config}: model_type {model_type!r} is not a Llama-family decoder "
                          f"this exporter knows ({', '.join(_DEFAULTS)})")
    if cfg.get("rope_scaling") or cfg.get("inference_rope_scaling"):
        raise SourceError(f"{layout.config}: rope scaling is not supported; export with it switched off")
    weights = _read_weights(layout.weights)
    arch = infer_arch(cfg, model_type, weights, context_length, source=str(layout.config or layout.weights[0]))
    if arch.tied_embeddings:
        head = weights.pop("lm_head.weight", None)
        if head is not None and not np.array_equal(head, weights.get("model.embed_tokens.weight")):
            raise SourceError("the config ties the output head to the embedding, but lm_head.weight differs from "
                              "model.embed_tokens.weight; set tie_word_embeddings to false in config.json to keep both")
    check_weights(arch, weights)
    extra = sorted(set(weights) - set(weight_names(arch)))
    if extra:
        raise SourceError(f"{layout.weights[0]}: tensors this architecture does not have: {', '.join(extra[:5])}")
    tok_cfg_path = layout.tokenizer / "tokenizer_config.json"
    tok = {"tokenizer": json.loads((layout.tokenizer / "tokenizer.json").read_text(encoding="utf-8")),
           "config": json.loads(tok_cfg_path.read_text(encoding="utf-8")) if tok_cfg_path.is_file() else {}}
    facts = {"name": _name(cfg, model_type, layout, arch), "model_type": model_type}
    return arch, weights, tok, facts


def infer_arch(cfg: dict, model_type: str, weights: dict, context_length: int | None, source: str) -> Arch:
    """The architecture from config entries where present (and not null), else the tensors'
    shapes, else the config class's defaults. A config value the shapes contradict is an error
    that names the tensor."""
    defaults = _DEFAULTS[model_type]

    def entry(key):
        v = cfg.get(key)
        return defaults.get(key) if v is None else v

    embed = _need(weights, "model.embed_tokens.weight", 2)
    vocab, hidden = embed.shape
    layers = sorted({int(m.group(1)) for k in weights if (m := re.match(r"model\.layers\.(\d+)\.", k))})
    if layers != list(range(len(layers))) or not layers:
        raise SourceError(f"{source}: the layers present are {layers[:10]}; expected model.layers.0 … N-1")
    gate = _need(weights, "model.layers.0.mlp.gate_proj.weight", 2)
    k_proj = _need(weights, "model.layers.0.self_attn.k_proj.weight", 2)
    heads = int(entry("num_attention_heads"))
    if hidden % heads:
        raise SourceError(f"{source}: hidden size {hidden} (from model.embed_tokens.weight) is not a multiple of "
                          f"{heads} attention heads; set num_attention_heads in config.json")
    head_dim = hidden // heads
    if k_proj.shape[0] % head_dim:
        raise SourceError(f"model.layers.0.self_attn.k_proj.weight has {k_proj.shape[0]} rows, not a multiple of the "
                          f"head size {head_dim} (hidden {hidden} / {heads} heads)")
    kv_heads = k_proj.shape[0] // head_dim
    shaped = {"vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": len(layers),
              "intermediate_size": gate.shape[0], "num_key_value_heads": kv_heads}
    for key, value in shaped.items():
        if cfg.get(key) is not None and int(cfg[key]) != value:
            raise SourceError(f"{source}: {key} is {cfg[key]} but the weights have {value} "
                              f"({_SHAPE_SOURCE[key]}); fix config.json or the checkpoint")
    if cfg.get("head_dim") not in (None, head_dim):
        raise SourceError(f"{source}: head_dim {cfg['head_dim']} differs from hidden/heads ({head_dim}); not supported")
    context = int(entry("max_position_embeddings"))
    arch = Arch(vocab_size=vocab, hidden_size=hidden, num_layers=len(layers), num_heads=heads,
                num_kv_heads=kv_heads, intermediate_size=gate.shape[0], rope_theta=float(entry("rope_theta")),
                rms_norm_eps=float(entry("rms_norm_eps")),
                tied_embeddings=bool(entry("tie_word_embeddings")),
                context_length=context_length or min(context, DEFAULT_MAX_CONTEXT))
    arch.validate()
    return arch


_SHAPE_SOURCE = {
    "vocab_size": "rows of model.embed_tokens.weight", "hidden_size": "columns of model.embed_tokens.weight",
    "num_hidden_layers": "model.layers.N present", "intermediate_size": "rows of model.layers.0.mlp.gate_proj.weight",
    "num_key_value_heads": "rows of model.layers.0.self_attn.k_proj.weight / head size",
}


def _need(weights: dict, name: str, ndim: int) -> np.ndarray:
    w = weights.get(name)
    if w is None:
        raise SourceError(f"weight {name} is missing; is this a Llama-family decoder with Hugging Face names?")
    if w.ndim != ndim:
        raise SourceError(f"weight {name} has shape {tuple(w.shape)}, expected {ndim} dimensions")
    return w


def _name(cfg: dict, model_type: str, layout: Layout, arch: Arch) -> str:
    """The model's own name: config's `_name_or_path` (its last part), else the checkpoint file's
    stem, else the model type and size ("Swen-28M")."""
    named = cfg.get("_name_or_path")
    if isinstance(named, str) and named.strip("/"):
        return named.rstrip("/").rsplit("/", 1)[-1]
    if layout.kind == "checkpoint":
        return layout.weights[0].stem
    return f"{model_type.capitalize()}-{arch.parameter_count() // 1_000_000}M"


def _read_weights(files: list[Path]) -> dict:
    weights: dict = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors.numpy import load_file
            try:
                part = load_file(str(f))
            except Exception as e:
                raise SourceError(f"{f}: cannot read safetensors ({e})") from e
        else:
            obj = torch_checkpoint.load(f)
            part = {k: t.numpy() for k, t in torch_checkpoint.state_dict(obj, f).items()}
        for k, v in part.items():
            name = k
            while name.startswith(("module.", "_orig_mod.")):
                name = name.split(".", 1)[1]
            if _IGNORED.search(name):
                continue
            if name in weights:
                raise SourceError(f"{f}: {name} appears twice")
            weights[name] = np.asarray(v, dtype=np.float32)
    return weights
