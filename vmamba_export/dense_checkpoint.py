"""Dense-task checkpoints: which task a state dict holds, which config it is, and what a load keeps of it.

Files (read by checkpoint.py: torch.load(weights_only=True), the weights under `state_dict` for mmengine training
files, which also hold `meta`, optimizer and scheduler state):
- mmseg segmentation training files: `backbone.*` (Backbone_VSSM), `decode_head.*` (UPerHead) and
  `auxiliary_head.*` (the FCN head used only by the training loss). Task "segmentation": backbone + decode_head
  load strictly into UperNetSegmenter; the auxiliary head is dropped and reported.
- mmdet detection training files: `backbone.*` plus `neck.*`, `rpn_head.*`, `roi_head.*`. Only the backbone is
  exported (task "backbone"); the rest is dropped and reported. A bare `backbone.*` file is a backbone too.
- classification checkpoints (everything else): task "classification" as before, or task "backbone": the
  classifier's weights minus `classifier.*`, the four out-norms (not in such a file) initialised as a fresh model
  has them (LayerNorm weight 1 bias 0; BatchNorm defaults), which the load reports.

Config detection of a dense file reads the backbone's shapes (compared with every classification config built as a
backbone), the out-norm kind (BatchNorm out-norms have running statistics) and, for a segmenter, the class count and
head width from `decode_head.conv_seg.weight` (classes, channels, 1, 1). A registered `upernet_vssm_*` config is
named when everything fits it; otherwise the backbone's config name with task segmentation and those values.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import torch

from .errors import CheckpointError, ConfigDetectionError
from .models import TASKS, VMambaConfig, get_config, list_configs
from .models.adapt import adapt_legacy_keys
from .models.configs import as_segmenter
from .models.dense import out_norm_kind

BACKBONE, DECODE_HEAD, AUX_HEAD = "backbone.", "decode_head.", "auxiliary_head."
DETECTION_PARTS = ("neck.", "rpn_head.", "roi_head.")
CONV_SEG = "decode_head.conv_seg.weight"
LISTED_DROPPED = 32  # dropped key names listed in full up to this many (the auxiliary head has 8)

# Which tasks a file of each layout can give (a classifier's out-norms can be initialised; a head cannot be made up).
_COMPATIBLE = {
    "segmentation": ("segmentation", "backbone"),
    "backbone": ("backbone",),
    "classification": ("classification", "backbone"),
}


def file_task(sd: dict[str, torch.Tensor]) -> str:
    """The task a state dict's layout holds: "segmentation" (decode_head.* keys), "backbone" (backbone.* without a
    decode head: a detector or a bare backbone; or out-norms without a classifier: an unprefixed backbone) or
    "classification" (anything else)."""
    if any(k.startswith(DECODE_HEAD) for k in sd):
        return "segmentation"
    if any(k.startswith(BACKBONE) for k in sd):
        return "backbone"
    if any(k.startswith("outnorm") for k in sd) and not any(k.startswith("classifier.") for k in sd):
        return "backbone"  # a bare Backbone_VSSM state dict (patch_embed, layers, outnorm0..3), as this tool saves
    return "classification"


def _layout_words(layout: str) -> str:
    return {
        "segmentation": "a segmentation checkpoint (backbone.* and decode_head.* keys)",
        "backbone": "a backbone/detection checkpoint (backbone.* keys, no decode_head)",
        "classification": "a classification checkpoint (no backbone.* keys)",
    }[layout]


def resolve_task(layout: str, name: str | None, task: str | None) -> str:
    """The task to load: `task` when given (checked against the file), else the named config's own dense task, else
    the file's. A task the file cannot give is one error naming both."""
    if task is not None and task not in TASKS:
        raise CheckpointError(f"task {task!r}: expected one of {', '.join(TASKS)}")
    if task is None and name is not None and get_config(name).task != "classification":
        task = get_config(name).task
        why = f"model {name} is a {task} config"
    elif task is None:
        return layout
    else:
        why = f"task {task}"
    if task not in _COMPATIBLE[layout]:
        raise CheckpointError(f"{why}, but the file is {_layout_words(layout)}")
    return task


def _out_norm_from(shapes: dict[str, tuple]) -> str:
    return "bn" if "outnorm0.running_mean" in shapes else ""


def _strip(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def _classifier_candidates() -> list[VMambaConfig]:
    return [c for c in list_configs() if c.task == "classification"]


def detect_backbone(shapes: dict[str, tuple]) -> VMambaConfig:
    """The classification config whose backbone (task "backbone", out-norm from the file) has exactly these keys and
    shapes (model names: patch_embed.*, layers.*, outnorm*), returned as a backbone config."""
    from .checkpoint import _depths, compare_shapes, expected_shapes

    kind = _out_norm_from(shapes)
    candidates = [c.with_overrides(task="backbone", out_norm=kind) for c in _classifier_candidates()]
    depths = _depths(shapes, max(len(c.depths) for c in candidates))
    likely = [c for c in candidates if tuple(c.depths) == depths]
    fits = [(c, compare_shapes(shapes, expected_shapes(c))) for c in likely or candidates]
    exact = [c for c, diff in fits if diff.exact]
    if len(exact) == 1:
        return exact[0]
    if len(exact) > 1:
        names = ", ".join(c.name for c in exact)
        raise ConfigDetectionError(f"ambiguous backbone weights: they fit {names}; pass a model name")
    if not fits:
        raise ConfigDetectionError(f"the {len(shapes)} backbone tensors match no known config")
    best, diff = min(fits, key=lambda f: f[1].total)
    err = ConfigDetectionError(
        f"the {len(shapes)} backbone tensors match no known config; closest: {best.name} ({diff.describe()}). "
        "Pass a model name to check against another"
    )
    err.diff = diff
    raise err


def _same_backbone(a: VMambaConfig, b: VMambaConfig) -> bool:
    fields = ("version", "depths", "dims", "ssm_ratio", "d_state", "mlp_ratio", "in_chans")
    return all(getattr(a, f) == getattr(b, f) for f in fields) and out_norm_kind(a) == out_norm_kind(b)


def segmentation_config(base: VMambaConfig, shapes: dict[str, tuple]) -> VMambaConfig:
    """`base` as a segmenter with the file's class count and head width (decode_head.conv_seg) and out-norm kind.
    Labels are kept only when there is one per class."""
    from .checkpoint import with_num_classes

    cfg = as_segmenter(base)
    kind = _out_norm_from(_strip_shapes(shapes, BACKBONE))
    if kind and cfg.out_norm != kind:
        cfg = cfg.with_overrides(out_norm=kind)
    conv_seg = shapes.get(CONV_SEG)
    if conv_seg is not None and len(conv_seg) == 4 and conv_seg[0] >= 1 and conv_seg[1] >= 1:
        if conv_seg[1] != cfg.head_channels:
            cfg = cfg.with_overrides(head_channels=conv_seg[1])
        if conv_seg[0] != cfg.num_classes:
            cfg = with_num_classes(cfg, conv_seg[0])
    return cfg


def _strip_shapes(shapes: dict[str, tuple], prefix: str) -> dict[str, tuple]:
    return {k[len(prefix) :]: v for k, v in shapes.items() if k.startswith(prefix)}


def detect_segmentation(shapes: dict[str, tuple]) -> tuple[str, VMambaConfig]:
    """(name, config) of a segmentation state dict (backbone.* + decode_head.*; no auxiliary head): the registered
    upernet config when backbone, classes and head width all fit one, else the backbone's config name with task
    segmentation and the file's classes and head width."""
    backbone = detect_backbone(_strip_shapes(shapes, BACKBONE))
    base = get_config(backbone.name)
    for registered in list_configs():
        if registered.task == "segmentation" and _same_backbone(registered, backbone):
            cfg = segmentation_config(registered, shapes)
            if cfg == registered:
                return registered.name, registered
    return base.name, segmentation_config(base.with_overrides(out_norm=backbone.out_norm), shapes)


def _adapt(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A backbone's v0 key names renamed to the current ones (models/adapt.py)."""
    try:
        return adapt_legacy_keys(sd)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None


@dataclasses.dataclass
class DensePick:
    """What a dense load takes from a file: the config, the tensors under the model's names, the keys dropped because
    the task does not use them (names as stored) and the keys initialised because the file has none."""

    name: str
    config: VMambaConfig
    state_dict: dict[str, torch.Tensor]
    task_dropped: list[str]
    initialised: list[str]


def _fresh_out_norms(cfg: VMambaConfig) -> dict[str, torch.Tensor]:
    """The out-norm tensors of a newly built backbone of cfg (LayerNorm 1/0, BatchNorm defaults)."""
    from .models.dense import _out_norm

    kind = out_norm_kind(cfg)
    fresh: dict[str, torch.Tensor] = {}
    for i, width in enumerate(cfg.widths):
        for key, value in _out_norm(kind, width).state_dict().items():
            fresh[f"outnorm{i}.{key}"] = value
    return fresh


def pick_dense(sd: dict[str, torch.Tensor], name: str | None, task: str, layout: str) -> DensePick:
    """Config and tensors for a dense `task` from a file of `layout` (see resolve_task), with the named config or
    a detected one. Unexpected or missing keys are left in for the strict check that follows."""
    from .checkpoint import _select_classification

    if layout == "classification":  # task backbone from a classifier: its own checks first, then the out-norms
        cfg, _, kept = _select_classification(sd, name)
        cfg = cfg.with_overrides(task="backbone")
        dropped = [k for k in kept if k.startswith("classifier.")]
        kept = {k: v for k, v in kept.items() if not k.startswith("classifier.")}
        fresh = {k: v for k, v in _fresh_out_norms(cfg).items() if k not in kept}
        return DensePick(name or cfg.name, cfg, {**kept, **fresh}, dropped, sorted(fresh))
    if task == "segmentation":
        dropped = [k for k in sd if k.startswith(AUX_HEAD)]
        kept = {k: v for k, v in sd.items() if not k.startswith(AUX_HEAD)}
        backbone = {BACKBONE + k: v for k, v in _adapt(_strip(kept, BACKBONE)).items()}
        kept = {**backbone, **{k: v for k, v in kept.items() if not k.startswith(BACKBONE)}}
        kept_shapes = {k: tuple(v.shape) for k, v in kept.items()}
        if name is None:
            name, cfg = detect_segmentation(kept_shapes)
        else:
            cfg = segmentation_config(get_config(name), kept_shapes)
        return DensePick(name, cfg, kept, dropped, [])
    # task backbone from a segmentation or detection file: backbone.* only (an unprefixed backbone: all of it)
    if any(k.startswith(BACKBONE) for k in sd):
        dropped = [k for k in sd if not k.startswith(BACKBONE)]
        kept = _adapt(_strip(sd, BACKBONE))
    else:
        dropped, kept = [], _adapt(sd)
    kept_shapes = {k: tuple(v.shape) for k, v in kept.items()}
    if name is None:
        cfg = detect_backbone(kept_shapes)
        name = cfg.name
    else:
        cfg = get_config(name).with_overrides(task="backbone")
        kind = _out_norm_from(kept_shapes)
        if kind and cfg.out_norm != kind:
            cfg = cfg.with_overrides(out_norm=kind)
    return DensePick(name, cfg, kept, dropped, [])


def dropped_record(keys: list[str]) -> dict:
    """Manifest/report record of keys a task does not use: count, count per top-level module, names (all of them up
    to LISTED_DROPPED, else the first LISTED_DROPPED)."""
    by_module = Counter(k.split(".", 1)[0] for k in keys)
    return {"count": len(keys), "by_module": dict(by_module), "keys": list(keys[:LISTED_DROPPED])}


__all__ = [
    "DensePick",
    "detect_backbone",
    "detect_segmentation",
    "dropped_record",
    "file_task",
    "pick_dense",
    "resolve_task",
    "segmentation_config",
]
