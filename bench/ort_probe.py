"""onnxruntime's side of compare_runtimes.py: the same measurement `mulmd probe` makes, on the
same model.onnx, printed as the same JSON. Run in a fresh process per configuration."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))

from probe_common import measure, parser  # noqa: E402


def main() -> None:
    a = parser().parse_args()
    from mulm_export.runner import OrtModel

    t = time.perf_counter()
    model = OrtModel(Path(a.model), threads=a.threads)
    load_ms = (time.perf_counter() - t) * 1e3
    measure(a, "onnxruntime", model.manifest["precision"], load_ms, model.reset, model.step)


if __name__ == "__main__":
    main()
