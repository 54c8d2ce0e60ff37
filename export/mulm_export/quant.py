"""Block-wise 4-bit weight quantization in the layout of com.microsoft MatMulNBits.

A weight W of shape [N, K] (N outputs, K inputs) is cut into blocks of 32 consecutive inputs
per output. Each block stores one float scale and 32 unsigned 4-bit codes; a code q stands for
(q - 8) * scale. Two codes share a byte, the even index in the low nibble. With block 32 and
K a multiple of 32, tract maps this straight onto its Q4_0 kernels, and onnxruntime runs it with
its own MatMulNBits kernel, so one file serves both.
"""

from __future__ import annotations

import numpy as np

BLOCK = 32


def quantize_q4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns (codes uint8 [N, K/32, 16], scales float32 [N * K/32]) for a [N, K] weight."""
    n, k = w.shape
    if k % BLOCK:
        raise ValueError(f"4-bit quantization needs inputs in multiples of {BLOCK}, got {k}")
    blocks = w.astype(np.float32).reshape(n, k // BLOCK, BLOCK)
    amax = np.abs(blocks).max(axis=2, keepdims=True)
    # The symmetric range is [-8, 7]; mapping the largest magnitude to -8 (as Q4_0 does) keeps
    # one more level for it than mapping it to 7.
    signed_max = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=2)[..., None], axis=2)
    scale = signed_max / -8.0
    scale[amax == 0] = 1.0
    # tract keeps block scales as float16 (as GGML's Q4_0 does); rounding them here makes the
    # file mean the same weights in every runtime.
    scale = scale.astype(np.float16).astype(np.float32)
    q = np.clip(np.round(blocks / scale), -8, 7).astype(np.int16) + 8
    q = q.astype(np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return packed, scale.reshape(-1).astype(np.float32)


def dequantize_q4(packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Inverse of quantize_q4: the float32 [N, K] weight the codes stand for."""
    n, nb, half = packed.shape
    q = np.empty((n, nb, half * 2), dtype=np.int16)
    q[..., 0::2] = packed & 0x0F
    q[..., 1::2] = packed >> 4
    w = (q - 8).astype(np.float32) * scales.reshape(n, nb, 1)
    return w.reshape(n, nb * half * 2)


def roundtrip_q4(w: np.ndarray) -> np.ndarray:
    """The weight as a 4-bit model will see it."""
    return dequantize_q4(*quantize_q4(w))
