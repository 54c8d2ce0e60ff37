"""What the daemon adds between the engine and a client: a real `mulmd serve` on loopback, an
independent client (Python grpcio, stubs generated from proto/ here), and for each request the
client's own clock from sending it to receiving the first opener word, beside the engine's
clock for that word (`Word.at_ms`: from the request's arrival in the daemon to the word being
emitted) and the engine's TTFT.

overhead = client-observed first word - engine's first word: gRPC framing both ways, the
loopback hops, the handler and the event channel. Cloud off, one worker, one request at a
time, after warm-up requests.

  python bench/grpc_latency.py [--model DIR] [--requests 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "How do I remove odor from inside my shoes?",
    "What is the capital of France?",
    "Give me three tips for better sleep.",
    "Why is the sky blue?",
    "How long should I boil an egg?",
]


def stubs(out: Path):
    from grpc_tools import protoc

    proto = ROOT / "proto"
    if protoc.main(["protoc", f"-I{proto}", f"--python_out={out}", f"--grpc_python_out={out}",
                    str(proto / "mulm/v1/mulm.proto")]) != 0:
        raise SystemExit("protoc failed on proto/mulm/v1/mulm.proto")
    sys.path.insert(0, str(out))
    from mulm.v1 import mulm_pb2, mulm_pb2_grpc

    return mulm_pb2, mulm_pb2_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(channel, proc, log: Path) -> None:
    """Waits (at most 2 minutes) for `mulmd serve` (`proc`) to answer on `channel`; if it
    exits or does not come up, stops with the end of its log."""
    import grpc

    ready = grpc.channel_ready_future(channel)
    deadline = time.monotonic() + 120
    while not ready.done():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"mulmd serve did not come up; its log:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(Path.home() / ".cache/mulmd/bench-models/smollm2-f32"))
    p.add_argument("--requests", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mulmd", default=str(Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release/mulmd"))
    a = p.parse_args()
    import grpc

    tmp = Path(tempfile.mkdtemp(prefix="mulmd-grpc-latency-"))
    mulm_pb2, mulm_pb2_grpc = stubs(tmp)
    port = free_port()
    config = tmp / "mulmd.toml"
    config.write_text(f'[model]\ndir = "{a.model}"\nthreads = {a.threads}\n[engine]\nworkers = 1\n'
                      f'[cloud]\nenabled = false\n[grpc]\nlisten = "127.0.0.1:{port}"\n')
    log = open(tmp / "serve.log", "w")
    proc = subprocess.Popen([a.mulmd, "serve", "--config", str(config)], stdout=log, stderr=log)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            log.flush()
            wait_ready(ch, proc, tmp / "serve.log")
            stub = mulm_pb2_grpc.AnswererStub(ch)
            rows = []
            for i in range(a.warmup + a.requests):
                req = mulm_pb2.AnswerRequest(query=QUESTIONS[i % len(QUESTIONS)], options=mulm_pb2.Options(cloud=False))
                t0 = time.perf_counter()
                first = ttft = None
                for ev in stub.Answer(req, timeout=60):
                    kind = ev.WhichOneof("event")
                    if kind == "word" and first is None:
                        first = ((time.perf_counter() - t0) * 1e3, ev.word.at_ms)
                    elif kind == "opener_done":
                        ttft = ev.opener_done.timings.ttft_ms
                if first and ttft is not None and i >= a.warmup:
                    rows.append((first[0], first[1], ttft))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    client = [r[0] for r in rows]
    engine = [r[1] for r in rows]
    overhead = [r[0] - r[1] for r in rows]
    ttft = [r[2] for r in rows]
    med = statistics.median
    print(f"model {a.model}, {len(rows)} requests over TCP loopback, {a.threads} thread(s), cloud off\n")
    print("| | median ms | p95 ms |")
    print("|---|---|---|")
    print(f"| engine TTFT (arrival to first token) | {med(ttft):.2f} | {pct(ttft, 0.95):.2f} |")
    print(f"| engine: arrival to first word emitted | {med(engine):.2f} | {pct(engine, 0.95):.2f} |")
    print(f"| client: request sent to first word received | {med(client):.2f} | {pct(client, 0.95):.2f} |")
    print(f"| overhead (client - engine, per request) | {med(overhead):.2f} | {pct(overhead, 0.95):.2f} |")


if __name__ == "__main__":
    main()
