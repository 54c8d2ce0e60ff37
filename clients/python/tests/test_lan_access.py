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


def write_config(tmp_path: Path, model: Path, grpc_listen="127.0.0.1:0", tokens: str | None = None, extra="", grpc_extra="") -> Path:
    """Every TCP front on loopback port 0 (gRPC at `grpc_listen`), a Unix socket, and
    `tokens` (the token file's text) when given; `grpc_extra` goes in [grpc], `extra` is
    appended as is."""
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
{grpc_extra}
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
        while not (m := re.search(r"serving \S+ \([^)]*\) on (.*); warm-up", log.read_text())):
            assert self.proc.poll() is None, f"mulmd serve exited: {log.read_text()}"
            assert time.time() < deadline, f"mulmd serve did not start: {log.read_text()}"
            time.sleep(0.05)
        fronts = m.group(1)
        self.grpc = re.search(r"gRPC ((?:\d+\.){3}\d+:\d+)", fronts).group(1).replace("0.0.0.0", "127.0.0.1")
        self.http = re.search(r"HTTP \([^)]*\) (https?://\S+?),", fronts).group(1)
        self.metrics = re.search(r"metrics (https?://\S+/metrics)", fronts).group(1)
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


def tls_init(binary: str, d: Path, group="no-such-group") -> tuple[Path, str]:
    """`mulmd tls init` into `d`: the certificate and the fingerprint it printed."""
    out = subprocess.run([binary, "tls", "init", "--dir", str(d), "--group", group], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return d / "cert.pem", re.search(r"fingerprint (SHA256:[0-9A-F:]+)", out.stdout).group(1)


def test_tls_with_a_pinned_self_signed_certificate_and_a_token(pb, binary, serve, tmp_path):
    import hashlib
    import ssl

    import httpx
    import openai

    mulm_pb2, mulm_pb2_grpc = pb
    cert, fingerprint = tls_init(binary, tmp_path / "tls")
    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    assert fingerprint == "SHA256:" + ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())
    assert (tmp_path / "tls" / "key.pem").stat().st_mode & 0o777 == 0o600, "the key is the owner's alone"
    # With the service's group (root's here), the group may read the key, no one else.
    shared = tmp_path / "shared"
    tls_init(binary, shared, group="root")
    assert (shared / "key.pem").stat().st_mode & 0o777 == 0o640 and (shared / "key.pem").stat().st_gid == 0
    again = subprocess.run([binary, "tls", "init", "--dir", str(shared)], capture_output=True, text=True, timeout=30)
    assert again.returncode != 0 and "--force" in again.stderr, "an existing pair is never replaced silently"
    s = serve(tokens=f"phone {PHONE}\n", extra=f'[tls]\ncert_file = "{cert}"\nkey_file = "{tmp_path / "tls" / "key.pem"}"\n')
    assert s.http.startswith("https://") and s.metrics.startswith("https://")
    # grpcio as an app would: the pinned certificate as its only root, the token as call credentials.
    creds = grpc.composite_channel_credentials(grpc.ssl_channel_credentials(root_certificates=cert.read_bytes()),
                                               grpc.access_token_call_credentials(PHONE))
    with grpc.secure_channel(s.grpc, creds) as ch:
        assert mulm_pb2_grpc.AnswererStub(ch).Open(mulm_pb2.OpenRequest(query="Hi?"), timeout=60).generated_tokens > 0
    with grpc.secure_channel(s.grpc, grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())) as ch:
        with pytest.raises(grpc.RpcError) as e:
            mulm_pb2_grpc.AnswererStub(ch).Open(mulm_pb2.OpenRequest(query="Hi?"), timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, "TLS does not replace the token"
    # Plain text, or another certificate than the pinned one, gets nowhere.
    with grpc.insecure_channel(s.grpc) as ch:
        with pytest.raises(grpc.RpcError) as e:
            mulm_pb2_grpc.AnswererStub(ch).Open(mulm_pb2.OpenRequest(query="Hi?"), timeout=10, metadata=[("authorization", f"Bearer {PHONE}")])
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    other, _ = tls_init(binary, tmp_path / "other")
    with grpc.secure_channel(s.grpc, grpc.ssl_channel_credentials(root_certificates=other.read_bytes())) as ch:
        with pytest.raises(grpc.RpcError) as e:
            mulm_pb2_grpc.AnswererStub(ch).Open(mulm_pb2.OpenRequest(query="Hi?"), timeout=10, metadata=[("authorization", f"Bearer {PHONE}")])
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    client = openai.OpenAI(base_url=f"{s.http}/v1", api_key=PHONE, max_retries=0, http_client=httpx.Client(verify=ssl.create_default_context(cafile=str(cert))))
    assert [m.id for m in client.models.list().data] == ["mulmd"]
    ctx = ssl.create_default_context(cafile=str(cert))
    req = urllib.request.Request(s.metrics, headers={"Authorization": f"Bearer {PHONE}"})
    assert "mulmd_queue_depth" in urllib.request.urlopen(req, timeout=10, context=ctx).read().decode()
    assert fingerprint in s.stop(), "the log names the fingerprint to pin"


def test_mutual_tls_asks_for_a_client_certificate(pb, binary, serve, tmp_path):
    mulm_pb2, mulm_pb2_grpc = pb
    cert, _ = tls_init(binary, tmp_path / "server")
    client_cert, _ = tls_init(binary, tmp_path / "client")  # self-signed: its own CA
    s = serve(tokens=f"phone {PHONE}\n", extra=f'[tls]\ncert_file = "{cert}"\nkey_file = "{tmp_path / "server" / "key.pem"}"\nclient_ca_file = "{client_cert}"\n')
    root = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    with grpc.secure_channel(s.grpc, root) as ch:
        with pytest.raises(grpc.RpcError) as e:
            mulm_pb2_grpc.AnswererStub(ch).Open(mulm_pb2.OpenRequest(query="Hi?"), timeout=10, metadata=[("authorization", f"Bearer {PHONE}")])
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, "no client certificate, no connection"
    with_cert = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes(), private_key=(tmp_path / "client" / "key.pem").read_bytes(),
                                             certificate_chain=client_cert.read_bytes())
    with grpc.secure_channel(s.grpc, with_cert) as ch:
        r = mulm_pb2_grpc.AnswererStub(ch).Open(mulm_pb2.OpenRequest(query="Hi?"), timeout=60, metadata=[("authorization", f"Bearer {PHONE}")])
        assert r.generated_tokens > 0


def test_bad_tls_files_stop_the_start_and_name_the_setting(binary, tmp_path, fixture_dir):
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    config = write_config(tmp_path, fixture_dir("tiny"), extra=f'[tls]\ncert_file = "{tmp_path / "cert.pem"}"\nkey_file = "{tmp_path / "key.pem"}"\n')
    out = subprocess.run([binary, "serve", "--config", str(config)], capture_output=True, text=True, timeout=120)
    assert out.returncode == EXIT_CONFIG and "tls.cert_file" in out.stderr, out.stderr
    config.write_text(config.read_text().replace(f'key_file = "{tmp_path / "key.pem"}"', ""))
    check = subprocess.run([binary, "check-config", str(config)], capture_output=True, text=True, timeout=30)
    assert check.returncode == EXIT_CONFIG and "go together" in check.stdout + check.stderr


def grpc_web_call(url: str, method: str, message: bytes, headers: dict) -> tuple[dict, list[bytes], dict]:
    """One gRPC-Web call over HTTP/1.1, framed by hand as PROTOCOL-WEB.md says: returns the
    response headers, the messages, and the trailers (from the 0x80 frame, or the headers
    of a trailers-only response)."""
    import http.client
    import struct
    from urllib.parse import urlsplit

    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    body = b"\x00" + struct.pack(">I", len(message)) + message
    conn.request("POST", method, body=body, headers={"content-type": "application/grpc-web+proto", "x-grpc-web": "1", **headers})
    r = conn.getresponse()
    head = {k.lower(): v for k, v in r.getheaders()}
    data = r.read()
    conn.close()
    messages, trailers, i = [], {}, 0
    while i < len(data):
        flag, n = data[i], struct.unpack(">I", data[i + 1:i + 5])[0]
        payload = data[i + 5:i + 5 + n]
        i += 5 + n
        if flag & 0x80:
            for line in payload.decode().split("\r\n"):
                if ":" in line:
                    k, v = line.split(":", 1)
                    trailers[k.strip().lower()] = v.strip()
        else:
            messages.append(payload)
    if "grpc-status" in head:
        trailers.setdefault("grpc-status", head["grpc-status"])
        trailers.setdefault("grpc-message", head.get("grpc-message", ""))
    return head, messages, trailers


def test_a_browser_streams_an_answer_over_grpc_web(pb, serve):
    import http.client
    from urllib.parse import urlsplit

    mulm_pb2, _ = pb
    app = "https://app.example"
    s = serve(tokens=f"phone {PHONE}\n", grpc_extra=f'web = true\ncors_origins = ["{app}"]')
    url = f"http://{s.grpc}"
    req = mulm_pb2.AnswerRequest(query="Hi?", options=mulm_pb2.Options(cloud=False)).SerializeToString()
    head, messages, trailers = grpc_web_call(url, "/mulm.v1.Answerer/Answer", req, {"authorization": f"Bearer {PHONE}", "origin": app})
    assert head["content-type"].startswith("application/grpc-web"), head
    assert head.get("access-control-allow-origin") == app
    events = [mulm_pb2.AnswerEvent.FromString(m).WhichOneof("event") for m in messages]
    assert events and events[-1] == "final" and events.count("final") == 1, events
    assert trailers["grpc-status"] == "0", trailers
    # Without the token: UNAUTHENTICATED (16), with the message a page can show.
    _, messages, trailers = grpc_web_call(url, "/mulm.v1.Answerer/Answer", req, {"origin": app})
    assert messages == [] and trailers["grpc-status"] == "16" and "Bearer" in trailers["grpc-message"]
    # The browser's preflight: allowed for the listed origin, with the headers a call carries.
    u = urlsplit(url)
    for origin, allowed in ((app, True), ("https://evil.example", False)):
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
        conn.request("OPTIONS", "/mulm.v1.Answerer/Answer", headers={
            "origin": origin, "access-control-request-method": "POST",
            "access-control-request-headers": "content-type,x-grpc-web,authorization"})
        r = conn.getresponse()
        h = {k.lower(): v for k, v in r.getheaders()}
        r.read()
        conn.close()
        if allowed:
            assert h.get("access-control-allow-origin") == origin and "authorization" in h.get("access-control-allow-headers", ""), h
        else:
            assert "access-control-allow-origin" not in h, h


def test_cors_origins_are_checked(binary, tmp_path, fixture_dir):
    config = write_config(tmp_path, fixture_dir("tiny"), grpc_extra='cors_origins = ["https://app.example/", "app.example"]')
    check = subprocess.run([binary, "check-config", str(config)], capture_output=True, text=True, timeout=30)
    assert check.returncode == EXIT_CONFIG and check.stderr.count("grpc.cors_origins") == 2, check.stderr


def test_apps_find_the_board_by_mdns_while_it_serves_the_lan(serve, fixture_dir):
    """python-zeroconf (what Home Assistant browses with) sees _mulmd._tcp with its TXT
    fields while gRPC listens beyond loopback, and sees it go at stop."""
    import threading

    from zeroconf import ServiceBrowser, ServiceStateChange, Zeroconf

    instance = f"mulmd test {os.getpid()}"
    added, removed, names = threading.Event(), threading.Event(), []

    def on_change(zeroconf, service_type, name, state_change):
        if not name.startswith(instance):
            return
        names.append(name)
        (added if state_change is ServiceStateChange.Added else removed if state_change is ServiceStateChange.Removed else threading.Event()).set()

    zc = Zeroconf()
    browser = ServiceBrowser(zc, "_mulmd._tcp.local.", handlers=[on_change])
    try:
        s = serve(grpc_listen="0.0.0.0:0", tokens=f"phone {PHONE}\n", extra=f'[discovery]\ninstance = "{instance}"\n')
        assert added.wait(20), "the advertisement was not seen"
        info = zc.get_service_info("_mulmd._tcp.local.", names[0], timeout=5000)
        assert info is not None
        txt = {k.decode(): (v or b"").decode() for k, v in info.properties.items()}
        port = int(s.grpc.rsplit(":", 1)[1])
        assert info.port == port and txt["grpc"] == str(port), (info, txt)
        assert (txt["api"], txt["auth"], txt["tls"], txt["fp"], txt["model"]) == ("mulm.v1", "bearer", "0", "", "tiny-seed1"), txt
        assert txt["http"] == "", "the HTTP API is on loopback: not offered"
        assert PHONE not in str(info.properties)
        s.stop()
        assert removed.wait(20), "the advertisement was not withdrawn at stop"
    finally:
        browser.cancel()
        zc.close()
    # On loopback only, there is nothing to advertise.
    s = serve()
    assert "mDNS" not in s.stop()
