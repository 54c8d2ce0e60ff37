"""The decoder architecture every mulmd model directory holds, and its named shapes.

One Llama-family decoder: token embedding, `layers` pre-norm blocks (RMSNorm, grouped-query
attention with rotate-half RoPE, RMSNorm, SwiGLU MLP), a final RMSNorm and an output head that
is the embedding matrix when `tied` is set. Weights are kept as a dict of numpy arrays with
Hugging Face Llama names and orientations (a Linear weight is [out_features, in_features]).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    rope_theta: float
    rms_norm_eps: float
    tied_embeddings: bool
    context_length: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self) -> None:
        """Raises ValueError naming the first inconsistent size."""
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        for name in ("vocab_size", "num_layers", "intermediate_size", "context_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["head_dim"] = self.head_dim
        return d

    @staticmethod
    def from_json(d: dict) -> "Arch":
        fields = {f.name for f in dataclasses.fields(Arch)}
        return Arch(**{k: v for k, v in d.items() if k in fields})

    def parameter_count(self) -> int:
        h, f, kv = self.hidden_size, self.intermediate_size, self.num_kv_heads * self.head_dim
        per_layer = h * h * 2 + h * kv * 2 + 3 * h * f + 2 * h
        head = 0 if self.tied_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_layers * per_layer + h + head


# The paper's 28.85M μLM (hidden 512, 8 layers, 8 query / 2 KV heads, SwiGLU 1408,
# vocabulary 12,288, tied embeddings, RoPE theta 1e6), and a tiny model of the same family
# that the tests run in milliseconds.
SHAPES = {
    "mulm-28m": Arch(
        vocab_size=12288, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2,
        intermediate_size=1408, rope_theta=1e6, rms_norm_eps=1e-5, tied_embeddings=True,
        context_length=2048,
    ),
    "tiny": Arch(
        vocab_size=12288, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        intermediate_size=128, rope_theta=1e6, rms_norm_eps=1e-5, tied_embeddings=True,
        context_length=512,
    ),
}


def weight_names(arch: Arch) -> list[str]:
    """Every tensor name a complete weight dict holds (HF Llama naming)."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        names += [p + n for n in (
            "input_layernorm.weight", "post_attention_layernorm.weight",
            "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
            "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
            "mlp.down_proj.weight",
        )]
    if not arch.tied_embeddings:
        names.append("lm_head.weight")
    return names


def expected_shape(arch: Arch, name: str) -> tuple[int, ...]:
    h, f, v = arch.hidden_size, arch.intermediate_size, arch.vocab_size
    kv = arch.num_kv_heads * arch.head_dim
    suffix = name.split(".", 3)[-1] if name.startswith("model.layers.") else name
    table = {
        "model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h),
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, h),
        "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f),
    }
    return table[suffix]


def check_weights(arch: Arch, weights: dict) -> None:
    """Raises ValueError naming a missing tensor or one with the wrong shape."""
    for name in weight_names(arch):
        if name not in weights:
            raise ValueError(f"weight {name} is missing")
        want = expected_shape(arch, name)
        got = tuple(weights[name].shape)
        if got != want:
            raise ValueError(f"weight {name} has shape {got}, the architecture needs {want}")
