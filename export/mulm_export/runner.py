"""Running a model directory with onnxruntime, the reference runtime, and greedy decoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .arch import Arch
from .modeldir import read_manifest


class OrtModel:
    """One onnxruntime session plus its KV cache; `step(ids)` feeds tokens, returns logits."""

    def __init__(self, directory: Path, threads: int = 1, taps: tuple[str, ...] = ()) -> None:
        """`taps` names inner values to return too: after each step, `tapped` holds them."""
        import onnx
        import onnxruntime as ort

        self.manifest = read_manifest(directory)
        self.arch = Arch.from_json(self.manifest["architecture"])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        path = str(Path(directory) / "model.onnx")
        if taps:
            model = onnx.load(path)
            model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in taps)
            path = model.SerializeToString()
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.tapped: dict[str, np.ndarray] = {}
        self.reset()

    def reset(self) -> None:
        a = self.arch
        empty = np.zeros((1, a.num_kv_heads, 0, a.head_dim), dtype=np.float32)
        self.past = {f"past.{i}.{k}": empty for i in range(a.num_layers) for k in ("key", "value")}

    def step(self, ids: list[int]) -> np.ndarray:
        feed = {"input_ids": np.asarray([ids], dtype=np.int64), **self.past}
        outs = self.session.run(None, feed)
        names = [o.name for o in self.session.get_outputs()]
        result = dict(zip(names, outs))
        self.past = {n.replace("present.", "past."): v for n, v in result.items() if n.startswith("present.")}
        self.tapped = {n: v for n, v in result.items() if n != "logits" and not n.startswith("present.")}
        return result["logits"][0]


def greedy(step, prompt_ids: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens and the logits each was chosen from (prefill, then n-1 decode steps)."""
    tokens, logits = [], []
    out = step(prompt_ids)
    for _ in range(n):
        logits.append(np.asarray(out))
        tok = int(np.argmax(out))
        tokens.append(tok)
        out = step([tok])
    return tokens, logits
