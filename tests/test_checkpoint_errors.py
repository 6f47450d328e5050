"""Checkpoint files that cannot be loaded fail with one clear line naming the file; nothing in a file is executed."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vmamba_export import load_checkpoint as top_level_load_checkpoint
from vmamba_export.checkpoint import (
    detect_config,
    inspect_checkpoint,
    load_checkpoint,
    load_state_dict_into_model,
    read_state_dict,
)
from vmamba_export.cli import main as cli_main
from vmamba_export.errors import CheckpointError, ConfigDetectionError, StateDictMismatchError
from vmamba_export.models import build_model, get_config

X = torch.randn(2, 3, 40, 36)


@pytest.fixture(scope="module")
def v2():
    torch.manual_seed(0)
    return build_model("vmamba_test_v2")


@pytest.fixture(scope="module")
def v0():
    torch.manual_seed(1)
    return build_model("vmamba_test_v0")


def sd_of(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def raises_one_line(exc_type, path, fn, *args, **kwargs) -> str:
    """Call fn, expect exc_type, check the message is one line that names the file; return the message."""
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and "\r" not in msg, msg
    assert str(path) in msg, msg
    return msg


def same_function(a, b) -> None:
    torch.testing.assert_close(a(X), b(X), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ unreadable files


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pth"
    assert "not found" in raises_one_line(CheckpointError, path, load_checkpoint, path)


def test_directory(tmp_path):
    assert "directory" in raises_one_line(CheckpointError, tmp_path, load_checkpoint, tmp_path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    assert "empty" in raises_one_line(CheckpointError, path, load_checkpoint, path)


@pytest.mark.parametrize("keep", [0.5, 0.9, 40])
def test_truncated_torch_file(tmp_path, v2, keep):
    full = tmp_path / "full.pth"
    torch.save({"model": v2.state_dict()}, full)
    data = full.read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[: int(len(data) * keep)] if keep < 1 else data[:keep])
    msg = raises_one_line(CheckpointError, path, load_checkpoint, path)
    assert "truncated or corrupt" in msg or "corrupt" in msg


def test_truncated_safetensors(tmp_path, v2):
    full = tmp_path / "full.safetensors"
    save_file(v2.state_dict(), full)
    path = tmp_path / "cut.safetensors"
    path.write_bytes(full.read_bytes()[:-1000])
    assert "corrupt" in raises_one_line(CheckpointError, path, load_checkpoint, path)


@pytest.mark.parametrize("suffix", [".pth", ".bin", ".safetensors"])
def test_random_bytes(tmp_path, suffix):
    path = tmp_path / f"noise{suffix}"
    path.write_bytes(os.urandom(4096))
    assert "corrupt" in raises_one_line(CheckpointError, path, load_checkpoint, path)


# ----------------------------------------------------------------------------------------------- malicious pickles


class _RunsCommand:
    """Unpickling this runs os.system: the classic malicious checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _RunsExec:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _write_torch(path, payload):
    torch.save({"model": {"w": torch.zeros(2)}, "extra": payload}, path)


def _write_raw_pickle(path, payload):
    with open(path, "wb") as f:
        pickle.dump(payload, f, protocol=2)


@pytest.mark.parametrize(
    "payload_cls,global_name", [(_RunsCommand, f"{os.system.__module__}.system"), (_RunsExec, "exec")]
)
@pytest.mark.parametrize("writer", [_write_torch, _write_raw_pickle])
def test_malicious_pickle_is_not_executed(tmp_path, payload_cls, global_name, writer):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    writer(path, payload_cls(marker))
    for fn in (load_checkpoint, read_state_dict, inspect_checkpoint):
        msg = raises_one_line(CheckpointError, path, fn, path)
        assert "refusing to execute code" in msg and f"global {global_name}," in msg, msg
        assert not marker.exists()
    assert cli_main(["inspect", str(path)]) == 2
    assert not marker.exists()
    # Control: the payload is live, so the checks above would have seen it run.
    try:
        torch.load(path, weights_only=False)
    except Exception:
        pass  # exec returns None, so torch may complain about the result after running it
    assert marker.exists()


# ----------------------------------------------------------------------------------------- readable, but not VMamba


def test_no_tensors(tmp_path):
    for i, obj in enumerate([{"epoch": 3, "optimizer": {}}, [1, 2, 3], {}, {"model": {}}]):
        path = tmp_path / f"nothing{i}.pth"
        torch.save(obj, path)
        msg = raises_one_line(CheckpointError, path, load_checkpoint, path)
        assert "no tensors" in msg or "not a state dict" in msg, msg


def test_keys_of_another_model(tmp_path, v0, v2):
    path = tmp_path / "v2.pth"
    torch.save({"model": v2.state_dict()}, path)
    msg = raises_one_line(StateDictMismatchError, path, load_checkpoint, path, name="vmamba_test_v0")
    # Counts computed independently from the two models' own state dicts.
    file_shapes = {k: tuple(v.shape) for k, v in v2.state_dict().items()}
    want_shapes = {k: tuple(v.shape) for k, v in v0.state_dict().items()}
    missing = len(want_shapes.keys() - file_shapes.keys())
    unexpected = len(file_shapes.keys() - want_shapes.keys())
    misshaped = sum(file_shapes[k] != want_shapes[k] for k in file_shapes.keys() & want_shapes.keys())
    assert missing and unexpected and misshaped
    assert f"{missing} missing" in msg and f"{unexpected} unexpected" in msg and f"{misshaped} mis-shaped" in msg
    assert "vmamba_test_v0" in msg and "they fit vmamba_test_v2" in msg


def test_partial_state_dict(tmp_path, v2):
    sd = sd_of(v2)
    dropped = list(sd)[10:15]
    for k in dropped:
        del sd[k]
    path = tmp_path / "partial.pth"
    torch.save(sd, path)
    msg = raises_one_line(StateDictMismatchError, path, load_checkpoint, path, name="vmamba_test_v2")
    assert "5 missing (e.g." in msg and "0 unexpected" in msg and "0 mis-shaped" in msg and dropped[0] in msg
    # Without a name: no config fits, and the closest is named with its counts.
    msg = raises_one_line(ConfigDetectionError, path, load_checkpoint, path)
    assert "closest: vmamba_test_v2: 5 missing, 0 unexpected, 0 mis-shaped" in msg
    # strict=False loads the rest; the dropped tensors keep their initial values.
    model = load_checkpoint(path, name="vmamba_test_v2", strict=False)
    got = model.state_dict()
    for k in sd:
        assert torch.equal(got[k], sd[k])
    # ... but a mis-shaped tensor is never accepted.
    sd["classifier.norm.weight"] = torch.ones(7)
    torch.save(sd, path)
    msg = raises_one_line(StateDictMismatchError, path, load_checkpoint, path, name="vmamba_test_v2", strict=False)
    assert "classifier.norm.weight: file [7] vs model [128]" in msg


def test_detection_ambiguous_and_no_match(v2):
    sd = sd_of(v2)
    cfg = get_config("vmamba_test_v2")
    twin = cfg.with_overrides(name="vmamba_test_v2_twin")
    with pytest.raises(ConfigDetectionError, match="ambiguous.*vmamba_test_v2, vmamba_test_v2_twin"):
        detect_config(sd, candidates=[cfg, twin])
    assert detect_config(sd, candidates=[cfg, get_config("vmamba_test_v0")]) == "vmamba_test_v2"
    # Same backbone with another class count: the config whose head fits as is wins over a "fine-tune" reading.
    wide = cfg.with_overrides(name="vmamba_test_v2_1k", num_classes=1000)
    assert detect_config(sd, candidates=[wide, cfg]) == "vmamba_test_v2"
    with pytest.raises(ConfigDetectionError, match=r"match no known config; closest: .*\d+ missing"):
        detect_config({"fc.weight": torch.zeros(3, 4)})


# ------------------------------------------------------------------------------------------------- layouts that load


def test_safetensors_round_trip(tmp_path, v2):
    path = tmp_path / "w.safetensors"
    save_file(v2.state_dict(), path)
    sd = read_state_dict(path)
    assert sd.keys() == v2.state_dict().keys()
    model = load_checkpoint(path)
    assert model.config.name == "vmamba_test_v2" and not model.training
    same_function(model, v2)
    assert inspect_checkpoint(path)["format"] == "safetensors"


@pytest.mark.parametrize("layout", ["bare", "model", "model_ema", "state_dict", "ddp", "ddp_ema", "compiled"])
def test_wrappers_and_prefixes(tmp_path, v2, layout):
    sd = sd_of(v2)
    obj = {
        "bare": sd,
        "model": {"model": sd, "optimizer": {"state": {}}, "epoch": 3},
        "model_ema": {"model_ema": sd, "epoch": 3},
        "state_dict": {"state_dict": sd},
        "ddp": {"model": {f"module.{k}": v for k, v in sd.items()}},
        "ddp_ema": {"model_ema": {f"module.{k}": v for k, v in sd.items()}},
        "compiled": {f"_orig_mod.{k}": v for k, v in sd.items()},
    }[layout]
    path = tmp_path / f"{layout}.pth"
    torch.save(obj, path)
    same_function(load_checkpoint(path), v2)
    same_function(top_level_load_checkpoint(path, name="vmamba_test_v2"), v2)


def test_model_preferred_over_ema(tmp_path, v2):
    torch.manual_seed(5)
    other = build_model("vmamba_test_v2")
    path = tmp_path / "both.pth"
    torch.save({"model_ema": sd_of(other), "model": sd_of(v2)}, path)
    same_function(load_checkpoint(path), v2)
    same_function(load_checkpoint(path, key="model_ema"), other)
    assert inspect_checkpoint(path)["wrapper"] == "model"
    raises_one_line(CheckpointError, path, load_checkpoint, path, key="ema")


def test_legacy_v0_names_load(tmp_path, v0):
    # Spell the test model's keys the v0 way (ARCHITECTURE.md), independently of the adapter.
    legacy = {}
    for k, v in v0.state_dict().items():
        k = k.replace("patch_embed.0.", "patch_embed.proj.").replace("patch_embed.2.", "patch_embed.norm.")
        k = k.replace(".op.", ".self_attention.").replace("classifier.", "")
        parts = k.split(".")
        if len(parts) > 4 and parts[2] == "blocks" and parts[4] == "norm":
            parts[4] = "ln_1"
        legacy[".".join(parts)] = v
    assert "layers.0.blocks.0.ln_1.weight" in legacy and "head.weight" in legacy and "norm.bias" in legacy
    path = tmp_path / "v0.pth"
    torch.save({"model": legacy}, path)
    same_function(load_checkpoint(path), v0)
    assert inspect_checkpoint(path)["legacy_names"] is True


def test_half_precision_and_nonfinite_reported(tmp_path, v2, capsys):
    sd = {k: v.half() for k, v in sd_of(v2).items()}
    path = tmp_path / "half.pth"
    torch.save(sd, path)
    model = load_checkpoint(path)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    expected = build_model("vmamba_test_v2")
    expected.load_state_dict({k: v.float() for k, v in sd.items()})
    same_function(model, expected)
    report = inspect_checkpoint(path)
    assert report["loadable"] and any("tensors not float32" in p and "float16" in p for p in report["problems"])

    sd = sd_of(v2)
    sd["layers.1.blocks.0.op.Ds"][3] = float("nan")
    sd["classifier.head.bias"][0] = float("inf")
    torch.save(sd, path)
    report = inspect_checkpoint(path)
    nan_problems = [p for p in report["problems"] if "NaN or Inf" in p]
    assert report["loadable"] and len(nan_problems) == 1 and nan_problems[0].startswith("2 tensors")


def test_cli_inspect_errors_are_one_line(tmp_path, v2, capsys):
    path = tmp_path / "noise.pth"
    path.write_bytes(os.urandom(1000))
    assert cli_main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(path) in err

    good = tmp_path / "good.pth"
    torch.save({"model": v2.state_dict()}, good)
    assert cli_main(["inspect", str(good), "--model", "vmamba_test_v0"]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "weights do not fit vmamba_test_v0" in captured.err
    assert cli_main(["inspect", str(good), "--model", "vmamba_test_v2"]) == 0


def test_load_state_dict_into_model_detects(v0):
    model = load_state_dict_into_model(sd_of(v0))
    assert model.config.name == "vmamba_test_v0"
    same_function(model, v0)


def test_swin_style_training_checkpoint_with_yacs_config_loads(tmp_path, monkeypatch):
    """Released VMamba files come from Swin-derived training code that pickles its yacs CfgNode beside the weights:
    they must load under weights_only, with the config read as inert data."""
    import sys

    package = tmp_path / "fake"
    (package / "yacs").mkdir(parents=True)
    (package / "yacs" / "__init__.py").write_text("")
    (package / "yacs" / "config.py").write_text(
        "class CfgNode(dict):\n"
        "    def __init__(self, d=None):\n"
        "        super().__init__(d or {})\n"
        "        self.__dict__['__immutable__'] = False\n"
    )
    monkeypatch.syspath_prepend(str(package))
    from yacs.config import CfgNode  # the stand-in training library, importable only while saving

    model = build_model("vmamba_test_v2")
    path = tmp_path / "ckpt_epoch_299.pth"
    torch.save({"model": model.state_dict(), "epoch": 299, "config": CfgNode({"MODEL": CfgNode({"NAME": "x"})})}, path)
    for name in [n for n in sys.modules if n == "yacs" or n.startswith("yacs.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(package)])  # loading must not need yacs
    loaded = load_checkpoint(path)
    assert loaded.config.name == "vmamba_test_v2"
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
