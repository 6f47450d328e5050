"""Model registry: a name picks a model everywhere (CLI, tests, manifests)."""

from __future__ import annotations

import torch

from .configs import (
    DEFAULT_MODEL,
    RELEASED_MODELS,
    TASKS,
    InputSpec,
    VMambaConfig,
    get_config,
    list_configs,
)
from .dense import UperNetSegmenter, VMambaBackbone
from .vmamba import SS2D, VMamba

AnyModel = VMamba | VMambaBackbone | UperNetSegmenter


def build_model(name: str = DEFAULT_MODEL, **overrides) -> AnyModel:
    """A model of the named config (fields of VMambaConfig may be overridden, `task="backbone"` among them), randomly
    initialised, in eval mode."""
    cfg = get_config(name)
    if overrides:
        cfg = cfg.with_overrides(**overrides)
    return build_from_config(cfg)


def build_from_config(cfg: VMambaConfig) -> AnyModel:
    """The module for the config's task: VMamba (classification), VMambaBackbone or UperNetSegmenter."""
    classes = {"classification": VMamba, "backbone": VMambaBackbone, "segmentation": UperNetSegmenter}
    if cfg.task not in classes:
        raise ValueError(f"task {cfg.task!r}: expected one of {', '.join(TASKS)}")
    model = classes[cfg.task](cfg)
    model.eval()
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "TASKS",
    "AnyModel",
    "UperNetSegmenter",
    "VMambaBackbone",
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
