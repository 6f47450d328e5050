"""The bundled trained models, under the names `model_source` uses; the files and the loader live in `weights/`."""

from __future__ import annotations

from pathlib import Path

from .weights import bundled_info, bundled_path, list_bundled, load_bundled


def available_bundled() -> list[str]:
    """Names of the models whose trained weights ship with the package."""
    return list_bundled()


def bundled_weights_path(name: str) -> Path:
    """Path of `<name>.safetensors` (CheckpointError when `name` is not bundled)."""
    return bundled_path(name)


def default_sources(model_name: str) -> tuple[str | None, str | None]:
    """(accuracy source, calibration source) a model's own data suggests: the bundled digits models and the bundled
    segmenter (generated shapes scenes with their masks) have labels."""
    if model_name.startswith("vmamba_digits"):
        return "digits:holdout", "digits:calib"
    if model_name == "vmamba_shapes_seg":
        return "shapes:holdout", "shapes:calib"
    return None, "builtin"


__all__ = [
    "available_bundled",
    "bundled_info",
    "bundled_weights_path",
    "default_sources",
    "list_bundled",
    "load_bundled",
]
