"""PyTorch checkpoints read without torch, and the layouts the paper's authors publish Swen-28M in.

The .pth files under checkpoints/ were written by the real torch.save (checkpoints/make.py says
how and with which version); values are multiples of 1/8, so numpy recomputes them here.
"""

import io
import json
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mulm_export import cli, hf_source, sources, torch_checkpoint as tc
from mulm_export.arch import SHAPES, Arch
from mulm_export.modeldir import read_manifest
from mulm_export.runner import OrtModel

HERE = Path(__file__).resolve().parent / "checkpoints"
DEMO = HERE / "swen_demo"


def values(*shape, start=0):
    n = int(np.prod(shape))
    return ((np.arange(n, dtype=np.float32) + start) / 8 - 2).reshape(shape)


def run_cli(*args) -> int:
    return cli.main([str(a) for a in args])


@pytest.mark.parametrize("name", ["formats.pth", "formats_legacy.pth"])
def test_every_dtype_and_storage_trick_reads_as_torch_wrote_it(name):
    sd = tc.load(HERE / name)
    got = {k: v.numpy() for k, v in sd.items()}
    base = values(6, 4)
    expected = {
        "f32": values(3, 4), "f16": values(2, 5).astype(np.float16), "bf16": values(4, 2),
        "f64": values(3).astype(np.float64), "i64": np.arange(7) - 3, "u8": np.arange(5, dtype=np.uint8),
        "flag": np.array([True, False, True]), "transposed": base.T, "rows_2_to_4": base[2:5],
        "scalar": np.float32(1.5), "embed": values(5, 3, start=100), "head": values(5, 3, start=100),
    }
    assert set(got) == set(expected)
    for k, want in expected.items():
        assert got[k].shape == np.shape(want), k
        assert got[k].dtype == np.asarray(want).dtype, k
        assert np.array_equal(got[k], want), k
    # Two names for one tensor (a tied head) share one storage in the file.
    assert sd["embed"].storage is sd["head"].storage


def test_a_training_checkpoint_yields_its_weights_and_never_reads_the_optimizer(monkeypatch):
    read = []
    original = tc._ZipSource.storage_bytes

    def counting(self, storage):
        read.append(storage.key)
        return original(self, storage)

    monkeypatch.setattr(tc._ZipSource, "storage_bytes", counting)
    obj = tc.load(HERE / "training.pth")
    assert {"optimizer", "scheduler", "step"} <= set(obj)
    sd = {k: v.numpy() for k, v in tc.state_dict(obj, "training.pth").items()}
    # `module.` (DistributedDataParallel) and `_orig_mod.` (torch.compile) are gone.
    assert sorted(sd) == ["0.weight", "1.bias", "1.weight"]
    assert np.array_equal(sd["0.weight"], values(3, 4))
    assert np.array_equal(sd["1.weight"], values(2, 3, start=20))
    assert np.array_equal(sd["1.bias"], values(2, start=40))
    assert len(read) == 3, f"only the three weights' storages may be read, not Adam's moments: {read}"


def _zip_checkpoint(path: Path, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")
    return path


class _Runs:
    """Pickles as a call of `func(*args)`: what a hostile checkpoint would contain."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def test_a_checkpoint_that_would_run_code_is_refused_before_anything_runs(tmp_path):
    import os

    marker = tmp_path / "ran"
    payload = pickle.dumps({"model": _Runs(os.system, f"touch {marker}")}, protocol=2)
    with pytest.raises(tc.CheckpointError) as e:
        tc.load(_zip_checkpoint(tmp_path / "evil.pth", payload))
    assert "system" in str(e.value) and "could run code" in str(e.value)
    assert not marker.exists()
    # The legacy layout starts with plain pickles: a hostile one is refused there too.
    legacy = tmp_path / "evil_legacy.pth"
    legacy.write_bytes(pickle.dumps(_Runs(os.system, f"touch {marker}"), protocol=2))
    with pytest.raises(tc.CheckpointError):
        tc.load(legacy)
    assert not marker.exists()


def test_damaged_checkpoints_get_errors_that_name_the_file(tmp_path):
    whole = (HERE / "formats_legacy.pth").read_bytes()
    for cut in (10, len(whole) // 2, len(whole) - 3):
        p = tmp_path / f"cut{cut}.pth"
        p.write_bytes(whole[:cut])
        with pytest.raises(tc.CheckpointError) as e:
            obj = tc.load(p)
            for v in obj.values():
                v.numpy()
        assert p.name in str(e.value)
    # A tensor that claims more elements than its storage holds.
    buf = io.BytesIO()
    with zipfile.ZipFile(HERE / "formats.pth") as src, zipfile.ZipFile(buf, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, data[: len(data) // 2] if "/data/" in item.filename else data)
    p = tmp_path / "short_storages.pth"
    p.write_bytes(buf.getvalue())
    with pytest.raises(tc.CheckpointError) as e:
        tc.load(p)["f32"].numpy()
    assert "storage" in str(e.value)


def test_a_checkpoint_without_weights_names_what_it_holds(tmp_path):
    p = _zip_checkpoint(tmp_path / "counters.pth", pickle.dumps({"step": 3, "epoch": 1}, protocol=2))
    with pytest.raises(tc.CheckpointError) as e:
        tc.state_dict(tc.load(p), p)
    assert "step" in str(e.value) and "state dict" in str(e.value)


# ---- the authors' layouts ------------------------------------------------------------------


def _demo_weights() -> dict:
    obj = tc.load(DEMO / "models" / "swen_tiny.pth")
    return {k: v.numpy() for k, v in tc.state_dict(obj, "swen_tiny.pth").items()}


def test_the_demo_repository_exports_with_one_command(tmp_path, capsys):
    """The demo layout: models/<name>.pth (a `model` entry, no config.json) and
    models/tokenizer/; the architecture comes from the shapes and the authors' defaults."""
    assert run_cli("from-hf", DEMO, "--out", tmp_path / "out") == 0
    m = read_manifest(tmp_path / "out")
    a = m["architecture"]
    assert m["name"] == "swen_tiny"
    assert (a["hidden_size"], a["num_layers"], a["num_heads"], a["num_kv_heads"], a["intermediate_size"]) == (16, 2, 8, 2, 64)
    assert a["tied_embeddings"] and a["rope_theta"] == 1e6 and a["vocab_size"] == 12288
    assert m["special_tokens"]["eos"] == "<|im_end|>" and "You are a helpful assistant" in m["chat_template"]
    assert m["source"]["kind"] == "checkpoint"
    # The export computes what the weights say: onnxruntime against the numpy reference.
    assert run_cli("verify", tmp_path / "out") == 0


def test_checkpoint_and_tokenizer_can_be_named_separately(tmp_path):
    ckpt = tmp_path / "elsewhere" / "swen_28m.pth"
    ckpt.parent.mkdir()
    shutil.copy(DEMO / "models" / "swen_tiny.pth", ckpt)
    assert run_cli("from-hf", "--checkpoint", ckpt, "--tokenizer", DEMO / "models" / "tokenizer",
                   "--out", tmp_path / "out") == 0
    assert read_manifest(tmp_path / "out")["name"] == "swen_28m"
    assert run_cli("from-hf", "--checkpoint", ckpt, "--out", tmp_path / "out2") == 2


def _hub_folder(tmp_path: Path, weights: dict, **config) -> Path:
    """The model-hub layout: config.json as the authors' remote-code class writes it (model_type
    swen, auto_map, intermediate_size null until the model fills it in, no tie_word_embeddings),
    model.safetensors without the tied head, the tokenizer files beside."""
    from safetensors.numpy import save_file

    hub = tmp_path / "hf"
    hub.mkdir()
    save_file({k: v for k, v in weights.items() if k != "lm_head.weight"}, str(hub / "model.safetensors"))
    cfg = {"model_type": "swen", "architectures": ["SwenForCausalLM"],
           "auto_map": {"AutoConfig": "configuration_swen.SwenConfig", "AutoModelForCausalLM": "modeling_swen.SwenForCausalLM"},
           "hidden_size": 512, "intermediate_size": None, "num_hidden_layers": 8, "num_attention_heads": 8,
           "num_key_value_heads": 2, "vocab_size": 12288, "rope_theta": 1000000.0, "rms_norm_eps": 1e-05,
           "max_position_embeddings": 32768, "inference_rope_scaling": False, "flash_attn": False}
    cfg.update(config)
    (hub / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO / "models" / "tokenizer" / f, hub / f)
    return hub


def test_the_hub_release_exports_to_the_same_model_as_the_checkpoint(tmp_path):
    weights = _demo_weights()
    hub = _hub_folder(tmp_path, weights, hidden_size=16, num_hidden_layers=2)
    assert run_cli("from-hf", hub, "--out", tmp_path / "from_hub") == 0
    assert run_cli("from-hf", DEMO, "--out", tmp_path / "from_ckpt") == 0
    m = read_manifest(tmp_path / "from_hub")
    assert m["architecture"]["tied_embeddings"], "an absent tie_word_embeddings means tied, as in Transformers"
    assert m["name"].startswith("Swen-"), "named after the model, not the folder"
    a, b = OrtModel(tmp_path / "from_hub"), OrtModel(tmp_path / "from_ckpt")
    ids = [1, 5, 300, 12000, 2]
    assert np.array_equal(a.step(ids), b.step(ids))


def test_the_full_size_hub_release_is_28_85m_parameters_with_a_tied_head(tmp_path):
    arch = SHAPES["mulm-28m"]
    weights = sources.generated_weights(arch, 3)
    hub = _hub_folder(tmp_path, weights)
    assert run_cli("from-hf", hub, "--out", tmp_path / "out") == 0
    m = read_manifest(tmp_path / "out")
    a = m["architecture"]
    assert m["name"] == "Swen-28M"
    assert a["intermediate_size"] == 1408 and a["tied_embeddings"]
    assert a["context_length"] == hf_source.DEFAULT_MAX_CONTEXT
    got = Arch.from_json(a).parameter_count()
    assert round(got / 1e6, 2) == 28.84
    # float32: 4 bytes a parameter, no second copy of the head, plus the RoPE tables.
    size = (tmp_path / "out" / "model.onnx").stat().st_size
    assert 28.84e6 * 4 < size < 28.84e6 * 4 + 8 * 2**20, size


def test_config_errors_name_the_setting_and_the_tensor(tmp_path, capsys):
    weights = _demo_weights()
    hub = _hub_folder(tmp_path, weights, hidden_size=16, num_hidden_layers=2, intermediate_size=1408)
    assert run_cli("from-hf", hub, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "intermediate_size is 1408" in err and "gate_proj" in err
    shutil.rmtree(hub)
    bad = dict(weights)
    bad["model.layers.1.self_attn.k_proj.weight"] = np.zeros((5, 16), np.float32)
    hub = _hub_folder(tmp_path, bad, hidden_size=16, num_hidden_layers=2)
    assert run_cli("from-hf", hub, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "model.layers.1.self_attn.k_proj.weight" in err and "(4, 16)" in err


def test_an_untied_head_is_kept_when_the_config_says_so(tmp_path):
    weights = _demo_weights()
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"] * 2
    from safetensors.numpy import save_file

    hub = _hub_folder(tmp_path, weights, hidden_size=16, num_hidden_layers=2, tie_word_embeddings=False)
    save_file(weights, str(hub / "model.safetensors"))
    assert run_cli("from-hf", hub, "--out", tmp_path / "out") == 0
    assert not read_manifest(tmp_path / "out")["architecture"]["tied_embeddings"]


def test_a_folder_without_weights_says_where_it_looked(tmp_path, capsys):
    assert run_cli("from-hf", tmp_path, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "*.pth" in err and "models" in err


def test_a_tensor_cannot_claim_more_than_its_storage(tmp_path):
    """A hostile view (a huge shape on zero strides) is refused before anything is copied."""
    obj = tc.load(HERE / "formats.pth")
    t = obj["f32"]
    for shape, stride in (((10**6, 10**6), (0, 0)), ((-1, 4), (4, 1))):
        bad = tc.LazyTensor(t._source, t.storage, 0, shape, stride)
        with pytest.raises(tc.CheckpointError) as e:
            bad.numpy()
        assert "claims more elements" in str(e.value)
    # A storage entry larger than its element count says is not read.
    buf = io.BytesIO()
    with zipfile.ZipFile(HERE / "formats.pth") as src, zipfile.ZipFile(buf, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, data + bytes(1 << 20) if "/data/" in item.filename else data)
    p = tmp_path / "long_storages.pth"
    p.write_bytes(buf.getvalue())
    with pytest.raises(tc.CheckpointError) as e:
        tc.load(p)["f32"].numpy()
    assert "more than its" in str(e.value)
