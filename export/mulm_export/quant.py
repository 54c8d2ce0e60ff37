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


def quantize_q4_1(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GGML's Q4_1, for a weight whose GGUF blocks are Q4_1: per block a scale d = (max − min) / 15,
    the minimum m, and codes trunc((x − m) / d + 0.5) in 0..15, weight = code · d + m, computed
    as the gguf package (and ggml-quants.c) do, with d and m kept as float16. A weight that is
    already Q4_1 (each block holds its minimum at code 0 and its maximum at code 15, as those
    quantizers write it) comes back with the same codes, scales and minimums.

    Returns (codes, scales, offsets) in q4's layout, where a code stands for (code − 8) · d as
    MatMulNBits reads it: codes uint8 [N, K/32, 16], scales d float32 [N * K/32], and each
    block's offset c = m + 8 · d, float32 [N, K/32], so that (code − 8) · d + c = code · d + m.
    The graph adds c times the activation block's sum (see graph.py)."""
    n, k = w.shape
    if k % BLOCK:
        raise ValueError(f"4-bit quantization needs inputs in multiples of {BLOCK}, got {k}")
    blocks = w.astype(np.float32).reshape(n, k // BLOCK, BLOCK)
    lo = blocks.min(axis=2, keepdims=True)
    d = (blocks.max(axis=2, keepdims=True) - lo) / np.float32(15)
    inverse = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    q = np.trunc((blocks - lo) * inverse + np.float32(0.5)).clip(0, 15).astype(np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    d16 = d.astype(np.float16).astype(np.float32).reshape(n, -1)
    m16 = lo.astype(np.float16).astype(np.float32).reshape(n, -1)
    return packed, d16.reshape(-1), (m16 + np.float32(8) * d16).astype(np.float32)


def dequantize_q4_1(packed: np.ndarray, scales: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Inverse of quantize_q4_1: the float32 [N, K] weight the codes stand for."""
    n, nb, _ = packed.shape
    return (dequantize_q4(packed, scales).reshape(n, nb, BLOCK) + offsets.reshape(n, nb, 1)).reshape(n, nb * BLOCK)


# Per quantized precision: its bits, and the quantizer and its inverse.
QUANTIZERS = {"q4": (4, quantize_q4, dequantize_q4), "q8": (8, quantize_q8, dequantize_q8)}


# How close two runtimes' values of one activation must be, relative to the largest magnitude
# in their row, to count as the same value computed in another float order. Correct float32
# evaluations of a 30-layer model differ by up to ~1e-4 of it; a wiring error moves values by
# a large share of it.
SAME_VALUE = 1e-3


def int8_activation(x: np.ndarray, edges_from: np.ndarray | None = None) -> np.ndarray:
    """What an int8-compute product sees of an activation: each row cut into blocks of 32,
    quantized with scale max|x| / 127 and rounded half to even, then scaled back. Computed in
    float32 with the operations and order onnxruntime uses, so codes on a rounding edge land
    on the same side.

    `edges_from` is the same activation as another runtime computed it: a value both compute
    within SAME_VALUE of each other takes that runtime's code. The two codes differ only where
    the value sits on a rounding edge, and there the side it falls on is the float order's
    choice; over many layers one such value grows into logit differences of several percent.
    Every other value is rounded from `x` alone."""
    v, scale = _in_steps(x)
    q = np.rint(v)
    if edges_from is not None:
        other = np.reshape(edges_from, np.shape(x)).astype(np.float32)
        theirs, _ = _in_steps(other)
        row_max = np.abs(other).max(axis=-1, keepdims=True)
        same = (np.abs(np.asarray(x, dtype=np.float64) - other) <= SAME_VALUE * row_max).reshape(v.shape)
        q = np.where(same, np.rint(theirs), q)
    return (q.astype(np.float64) * scale).reshape(np.shape(x))


def _in_steps(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x's blocks of 32 divided by their scales (float32, before rounding), and the scales."""
    x32 = np.asarray(x, dtype=np.float32)
    blocks = x32.reshape(*x32.shape[:-1], x32.shape[-1] // BLOCK, BLOCK)
    scale = (np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)).astype(np.float32)
    inverse = np.divide(np.float32(1), scale, out=np.zeros_like(scale), where=scale != 0)
    return blocks * inverse, scale
