"""Writing and reading a mulmd model directory: model.onnx, tokenizer.json and mulm.json.

mulm.json (the manifest) is the contract with the engine:
  format           "mulmd-model/1"
  name             a label for logs and reports
  architecture     the Arch fields plus head_dim
  precision        "float32", "q8" or "q4"
  context_length   the longest sequence (prompt + generated) the model supports
  special_tokens   bos / eos token text (bos may be null), add_bos, and stop: every token text
                   that ends generation
  chat_template    a Jinja template over `messages` (role, content) and `add_generation_prompt`
  graph            the ONNX interface: inputs, outputs, and that logits are last-position only
  source           where the weights came from: kind, file name, sha256
  files            sha256 of model.onnx and tokenizer.json
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .arch import Arch

FORMAT = "mulmd-model/1"
MANIFEST = "mulm.json"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write(out: Path, *, name: str, arch: Arch, precision: str, onnx_bytes_writer, tokenizer: dict,
          bos: str | None, eos: str, stop: list[str], add_bos: bool, chat_template: str, source: dict) -> Path:
    """Writes the directory atomically enough for a cache: files go in, then the manifest last,
    so a directory with a manifest is complete."""
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        manifest_path.unlink()
    onnx_bytes_writer(out / "model.onnx")
    with open(out / "tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(tokenizer, f, ensure_ascii=False)
    manifest = {
        "format": FORMAT,
        "name": name,
        "architecture": arch.to_json(),
        "precision": precision,
        "context_length": arch.context_length,
        "special_tokens": {"bos": bos, "eos": eos, "add_bos": add_bos, "stop": stop},
        "chat_template": chat_template,
        "graph": {
            "inputs": ["input_ids", "past.{layer}.key", "past.{layer}.value"],
            "outputs": ["logits", "present.{layer}.key", "present.{layer}.value"],
            "logits": "last_position",
            "kv_layout": "[1, kv_heads, sequence, head_dim]",
        },
        "source": source,
        "files": {n: sha256_file(out / n) for n in ("model.onnx", "tokenizer.json")},
    }
    tmp = out / (MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, manifest_path)
    return out


def read_manifest(d: Path) -> dict:
    p = Path(d) / MANIFEST
    if not p.is_file():
        raise ValueError(f"{p} is missing: {d} is not a mulmd model directory")
    m = json.loads(p.read_text(encoding="utf-8"))
    if m.get("format") != FORMAT:
        raise ValueError(f"{p}: format {m.get('format')!r} is not {FORMAT}")
    return m
