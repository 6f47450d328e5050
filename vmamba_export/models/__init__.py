"""Model registry: a name picks a model everywhere (CLI, tests, manifests)."""

from __future__ import annotations

import torch

from .configs import (
    DEFAULT_MODEL,
    RELEASED_MODELS,
    InputSpec,
    VMambaConfig,
    get_config,
    list_configs,
)
from .vmamba import SS2D, VMamba


def build_model(name: str = DEFAULT_MODEL, **overrides) -> VMamba:
    """A model of the named config (fields of VMambaConfig may be overridden), randomly initialised, in eval mode."""
    cfg = get_config(name)
    if overrides:
        cfg = cfg.with_overrides(**overrides)
    return build_from_config(cfg)


def build_from_config(cfg: VMambaConfig) -> VMamba:
    model = VMamba(cfg)
    model.eval()
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "DEFAULT_MODEL",
    "RELEASED_MODELS",
    "SS2D",
    "InputSpec",
    "VMamba",
    "VMambaConfig",
    "build_from_config",
    "build_model",
    "count_parameters",
    "get_config",
    "list_configs",
]
