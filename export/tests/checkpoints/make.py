"""Writes the PyTorch checkpoints the exporter's tests read, with the real `torch.save`.

Run once, in a throwaway virtual environment that has torch (the tests themselves never need
it), from this folder:

    python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch
    /tmp/torchvenv/bin/python make.py

The files were last written with torch 2.15.0 (CPU, Python 3.11); `versions.json` records the
version each run used. Values are small multiples of 1/8, exact in every float type, so a test
recomputes what each tensor must hold with numpy alone.

swen_demo/models/tokenizer/ holds the tokenizer files of the paper authors' demo repository
(github.com/Sensente/micro_language_model_swen_project, models/tokenizer/, MIT licence in
LICENSE beside them), unchanged: with swen_tiny.pth the folder has their demo's layout.
"""

import json
import sys
from collections import OrderedDict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def values(*shape, dtype=torch.float32, start=0):
    n = 1
    for s in shape:
        n *= s
    return ((torch.arange(n, dtype=torch.float32) + start) / 8 - 2).reshape(*shape).to(dtype)


def formats_state() -> OrderedDict:
    """Every dtype a checkpoint of weights holds, plus the storage tricks torch.save keeps:
    a transposed (strided) tensor, a view at an offset into a bigger storage, and two names
    for one tensor (a tied head)."""
    base = values(6, 4)
    tied = values(5, 3, start=100)
    return OrderedDict([
        ("f32", values(3, 4)),
        ("f16", values(2, 5, dtype=torch.float16)),
        ("bf16", values(4, 2, dtype=torch.bfloat16)),
        ("f64", values(3, dtype=torch.float64)),
        ("i64", torch.arange(7, dtype=torch.int64) - 3),
        ("u8", torch.arange(5, dtype=torch.uint8)),
        ("flag", torch.tensor([True, False, True])),
        ("transposed", base.t()),
        ("rows_2_to_4", base[2:5]),
        ("scalar", torch.tensor(1.5)),
        ("embed", tied),
        ("head", tied),
    ])


def training_checkpoint() -> dict:
    """What a DistributedDataParallel training loop saves: `module.`-prefixed weights as
    nn.Parameters, Adam's state, a scheduler, counters."""
    net = torch.nn.Sequential(torch.nn.Linear(4, 3, bias=False), torch.nn.Linear(3, 2, bias=True))
    with torch.no_grad():
        net[0].weight.copy_(values(3, 4))
        net[1].weight.copy_(values(2, 3, start=20))
        net[1].bias.copy_(values(2, start=40))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.ones(1, 4)).sum().backward()
    opt.step()
    # The step changed the weights; put the known values back so the test can check them.
    with torch.no_grad():
        net[0].weight.copy_(values(3, 4))
        net[1].weight.copy_(values(2, 3, start=20))
        net[1].bias.copy_(values(2, start=40))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    state = OrderedDict((f"module._orig_mod.{k}", v) for k, v in net.state_dict(keep_vars=True).items())
    return {"model": state, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": 1, "epoch": 0,
            "best_loss": 2.5}


def swen_shaped() -> dict:
    """A checkpoint laid out as the authors' swen_28m.pth (a `model` entry with Hugging Face
    Llama names, lm_head and embed_tokens one tensor), at a tiny size: hidden 16, 2 layers,
    8 heads of 2, 2 KV heads, SwiGLU 64 (the 8/3 rule rounded up to 64), vocabulary 12,288."""
    g = torch.Generator().manual_seed(7)
    hidden, layers, kv, inter, vocab = 16, 2, 4, 64, 12288

    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    sd = OrderedDict()
    embed = w(vocab, hidden)
    sd["model.embed_tokens.weight"] = embed
    for i in range(layers):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = w(hidden, hidden)
        sd[p + "self_attn.k_proj.weight"] = w(kv, hidden)
        sd[p + "self_attn.v_proj.weight"] = w(kv, hidden)
        sd[p + "self_attn.o_proj.weight"] = w(hidden, hidden)
        sd[p + "input_layernorm.weight"] = 1 + w(hidden)
        sd[p + "post_attention_layernorm.weight"] = 1 + w(hidden)
        sd[p + "mlp.gate_proj.weight"] = w(inter, hidden)
        sd[p + "mlp.down_proj.weight"] = w(hidden, inter)
        sd[p + "mlp.up_proj.weight"] = w(inter, hidden)
    sd["model.norm.weight"] = 1 + w(hidden)
    sd["lm_head.weight"] = embed
    return {"model": sd, "step": 1}


def main() -> None:
    torch.save(formats_state(), HERE / "formats.pth")
    torch.save(formats_state(), HERE / "formats_legacy.pth", _use_new_zipfile_serialization=False)
    torch.save(training_checkpoint(), HERE / "training.pth")
    demo = HERE / "swen_demo" / "models"
    demo.mkdir(parents=True, exist_ok=True)
    torch.save(swen_shaped(), demo / "swen_tiny.pth")
    (HERE / "versions.json").write_text(json.dumps({"torch": torch.__version__, "python": sys.version.split()[0]}) + "\n")


if __name__ == "__main__":
    main()
