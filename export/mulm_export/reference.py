"""An independent numpy implementation of the architecture, the yardstick for `verify`.

It shares nothing with the ONNX writer but the weight dict: attention is computed head by head
with the key/value heads repeated, and rotary angles are recomputed here in float64.
"""

from __future__ import annotations

import numpy as np

from .arch import Arch
from .quant import BLOCK, int8_activation


class Reference:
    def __init__(self, arch: Arch, weights: dict, int8_products: dict | None = None) -> None:
        """`int8_products` names the weights whose products see their input quantized to int8
        (quantized files, see quant.py), each with its blocks' offsets [N, K/32] where it
        keeps Q4_1 blocks (else None); the rest see their input exactly."""
        self.arch = arch
        self.w = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
        self.int8 = {k: None if v is None else np.asarray(v, dtype=np.float64) for k, v in (int8_products or {}).items()}
        self.edges_from: dict = {}
        self.k_cache = [np.zeros((arch.num_kv_heads, 0, arch.head_dim)) for _ in range(arch.num_layers)]
        self.v_cache = [np.zeros((arch.num_kv_heads, 0, arch.head_dim)) for _ in range(arch.num_layers)]

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        var = (x * x).mean(axis=-1, keepdims=True)
        return x / np.sqrt(var + self.arch.rms_norm_eps) * self.w[name]

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        if name not in self.int8:
            return x @ self.w[name].T
        offsets = self.int8[name]
        xq = int8_activation(x, self.edges_from.get(name))
        if offsets is None:
            return xq @ self.w[name].T
        # Q4_1 kept: the codes' part meets the int8 activation, each block's offset the exact
        # sum of the activation's block (graph.py).
        codes_part = self.w[name] - np.repeat(offsets, BLOCK, axis=1)
        sums = x.reshape(*x.shape[:-1], -1, BLOCK).sum(axis=-1)
        return xq @ codes_part.T + sums @ offsets.T

    def _rope(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        # x: [heads, seq, head_dim]; dimension i pairs with i + head_dim/2.
        d = x.shape[-1]
        half = d // 2
        freqs = self.arch.rope_theta ** (-np.arange(half) * 2.0 / d)
        ang = positions[:, None] * freqs[None, :]
        c, s = np.cos(ang), np.sin(ang)
        a, b = x[..., :half], x[..., half:]
        return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)

    def forward(self, ids: list[int], edges_from: dict | None = None) -> np.ndarray:
        """Feeds `ids` after everything fed so far; returns the last position's logits.
        `edges_from` holds, by weight name, the input another runtime gave that product on the
        same step: int8 codes on a rounding edge are rounded as there (see int8_activation)."""
        self.edges_from = edges_from or {}
        a = self.arch
        past = self.k_cache[0].shape[1]
        pos = np.arange(past, past + len(ids), dtype=np.float64)
        x = self.w["model.embed_tokens.weight"][ids]
        group = a.num_heads // a.num_kv_heads
        for i in range(a.num_layers):
            p = f"model.layers.{i}."
            xn = self._norm(x, p + "input_layernorm.weight")
            q = self._linear(xn, p + "self_attn.q_proj.weight").reshape(len(ids), a.num_heads, a.head_dim).transpose(1, 0, 2)
            k = self._linear(xn, p + "self_attn.k_proj.weight").reshape(len(ids), a.num_kv_heads, a.head_dim).transpose(1, 0, 2)
            v = self._linear(xn, p + "self_attn.v_proj.weight").reshape(len(ids), a.num_kv_heads, a.head_dim).transpose(1, 0, 2)
            q, k = self._rope(q, pos), self._rope(k, pos)
            self.k_cache[i] = np.concatenate([self.k_cache[i], k], axis=1)
            self.v_cache[i] = np.concatenate([self.v_cache[i], v], axis=1)
            total = self.k_cache[i].shape[1]
            out = np.empty_like(q)
            for head in range(a.num_heads):
                kh, vh = self.k_cache[i][head // group], self.v_cache[i][head // group]
                scores = q[head] @ kh.T / np.sqrt(a.head_dim)
                allowed = np.arange(total)[None, :] <= pos[:, None]
                scores = np.where(allowed, scores, -np.inf)
                scores -= scores.max(axis=-1, keepdims=True)
                probs = np.exp(scores)
                probs /= probs.sum(axis=-1, keepdims=True)
                out[head] = probs @ vh
            attn = out.transpose(1, 0, 2).reshape(len(ids), a.hidden_size)
            x = x + self._linear(attn, p + "self_attn.o_proj.weight")
            xn = self._norm(x, p + "post_attention_layernorm.weight")
            gate = self._linear(xn, p + "mlp.gate_proj.weight")
            up = self._linear(xn, p + "mlp.up_proj.weight")
            x = x + self._linear(gate / (1.0 + np.exp(-gate)) * up, p + "mlp.down_proj.weight")
        last = self._norm(x[-1], "model.norm.weight")
        if "__head__" in self.w:
            return self._linear(last, "__head__")
        return self._linear(last, "model.embed_tokens.weight" if a.tied_embeddings else "lm_head.weight")
