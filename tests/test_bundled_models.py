"""The shipped weights: they load strictly, are small, and still score >= 97% on the digits holdout with the
model's own scan op; the training scan is the op's function with the portable form's gradients."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vmamba_export.data.sources import digits_split, load_batch
from vmamba_export.errors import CheckpointError
from vmamba_export.models import build_model, get_config
from vmamba_export.scan import selective_scan_portable, selective_scan_reference
from vmamba_export.training import BUNDLED_MODELS, selective_scan_train
from vmamba_export.weights import WEIGHTS_DIR, bundled_info, list_bundled, load_bundled


@pytest.fixture(scope="module")
def holdout():
    x, labels, _ = load_batch("digits:holdout", get_config("vmamba_digits_v2").input)
    return torch.from_numpy(x), torch.tensor(labels)


def test_both_digits_models_are_bundled():
    assert set(BUNDLED_MODELS) <= set(list_bundled())
    for name in BUNDLED_MODELS:
        assert (WEIGHTS_DIR / f"{name}.safetensors").stat().st_size < 2 * 1024 * 1024


@pytest.mark.parametrize("name", BUNDLED_MODELS)
def test_bundled_model_heldout_accuracy(name, holdout):
    x, labels = holdout
    model = load_bundled(name)
    assert not model.training
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + 128]).argmax(1) for i in range(0, len(x), 128)])
    acc = float((pred == labels).float().mean())
    assert acc >= 0.97, f"{name}: held-out top-1 {acc:.4f}"
    info = bundled_info(name)
    # The recorded number is reproduced (one image of slack for summation-order differences between thread counts).
    assert abs(acc - info["heldout_top1"]) <= 1.0 / len(labels) + 1e-9
    assert info["split_sizes"] == {k: len(v) for k, v in digits_split().items()}
    assert info["config"]["name"] == name and info["seed"] == 0


@pytest.mark.parametrize("name", BUNDLED_MODELS)
def test_bundled_metadata(name):
    from safetensors import safe_open

    with safe_open(str(WEIGHTS_DIR / f"{name}.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["config_name"] == name
    assert float(meta["heldout_top1"]) >= 0.97
    assert float(meta["train_seconds"]) > 0
    assert json.loads(meta["split_sizes"]) == {k: len(v) for k, v in digits_split().items()}
    assert meta["torch_version"] and meta["seed"] == "0"


def test_load_bundled_rejects_unknown_and_mismatched(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="no bundled weights"):
        load_bundled("vmamba_test_v2")
    # A file whose metadata names another config is refused even if it were renamed.
    import shutil

    import vmamba_export.weights as weights

    shutil.copy(WEIGHTS_DIR / "vmamba_digits_v0.safetensors", tmp_path / "vmamba_digits_v2.safetensors")
    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(CheckpointError, match="vmamba_digits_v0"):
        load_bundled("vmamba_digits_v2")


@pytest.mark.parametrize("d_state", [1, 4])
def test_training_scan_matches_reference_and_portable_gradients(d_state):
    g = torch.Generator().manual_seed(d_state)
    b, k, di, h, w = 2, 4, 3, 3, 5

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_()

    args = (
        rnd(b, di, h, w),
        rnd(b, k, di, h, w, scale=0.5),
        rnd(k * di, d_state, scale=0.5),
        rnd(b, k, d_state, h, w),
        rnd(b, k, d_state, h, w),
        rnd(k * di),
        rnd(k * di, scale=0.5),
    )
    out = selective_scan_train(*args)
    ref = selective_scan_reference(*[a.detach() for a in args])
    np.testing.assert_allclose(out.detach().numpy(), ref.numpy(), rtol=1e-9, atol=1e-9)
    weight = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * weight).sum(), args)
    grads_portable = torch.autograd.grad((selective_scan_portable(*args) * weight).sum(), args)
    for ours, theirs in zip(grads, grads_portable, strict=True):
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-7, atol=1e-9)


def test_training_scan_in_a_model_equals_the_op():
    torch.manual_seed(0)
    model = build_model("vmamba_digits_v0")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        got = model.set_scan(selective_scan_train)(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
