"""Who may reach `mulmd serve`: bearer tokens on every TCP listener (gRPC through grpcio, the
OpenAI API through the `openai` package, /metrics as a scraper sees it), and the refusal to
listen beyond loopback with no token."""

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[3]
PHONE = "tok-phone-0123456789abcdef"
TABLET = "tok-tablet-fedcba9876543210"
EXIT_CONFIG = 78


@pytest.fixture(scope="module")
def pb(tmp_path_factory):
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("stubs")
    proto_root = ROOT / "proto"
    assert protoc.main(["protoc", f"-I{proto_root}", f"--python_out={out}", f"--grpc_python_out={out}",
                        str(proto_root / "mulm/v1/mulm.proto")]) == 0
    sys.path.insert(0, str(out))
    from mulm.v1 import mulm_pb2, mulm_pb2_grpc

    return mulm_pb2, mulm_pb2_grpc


@pytest.fixture
def binary(need):
    b = os.environ.get("MULMD_BIN") or shutil.which("mulmd")
    if not b or not Path(b).exists():
        need("the mulmd binary", "build it and set MULMD_BIN (scripts/test does both)")
    return b


def write_config(tmp_path: Path, model: Path, grpc_listen="127.0.0.1:0", tokens: str | None = None, extra="") -> Path:
    auth = ""
    if tokens is not None:
        (tmp_path / "tokens").write_text(tokens)
        auth = f'[auth]\ntokens_file = "{tmp_path / "tokens"}"\n'
    config = tmp_path / "mulmd.toml"
    config.write_text(f"""
[model]
dir = "{model}"
[grpc]
listen = "{grpc_listen}"
unix_socket = "{tmp_path / 'api.sock'}"
[http]
enabled = true
listen = "127.0.0.1:0"
[metrics]
listen = "127.0.0.1:0"
{auth}{extra}""")
    return config


class Serve:
    """A `mulmd serve` process, its log, and the addresses its "serving" line names."""

    def __init__(self, binary: str, config: Path, log: Path):
        self.log_path = log
        self.log = open(log, "w")
        self.proc = subprocess.Popen([binary, "serve", "--config", str(config)], stdout=self.log, stderr=self.log)
        deadline = time.time() + 120
        while not (m := re.search(r"serving .* on (.*); warm-up", log.read_text())):
            assert self.proc.poll() is None, f"mulmd serve exited: {log.read_text()}"
            assert time.time() < deadline, f"mulmd serve did not start: {log.read_text()}"
            time.sleep(0.05)
        fronts = m.group(1)
        self.grpc = re.search(r"gRPC ((?:\d+\.){3}\d+:\d+)", fronts).group(1).replace("0.0.0.0", "127.0.0.1")
        self.http = re.search(r"HTTP \([^)]*\) (http://\S+?),", fronts).group(1)
        self.metrics = re.search(r"metrics (http://\S+/metrics)", fronts).group(1)
        self.unix = f"unix:{config.parent / 'api.sock'}"

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.log.close()
        return self.log_path.read_text()


@pytest.fixture
def serve(binary, tmp_path, fixture_dir):
    started = []

    def start(**kw):
        d = tmp_path / f"run{len(started)}"
        d.mkdir()
        s = Serve(binary, write_config(d, fixture_dir("tiny"), **kw), d / "serve.log")
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def test_grpc_asks_for_a_known_token_and_health_stays_open(pb, serve):
    mulm_pb2, mulm_pb2_grpc = pb
    s = serve(tokens=f"# the phone app\nphone {PHONE}\ntablet {TABLET}\n")
    with grpc.insecure_channel(s.grpc) as ch:
        stub = mulm_pb2_grpc.AnswererStub(ch)
        req = mulm_pb2.OpenRequest(query="Hello there?")
        with pytest.raises(grpc.RpcError) as e:
            stub.Open(req, timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            stub.Open(req, timeout=30, metadata=[("authorization", f"Bearer {PHONE[:-1]}X")])
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "not one this server accepts" in e.value.details()
        assert PHONE[:-1] not in e.value.details()
        for token in (PHONE, TABLET):
            r = stub.Open(req, timeout=60, metadata=[("authorization", f"Bearer {token}")])
            assert r.generated_tokens > 0
        # Streams are guarded too, and the check comes before any work.
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Answer(mulm_pb2.AnswerRequest(query="Hi?"), timeout=30))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    # The Unix socket's file mode decides who connects: no token there.
    with grpc.insecure_channel(s.unix, options=[("grpc.default_authority", "localhost")]) as ch:
        assert mulm_pb2_grpc.AnswererStub(ch).Open(mulm_pb2.OpenRequest(query="Hello there?"), timeout=60).generated_tokens > 0
    log = s.stop()
    assert PHONE not in log and TABLET not in log, "tokens never reach the log"
    assert "phone" in log and "tablet" in log, "their names do"


def test_a_revoked_token_is_refused_after_a_restart(pb, serve):
    mulm_pb2, mulm_pb2_grpc = pb
    s = serve(tokens=f"phone {PHONE}\n")  # the tablet's line was deleted
    with grpc.insecure_channel(s.grpc) as ch:
        stub = mulm_pb2_grpc.AnswererStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.Open(mulm_pb2.OpenRequest(query="Hi?"), timeout=30, metadata=[("authorization", f"Bearer {TABLET}")])
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.Open(mulm_pb2.OpenRequest(query="Hi?"), timeout=60, metadata=[("authorization", f"Bearer {PHONE}")]).generated_tokens > 0


def test_the_openai_api_and_metrics_ask_for_the_same_tokens(serve):
    import openai

    s = serve(tokens=f"phone {PHONE}\nprometheus {TABLET}\n")
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=f"{s.http}/v1", api_key="not-a-token-at-all", max_retries=0).models.list()
    assert "not one this server accepts" in str(e.value)
    models = openai.OpenAI(base_url=f"{s.http}/v1", api_key=PHONE, max_retries=0).models.list()
    assert [m.id for m in models.data] == ["mulmd"]
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(s.metrics, timeout=10)
    assert e.value.code == 401 and e.value.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in e.value.read().decode()
    req = urllib.request.Request(s.metrics, headers={"Authorization": f"Bearer {TABLET}"})
    body = urllib.request.urlopen(req, timeout=10).read().decode()
    assert "mulmd_queue_depth" in body


def test_without_tokens_nothing_listens_beyond_loopback(binary, tmp_path, fixture_dir):
    config = write_config(tmp_path, fixture_dir("tiny"), grpc_listen="0.0.0.0:0")
    out = subprocess.run([binary, "serve", "--config", str(config)], capture_output=True, text=True, timeout=120)
    assert out.returncode == EXIT_CONFIG, out.stderr
    assert "grpc.listen" in out.stderr and "auth.tokens_file" in out.stderr and "127.0.0.1" in out.stderr
    assert "serving " not in out.stderr
    check = subprocess.run([binary, "check-config", str(config)], capture_output=True, text=True, timeout=30)
    assert check.returncode == EXIT_CONFIG and "auth.tokens_file" in check.stdout + check.stderr


def test_the_lan_is_served_with_a_token_or_an_explicit_allowance(pb, serve):
    mulm_pb2, mulm_pb2_grpc = pb
    s = serve(grpc_listen="0.0.0.0:0", tokens=f"phone {PHONE}\n")
    with grpc.insecure_channel(s.grpc) as ch:
        stub = mulm_pb2_grpc.AnswererStub(ch)
        with pytest.raises(grpc.RpcError):
            stub.Open(mulm_pb2.OpenRequest(query="Hi?"), timeout=30)
        assert stub.Open(mulm_pb2.OpenRequest(query="Hi?"), timeout=60, metadata=[("authorization", f"Bearer {PHONE}")]).generated_tokens > 0
    s = serve(grpc_listen="0.0.0.0:0", extra="[auth]\nallow_unauthenticated_lan = true\n")
    with grpc.insecure_channel(s.grpc) as ch:
        assert mulm_pb2_grpc.AnswererStub(ch).Open(mulm_pb2.OpenRequest(query="Hi?"), timeout=60).generated_tokens > 0
    assert "no token is asked for" in s.stop()
