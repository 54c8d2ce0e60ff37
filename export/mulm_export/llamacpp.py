"""verify's llama.cpp checks for GGUF-sourced models (llama-cpp-python from PyPI).

1. Tokenizer: our tokenizer.json must give llama.cpp's ids on a varied corpus.
2. Numerics: a float32 GGUF of the same weights (the source dequantized, nothing else changed)
   decoded greedily by llama.cpp must pick the same tokens as onnxruntime on our model.onnx.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from .runner import OrtModel, greedy

CORPUS = [
    "Hello, world! How are you today?",
    "  leading spaces, trailing spaces   ",
    "Numbers: 3.14159, 2,718, 1e-9, 0x1F, 1234567890 and 42%.",
    "def add(a, b):\n    return a + b  # sum\n\tindented\twith tabs",
    "Emoji: 😀🎉👍🏽 and symbols © ® ™ → ∑ ≠ ∞",
    "Non-Latin: Привет мир. こんにちは世界。 مرحبا بالعالم. 你好，世界！ नमस्ते",
    "Quotes 'single' \"double\" «guillemets» and it's they're we'll I'd",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "Mixed-case WORDS, snake_case, camelCase and URLs like https://example.com/a?b=c&d=e",
    "Line one\n\nLine three\r\nWindows line\n",
    "Ünïcödé àccents: naïve café, façade, Zürich, São Paulo",
    "",
]

PROMPTS = [
    "How do I remove odor from inside my shoes?",
    "What is the capital of France?",
    "Give me three tips for better sleep.",
    "Write a haiku about autumn.",
]


def write_f32_gguf(src: Path, dst: Path, qtype: str = "F32") -> None:
    """The source GGUF with every tensor dequantized to float32 (metadata copied as is), or
    with `qtype="Q8_0"` its matrices quantized again to Q8_0 by the gguf package (vectors, the
    norms, stay float32, as llama.cpp's own quantizer keeps them)."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize, quantize

    if qtype not in ("F32", "Q8_0"):
        raise ValueError(f"GGUF type {qtype!r} is not F32 or Q8_0")

    reader = GGUFReader(str(src))
    writer = GGUFWriter(str(dst), arch=reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        vtype = GGUFValueType(field.types[0])
        sub = GGUFValueType(field.types[1]) if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
    # llama.cpp's LLAMA_FTYPE_ALL_F32 / MOSTLY_Q8_0
    writer.add_key_value("general.file_type", 0 if qtype == "F32" else 7, GGUFValueType.UINT32)
    for t in reader.tensors:
        data = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if qtype == "Q8_0" and data.ndim == 2:
            q8 = GGMLQuantizationType.Q8_0
            writer.add_tensor(t.name, quantize(data, q8), raw_dtype=q8)  # shape read from the block bytes
        else:
            writer.add_tensor(t.name, data, raw_dtype=GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _llama(path: Path, **kw):
    try:
        from llama_cpp import Llama
    except ImportError as e:
        raise ValueError("llama-cpp-python is not installed; run export/setup-venv --with-llama-cpp") from e
    return Llama(model_path=str(path), verbose=False, **kw)


def _last_logits(llama) -> np.ndarray:
    """The last evaluated position's logits, read from llama.cpp's context directly (the
    high-level `scores` array is only filled with logits_all)."""
    import llama_cpp

    ptr = llama_cpp.llama_get_logits_ith(llama.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llama.n_vocab(),)).copy()


def check_tokenizer(directory: Path, gguf: Path) -> dict:
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(Path(directory) / "tokenizer.json"))
    llama = _llama(gguf, vocab_only=True)
    mismatches = []
    for text in CORPUS:
        want = llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        got = ours.encode(text, add_special_tokens=False).ids
        if list(want) != list(got):
            mismatches.append({"text": text, "llama_cpp": list(want), "ours": list(got)})
    return {"texts": len(CORPUS), "mismatches": mismatches, "ok": not mismatches}


def check_greedy(directory: Path, gguf: Path, steps: int) -> dict:
    """Greedy tokens of llama.cpp (float32 GGUF) and onnxruntime (our model.onnx) per prompt."""
    from .verify import prompt_ids
    import jinja2

    model = OrtModel(directory)
    template = jinja2.Environment().from_string(model.manifest["chat_template"])
    with tempfile.TemporaryDirectory() as tmp:
        f32 = Path(tmp) / "f32.gguf"
        write_f32_gguf(gguf, f32)
        llama = _llama(f32, n_ctx=512, n_threads=int(os.environ.get("MULMD_VERIFY_THREADS", "1")), n_batch=512)
        results = []
        for prompt in PROMPTS:
            text = template.render(messages=[{"role": "user", "content": prompt}], add_generation_prompt=True)
            ids = prompt_ids(directory, text)
            model.reset()
            ours, _ = greedy(model.step, ids, steps)
            llama.reset()
            llama.eval(ids)
            theirs = []
            for _ in range(steps):
                tok = int(np.argmax(_last_logits(llama)))
                theirs.append(tok)
                llama.eval([tok])
            agree = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), steps)
            results.append({"prompt": prompt, "agreeing_steps": agree, "ours": ours, "llama_cpp": theirs})
    return {"steps": steps, "prompts": results, "ok": all(r["agreeing_steps"] >= steps for r in results)}


def check(directory: Path, gguf: Path, steps: int) -> dict:
    report = {"tokenizer": check_tokenizer(directory, gguf)}
    manifest_precision = OrtModel(directory).manifest["precision"]
    if manifest_precision == "float32":
        report["greedy"] = check_greedy(directory, gguf, steps)
    else:
        report["greedy"] = {"skipped": f"greedy agreement is checked on float32 exports, this one is {manifest_precision}", "ok": True}
    report["ok"] = report["tokenizer"]["ok"] and report["greedy"]["ok"]
    return report
