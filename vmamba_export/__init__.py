"""vmamba-export: trained VMamba models to verified, measured edge artifacts."""

from __future__ import annotations

__version__ = "0.1.0"

from .models import build_model, get_config, list_configs

__all__ = ["__version__", "build_model", "get_config", "list_configs", "load", "load_checkpoint"]


def load_checkpoint(path, name=None, **kwargs):
    """Load a checkpoint file into a model of its config (detected from the weights when `name` is None)."""
    from .checkpoint import load_checkpoint as _load_checkpoint

    return _load_checkpoint(path, name=name, **kwargs)


def load(artifact_dir, **kwargs):
    """Open an artifact folder and return a predictor (see vmamba_export.runtime)."""
    from .runtime import load as _load

    return _load(artifact_dir, **kwargs)
