"""Where a model's weights come from (bundled, a checkpoint file, or seeded random init) and how to rebuild the same
PyTorch model later from what the manifest records, so `validate` can compare an artifact with its source.

The manifest records a checkpoint by file name and sha256, never by the path it had on the build machine: `validate`
finds bundled models by name and needs the checkpoint file of any other (`--checkpoint PATH`, checked against the
recorded sha256)."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError, VMambaExportError
from .models import DEFAULT_MODEL, TASKS, AnyModel, build_model, get_config
from .models.configs import as_segmenter

LABELS_MAX_BYTES = 16 << 20  # a label file is text, one short line per class


@dataclass
class ModelSource:
    model: AnyModel  # VMamba, VMambaBackbone or UperNetSegmenter (model.config.task says which)
    weights: dict  # manifest record: kind ("bundled" | "checkpoint" | "random"), name/file, sha256, seed
    # Where the model's labels came from: "config" (the registered config's), the label file's name, "given" (a
    # list passed in Python), or None: unknown, the classes are numbered class_0, class_1, ...
    labels_source: str | None = None
    checkpoint_path: Path | None = None  # the file read on this machine (not recorded: the manifest keeps its name)


def state_dict_digest(model: torch.nn.Module) -> str:
    """sha256 over every tensor's name, shape and bytes: identifies weights whatever file they came from."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def bundled_names() -> list[str]:
    from .bundled import available_bundled

    return available_bundled()


def read_labels(path: str | Path) -> list[str]:
    """Class labels from a text file (UTF-8): one per line, surrounding whitespace stripped, blank lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise VMambaExportError(f"labels file {path}: {'is a directory' if path.is_dir() else 'not found'}")
    size = path.stat().st_size
    if size > LABELS_MAX_BYTES:
        raise VMambaExportError(f"labels file {path}: {size:,} bytes, more than a label file's {LABELS_MAX_BYTES:,}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark is not part of the first label
    except UnicodeDecodeError as exc:
        raise VMambaExportError(f"labels file {path}: not UTF-8 text (bad byte at offset {exc.start})") from None
    labels = [line.strip() for line in text.splitlines() if line.strip()]
    if not labels:
        raise VMambaExportError(f"labels file {path}: no labels (expected one label per line)")
    return labels


def _labels_from(labels: Sequence[str] | str | Path) -> tuple[list[str], str, str]:
    """(labels, where they came from for the manifest, what an error names) for a file path or a list of strings."""
    if isinstance(labels, (str, Path)):
        return read_labels(labels), f"labels file {Path(labels).name}", f"labels file {labels}"
    values = list(labels)
    bad = next((v for v in values if not isinstance(v, str) or not v.strip()), None)
    if bad is not None or not values:
        raise VMambaExportError(f"labels must be non-empty strings, one per class; got {bad!r} in the list given")
    return values, "given", "labels given"


def apply_labels(model: AnyModel, labels: Sequence[str] | str | Path | None) -> str | None:
    """Give the model's config these labels (a list, or a file with one per line); returns where they came from.

    With none given, the config's own labels are kept when there is one per class; otherwise there are none (the
    runtime numbers the classes). A count that differs from the head's class count is an error.
    """
    cfg = model.config
    if cfg.task == "backbone":  # feature maps: no classes to name
        if labels is not None:
            raise VMambaExportError(f"labels given for {cfg.name} as a backbone: it outputs feature maps, not classes")
        if cfg.input.labels is not None:
            model.config = cfg.with_overrides(input=dataclasses.replace(cfg.input, labels=None))
        return None
    if labels is None:
        if cfg.input.labels is not None and len(cfg.input.labels) == cfg.num_classes:
            return "config"
        model.config = cfg.with_overrides(input=dataclasses.replace(cfg.input, labels=None))
        return None
    values, origin, shown = _labels_from(labels)
    if len(values) != cfg.num_classes:
        raise VMambaExportError(
            f"{shown}: {len(values)} labels, but the model ({cfg.name}) has {cfg.num_classes} classes; "
            "give one label per class"
        )
    model.config = cfg.with_overrides(input=dataclasses.replace(cfg.input, labels=tuple(values)))
    return origin


def resolve_model(
    model_name: str | None = None,
    checkpoint: str | Path | None = None,
    random_weights: bool = False,
    seed: int = 0,
    labels: Sequence[str] | str | Path | None = None,
    ignore_keys: Sequence[str] = (),
    non_strict: bool = False,
    task: str | None = None,
    overrides: dict | None = None,
) -> ModelSource:
    """The model a command works on: a checkpoint, a bundled trained model, or (asked for) seeded random weights.

    `labels`: one per class, as a list or a text file (one per line); needed for a fine-tune whose head has other
    classes than its config's labels, else its classes are numbered. `ignore_keys` (globs) and `non_strict` leave
    extra keys of a checkpoint out (see checkpoint.py); both are recorded in the manifest so validate re-applies them.

    `task` ("classification", "backbone", "segmentation"): None takes a checkpoint's own task (detected, or the named
    config's dense task) and the named config's task otherwise; one the file cannot give is an error naming both
    (dense_checkpoint.py). What a dense load drops (an auxiliary head, a detector's heads, a classifier) and
    initialises (a classifier's out-norms) is recorded in the weights record. `overrides` (VMambaConfig fields, e.g.
    head_channels, num_classes) apply to random weights only, and are recorded so validate rebuilds the same model.
    """
    if task is not None and task not in TASKS:
        raise VMambaExportError(f"task {task!r}: expected one of {', '.join(TASKS)}")
    if overrides and not random_weights:
        raise VMambaExportError("config overrides apply to --random-weights builds only (a checkpoint fixes shapes)")
    if checkpoint is not None and random_weights:
        raise VMambaExportError("--checkpoint and --random-weights contradict each other: give one of them")
    checkpoint_path = None
    if checkpoint is not None:
        from .artifact import sha256_file
        from .checkpoint import load_checkpoint_selection

        checkpoint_path = Path(checkpoint)
        model, sel = load_checkpoint_selection(
            checkpoint_path, name=model_name, ignore_keys=ignore_keys, drop_unexpected=non_strict, task=task
        )
        # The file name and its hash identify it; the build machine's path is nobody else's business.
        weights = {"kind": "checkpoint", "file": checkpoint_path.name, "sha256": sha256_file(checkpoint_path)}
        if ignore_keys or non_strict:
            weights.update(
                ignore_keys=list(ignore_keys), non_strict=non_strict, dropped_keys=len(sel.ignored) + len(sel.dropped)
            )
        if model.config.task != "classification":
            from .dense_checkpoint import dropped_record

            weights["task"] = model.config.task
            if sel.task_dropped:
                weights["task_dropped"] = dropped_record(sel.task_dropped)
            if any(k.startswith("outnorm") for k in sel.initialised):
                weights["out_norms"] = "initialised"
    else:
        if ignore_keys or non_strict:
            raise VMambaExportError("--ignore-keys and --non-strict apply to a --checkpoint file; none was given")
        name = model_name or _default_model(task)
        get_config(name)  # unknown names fail here with the list of known ones
        if random_weights:
            fields = dict(overrides or {})
            if task is not None:
                fields["task"] = task
            if fields.get("task") == "segmentation" and get_config(name).task != "segmentation":
                # A classifier built as a segmenter takes the segmentation input and 150 classes (as_segmenter),
                # recorded as plain overrides so that validate rebuilds the same model.
                seg = as_segmenter(get_config(name), **{k: v for k, v in fields.items() if k != "task"})
                fields = {"input": seg.input.to_dict(), "num_classes": seg.num_classes, **fields}
            torch.manual_seed(seed)
            model = build_model(name, **fields)
            weights = {"kind": "random", "name": name, "seed": seed}
            if fields:
                weights["overrides"] = fields
        elif task not in (None, get_config(name).task) and not (
            task == "backbone" and get_config(name).task in ("classification", "segmentation")
        ):
            raise VMambaExportError(
                f"task {task}: {name} is a {get_config(name).task} model; pass --checkpoint PATH to load its weights "
                "for another task, or --random-weights"
            )
        elif name in bundled_names():
            from .artifact import sha256_file
            from .bundled import bundled_weights_path, load_bundled

            model = load_bundled(name)
            weights = {"kind": "bundled", "name": name, "sha256": sha256_file(bundled_weights_path(name))}
            if task == "backbone" and model.config.task != "backbone":
                model = _as_backbone(model, name, weights)
        else:
            raise VMambaExportError(
                f"no weights for {name!r}: pass --checkpoint PATH (an official .pth or your fine-tune), "
                f"or --random-weights for a speed-only build; bundled trained models: {', '.join(bundled_names())}"
            )
    # An mmseg training file names its classes (meta.dataset_meta.classes): used, unless labels are given, when there
    # is one per class.
    names = sel.class_names if checkpoint is not None and model.config.task == "segmentation" else None
    if labels is None and names is not None and len(names) == model.config.num_classes:
        apply_labels(model, names)
        labels_source = "checkpoint meta.dataset_meta.classes"
    else:
        labels_source = apply_labels(model, labels)
    weights["state_digest"] = state_dict_digest(model)
    return ModelSource(model=model, weights=weights, labels_source=labels_source, checkpoint_path=checkpoint_path)


def _default_model(task: str | None) -> str:
    """The model used when none is named: the bundled digits classifier, or for --task segmentation the bundled
    segmenter (the first bundled segmentation config: vmamba_shapes_seg where it ships)."""
    if task != "segmentation":
        return DEFAULT_MODEL
    from .models import list_configs

    bundled = set(bundled_names())
    segmenters = [c.name for c in list_configs() if c.task == "segmentation" and c.name in bundled]
    if not segmenters:
        raise VMambaExportError(
            "no bundled segmentation model in this installation: pass --model NAME with --checkpoint PATH "
            "(e.g. an mmseg upernet_vssm_* training file) or --random-weights"
        )
    return "vmamba_shapes_seg" if "vmamba_shapes_seg" in segmenters else segmenters[0]


def _as_backbone(model: AnyModel, name: str, weights: dict) -> AnyModel:
    """A bundled classifier's or segmenter's backbone, as a checkpoint of it would load with task backbone (the
    classifier's out-norms initialised); what was dropped and initialised goes into the weights record."""
    from .checkpoint import _build_loaded, compare_shapes, expected_shapes
    from .dense_checkpoint import dropped_record, file_task, pick_dense

    sd = model.state_dict()
    pick = pick_dense(sd, name, "backbone", file_task(sd))
    diff = compare_shapes({k: tuple(v.shape) for k, v in pick.state_dict.items()}, expected_shapes(pick.config))
    if not diff.exact:  # a bundled file always fits its own config; this would be a bug here
        raise VMambaExportError(f"bundled {name} as a backbone: {diff.describe()}")
    weights["task"] = "backbone"
    if pick.task_dropped:
        weights["task_dropped"] = dropped_record(pick.task_dropped)
    if any(k.startswith("outnorm") for k in pick.initialised):
        weights["out_norms"] = "initialised"
    return _build_loaded(pick.config, pick.state_dict, strict=True)


def _recorded_key_options(weights: dict) -> tuple[list[str], bool]:
    """The --ignore-keys patterns and --non-strict the artifact was exported with."""
    patterns = weights.get("ignore_keys") or []
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise VMambaExportError("manifest 'model.weights.ignore_keys' must be a list of strings")
    return patterns, weights.get("non_strict") is True


def _recorded_task(manifest: dict) -> str | None:
    """The task the artifact's model was built for (None in manifests written before dense tasks: a classifier)."""
    config = manifest["model"].get("config")
    task = config.get("task") if isinstance(config, dict) else None
    if task is not None and task not in TASKS:
        raise VMambaExportError(f"manifest 'model.config.task' {task!r}: expected one of {', '.join(TASKS)}")
    return task


def rebuild_from_manifest(manifest: dict, checkpoint: str | Path | None = None) -> AnyModel:
    """The PyTorch fp32 model an artifact was built from, checked against the recorded weight digest.

    Bundled and random weights are rebuilt by name (and seed). A checkpoint is not looked for: `checkpoint` must
    be given, and its sha256 must be the recorded one. Given for bundled or random weights, it is used instead and
    only the weight digest decides.
    """
    from .artifact import sha256_file

    weights = manifest["model"].get("weights") or {}
    if not isinstance(weights, dict):
        raise VMambaExportError("manifest 'model.weights' must be an object")
    kind = weights.get("kind")
    name = manifest["model"]["name"]
    task = _recorded_task(manifest)
    if kind == "checkpoint":
        # Manifests written before the file name was recorded hold an absolute path: only its name is used.
        recorded = str(weights.get("file") or Path(str(weights.get("path") or "?")).name)
        sha = str(weights.get("sha256") or "")
        if checkpoint is None:
            raise CheckpointError(
                f"the artifact was built from checkpoint {recorded!r} (sha256 {sha[:16] or '?'}); pass "
                "--checkpoint PATH to that file to validate against it"
            )
        path = Path(checkpoint)
        if not path.is_file():
            raise CheckpointError(f"--checkpoint {path}: not found (the artifact was built from {recorded!r})")
        actual = sha256_file(path)
        if sha and actual != sha:
            raise CheckpointError(
                f"--checkpoint {path} has sha256 {actual[:16]}, but the artifact was built from {recorded!r} with "
                f"sha256 {sha[:16]}: not the same file"
            )
        patterns, non_strict = _recorded_key_options(weights)
        source = resolve_model(name, checkpoint=path, ignore_keys=patterns, non_strict=non_strict, task=task)
    elif checkpoint is not None:
        source = resolve_model(name, checkpoint=checkpoint, task=task)
    elif kind == "random":
        overrides = weights.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise VMambaExportError("manifest 'model.weights.overrides' must be an object")
        overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
        source = resolve_model(
            weights["name"], random_weights=True, seed=int(weights.get("seed", 0)), overrides=overrides
        )
    elif kind == "bundled":
        source = resolve_model(weights["name"], task=task if task == "backbone" else None)
    else:
        raise VMambaExportError(f"manifest records weights of unknown kind {kind!r}")
    expected = weights.get("state_digest")
    if expected and source.weights["state_digest"] != expected:
        what = weights.get("file") or weights.get("name") or Path(str(weights.get("path") or "?")).name
        raise VMambaExportError(
            "the PyTorch weights rebuilt for validation differ from those the artifact was built from "
            f"({kind} {what}); pass --checkpoint with the original file"
        )
    return source.model
