"""The daemon's gRPC API through an independent client: Python grpcio with stubs generated
here from proto/ (nothing shared with the Rust side), against a real `mulmd serve` process
on TCP and on a Unix socket."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

ROOT = Path(__file__).resolve().parents[3]
SHOES = "How do I remove odor from inside my shoes?"
OPENER = "Removing odor from inside your shoes is a"



@pytest.fixture(scope="session")
def pb(tmp_path_factory):
    """mulm_pb2 and mulm_pb2_grpc compiled from proto/ by grpcio-tools."""
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("stubs")
    proto_root = ROOT / "proto"
    rc = protoc.main(["protoc", f"-I{proto_root}", f"--python_out={out}", f"--grpc_python_out={out}", str(proto_root / "mulm/v1/mulm.proto")])
    assert rc == 0, "protoc failed on proto/mulm/v1/mulm.proto"
    sys.path.insert(0, str(out))
    from mulm.v1 import mulm_pb2, mulm_pb2_grpc

    return mulm_pb2, mulm_pb2_grpc


class StallingCloud:
    """An OpenAI-compatible endpoint that accepts and never answers, and notices when the
    daemon hangs up (which is how a cancelled continuation shows from outside)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.completions_closed = threading.Event()
        self.completions_open = threading.Event()
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.hold, args=(conn,), daemon=True).start()

    def hold(self, conn):
        head = conn.recv(65536)
        is_completion = b"/chat/completions" in head
        if is_completion:
            self.completions_open.set()
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass
        if is_completion:
            self.completions_closed.set()
        conn.close()


@pytest.fixture
def daemon(tmp_path, fixture_model, need):
    """`mulmd serve` with the SmolLM2 fixture, TCP + Unix socket, and a stalling cloud."""
    binary = os.environ.get("MULMD_BIN") or shutil.which("mulmd")
    if not binary or not Path(binary).exists():
        need("the mulmd binary", "build it and set MULMD_BIN (scripts/test does both)")
    cloud = StallingCloud()
    sock = tmp_path / "api.sock"
    config = tmp_path / "mulmd.toml"
    config.write_text(
        f"""
[model]
dir = "{fixture_model}"
[cloud]
enabled = true
base_url = "{cloud.url}"
first_token_timeout_ms = 60000
total_timeout_ms = 60000
# Set, not "auto": the layout probe would be the first request this cloud holds, and the
# tests watch the continuation's own connection.
prompt = "prefill"
[grpc]
listen = "127.0.0.1:0"
unix_socket = "{sock}"
grace_period_ms = 5000
"""
    )
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([binary, "serve", "--config", str(config)], stdout=log, stderr=log)
    # Port 0: the daemon binds a free port and names it in its "serving ... on gRPC <addr>" line,
    # so no other process can take the port between a probe and the bind.
    serve_log = tmp_path / "serve.log"
    deadline = time.time() + 120
    while not (serving := re.search(r"serving .* on gRPC (127\.0\.0\.1:\d+)", serve_log.read_text())):
        assert proc.poll() is None, f"mulmd serve exited: {serve_log.read_text()}"
        assert time.time() < deadline, f"mulmd serve did not start serving: {serve_log.read_text()}"
        time.sleep(0.1)
    addr = serving.group(1)
    yield {"addr": addr, "unix": f"unix:{sock}", "socket": sock, "proc": proc, "cloud": cloud}
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()


@pytest.fixture
def fixture_model(fixture_dir):
    return fixture_dir("smollm2")


def kinds(events):
    return [e.WhichOneof("event") for e in events]


def test_open_over_the_unix_socket_returns_the_opener(pb, daemon):
    mulm_pb2, mulm_pb2_grpc = pb
    # grpcio sends the socket path as :authority, which HTTP/2 servers built on h2 (tonic)
    # refuse as malformed (hyperium/h2#487); "localhost" is what grpc-go and grpcurl send.
    with grpc.insecure_channel(daemon["unix"], options=[("grpc.default_authority", "localhost")]) as ch:
        r = mulm_pb2_grpc.AnswererStub(ch).Open(mulm_pb2.OpenRequest(query=SHOES), timeout=60)
    assert r.opener == OPENER
    assert [w.text for w in r.words][:2] == ["Removing", "odor"]
    assert 0 < r.timings.ttft_ms <= r.timings.opener_ms
    assert r.generated_tokens >= len(r.words)


def test_no_cloud_answer_streams_words_opener_deltas_and_one_final(pb, daemon):
    mulm_pb2, mulm_pb2_grpc = pb
    with grpc.insecure_channel(daemon["addr"]) as ch:
        req = mulm_pb2.AnswerRequest(query=SHOES, options=mulm_pb2.Options(cloud=False))
        events = list(mulm_pb2_grpc.AnswererStub(ch).Answer(req, timeout=60))
    k = kinds(events)
    first_done = k.index("opener_done")
    assert set(k[:first_done]) == {"word"} and first_done == 8
    assert k[-1] == "final" and k.count("final") == 1
    assert set(k[first_done + 1 : -1]) <= {"delta"}
    final = events[-1].final
    assert final.opener == OPENER and final.fallback.reason == "disabled"
    words = "".join((w.word.leading + w.word.text) for w in events[:first_done])
    assert words == OPENER
    deltas = "".join(e.delta.text for e in events if e.WhichOneof("event") == "delta")
    assert final.text == OPENER + deltas


def test_bad_requests_are_invalid_argument_with_the_fix_named(pb, daemon):
    mulm_pb2, mulm_pb2_grpc = pb
    with grpc.insecure_channel(daemon["addr"]) as ch:
        stub = mulm_pb2_grpc.AnswererStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.Open(mulm_pb2.OpenRequest(query="   "), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "empty" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Answer(mulm_pb2.AnswerRequest(query="Hi?", options=mulm_pb2.Options(max_words=500)), timeout=30))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_words_limit" in e.value.details()


def test_a_deadline_ends_the_stream_and_cancels_the_cloud_call(pb, daemon):
    mulm_pb2, mulm_pb2_grpc = pb
    with grpc.insecure_channel(daemon["addr"]) as ch:
        stub = mulm_pb2_grpc.AnswererStub(ch)
        seen = []
        with pytest.raises(grpc.RpcError) as e:
            for ev in stub.Answer(mulm_pb2.AnswerRequest(query=SHOES), timeout=3):
                seen.append(ev.WhichOneof("event"))
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "opener_done" in seen, "the opener arrived before the stalled cloud ran out the deadline"
        assert daemon["cloud"].completions_closed.wait(30), "the daemon hung up on the cloud"
        # And it goes on serving.
        assert stub.Open(mulm_pb2.OpenRequest(query=SHOES), timeout=60).opener == OPENER


def test_cancelling_mid_answer_hangs_up_on_the_cloud(pb, daemon):
    mulm_pb2, mulm_pb2_grpc = pb
    with grpc.insecure_channel(daemon["addr"]) as ch:
        stub = mulm_pb2_grpc.AnswererStub(ch)
        call = stub.Answer(mulm_pb2.AnswerRequest(query=SHOES), timeout=120)
        for ev in call:
            if ev.WhichOneof("event") == "opener_done":
                break
        assert daemon["cloud"].completions_open.wait(30), "the continuation was requested"
        call.cancel()
        assert daemon["cloud"].completions_closed.wait(30), "cancelling the call closed the cloud request"
        assert stub.Open(mulm_pb2.OpenRequest(query=SHOES), timeout=60).opener == OPENER


def test_health_and_reflection_work_untold(pb, daemon):
    with grpc.insecure_channel(daemon["addr"]) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "mulm.v1.Answerer"):
            r = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert r.status == health_pb2.HealthCheckResponse.SERVING, service
        db = ProtoReflectionDescriptorDatabase(ch)
        services = db.get_services()
        assert "mulm.v1.Answerer" in services and "grpc.health.v1.Health" in services
        answerer = db.FindFileContainingSymbol("mulm.v1.Answerer")
        assert answerer.package == "mulm.v1"
        methods = {m.name for s in answerer.service for m in s.method}
        assert {"Answer", "Open"} <= methods


def test_sigterm_exits_cleanly_and_removes_the_socket(pb, daemon):
    proc = daemon["proc"]
    assert daemon["socket"].exists()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert not daemon["socket"].exists()
