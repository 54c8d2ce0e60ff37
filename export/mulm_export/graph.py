"""Writes the decoder as an ONNX graph that tract and onnxruntime both run.

Interface (batch is always 1):
  inputs   input_ids              int64   [1, sequence]
           past.{i}.key|value     float32 [1, kv_heads, past_sequence, head_dim]
  outputs  logits                 float32 [1, vocab]   (last position only)
           present.{i}.key|value  float32 [1, kv_heads, past_sequence + sequence, head_dim]

Positions are derived inside the graph from the cache length, so a caller feeds token ids and
the cache it got back last time, nothing else. Only standard ONNX ops are used (opset 17),
plus com.microsoft MatMulNBits for 4- and 8-bit weights: attention, RoPE and RMSNorm are spelled out
in plain ops so one graph covers a prompt of any length against a cache of any length (the
fused contrib attention ops accept only a first prompt or a single decode token).
Only the last position's logits are computed: the head is the largest matmul in a small
model, and a prompt's other positions are never sampled.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .arch import Arch
from .quant import ACCURACY_LEVEL, BLOCK, QUANTIZERS, quantize_q4_1

OPSET = 17
PRECISIONS = ("float32", "q4", "q8")


class _Builder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str, domain: str = "", **attrs) -> str:
        out = self.name(hint)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, domain=domain, **attrs))
        return out

    def op_to(self, op_type: str, inputs: list[str], output: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attrs))
        return output


def rope_tables(arch: Arch) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin, [context_length, head_dim], both halves repeated (rotate-half layout)."""
    d = arch.head_dim
    inv_freq = 1.0 / (arch.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    angles = np.outer(np.arange(arch.context_length, dtype=np.float64), inv_freq)
    angles = np.concatenate([angles, angles], axis=1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def build(arch: Arch, weights: dict, precision: str, producer: str, block_formats: dict | None = None) -> onnx.ModelProto:
    """The ONNX model for `weights` (HF Llama names, float arrays) at `precision`.
    `block_formats` names the GGML block format a weight came in ("Q4_1", ...): at q4, Q4_1
    and Q8_0 blocks are kept as they are rather than turned into Q4_0."""
    block_formats = block_formats or {}
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    arch.validate()
    b = _Builder()
    h, nh, kvh, hd = arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.head_dim
    group = nh // kvh

    def f32(a) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(a, dtype=np.float32))

    quantized = precision in QUANTIZERS

    def blocks_shape(rank: int) -> str:
        if rank not in shape_blocks:
            shape_blocks[rank] = b.const(f"shape_blocks{rank}", np.array([0] * (rank - 1) + [-1, BLOCK], dtype=np.int64))
        return shape_blocks[rank]

    def nbits(x: str, w: np.ndarray, wname: str, hint: str, output: str | None = None, rank: int = 3,
              source: str | None = None) -> str:
        """A MatMulNBits of weight `w` [out, in], its codes named `wname` + ".q4" or ".q8".
        A weight whose source blocks are Q8_0 keeps them at q4 too (an 8-bit MatMulNBits).
        One whose source blocks are Q4_1 keeps them at q4: the MatMulNBits holds codes
        and scales, and each block's offset (`wname` + ".offsets", [in/32, out]) meets the sum
        of the activation's block in a float product added to it. `output` names the result, `rank`
        is the activation's, `source` the weight's name in `weights` where it is not `wname`."""
        n, k = w.shape
        attrs = dict(domain="com.microsoft", K=k, N=n, block_size=BLOCK, accuracy_level=ACCURACY_LEVEL)
        if precision == "q4" and block_formats.get(source or wname) == "Q4_1":
            codes, scales, offsets = quantize_q4_1(w)
            inputs = [x, b.const(f"{wname}.{precision}", codes), b.const(wname + ".scales", scales)]
            main = b.op("MatMulNBits", inputs, hint, bits=4, **attrs)
            sums = b.op("ReduceSum", [b.op("Reshape", [x, blocks_shape(rank)], hint + "_blocks"), c_minus1], hint + "_block_sums", keepdims=0)
            term = b.op("MatMul", [sums, b.const(wname + ".offsets", np.ascontiguousarray(offsets.T))], hint + "_offsets")
            return b.op("Add", [main, term], hint) if output is None else b.op_to("Add", [main, term], output)
        # A Q8_0 weight stays 8-bit at q4: its blocks kept, not quantized again to fewer bits.
        kind = "q8" if precision == "q4" and block_formats.get(source or wname) == "Q8_0" else precision
        bits, quantize, _ = QUANTIZERS[kind]
        codes, scales = quantize(w)
        inputs = [x, b.const(f"{wname}.{kind}", codes), b.const(wname + ".scales", scales)]
        if output is None:
            return b.op("MatMulNBits", inputs, hint, bits=bits, **attrs)
        return b.op_to("MatMulNBits", inputs, output, bits=bits, **attrs)

    def linear(x: str, wname: str, hint: str) -> str:
        w = f32(weights[wname])  # [out, in]
        if quantized and w.shape[1] % BLOCK == 0:
            return nbits(x, w, wname, hint)
        return b.op("MatMul", [x, b.const(wname + ".T", np.ascontiguousarray(w.T))], hint)

    def rmsnorm(x: str, wname: str) -> str:
        sq = b.op("Mul", [x, x], "sq")
        ms = b.op("ReduceMean", [sq], "ms", axes=[-1], keepdims=1)
        inv = b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [ms, eps], "mse")], "rms")], "inv_rms")
        return b.op("Mul", [b.op("Mul", [x, inv], "normed"), b.const(wname, f32(weights[wname]))], "rmsnorm")

    def rotate(x: str, cos: str, sin: str) -> str:
        # x * cos + rotate_half(x) * sin, rotate_half(x) = concat(-x[d/2:], x[:d/2])
        lo = b.op("Slice", [x, c_zero1, c_half1, c_minus1], "lo")
        hi = b.op("Slice", [x, c_half1, c_hd1, c_minus1], "hi")
        rot = b.op("Concat", [b.op("Neg", [hi], "neg_hi"), lo], "rot_half", axis=-1)
        return b.op("Add", [b.op("Mul", [x, cos], "xcos"), b.op("Mul", [rot, sin], "rsin")], "rope")

    # Constants shared by every layer.
    eps = b.const("rms_eps", np.array(arch.rms_norm_eps, dtype=np.float32))
    c_zero1 = b.const("c_zero1", np.array([0], dtype=np.int64))
    c_one1 = b.const("c_one1", np.array([1], dtype=np.int64))
    c_two1 = b.const("c_two1", np.array([2], dtype=np.int64))
    c_three1 = b.const("c_three1", np.array([3], dtype=np.int64))
    c_half1 = b.const("c_half1", np.array([hd // 2], dtype=np.int64))
    c_hd1 = b.const("c_hd1", np.array([hd], dtype=np.int64))
    c_minus1 = b.const("c_minus1", np.array([-1], dtype=np.int64))
    c_zero = b.const("c_zero", np.array(0, dtype=np.int64))
    c_one = b.const("c_one", np.array(1, dtype=np.int64))
    cos_t, sin_t = rope_tables(arch)
    cos_table = b.const("rope_cos", cos_t)
    sin_table = b.const("rope_sin", sin_t)
    scale = b.const("attn_scale", np.array(1.0 / np.sqrt(hd), dtype=np.float32))
    neg_inf = b.const("neg_inf", np.array(-np.inf, dtype=np.float32))
    zero_f = b.const("zero_f", np.array(0.0, dtype=np.float32))
    shape_q = b.const("shape_q", np.array([1, -1, nh, hd], dtype=np.int64))
    shape_kv = b.const("shape_kv", np.array([1, -1, kvh, hd], dtype=np.int64))
    shape_q5 = b.const("shape_q5", np.array([1, kvh, group, -1, hd], dtype=np.int64))
    shape_o4 = b.const("shape_o4", np.array([1, nh, -1, hd], dtype=np.int64))
    shape_o = b.const("shape_o", np.array([1, -1, h], dtype=np.int64))
    # An activation [1, seq, in] or the head's [1, in] cut into blocks of 32 inputs (0 keeps a
    # dimension); written when a Q4_1 weight first needs it.
    shape_blocks: dict[int, str] = {}

    # Positions of the new tokens: past_len .. past_len + seq_len.
    seq_len = b.op("Squeeze", [b.op("Slice", [b.op("Shape", ["input_ids"], "ids_shape"), c_one1, c_two1], "s1")], "seq_len")
    past_len = b.op("Squeeze", [b.op("Slice", [b.op("Shape", ["past.0.key"], "past_shape"), c_two1, c_three1], "p1")], "past_len")
    total_len = b.op("Add", [past_len, seq_len], "total_len")
    q_pos = b.op("Range", [past_len, total_len, c_one], "q_pos")
    k_pos = b.op("Range", [c_zero, total_len, c_one], "k_pos")
    cos = b.op("Gather", [cos_table, q_pos], "cos", axis=0)
    sin = b.op("Gather", [sin_table, q_pos], "sin", axis=0)
    # Causal mask [seq, total]: query i (at past_len + i) sees keys at positions <= its own.
    future = b.op("Greater", [b.op("Unsqueeze", [k_pos, c_zero1], "kp"), b.op("Unsqueeze", [q_pos, c_one1], "qp")], "future")
    mask = b.op("Where", [future, neg_inf, zero_f], "causal_mask")

    embed = f32(weights["model.embed_tokens.weight"])
    if quantized:
        # Quantized, the head has constants of its own, so the table serves only the lookup
        # of one row per token: float16 halves the largest tensor of the file (and of resident
        # memory) at a rounding far below the quantized weights' own.
        table = b.const("model.embed_tokens.weight", embed.astype(np.float16))
        x = b.op("Cast", [b.op("Gather", [table, "input_ids"], "embed16", axis=0)], "embed", to=TensorProto.FLOAT)
    else:
        x = b.op("Gather", [b.const("model.embed_tokens.weight", embed), "input_ids"], "embed", axis=0)
    inputs, outputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "sequence"])], []
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        xn = rmsnorm(x, p + "input_layernorm.weight")
        q = b.op("Transpose", [b.op("Reshape", [linear(xn, p + "self_attn.q_proj.weight", "q"), shape_q], "q4d")], "q_bnsh", perm=[0, 2, 1, 3])
        k = b.op("Transpose", [b.op("Reshape", [linear(xn, p + "self_attn.k_proj.weight", "k"), shape_kv], "k4d")], "k_bnsh", perm=[0, 2, 1, 3])
        v = b.op("Transpose", [b.op("Reshape", [linear(xn, p + "self_attn.v_proj.weight", "v"), shape_kv], "v4d")], "v_bnsh", perm=[0, 2, 1, 3])
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        for kind, new in (("key", k), ("value", v)):
            inputs.append(helper.make_tensor_value_info(f"past.{i}.{kind}", TensorProto.FLOAT, [1, kvh, "past_sequence", hd]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT, None))
            b.op_to("Concat", [f"past.{i}.{kind}", new], f"present.{i}.{kind}", axis=2)
        # Grouped-query attention without copying the cache: query heads are viewed as
        # [kv_heads, group] and the cache gets a broadcast axis of 1.
        q5 = b.op("Reshape", [q, shape_q5], "q5")
        k5 = b.op("Transpose", [b.op("Unsqueeze", [f"present.{i}.key", c_two1], "k5")], "k5t", perm=[0, 1, 2, 4, 3])
        v5 = b.op("Unsqueeze", [f"present.{i}.value", c_two1], "v5")
        scores = b.op("Add", [b.op("Mul", [b.op("MatMul", [q5, k5], "qk"), scale], "scaled"), mask], "masked")
        probs = b.op("Softmax", [scores], "probs", axis=-1)
        o = b.op("Reshape", [b.op("MatMul", [probs, v5], "pv"), shape_o4], "o4")
        o = b.op("Reshape", [b.op("Transpose", [o], "o_bsnh", perm=[0, 2, 1, 3]), shape_o], "o")
        x = b.op("Add", [x, linear(o, p + "self_attn.o_proj.weight", "o_proj")], "resid1")
        xn = rmsnorm(x, p + "post_attention_layernorm.weight")
        gate = linear(xn, p + "mlp.gate_proj.weight", "gate")
        act = b.op("Mul", [gate, b.op("Sigmoid", [gate], "sig")], "silu")
        up = linear(xn, p + "mlp.up_proj.weight", "up")
        x = b.op("Add", [x, linear(b.op("Mul", [act, up], "swiglu"), p + "mlp.down_proj.weight", "down")], "resid2")

    xn = rmsnorm(x, "model.norm.weight")
    last = b.op("Gather", [xn, b.op("Sub", [seq_len, c_one], "last_idx")], "last", axis=1)
    head_name = "model.embed_tokens.weight" if arch.tied_embeddings else "lm_head.weight"
    head = f32(weights[head_name])
    if quantized:
        nbits(last, head, "head", "logits", output="logits", rank=2, source=head_name)
    else:
        # Gemm with transB reads the [vocab, hidden] table in place: a tied head costs no copy.
        src = head_name if arch.tied_embeddings else b.const(head_name, head)
        b.nodes.append(helper.make_node("Gemm", [last, src], ["logits"], name="logits", transB=1))
    outputs.insert(0, helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, arch.vocab_size]))

    graph = helper.make_graph(b.nodes, "mulm_decoder", inputs, outputs, b.inits)
    opsets = [helper.make_opsetid("", OPSET)]
    if quantized:
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name=producer)
    model.ir_version = 8
    return model


def save(model: onnx.ModelProto, path) -> None:
    """Writes the model as one file (weights inline), so the directory stays self-contained."""
    data = model.SerializeToString()
    if len(data) >= 2**31:
        raise ValueError("the model exceeds 2 GiB, which one ONNX file cannot hold")
    with open(path, "wb") as f:
        f.write(data)
