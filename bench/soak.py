"""A soak of `mulmd serve` against a cloud that misbehaves on purpose: thousands of mixed
requests over gRPC (Python grpcio, stubs generated from proto/ here), each continued by a
fake OpenAI-compatible endpoint that picks a fault at random (an endless stream, a flood
then a stall, one huge event, a 429 with a nonsense Retry-After, a 5 MB error body, a
malformed event, a stall, or a normal answer), with clients that cancel or set short
deadlines. The daemon's resident memory is sampled every second.

It checks what must hold whatever the cloud does: every request ends exactly once (a Final,
or a status), the daemon stays up, and memory stays flat after warm-up. It prints the RSS
timeline and a summary (not a CI test: run it by hand; results go in bench/RESULTS.md).

  python bench/soak.py [--model DIR] [--requests 4000] [--concurrency 8] [--seed 1]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpc_latency import QUESTIONS, stubs  # noqa: E402

FAULTS = ["normal", "normal", "endless", "flood_stall", "huge_event", "bad_retry_after", "huge_error", "malformed", "stall"]


def chunk(text: str) -> bytes:
    body = {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    return f"data: {json.dumps(body)}\n\n".encode()


class FaultyCloud(BaseHTTPRequestHandler):
    """Each chat-completions request gets a fault drawn from FAULTS (seeded per request)."""

    protocol_version = "HTTP/1.1"
    rng = random.Random(0)
    lock = threading.Lock()
    served = collections.Counter()

    def log_message(self, *_):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def sse_head(self):
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("connection", "close")
        self.end_headers()

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        with FaultyCloud.lock:
            fault = FaultyCloud.rng.choice(FAULTS)
            FaultyCloud.served[fault] += 1
        self.close_connection = True
        try:
            getattr(self, fault)()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon hung up: what a cap or a cancel looks like from here

    def normal(self):
        self.sse_head()
        for w in " it is simple to do at home.".split(" ")[1:]:
            self.wfile.write(chunk(" " + w))
        self.wfile.write(b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n')

    def endless(self):
        self.sse_head()
        piece = chunk(" more")
        while True:
            self.wfile.write(piece * 64)

    def flood_stall(self):
        self.sse_head()
        self.wfile.write(chunk(" word") * 500)
        self.wfile.flush()
        time.sleep(30)

    def huge_event(self):
        self.sse_head()
        self.wfile.write(chunk("x" * 300_000))

    def bad_retry_after(self):
        body = b'{"error":{"message":"slow down"}}'
        self.send_response(429)
        self.send_header("retry-after", random.choice(["NaN", "-1", "inf", "1e300", "99999999999999999999"]))
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def huge_error(self):
        body = b"E" * (5 << 20)
        self.send_response(500)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def malformed(self):
        self.sse_head()
        self.wfile.write(b"data: {not json at all\n\n")

    def stall(self):
        time.sleep(30)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.environ.get("MULMD_TEST_MODELS", str(Path.home() / ".cache/mulmd/test-models")) + "/smollm2")
    p.add_argument("--bin", default=str(ROOT / "target/release/mulmd"))
    p.add_argument("--requests", type=int, default=4000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    import grpc

    FaultyCloud.rng = random.Random(a.seed)
    cloud = ThreadingHTTPServer(("127.0.0.1", 0), FaultyCloud)
    cloud.daemon_threads = True
    threading.Thread(target=cloud.serve_forever, daemon=True).start()
    work = Path(tempfile.mkdtemp(prefix="mulmd-soak-"))
    pb, pb_grpc = stubs(work)
    config = work / "mulmd.toml"
    config.write_text(f"""
[model]
dir = "{a.model}"
[engine]
queue_depth = 16
[cloud]
enabled = true
base_url = "http://127.0.0.1:{cloud.server_address[1]}/v1"
first_token_timeout_ms = 2000
idle_timeout_ms = 1000
total_timeout_ms = 8000
max_retries = 1
[grpc]
listen = "127.0.0.1:0"
grace_period_ms = 2000
[log]
level = "warn"
""")
    log = open(work / "mulmd.log", "w+")
    daemon = subprocess.Popen([a.bin, "serve", "--config", str(config), "--log", "info"], stderr=log)
    addr = None
    for _ in range(600):
        time.sleep(0.1)
        log.seek(0)
        for line in log:
            if "serving " in line and "gRPC " in line:
                addr = line.split("gRPC ")[1].split(",")[0].split(";")[0].strip()
        if addr or daemon.poll() is not None:
            break
    if not addr:
        raise SystemExit(f"mulmd serve did not start; log in {work / 'mulmd.log'}")
    print(f"mulmd serve pid {daemon.pid} on {addr}; cloud on :{cloud.server_address[1]}; {a.requests} requests, {a.concurrency} at a time")

    rss: list[tuple[float, float]] = []
    stop = threading.Event()
    t0 = time.time()

    def sample():
        while not stop.wait(1.0):
            rss.append((time.time() - t0, rss_mb(daemon.pid)))

    threading.Thread(target=sample, daemon=True).start()
    outcomes = collections.Counter()
    ends = collections.Counter()
    lock = threading.Lock()
    channel = grpc.insecure_channel(addr, options=[("grpc.max_receive_message_length", 4 << 20)])
    client = pb_grpc.AnswererStub(channel)

    def one(i: int):
        r = random.Random(a.seed * 1_000_003 + i)
        kind = r.choice(["answer", "answer", "answer", "deadline", "cancel", "open"])
        query = r.choice(QUESTIONS)
        finals = 0
        try:
            if kind == "open":
                client.Open(pb.OpenRequest(query=query), timeout=60)
                outcome = "open"
            else:
                timeout = r.uniform(0.05, 1.5) if kind == "deadline" else 120
                call = client.Answer(pb.AnswerRequest(query=query), timeout=timeout)
                for n, ev in enumerate(call):
                    if ev.WhichOneof("event") == "final":
                        finals += 1
                        outcome = "final:" + (ev.final.fallback.reason or ev.final.finish_reason or "stop")
                    if kind == "cancel" and n == 2:
                        call.cancel()
                if finals == 0:
                    outcome = "no_final"
        except grpc.RpcError as e:
            outcome = "status:" + e.code().name
        with lock:
            outcomes[outcome] += 1
            ends[finals] += 1

    with ThreadPoolExecutor(a.concurrency) as pool:
        list(pool.map(one, range(a.requests)))
    elapsed = time.time() - t0
    stop.set()
    alive = daemon.poll() is None
    daemon.terminate()
    code = daemon.wait(timeout=30)

    print(f"\n{a.requests} requests in {elapsed:.0f} s; daemon alive at the end: {alive}; exit after SIGTERM: {code}")
    print("cloud faults served:", dict(FaultyCloud.served))
    print("outcomes:", dict(sorted(outcomes.items())))
    print("Final events per answer:", dict(ends))
    if rss:
        warm = [m for t, m in rss if t > min(60, elapsed / 4)] or [m for _, m in rss]
        print(f"RSS MB: start {rss[0][1]:.1f}, after warm-up min {min(warm):.1f} max {max(warm):.1f} (spread {max(warm) - min(warm):.1f}), end {rss[-1][1]:.1f}")
        step = max(1, len(rss) // 20)
        print("RSS over time (s: MB):", ", ".join(f"{t:.0f}: {m:.1f}" for t, m in rss[::step]))
    bad = outcomes.get("no_final", 0) + sum(v for k, v in ends.items() if k > 1)
    if bad or not alive or code != 0:
        raise SystemExit(f"FAILED: {bad} answers without exactly one Final, alive={alive}, exit={code}; log in {work / 'mulmd.log'}")


if __name__ == "__main__":
    main()
