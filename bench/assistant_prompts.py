"""The prompts assistants send, timed: mulmd's daemon against llama.cpp's server on the same
model, both over their OpenAI-compatible HTTP endpoints, in one run.

Home Assistant's conversation agent puts a system prompt listing the exposed devices and their
states (1,000–3,000 tokens in a real home) before every question, and a follow-up resends the
whole conversation. Per system-prompt size, one scenario:

  cold       the first request with this system prompt (a fresh nonce starts it, so no
             runtime has seen any of it);
  repeat     a new question on the same system prompt;
  turn 2..6  follow-ups, each resending the conversation so far (the same scripted assistant
             replies go to both runtimes, so both see the same tokens).

The figure is time to first text: from sending the request to the first streamed chunk with
content. mulmd streams whole words (its first chunk is a complete word), llama-server streams
tokens; the measure is the same either way, what a client can show first. llama-server keeps
its last prompt's KV cache (`cache_prompt`, on by default); mulmd keeps recent prompts' caches
(`engine.prefix_cache_mb`). Rounds rotate which runtime goes first; medians are printed, with
mulmd's ratio (llama.cpp's time over mulmd's: above 1, mulmd is first).

  python bench/assistant_prompts.py [--models smollm2-f32 smollm2-q4] [--sizes 1000 3000]
                                    [--rounds 3] [--threads 1]

Models and GGUFs come from bench/compare_runtimes.py's cache ($MULMD_BENCH_MODELS); the
llama-server binary from scripts/build-llama-server (built if missing).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from compare_runtimes import cpu_name, gguf_for, mulmd_binary, prepare  # noqa: E402
from grpc_latency import free_port  # noqa: E402
from seam_eval import wait_http  # noqa: E402

AREAS = ["Kitchen", "Living Room", "Bedroom", "Office", "Hallway", "Garage", "Bathroom", "Garden", "Nursery", "Attic"]
KINDS = [
    ("light", "Ceiling Light", ["'on'", "'off'"], "brightness: {n}%"),
    ("switch", "Coffee Maker", ["'on'", "'off'"], None),
    ("sensor", "Temperature", ["'21.{n}'"], "unit_of_measurement: °C"),
    ("sensor", "Humidity", ["'4{n}'"], "unit_of_measurement: '%'"),
    ("climate", "Thermostat", ["heat", "'off'"], "temperature: 2{n}"),
    ("cover", "Blinds", ["open", "closed"], "current_position: {n}0"),
    ("binary_sensor", "Window", ["'on'", "'off'"], "device_class: window"),
    ("media_player", "Speaker", ["idle", "playing"], "volume_level: 0.{n}"),
    ("lock", "Door Lock", ["locked", "unlocked"], None),
    ("fan", "Fan", ["'on'", "'off'"], "percentage: {n}0"),
]
QUESTIONS = ["Is the kitchen ceiling light on?", "What is the temperature in the office?"]
TURNS = [
    ("It is on, at 60 percent brightness.", "Turn it off, please."),
    ("Done, the kitchen ceiling light is off.", "Are any windows open?"),
    ("The bedroom window is open; the others are closed.", "Should I close it before I leave?"),
    ("Yes, it looks like rain this afternoon, so closing it is a good idea.", "And is the front door locked?"),
    ("The hallway door lock is locked.", "Thanks. Set the thermostat to 21 degrees."),
]


def home_prompt(tokens: int, count, nonce: str) -> str:
    """A Home Assistant style system prompt of about `tokens` tokens (by `count`): its
    instructions, then the exposed entities in its YAML overview shape."""
    head = (f"Session {nonce}.\nYou are a voice assistant for Home Assistant.\nAnswer questions about the world truthfully.\n"
            "Answer in plain text. Keep it simple and to the point.\nWhen controlling Home Assistant always call the intent tools. "
            "Use HassTurnOn to lock and HassTurnOff to unlock a lock. When controlling a device, prefer passing just name and "
            "domain. When controlling an area, prefer passing just area name and domain.\nWhen a user asks to turn on all "
            "devices of a specific type, ask user to specify an area, unless there is only one device of that type.\n"
            "Static Context: An overview of the areas and the devices in this smart home:\n")
    lines, i = [head], 0
    while count("".join(lines)) < tokens:
        domain, name, states, attr = KINDS[i % len(KINDS)]
        area = AREAS[(i // len(KINDS)) % len(AREAS)]
        n = i % 10
        entry = f"- names: {area} {name}\n  domain: {domain}\n  state: {states[i % len(states)]}\n  areas: {area}\n"
        if attr:
            entry += f"  attributes:\n    {attr.format(n=n)}\n"
        lines.append(entry)
        i += 1
    return "".join(lines)


def start_mulmd(model: Path, threads: int, cache_mb: int, tmp: Path) -> tuple[str, subprocess.Popen]:
    port, log = free_port(), tmp / f"mulmd-{model.name}.log"
    config = tmp / f"mulmd-{model.name}.toml"
    config.write_text(f'[model]\ndir = "{model}"\nthreads = {threads}\n[engine]\nprefix_cache_mb = {cache_mb}\n'
                      "[opener]\nmax_prompt_tokens = 8000\n[cloud]\nenabled = false\n"
                      f'[grpc]\nlisten = "127.0.0.1:0"\n[http]\nenabled = true\nlisten = "127.0.0.1:{port}"\n')
    proc = subprocess.Popen([str(mulmd_binary()), "serve", "--config", str(config)], stdout=open(log, "w"), stderr=subprocess.STDOUT)
    wait_http(f"http://127.0.0.1:{port}/v1/models", proc, "mulmd serve", log)
    return f"http://127.0.0.1:{port}/v1", proc


def llama_server_binary() -> Path:
    out = subprocess.run([str(ROOT / "scripts" / "build-llama-server")], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def start_llama(gguf: Path, threads: int, tmp: Path) -> tuple[str, subprocess.Popen]:
    port, log = free_port(), tmp / f"llama-{gguf.stem}.log"
    cmd = [str(llama_server_binary()), "-m", str(gguf), "--port", str(port), "-c", "8192", "-np", "1", "--jinja",
           "-t", str(threads), "-tb", str(threads)]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    wait_http(f"http://127.0.0.1:{port}/v1/models", proc, "llama-server", log)
    return f"http://127.0.0.1:{port}/v1", proc


def first_text_ms(client, messages: list[dict]) -> float:
    """Milliseconds from sending the request to the first streamed chunk with content; the
    stream is then read to its end (so the next request finds the server idle)."""
    t = time.perf_counter()
    first = None
    stream = client.chat.completions.create(model="mulmd", messages=messages, stream=True, temperature=0, max_tokens=12)
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = (time.perf_counter() - t) * 1e3
    if first is None:
        raise RuntimeError("the stream ended without text")
    return first


def scenario(client, system: str) -> dict[str, float]:
    """Cold, repeat and turns 2..6 on one system prompt (see the module doc)."""
    out = {"cold": first_text_ms(client, [{"role": "system", "content": system}, {"role": "user", "content": QUESTIONS[0]}])}
    messages = [{"role": "system", "content": system}, {"role": "user", "content": QUESTIONS[1]}]
    out["repeat"] = first_text_ms(client, messages)
    for turn, (reply, question) in enumerate(TURNS, start=2):
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": question}]
        out[f"turn {turn}"] = first_text_ms(client, messages)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["smollm2-f32", "smollm2-q4"])
    p.add_argument("--sizes", nargs="+", type=int, default=[1000, 3000], help="system prompt tokens")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache-mb", type=int, default=512, help="mulmd's engine.prefix_cache_mb")
    p.add_argument("--json", help="also write every timing here")
    a = p.parse_args()
    cache = Path(os.environ.get("MULMD_BENCH_MODELS", Path.home() / ".cache/mulmd/bench-models"))
    cache.mkdir(parents=True, exist_ok=True)
    dirs = prepare(cache, a.models)
    from openai import OpenAI
    from tokenizers import Tokenizer

    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in a.models:
            tokenizer = Tokenizer.from_file(str(dirs[name] / "tokenizer.json"))
            count = lambda text: len(tokenizer.encode(text).ids)  # noqa: E731
            servers = {"mulmd": start_mulmd(dirs[name], a.threads, a.cache_mb, tmp), "llama.cpp": start_llama(gguf_for(cache, name), a.threads, tmp)}
            try:
                clients = {rt: OpenAI(base_url=url, api_key="unused", timeout=600) for rt, (url, _) in servers.items()}
                for client in clients.values():  # warm-up: first-touch costs are not what is measured
                    scenario(client, home_prompt(200, count, "warm-up"))
                for r in range(a.rounds):
                    order = list(clients) if r % 2 == 0 else list(reversed(clients))
                    for size in a.sizes:
                        for rt in order:
                            system = home_prompt(size, count, f"{random.getrandbits(64):016x}")
                            for step, ms in scenario(clients[rt], system).items():
                                results.append({"model": name, "size": size, "runtime": rt, "step": step, "ms": ms,
                                                "system_tokens": count(system), "round": r})
                            print(f"  {name} {size} {rt} round {r + 1}/{a.rounds} done", file=sys.stderr)
            finally:
                for _, proc in servers.values():
                    proc.terminate()
                    proc.wait()
    report(results, a)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


def report(results: list[dict], a) -> None:
    cpu = cpu_name()
    kernels = os.environ.get("MULMD_KERNELS", "best the CPU has")
    print(f"\n== {cpu}, {a.threads} thread(s), mulmd kernels: {kernels}; time to first text, ms (median of {a.rounds})")
    print("| model | system tokens | step | mulmd | llama.cpp | llama.cpp / mulmd |")
    print("|---|---|---|---|---|---|")
    steps = list(dict.fromkeys(r["step"] for r in results))
    for name in a.models:
        for size in a.sizes:
            rows = [r for r in results if r["model"] == name and r["size"] == size]
            tokens = statistics.median(r["system_tokens"] for r in rows)
            for step in steps:
                med = {rt: statistics.median(r["ms"] for r in rows if r["runtime"] == rt and r["step"] == step) for rt in ("mulmd", "llama.cpp")}
                print(f"| {name} | {tokens:.0f} | {step} | {med['mulmd']:.0f} | {med['llama.cpp']:.0f} | {med['llama.cpp'] / med['mulmd']:.2f} |")


if __name__ == "__main__":
    main()
