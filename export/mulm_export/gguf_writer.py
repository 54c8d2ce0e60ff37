"""Writing an exported model directory as a llama-architecture GGUF, so llama.cpp can run the
same weights as mulmd and onnxruntime (bench/compare_runtimes.py's third column).

The inverse of gguf_source.read: HF Llama names become GGUF names, Q and K rows are permuted
back into llama.cpp's adjacent-pair rotary layout, and the tokenizer travels as
`tokenizer.ggml.*` (byte-level BPE, the tokens and merges of tokenizer.json). Weights are read
back out of model.onnx (a q4 directory's blocks dequantized first), then written as F32 or
quantized by the gguf package to Q8_0, Q4_0 or Q4_1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import onnx_weights
from .arch import Arch

QTYPES = ("F32", "Q8_0", "Q4_0", "Q4_1")

_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# llama.cpp's LLAMA_FTYPE_ALL_F32 / MOSTLY_Q4_0 / MOSTLY_Q4_1 / MOSTLY_Q8_0
_FILE_TYPE = {"F32": 0, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7}
_TOKEN_NORMAL, _TOKEN_CONTROL = 1, 3


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's half-split rotary rows → llama.cpp's interleaved pairs (undone by gguf_source)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_LAYER_NAMES[module]}.{kind}"


def write(directory: Path, dst: Path, qtype: str = "F32") -> None:
    """Writes `directory` (an export: mulm.json, model.onnx, tokenizer.json) to `dst`."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    if qtype not in QTYPES:
        raise ValueError(f"GGUF type {qtype!r} is not one of {', '.join(QTYPES)}")
    manifest = json.loads((directory / "mulm.json").read_text())
    arch = Arch.from_json(manifest["architecture"])
    tok = json.loads((directory / "tokenizer.json").read_text())

    # Everything that can be wrong with the directory is found before a byte is written.
    ids = tok["model"]["vocab"]
    vocab = sorted(ids.items(), key=lambda kv: kv[1])
    if [i for _, i in vocab] != list(range(len(vocab))):
        raise ValueError(f"{directory / 'tokenizer.json'}: token ids are not 0..n-1")
    if len(vocab) > arch.vocab_size:
        raise ValueError(f"{directory / 'tokenizer.json'} has {len(vocab)} tokens, the model's vocabulary "
                         f"{arch.vocab_size}: the tokenizer belongs to another model")
    st = manifest["special_tokens"]
    for name in [st["eos"]] + ([st["bos"]] if st.get("bos") else []):
        if name not in ids:
            raise ValueError(f"{directory / 'mulm.json'} names {name!r} as a special token; tokenizer.json lacks it")
    special = {t["id"] for t in tok["added_tokens"] if t.get("special")}
    tokens = [t for t, _ in vocab] + [f"[PAD{i}]" for i in range(len(vocab), arch.vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    weights = onnx_weights.read(directory / "model.onnx", arch)
    # A q4 head is the embedding table requantized; llama.cpp's tied head reads the table.
    weights.pop("__head__", None)

    # Written beside the destination and renamed into place: a failure leaves no half file.
    part = dst.with_name(dst.name + ".part")
    w = GGUFWriter(str(part), arch="llama")
    w.add_name(manifest["name"])
    w.add_context_length(arch.context_length)
    w.add_embedding_length(arch.hidden_size)
    w.add_block_count(arch.num_layers)
    w.add_feed_forward_length(arch.intermediate_size)
    w.add_head_count(arch.num_heads)
    w.add_head_count_kv(arch.num_kv_heads)
    w.add_rope_dimension_count(arch.head_dim)
    w.add_rope_freq_base(arch.rope_theta)
    w.add_layer_norm_rms_eps(arch.rms_norm_eps)
    w.add_vocab_size(arch.vocab_size)
    w.add_file_type(_FILE_TYPE[qtype])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([_TOKEN_CONTROL if i in special or i >= len(vocab) else _TOKEN_NORMAL for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_eos_token_id(ids[st["eos"]])
    if st.get("bos"):
        w.add_bos_token_id(ids[st["bos"]])
    w.add_add_bos_token(bool(st.get("add_bos")))
    w.add_chat_template(manifest["chat_template"])

    try:
        for hf, value in weights.items():
            value = np.ascontiguousarray(value, dtype=np.float32)
            if hf.endswith("q_proj.weight"):
                value = _permute(value, arch.num_heads)
            elif hf.endswith("k_proj.weight"):
                value = _permute(value, arch.num_kv_heads)
            # Norm weights (1-D) stay F32, as llama.cpp's own converter keeps them.
            if qtype == "F32" or value.ndim == 1:
                w.add_tensor(_gguf_name(hf), value, raw_dtype=GGMLQuantizationType.F32)
            else:
                q = GGMLQuantizationType[qtype]
                w.add_tensor(_gguf_name(hf), quantize(value, q), raw_dtype=q)  # shape read from the block bytes
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    except BaseException:
        w.close()
        part.unlink(missing_ok=True)
        raise
    part.replace(dst)
