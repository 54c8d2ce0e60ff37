"""Reading a Llama-family GGUF: architecture, dequantized weights, tokenizer and chat template."""

from __future__ import annotations

import numpy as np

from .arch import Arch

# GGUF tensor names → HF Llama names ({i} is the layer).
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOKEN_TYPE_CONTROL = 3


class GgufError(ValueError):
    pass


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is not None:
            return default
        raise GgufError(f"the GGUF has no {key} entry")
    return field.contents()


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's converter, which reorders Q/K rows so that its rope rotates adjacent
    pairs; the ONNX graph rotates halves, as the original Hugging Face weights expect."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(gguf_name: str) -> str | None:
    """The HF Llama name of a GGUF tensor, None for one that is not part of the model."""
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk":
        _, layer, kind, _ = parts
        if kind in _LAYER_NAMES:
            return f"model.layers.{layer}.{_LAYER_NAMES[kind]}.weight"
    return None


def block_formats(path: str) -> dict[str, str]:
    """Each model tensor's GGML type by HF name ("Q4_1", "Q8_0", "F32", ...): what an export
    can keep as it is."""
    from gguf import GGUFReader

    return {hf: t.tensor_type.name for t in GGUFReader(path).tensors if (hf := _hf_name(t.name))}


def read_tokenizer_only(path: str) -> tuple[None, None, dict]:
    """Just the tokenizer info (no tensors are dequantized)."""
    return read(path, tensors=False)


def read(path: str, tensors: bool = True) -> tuple[Arch, dict, dict]:
    """Returns (arch, weights, tokenizer info) from a GGUF file.

    tokenizer info: tokens, merges, token types, special ids, bos/eos ids, pre-tokenizer name,
    chat template."""
    try:
        from gguf import GGUFReader
        from gguf.quants import dequantize
    except ImportError as e:  # pragma: no cover - set-up problem
        raise GgufError("the Python package gguf is missing; run export/setup-venv") from e
    try:
        reader = GGUFReader(path)
    except Exception as e:
        raise GgufError(f"{path} is not a readable GGUF file: {e}") from e
    arch_name = _field(reader, "general.architecture")
    if arch_name != "llama":
        raise GgufError(f"{path} holds a {arch_name!r} model; only the llama architecture is supported")
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise GgufError(f"{path} uses a {model!r} tokenizer; only byte-level BPE ('gpt2') is supported")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    n_head = int(_field(reader, "llama.attention.head_count"))
    n_kv = int(_field(reader, "llama.attention.head_count_kv", n_head))
    names = {t.name for t in reader.tensors}
    arch = Arch(
        vocab_size=len(tokens),
        hidden_size=int(_field(reader, "llama.embedding_length")),
        num_layers=int(_field(reader, "llama.block_count")),
        num_heads=n_head,
        num_kv_heads=n_kv,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        tied_embeddings="output.weight" not in names,
        context_length=int(_field(reader, "llama.context_length", 2048)),
    )
    weights = {}
    for t in (reader.tensors if tensors else []):
        data = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        hf = _hf_name(t.name)
        if hf is None:
            if t.name.startswith("blk."):
                raise GgufError(f"{path}: tensor {t.name} is not part of a Llama block")
            if t.name != "rope_freqs.weight":
                raise GgufError(f"{path}: unexpected tensor {t.name}")
            continue
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else None
        if kind == "attn_q":
            data = _unpermute(data, n_head)
        elif kind == "attn_k":
            data = _unpermute(data, n_kv)
        weights[hf] = data
    token_types = list(_field(reader, "tokenizer.ggml.token_type"))
    tok = {
        "tokens": tokens,
        "merges": list(_field(reader, "tokenizer.ggml.merges")),
        "special_ids": [i for i, ty in enumerate(token_types) if ty == _TOKEN_TYPE_CONTROL],
        "bos_id": reader.fields.get("tokenizer.ggml.bos_token_id") and int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
        "add_bos": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "pre": _field(reader, "tokenizer.ggml.pre", "default"),
        "chat_template": _field(reader, "tokenizer.chat_template", ""),
    }
    return arch, weights, tok
