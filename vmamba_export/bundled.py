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


__all__ = ["available_bundled", "bundled_info", "bundled_weights_path", "list_bundled", "load_bundled"]
