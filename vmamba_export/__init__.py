"""vmamba-export: trained VMamba models to verified, measured edge artifacts."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "build_model", "get_config", "list_configs", "load", "load_checkpoint"]


# The model registry needs torch (the builder side); importing the package must not, so that the runtime
# (`load`, the predictor, predict/validate/bench) runs where only numpy and one runtime are installed.
_MODEL_NAMES = ("build_model", "get_config", "list_configs")


def __getattr__(name: str):
    if name in _MODEL_NAMES:
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_checkpoint(path, name=None, **kwargs):
    """Load a checkpoint file into a model of its config (detected from the weights when `name` is None)."""
    from .checkpoint import load_checkpoint as _load_checkpoint

    return _load_checkpoint(path, name=name, **kwargs)


def load(artifact_dir, **kwargs):
    """Open an artifact folder and return a predictor (see vmamba_export.runtime)."""
    from .runtime import load as _load

    return _load(artifact_dir, **kwargs)
