"""The released checkpoints' key listings (../shared/vmamba/keys/) load into our models, and are recognised.

Each listing gives every key with its shape as the released `.pth` files hold them; a state dict of random tensors
with those names and shapes stands in for the file.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

from vmamba_export.checkpoint import detect, detect_config, load_checkpoint, load_state_dict_into_model
from vmamba_export.cli import main as cli_main
from vmamba_export.models import RELEASED_MODELS, VMamba, build_model, get_config
from vmamba_export.models.adapt import adapt_legacy_keys, is_legacy, legacy_key

KEYS_DIR = Path(__file__).resolve().parents[2] / "shared" / "vmamba" / "keys"
if not KEYS_DIR.is_dir():
    KEYS_DIR = Path("/work/shared/vmamba/keys")

CURRENT = sorted(RELEASED_MODELS)
LEGACY = sorted(p.name.removesuffix(".legacy.txt") for p in KEYS_DIR.glob("*.legacy.txt"))
# (listing file stem, config name)
LISTINGS = [(n, n) for n in CURRENT] + [(f"{n}.legacy", n) for n in LEGACY]


def parse_listing(stem: str) -> tuple[list[tuple[str, tuple[int, ...], str]], dict[str, int]]:
    """(key, shape, dtype) rows in file order, and the header's declared counts."""
    rows, header = [], {}
    for line in (KEYS_DIR / f"{stem}.txt").read_text().splitlines():
        if line.startswith("#"):
            m = re.search(r"(\d+) tensors, (\d+) elements", line)
            if m:
                header = {"tensors": int(m.group(1)), "elements": int(m.group(2))}
            continue
        if line.strip():
            key, shape, dtype = line.split("\t")
            rows.append((key, tuple(ast.literal_eval(shape)), dtype))
    return rows, header


def random_state_dict(rows, device: str = "cpu") -> dict[str, torch.Tensor]:
    return {key: torch.randn(shape, device=device) for key, shape, _ in rows}


def test_listings_present():
    assert len(CURRENT) == 9 and LEGACY == ["vanilla_vmamba_base", "vanilla_vmamba_small", "vanilla_vmamba_tiny"]
    for stem, _ in LISTINGS:
        rows, header = parse_listing(stem)
        # The header's counts are a check on the parser: a dropped or mangled line would show here.
        assert len(rows) == header["tensors"]
        assert sum(torch.Size(s).numel() for _, s, _ in rows) == header["elements"]
        assert {d for _, _, d in rows} == {"float32"}


@pytest.mark.parametrize("stem,name", LISTINGS)
def test_listing_loads_strict(stem, name):
    rows, header = parse_listing(stem)
    sd = random_state_dict(rows)
    legacy = stem.endswith(".legacy")
    assert is_legacy(sd) == legacy
    current = adapt_legacy_keys(sd)
    with torch.device("meta"):
        model = VMamba(get_config(name))
    if not legacy:
        # Key order of the model's state dict is the released files' order (re-saved files diff cleanly). The v0
        # files list SS2D's own parameters in another order, which does not matter for loading.
        assert list(model.state_dict()) == list(current)

    # Independent of our loader: torch's own strict load (adopting the tensors into a meta-built model; the
    # full-size models are too big to also initialise on CPU in every test).
    model.load_state_dict(current, strict=True, assign=True)
    assert sum(p.numel() for p in model.parameters()) == header["elements"]
    del model

    # Our loader: detection by names and shapes, strict load; every tensor lands under its own name.
    assert detect_config(sd) == name
    loaded = load_state_dict_into_model(sd)
    assert loaded.config.name == name and not loaded.training
    params = dict(loaded.named_parameters())
    for key, _, _ in rows:
        assert torch.equal(params[legacy_key(key)], sd[key]), key


@pytest.fixture(scope="module")
def saved_tiny_files(tmp_path_factory):
    """Released-style files ({"model": sd}) of the smallest v0 (legacy names) and v2 models, with their sds."""
    out = {}
    tmp = tmp_path_factory.mktemp("released")
    for stem, name in [("vanilla_vmamba_tiny.legacy", "vanilla_vmamba_tiny"), ("vmamba_tiny_s1l8", "vmamba_tiny_s1l8")]:
        torch.manual_seed(0)
        sd = random_state_dict(parse_listing(stem)[0])
        path = tmp / f"{stem}.pth"
        torch.save({"model": sd, "epoch": 299, "max_accuracy": 82.2}, path)
        out[name] = (path, sd)
    return out


@pytest.mark.parametrize("name", ["vanilla_vmamba_tiny", "vmamba_tiny_s1l8"])
def test_load_checkpoint_file(saved_tiny_files, name):
    path, sd = saved_tiny_files[name]
    model = load_checkpoint(path)
    assert model.config.name == name and model.config.num_classes == 1000
    current = adapt_legacy_keys(sd)
    for key, value in model.state_dict().items():
        assert torch.equal(value, current[key]), key
    # The loaded model computes (a 1-image forward at a small size is cheap enough for the tiny models).
    out = model(torch.randn(1, 3, 40, 40))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_cli_inspect_names_legacy_v0_tiny(saved_tiny_files, capsys):
    path, sd = saved_tiny_files["vanilla_vmamba_tiny"]
    assert cli_main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"] == "vanilla_vmamba_tiny"
    assert report["legacy_names"] is True and report["wrapper"] == "model" and report["loadable"] is True
    assert report["tensors"] == len(sd) == 212
    assert report["params"] == sum(v.numel() for v in sd.values()) == 22893448
    assert report["problems"] == []
    assert report["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    # The human-readable form names it too.
    assert cli_main(["inspect", str(path)]) == 0
    assert "vanilla_vmamba_tiny" in capsys.readouterr().out


def test_finetune_with_other_head_is_detected_and_loads():
    """A fine-tune keeps the backbone and replaces the head: detect the backbone, take num_classes from the head."""
    rows, _ = parse_listing("vmamba_small_s2l15")
    sd = random_state_dict(rows, device="meta")  # detection needs shapes only
    sd["classifier.head.weight"] = torch.empty(37, 768, device="meta")
    sd["classifier.head.bias"] = torch.empty(37, device="meta")
    found = detect(sd)
    assert (found.name, found.config.num_classes, found.head_replaced) == ("vmamba_small_s2l15", 37, True)

    # A real load of a small fine-tune, both detected and named.
    base = build_model("vmamba_test_v2", num_classes=5)
    sd = {k: v.clone() for k, v in base.state_dict().items()}
    for model in (load_state_dict_into_model(sd), load_state_dict_into_model(sd, name="vmamba_test_v2")):
        assert model.config.name == "vmamba_test_v2" and model.config.num_classes == 5
        x = torch.randn(2, 3, 40, 40)
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)


def test_legacy_rename_is_exactly_the_documented_one():
    # Independent spelling of the ARCHITECTURE.md rename rules, applied to a few keys by hand.
    cases = {
        "patch_embed.proj.weight": "patch_embed.0.weight",
        "patch_embed.norm.bias": "patch_embed.2.bias",
        "layers.2.blocks.8.ln_1.weight": "layers.2.blocks.8.norm.weight",
        "layers.0.blocks.1.self_attention.A_logs": "layers.0.blocks.1.op.A_logs",
        "layers.0.downsample.norm.weight": "layers.0.downsample.norm.weight",  # not the top-level norm
        "norm.weight": "classifier.norm.weight",
        "head.bias": "classifier.head.bias",
        "classifier.head.bias": "classifier.head.bias",  # current names pass through
        "layers.1.blocks.0.op.out_norm.weight": "layers.1.blocks.0.op.out_norm.weight",
    }
    for old, new in cases.items():
        assert legacy_key(old) == new
    with pytest.raises(ValueError, match="both map to"):
        adapt_legacy_keys({"head.bias": torch.zeros(1), "classifier.head.bias": torch.zeros(1)})
