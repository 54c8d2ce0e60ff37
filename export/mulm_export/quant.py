"""Block-wise 4- and 8-bit weight quantization in the layout of com.microsoft MatMulNBits.

A weight W of shape [N, K] (N outputs, K inputs) is cut into blocks of 32 consecutive inputs
per output. Each block stores one float scale and 32 unsigned codes; at 4 bits a code q stands
for (q - 8) * scale and two codes share a byte, the even index in the low nibble; at 8 bits a
code q stands for (q - 128) * scale, one a byte. With block 32 and K a multiple of 32 these are
exactly GGML's Q4_0 and Q8_0 (whose signed code is q - 128), so one file serves mulmd,
onnxruntime and, written as GGUF, llama.cpp.

Activations are quantized too (MatMulNBits `accuracy_level = 4`): each row of the input is cut
into the same blocks of 32 and rounded to int8 with one scale per block (max|x| / 127), and the
products are integer dot products, as llama.cpp computes Q4_0 × Q8_0 and Q8_0 × Q8_0. onnxruntime does this
when the attribute asks for it; mulmd always does (daemon/src/engine/ops/quantized). It is several
times faster than widening 4-bit weights to float on a CPU, and its error (a few tenths of a
percent of the output scale) is small next to the 4-bit weights' own.
"""

from __future__ import annotations

import numpy as np

BLOCK = 32
# MatMulNBits' "int8 compute" level: activations quantized per block, as described above.
ACCURACY_LEVEL = 4


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


def quantize_q8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns (codes uint8 [N, K/32, 32], scales float32 [N * K/32]) for a [N, K] weight.

    GGML's Q8_0, computed as llama.cpp's ggml-quants.c does (and the gguf package, bit for
    bit): d = max|x| / 127, code round(x / d) rounded half away from zero, plus 128; the scale
    kept is d as float16. So a float weight exports to the very blocks llama.cpp would make of
    it, and a weight that is already Q8_0 (every block's extreme on ±127·d, as those quantizers
    write it) comes back with the same codes and scales."""
    n, k = w.shape
    if k % BLOCK:
        raise ValueError(f"8-bit quantization needs inputs in multiples of {BLOCK}, got {k}")
    blocks = w.astype(np.float32).reshape(n, k // BLOCK, BLOCK)
    d = np.abs(blocks).max(axis=2, keepdims=True) / np.float32(127)
    inverse = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    x = blocks * inverse
    # Half away from zero, as C's roundf; written without adding 0.5, which in float32 rounds
    # 0.49999997 up to 1.
    a = np.abs(x)
    q = np.sign(x) * (np.floor(a) + np.floor(2 * (a - np.floor(a))))
    codes = (np.clip(q, -127, 127).astype(np.int16) + 128).astype(np.uint8)
    return codes, d.astype(np.float16).astype(np.float32).reshape(-1)


def dequantize_q8(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Inverse of quantize_q8: the float32 [N, K] weight the codes stand for."""
    n, nb, block = codes.shape
    w = (codes.astype(np.int16) - 128).astype(np.float32) * scales.reshape(n, nb, 1)
    return w.reshape(n, nb * block)


# Per quantized precision: its bits, and the quantizer and its inverse.
QUANTIZERS = {"q4": (4, quantize_q4, dequantize_q4), "q8": (8, quantize_q8, dequantize_q8)}


def int8_activation(x: np.ndarray) -> np.ndarray:
    """What an int8-compute product sees of an activation: each row cut into blocks of 32,
    quantized with scale max|x| / 127 and rounded half to even, then scaled back. Computed in
    float32 with the operations and order onnxruntime uses, so codes on a rounding edge land
    on the same side."""
    x32 = np.asarray(x, dtype=np.float32)
    blocks = x32.reshape(*x32.shape[:-1], x32.shape[-1] // BLOCK, BLOCK)
    scale = (np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)).astype(np.float32)
    inverse = np.divide(np.float32(1), scale, out=np.zeros_like(scale), where=scale != 0)
    q = np.rint(blocks * inverse)
    return (q.astype(np.float64) * scale).reshape(x.shape)
