"""mulm-export end to end: exports verify, quantization costs are reported, bad input is named."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mulm_export import cli, gguf_source, onnx_weights, quant, sources
from mulm_export.arch import SHAPES, Arch
from mulm_export.runner import OrtModel
from mulm_export.modeldir import sha256_file


def run_cli(*args) -> int:
    return cli.main([str(a) for a in args])


def test_quantization_roundtrip_error_is_bounded():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    codes, scales = quant.quantize_q4(w)
    assert codes.shape == (8, 2, 16) and scales.shape == (16,)
    back = quant.dequantize_q4(codes, scales)
    step = np.repeat(np.abs(scales), 32).reshape(8, 64)
    err = np.abs(back - w)
    # Rounding costs half a step; only values of the opposite sign to the block's extreme can
    # be clipped at +7, costing at most one step. The extreme itself is exact up to the scale's
    # float16 rounding (2^-11 relative).
    assert np.all(err <= step + 1e-6)
    assert np.mean(err <= step * 0.5 + 1e-6) > 0.95
    blocks, berr = w.reshape(16, 32), err.reshape(16, 32)
    extreme = np.abs(blocks).argmax(axis=1)
    assert np.all(berr[np.arange(16), extreme] <= np.abs(blocks[np.arange(16), extreme]) * 2.0**-10)


def test_8_bit_quantization_is_ggml_q8_0_and_round_trips():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block
    codes, scales = quant.quantize_q8(w)
    assert codes.shape == (8, 2, 32) and codes.dtype == np.uint8 and scales.shape == (16,)
    back = quant.dequantize_q8(codes, scales)
    assert np.all(back[0, :32] == 0)
    # Half a step of rounding, the step being the scale; codes are taken against the scale
    # before its float16 rounding (as llama.cpp does), which moves the extreme by ≤ 127 · 2^-11.
    step = np.repeat(scales, 32).reshape(8, 64)
    assert np.all(np.abs(back - w) <= step * (0.5 + 127 * 2.0**-11) + 1e-7)

    # The very blocks llama.cpp's quantizer (the gguf package's port of it, bit for bit) makes.
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as ggml_quantize
    ggml = ggml_quantize(w, GGMLQuantizationType.Q8_0).reshape(16, 34)
    assert np.array_equal(ggml[:, :2].copy().view(np.float16).astype(np.float32).reshape(-1), scales)
    assert np.array_equal(ggml[:, 2:].view(np.int8).astype(np.int16) + 128, codes.reshape(16, 32))
    # Every block uses its full range (its extreme on ±127), so quantizing the dequantized
    # weight again gives the same codes and scales: what keeps a Q8_0 GGUF's blocks as they are.
    signed = codes.astype(np.int16) - 128
    assert np.all(np.abs(signed).max(axis=2)[scales.reshape(8, 2) > 0] == 127)
    codes2, scales2 = quant.quantize_q8(back)
    assert np.array_equal(codes2, codes) and np.array_equal(scales2, scales)


def test_q4_1_quantization_is_ggml_q4_1_and_round_trips():
    """Q4_1 blocks are kept as they are: the quantizer makes the gguf package's blocks (its
    port of llama.cpp's, bit for bit), and quantizing their dequantized weight again gives the
    same codes, scales and offsets."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((8, 64)).astype(np.float32) + 0.3
    w[0, :32] = 0.25  # a constant block: no range, its value in the minimum
    codes, scales, offsets = quant.quantize_q4_1(w)
    assert codes.shape == (8, 2, 16) and scales.shape == (16,) and offsets.shape == (8, 2)
    back = quant.dequantize_q4_1(codes, scales, offsets)
    assert np.allclose(back[0, :32], 0.25, rtol=2.0**-10)
    # Half a step of rounding, the step being the scale (plus its float16 rounding).
    step = np.repeat(scales, 32).reshape(8, 64)
    assert np.all(np.abs(back - w) <= step * 0.52 + 1e-3)

    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as ggml_quantize
    ggml = ggml_quantize(w, GGMLQuantizationType.Q4_1).reshape(16, 20)
    d = ggml[:, 0:2].copy().view(np.float16).astype(np.float32).reshape(-1)
    m = ggml[:, 2:4].copy().view(np.float16).astype(np.float32).reshape(-1)
    assert np.array_equal(d, scales)
    assert np.array_equal(m + 8 * d, offsets.reshape(-1))
    # GGML keeps code j in byte j's low nibble and code j + 16 in its high one; MatMulNBits
    # keeps codes 2i and 2i + 1 in byte i.
    ggml_codes = np.concatenate([ggml[:, 4:] & 0x0F, ggml[:, 4:] >> 4], axis=1)
    ours = codes.reshape(16, 16)
    assert np.array_equal(np.stack([ours & 0x0F, ours >> 4], axis=2).reshape(16, 32), ggml_codes)
    again = quant.quantize_q4_1(back)
    for a, b in zip(again, (codes, scales, offsets)):
        assert np.array_equal(a, b)


def test_int8_activations_on_a_rounding_edge_round_as_the_other_runtime_did():
    """verify's reference takes onnxruntime's code only for values both compute within
    SAME_VALUE of each other (where they differ, the value is on a rounding edge); every other
    value is its own, whatever the other runtime computed."""
    x = np.linspace(-1, 1, 32, dtype=np.float32)
    x[0] = -1.0  # the block's scale is 1/127: a value in steps is x · 127
    x[5] = np.float32(10.5 + 2e-4) / np.float32(127)   # on the edge, above it
    x[9] = np.float32(20.4) / np.float32(127)          # clear of any edge
    theirs = x.copy()
    theirs[5] = np.float32(10.5 - 2e-4) / np.float32(127)  # the same value, a hair below the edge
    theirs[9] = 0.0
    step = 1.0 / 127
    ours = quant.int8_activation(x)
    assert round(ours[5] / step) == 11 and round(ours[9] / step) == 20
    resolved = quant.int8_activation(x, edges_from=theirs)
    assert round(resolved[5] / step) == 10, "on the edge: the other runtime's side"
    assert round(resolved[9] / step) == 20, "clear of the edge: our own value, not theirs"
    assert np.array_equal(np.delete(resolved, 5), np.delete(ours, 5))


def test_generate_is_reproducible(tmp_path):
    for name in ("a", "b"):
        assert run_cli("generate", "--shape", "tiny", "--seed", 5, "--out", tmp_path / name) == 0
    assert sha256_file(tmp_path / "a/model.onnx") == sha256_file(tmp_path / "b/model.onnx")
    assert sha256_file(tmp_path / "a/tokenizer.json") == sha256_file(tmp_path / "b/tokenizer.json")
    manifest = json.loads((tmp_path / "a/mulm.json").read_text())
    assert manifest["architecture"]["vocab_size"] == 12288
    tok = json.loads((tmp_path / "a/tokenizer.json").read_text())
    assert len(tok["model"]["vocab"]) == 12288


def test_mulm_28m_has_the_papers_parameter_count():
    assert round(SHAPES["mulm-28m"].parameter_count() / 1e6, 2) == 28.84


def test_verify_passes_for_the_tiny_model(fixture_dir, capsys):
    assert cli.main(["verify", str(fixture_dir("tiny"))]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["reference"]["ok"] and report["reference"]["max_relative_error"] < 1e-3


def test_verify_reports_what_4_bit_costs(fixture_dir, capsys):
    assert cli.main(["verify", str(fixture_dir("tiny-q4")), "--baseline", str(fixture_dir("tiny"))]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["reference"]["ok"], "onnxruntime must match the reference on the dequantized weights"
    cost = report["precision_cost"]
    assert cost["max_abs_error"] > 0, "4-bit weights cannot be free"


def test_8_bit_runs_in_onnxruntime_as_the_reference_says_and_costs_less_than_4_bit(fixture_dir, capsys):
    costs = {}
    for name in ("tiny-q8", "tiny-q4"):
        assert cli.main(["verify", str(fixture_dir(name)), "--baseline", str(fixture_dir("tiny"))]) == 0
        report = json.loads(capsys.readouterr().out)
        # The reference quantizes activations to int8 as the contract says; onnxruntime's
        # 8-bit MatMulNBits at accuracy_level 4 must do the same to agree this closely.
        assert report["reference"]["ok"], name
        costs[name] = report["precision_cost"]["max_abs_error"]
    assert 0 < costs["tiny-q8"] < costs["tiny-q4"] / 4, costs


def test_smollm2_agrees_with_llama_cpp(fixture_dir, capsys):
    gguf = sources.smollm2_gguf()
    assert cli.main(["verify", str(fixture_dir("smollm2")), "--llama-cpp", str(gguf), "--greedy-steps", "16"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["llama_cpp"]["tokenizer"]["mismatches"] == []
    assert report["llama_cpp"]["tokenizer"]["texts"] >= 10
    prompts = report["llama_cpp"]["greedy"]["prompts"]
    assert len(prompts) >= 3 and all(p["agreeing_steps"] >= 16 for p in prompts)


def test_from_hf_matches_the_same_weights_generated(tmp_path, fixture_dir):
    """A Hugging Face directory of the tiny model's weights exports to the same logits."""
    from safetensors.numpy import save_file

    arch = SHAPES["tiny"]
    weights = sources.generated_weights(arch, 1)
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file(weights, str(hf / "model.safetensors"))
    (hf / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "vocab_size": arch.vocab_size, "hidden_size": arch.hidden_size,
        "num_hidden_layers": arch.num_layers, "num_attention_heads": arch.num_heads,
        "num_key_value_heads": arch.num_kv_heads, "intermediate_size": arch.intermediate_size,
        "rope_theta": arch.rope_theta, "rms_norm_eps": arch.rms_norm_eps, "tie_word_embeddings": True,
        "max_position_embeddings": arch.context_length,
    }))
    shutil.copy(fixture_dir("tiny") / "tokenizer.json", hf / "tokenizer.json")
    (hf / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    assert run_cli("from-hf", hf, "--out", tmp_path / "out") == 0
    from mulm_export.runner import OrtModel

    a, b = OrtModel(tmp_path / "out"), OrtModel(fixture_dir("tiny"))
    ids = [5, 17, 300, 42]
    assert np.allclose(a.step(ids), b.step(ids), atol=1e-6)


def test_a_file_that_is_not_gguf_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"hello")
    assert run_cli("from-gguf", bad, "--out", tmp_path / "out") == 2
    assert "bad.gguf" in capsys.readouterr().err


def test_the_launcher_runs_from_a_shell():
    launcher = Path(__file__).resolve().parents[1] / "mulm-export"
    env = dict(os.environ, MULMD_VENV=str(Path(sys.executable).parents[1]))
    out = subprocess.run([str(launcher), "--version"], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "mulm-export" in out.stdout


@pytest.mark.parametrize("precision", ["float32", "q4"])
def test_verify_catches_a_miswired_graph(tmp_path, monkeypatch, capsys, precision):
    """verify's reference is independent of the graph writer: a graph whose rotary embedding
    turns the wrong way must fail it, at q4 too, where the reference takes onnxruntime's
    rounding of values on an int8 rounding edge."""
    from mulm_export import graph

    real = graph.rope_tables
    monkeypatch.setattr(graph, "rope_tables", lambda arch: (real(arch)[0], -real(arch)[1]))
    # Large weights make attention sharp enough for the error to show in the logits.
    monkeypatch.setattr(sources, "generated_weights",
                        lambda arch, seed, real_gen=sources.generated_weights: {
                            k: (v * 50 if v.ndim == 2 else v) for k, v in real_gen(arch, seed).items()})
    assert run_cli("generate", "--shape", "tiny", "--seed", 2, "--precision", precision, "--out", tmp_path / "bad") == 0
    with pytest.raises(SystemExit) as e:
        cli.main(["verify", str(tmp_path / "bad")])
    assert e.value.code == 1
    assert "FAILED" in capsys.readouterr().err


def _llama_cpp_logits(gguf: Path, ids: list[int]) -> np.ndarray:
    from llama_cpp import Llama

    from mulm_export.llamacpp import _last_logits

    llama = Llama(model_path=str(gguf), n_ctx=128, n_threads=1, verbose=False)
    llama.eval(ids)
    return _last_logits(llama)


def test_a_gguf_of_the_tiny_model_gives_llama_cpp_onnxruntimes_logits(tmp_path, fixture_dir):
    """The GGUF bench/compare_runtimes.py hands llama.cpp must be the same model: names, the
    rotary row permutation and the tokenizer metadata all right, or the logits drift."""
    tiny = fixture_dir("tiny")
    gguf = tmp_path / "tiny.gguf"
    assert cli.main(["to-gguf", str(tiny), "--out", str(gguf)]) == 0
    _, weights, tokenizer = gguf_source.read(str(gguf))
    arch = Arch.from_json(json.loads((tiny / "mulm.json").read_text())["architecture"])
    ours = onnx_weights.read(tiny / "model.onnx", arch)
    for name, w in ours.items():
        np.testing.assert_array_equal(weights[name], w, err_msg=name)
    assert tokenizer["tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

    ids = [1, 882, 198, 40, 1055, 260, 3152, 30, 2, 198, 1, 520, 9531, 198]
    expected = OrtModel(tiny).step(ids)
    got = _llama_cpp_logits(gguf, ids)
    scale = max(1.0, float(np.abs(expected).max()))
    assert np.abs(got - expected).max() <= 1e-3 * scale
    assert int(got.argmax()) == int(expected.argmax())


def test_a_quantized_gguf_is_written_and_loads(tmp_path, fixture_dir):
    gguf = tmp_path / "tiny-q8.gguf"
    assert cli.main(["to-gguf", str(fixture_dir("tiny")), "--out", str(gguf), "--type", "Q8_0"]) == 0
    ids = [1, 882, 198, 40, 1055]
    expected = OrtModel(fixture_dir("tiny")).step(ids)
    got = _llama_cpp_logits(gguf, ids)
    # 8-bit weights move the logits a little, not the way a wrong layout would.
    assert np.corrcoef(got, expected)[0, 1] > 0.99


def test_the_quality_report_finds_a_model_identical_to_itself(fixture_dir, capsys):
    tiny = fixture_dir("tiny")
    assert cli.main(["verify", str(tiny), "--baseline", str(tiny), "--quality", "--questions", "5", "--greedy-steps", "6"]) == 0
    q = json.loads(capsys.readouterr().out)["quality"]
    assert (q["questions"], q["steps"]) == (5, 6)
    assert q["greedy_agreement"] == 1.0 and q["identical_openers"] == 1.0 and q["max_abs_error"] == 0.0
    assert q["differing"] == []


def test_the_quality_report_measures_what_4_bit_costs(fixture_dir, capsys):
    assert cli.main(["verify", str(fixture_dir("tiny-q4")), "--baseline", str(fixture_dir("tiny")), "--quality",
                     "--questions", "5", "--greedy-steps", "6"]) == 0
    captured = capsys.readouterr()
    q = json.loads(captured.out)["quality"]
    assert q["precision"] == "q4" and q["max_abs_error"] > 0 and 0 <= q["greedy_agreement"] <= 1
    assert "identical openers" in captured.err


def test_quality_without_a_baseline_says_what_to_add(fixture_dir, capsys):
    assert cli.main(["verify", str(fixture_dir("tiny-q4")), "--quality"]) == 2
    assert "--baseline" in capsys.readouterr().err


def test_a_q4_1_gguf_keeps_its_blocks_at_q4(tmp_path, fixture_dir):
    """SmolLM2's GGUF is Q4_1: exported at q4, every matrix keeps its blocks (codes, scales and
    minimums, the minimum as the block's offset term) instead of being turned into Q4_0, and
    the logits are llama.cpp's on the same file up to the activations' rounding, in
    onnxruntime and in the numpy reference alike."""
    gguf = tmp_path / "tiny-Q4_1.gguf"
    assert cli.main(["to-gguf", str(fixture_dir("tiny")), "--out", str(gguf), "--type", "Q4_1"]) == 0
    out = tmp_path / "out"
    assert cli.main(["from-gguf", str(gguf), "--out", str(out), "--precision", "q4"]) == 0
    arch, source, _ = gguf_source.read(str(gguf))
    formats = gguf_source.block_formats(str(gguf))
    exported = onnx_weights.read(out / "model.onnx", arch)
    products = onnx_weights.int8_products(out / "model.onnx")
    matrices = [n for n, w in source.items() if w.ndim == 2 and n != "model.embed_tokens.weight"]
    assert len(matrices) == 7 * arch.num_layers
    for name in matrices + ["__head__"]:
        src = source["model.embed_tokens.weight" if name == "__head__" else name]
        assert formats.get(name, "Q4_1") == "Q4_1" and products[name] is not None, name
        # The same weights up to float32 rounding: (code − 8) · d + (m + 8d) against code · d + m.
        assert np.allclose(exported[name], src, rtol=0, atol=4 * np.abs(src).max() * 2.0**-23), name
        again = quant.quantize_q4_1(exported[name])
        assert np.array_equal(again[0], quant.quantize_q4_1(src)[0]), f"{name}: codes moved"
    ids = [1, 882, 198, 40, 1055]
    got, want = OrtModel(out).step(ids), _llama_cpp_logits(gguf, ids)
    scale = float(np.max(np.abs(want)))
    assert float(np.max(np.abs(got - want))) < 0.02 * scale and int(np.argmax(got)) == int(np.argmax(want))
    assert cli.main(["verify", str(out)]) == 0, "onnxruntime agrees with the numpy reference"


@pytest.mark.parametrize("gguf_type,precision", [("Q4_0", "q4"), ("Q8_0", "q8")])
def test_a_q4_0_or_q8_0_gguf_keeps_its_blocks(tmp_path, fixture_dir, gguf_type, precision):
    """Q4_0 and Q8_0 are the q4 and q8 precisions' own block formats: such a GGUF exported at
    that precision keeps every weight exactly (the dequantized block still holds its extreme,
    −8·d or ±127·d, so the scale and the codes come back as they were), and its logits are
    llama.cpp's on the same file up to the activations' rounding."""
    gguf = tmp_path / f"tiny-{gguf_type}.gguf"
    assert cli.main(["to-gguf", str(fixture_dir("tiny")), "--out", str(gguf), "--type", gguf_type]) == 0
    out = tmp_path / "out"
    assert cli.main(["from-gguf", str(gguf), "--out", str(out), "--precision", precision]) == 0
    arch, source, _ = gguf_source.read(str(gguf))
    exported = onnx_weights.read(out / "model.onnx", arch)
    matrices = [n for n, w in source.items() if w.ndim == 2 and n != "model.embed_tokens.weight"]
    assert len(matrices) == 7 * arch.num_layers
    for name in matrices:
        assert np.array_equal(exported[name], source[name]), name
    assert np.array_equal(exported["__head__"], source["model.embed_tokens.weight"]), "the tied head"
    ids = [1, 882, 198, 40, 1055]
    got, want = OrtModel(out).step(ids), _llama_cpp_logits(gguf, ids)
    scale = float(np.max(np.abs(want)))
    assert float(np.max(np.abs(got - want))) < 0.02 * scale and int(np.argmax(got)) == int(np.argmax(want))
