"""The bundled, trained models: `<name>.safetensors` (weights + metadata) and `<name>.json` (how they were trained
and their held-out accuracy or mIoU), written by `scripts/train_digits.py` (the digits classifiers) and
`scripts/train_segmenter.py` (vmamba_shapes_seg, a UperNet segmenter)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError, StateDictMismatchError
from ..models import AnyModel, build_model

WEIGHTS_DIR = Path(__file__).parent


def list_bundled() -> list[str]:
    """Names of the models whose weights ship with the package."""
    return sorted(p.stem for p in WEIGHTS_DIR.glob("*.safetensors"))


def bundled_path(name: str) -> Path:
    path = WEIGHTS_DIR / f"{name}.safetensors"
    if not path.is_file():
        known = ", ".join(list_bundled()) or "none"
        raise CheckpointError(f"no bundled weights for {name!r} (looked for {path}); bundled models: {known}")
    return path


def bundled_info(name: str) -> dict:
    """The training record beside the weights: held-out top-1 (classifiers) or mIoU, pixel accuracy and per-class
    IoU (segmenters), train seconds, seed, split sizes, config."""
    bundled_path(name)
    return json.loads((WEIGHTS_DIR / f"{name}.json").read_text())


def load_bundled(name: str) -> AnyModel:
    """`build_model(name)` (the module of the config's task) with the bundled weights loaded strictly, in eval
    mode."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = bundled_path(name)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    # A renamed or swapped file would otherwise load into the wrong config whenever the shapes happen to agree.
    if meta.get("config_name") != name:
        raise CheckpointError(f"{path} holds weights of {meta.get('config_name')!r}, not {name!r}")
    model = build_model(name)
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as err:
        raise StateDictMismatchError(f"{path} does not fit config {name!r}: {err}") from err
    return model.eval()


__all__ = ["WEIGHTS_DIR", "bundled_info", "bundled_path", "list_bundled", "load_bundled"]
