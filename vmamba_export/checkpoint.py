"""Reading VMamba checkpoint files safely, recognising their config, and loading them into a model.

Safety: torch files are read with `torch.load(weights_only=True)` only, so nothing in a file is ever executed; a file
that needs code (any pickled global outside torch's allow-list) is refused with the global's name. `.safetensors`
files hold tensors only.

Accepted layouts: a bare state dict, or a training dict holding one under `model`, `model_ema` or `state_dict`.
`model` wins when several are present: the released VMamba files keep the evaluated weights there (the EMA copy,
when training kept one, is reported separately by the paper); pass `key=` to pick another. A `module.` (DDP) or
`_orig_mod.` (torch.compile) prefix shared by every key is stripped, and v0 key names are renamed
(models/adapt.py).

Hostile files: every key must be a string and every tensor must hold the data its shape claims (no meta tensors,
no zero-stride views of a few bytes claiming terabytes), so nothing is allocated or looped over beyond what the file
really contains; config detection reads stage indices from key names only up to the known configs' stage count.

Extra keys: `ignore_keys` (glob patterns, fnmatch, matched against each key as stored after a shared prefix is
stripped, and against its current name for v0 files) drops the keys they match; `drop_unexpected` drops the keys the
detected (or named) config does not have that lie outside its modules (patch_embed, layers, classifier: an extra
`layers.*` key means other weights, and only a pattern drops it). Missing or mis-shaped weights are never made up.

Dense tasks (dense_checkpoint.py): mmseg/mmdet training files (weights under `state_dict`; `meta`, optimizer and
logger state beside them, numpy values and mmengine HistoryBuffers read as inert data) load as a segmenter or a
backbone; what the task does not use (an auxiliary head, a detector's heads) is dropped and reported.

Every error is a CheckpointError subclass whose message is one line and starts with the file's path.
"""

from __future__ import annotations

import collections
import dataclasses
import fnmatch
import math
import pickle
import re
import warnings
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from .artifact import sha256_file
from .errors import CheckpointError, ConfigDetectionError, StateDictMismatchError
from .models import AnyModel, VMambaConfig, build_from_config, get_config, list_configs
from .models.adapt import adapt_legacy_keys, is_legacy, legacy_key

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"
WRAPPER_KEYS = ("model", "model_ema", "state_dict")
STRIP_PREFIXES = ("module.", "_orig_mod.")
HEAD_WEIGHT, HEAD_BIAS = "classifier.head.weight", "classifier.head.bias"
MAX_EXAMPLES = 3
MAX_SHOWN_KEY = 80  # characters of a key name shown in a message (a hostile file may hold megabyte-long names)

Shapes = dict[str, tuple[int, ...]]


# --------------------------------------------------------------------------------------------------------------------
# Reading files


@dataclass
class _ReadInfo:
    format: str  # "torch-zip", "torch-legacy" (pre-1.6 non-zip serialisation) or "safetensors"
    wrapper: str | None  # the dict key the state dict came from; None for a bare state dict
    stripped_prefix: str | None
    class_names: list[str] | None = None  # an mmengine training file's meta.dataset_meta.classes


MAX_CLASS_NAMES = 100_000


def _dataset_classes(obj) -> list[str] | None:
    """The class names an mmengine (mmseg/mmdet) training file records in `meta.dataset_meta.classes`, when that is a
    non-empty list of non-empty strings; None for anything else (the names are a convenience, never an error)."""
    meta = obj.get("meta") if isinstance(obj, dict) else None
    dataset_meta = meta.get("dataset_meta") if isinstance(meta, dict) else None
    classes = dataset_meta.get("classes") if isinstance(dataset_meta, dict) else None
    if not isinstance(classes, (list, tuple)) or not 0 < len(classes) <= MAX_CLASS_NAMES:
        return None
    if not all(isinstance(c, str) and c.strip() for c in classes):
        return None
    return [c.strip() for c in classes]


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _shown(key) -> str:
    """A key as a message shows it: repr for a non-string, one line, at most MAX_SHOWN_KEY characters."""
    text = _one_line(key if isinstance(key, str) else repr(key))
    return text if len(text) <= MAX_SHOWN_KEY else text[: MAX_SHOWN_KEY - 3] + "..."


def _fail(path: Path, message: str, cls: type[CheckpointError] = CheckpointError) -> CheckpointError:
    return cls(f"{path}: {_one_line(message)}")


def _sniff(path: Path) -> str:
    """File format from the first bytes, so a misnamed file still gets the right reader and a clear message."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    # safetensors: little-endian u64 header length, then a JSON object.
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 100_000_000:
        return "safetensors"
    return "torch-legacy"


def _check_path(path: Path) -> None:
    if not path.exists():
        raise _fail(path, "checkpoint file not found")
    if path.is_dir():
        raise _fail(path, "is a directory, not a checkpoint file")
    if path.stat().st_size == 0:
        raise _fail(path, "is empty (0 bytes): truncated or not written")


# Training code derived from Swin's (as the official VMamba classification code is) saves its yacs config beside the
# weights ({"model": ..., "config": CfgNode, ...}). weights_only refuses unknown classes; this name alone is read as a
# plain OrderedDict (a data container: the restricted unpickler fills it, no code of the file runs). Nothing else is.
_INERT_CONFIG_CLASSES = [(collections.OrderedDict, "yacs.config.CfgNode")]


class _DiscardedLoggerState:
    """Read in place of mmengine's HistoryBuffer (logged loss/lr history in an mmengine training file's
    `message_hub`): the restricted unpickler builds it from plain data and this class keeps none of it."""

    def __setstate__(self, state) -> None:
        pass


def _method_reference(owner, name: str) -> str:
    # HistoryBuffer's state names its statistics methods as getattr(HistoryBuffer, "min") (pickle protocol 2).
    # Read as this stand-in, which looks nothing up: the real getattr is never allowed.
    return f"<method {name}>"


def _numpy_globals() -> list:
    """numpy's array and scalar reconstruction (data only: an object array's items go through the same restricted
    unpickler), under the module names numpy 1.x and 2.x pickle them with; mmengine files hold numpy values in
    `meta` and `message_hub`."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
        return []
    try:
        from numpy._core import multiarray  # numpy 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    names = []
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        names += [(multiarray._reconstruct, f"{module}._reconstruct"), (multiarray.scalar, f"{module}.scalar")]
    dtype_classes = {type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int32, np.int64, np.bool_)}
    return [*names, np.ndarray, np.dtype, *sorted(dtype_classes, key=lambda c: c.__name__)]


# mmengine (mmseg, mmdet) training files: `meta` and `message_hub` may hold numpy values and logger history
# buffers next to the `state_dict`. Allowed as data; the buffers are read as _DiscardedLoggerState.
_MMENGINE_GLOBALS = [
    (_DiscardedLoggerState, "mmengine.logging.history_buffer.HistoryBuffer"),
    (_method_reference, "__builtin__.getattr"),
    (_method_reference, "builtins.getattr"),
]


def _torch_load(path: Path, fmt: str):
    try:
        allowed = _INERT_CONFIG_CLASSES + _MMENGINE_GLOBALS + _numpy_globals()
        with warnings.catch_warnings(), torch.serialization.safe_globals(allowed):
            # Raw pickles with protocol > 2 trigger a harmless torch warning before the real error.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        found = re.search(r"GLOBAL ([\w.]+)", msg)
        if found:
            raise _fail(
                path,
                f"refusing to execute code in the file: it needs the Python global {found.group(1)}, which "
                "torch.load(weights_only=True) does not allow; if you trust the file, re-save just its state dict",
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n|$)", msg.strip())
        reason = detail.group(1) if detail else msg.splitlines()[0] if msg else "unreadable pickle"
        if fmt == "torch-zip":
            raise _fail(path, f"corrupt torch checkpoint ({reason})") from None
        raise _fail(path, f"not a torch checkpoint, or corrupt ({reason}); nothing in it was executed") from None
    except (EOFError, zipfile.BadZipFile) as exc:
        reason = f"{type(exc).__name__}: {exc or 'unexpected end of file'}"
        raise _fail(path, f"truncated or corrupt torch checkpoint ({reason})") from None
    except Exception as exc:  # random bytes reach the unpickler as IndexError, KeyError, ...
        what = "truncated or corrupt torch checkpoint" if fmt == "torch-zip" else "not a torch checkpoint, or corrupt"
        raise _fail(path, f"{what} ({type(exc).__name__}: {exc})") from None


def _safetensors_load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise _fail(path, f"truncated or corrupt safetensors file ({exc})") from None


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(path: Path, obj, key: str | None) -> tuple[dict[str, torch.Tensor], str | None]:
    if not isinstance(obj, dict):
        raise _fail(path, f"holds a {type(obj).__name__}, not a state dict; no tensors to load")
    if key is not None:
        if key not in obj:
            raise _fail(path, f"has no entry {key!r}; top-level keys: {', '.join(map(str, list(obj)[:10]))}")
        candidates = [key]
    elif _is_tensor_dict(obj):
        return obj, None
    else:
        candidates = [k for k in WRAPPER_KEYS if k in obj]
    for k in candidates:
        inner = obj[k]
        if _is_tensor_dict(inner):
            return inner, k
        if isinstance(inner, dict) and inner:
            bad = next(n for n, v in inner.items() if not isinstance(v, torch.Tensor))
            raise _fail(path, f"entry {k!r} is not a state dict: {_shown(bad)} holds a {type(inner[bad]).__name__}")
    if candidates:
        raise _fail(path, f"holds no tensors under {', '.join(repr(c) for c in candidates)}")
    if not any(isinstance(v, torch.Tensor) for v in obj.values()):
        shown = ", ".join(map(_shown, list(obj)[:10])) or "none"
        raise _fail(path, f"holds no tensors (top-level keys: {shown}); expected a state dict or one under 'model'")
    bad = next(n for n, v in obj.items() if not isinstance(v, torch.Tensor))
    raise _fail(path, f"is not a state dict: entry {_shown(bad)} holds a {type(obj[bad]).__name__}, not a tensor")


def _non_string_keys(sd: dict) -> str | None:
    """The problem with a dict whose keys are not all strings (ints, tuples, bytes), or None."""
    not_str = [k for k in sd if not isinstance(k, str)]
    if not not_str:
        return None
    shown = ", ".join(f"{_shown(k)} ({type(k).__name__})" for k in not_str[:MAX_EXAMPLES])
    return (
        f"{len(not_str)} of its {len(sd)} keys are not strings (e.g. {shown}); a state dict maps parameter names "
        "(strings) to tensors"
    )


def _check_contents(path: Path, sd: dict) -> None:
    """Refuse what would make later steps loop or allocate beyond what the file really holds: keys that are not
    names, tensors without data (meta) and tensors whose shape claims more values than their stored bytes."""
    problem = _non_string_keys(sd)
    if problem:
        raise _fail(path, problem)
    for key, tensor in sd.items():
        if tensor.device.type != "cpu":
            raise _fail(path, f"tensor {_shown(key)} has no data in the file (device {tensor.device.type})")
        if tensor.layout != torch.strided:
            raise _fail(path, f"tensor {_shown(key)} is {tensor.layout}; weights must be dense tensors")
        claimed = tensor.numel() * tensor.element_size()
        stored = tensor.untyped_storage().nbytes()
        if claimed > stored:
            # A zero-stride (expanded) or overlapping view: a few bytes in the file, any shape in its header.
            raise _fail(
                path,
                f"tensor {_shown(key)} claims shape {list(tensor.shape)} ({claimed:,} bytes) but the file stores "
                f"only {stored:,} bytes for it (an expanded or overlapping view); refusing to materialise it",
            )


def _strip_prefix(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str | None]:
    for prefix in STRIP_PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            return {k[len(prefix) :]: v for k, v in sd.items()}, prefix
    return sd, None


def _read(path, key: str | None = None) -> tuple[dict[str, torch.Tensor], _ReadInfo]:
    path = Path(path)
    _check_path(path)
    fmt = "safetensors" if path.suffix == SAFETENSORS_SUFFIX else _sniff(path)
    if fmt == "safetensors":
        obj = _safetensors_load(path)
        if not obj:
            raise _fail(path, "holds no tensors")
    else:
        obj = _torch_load(path, fmt)
    sd, wrapper = _unwrap(path, obj, key)
    _check_contents(path, sd)
    sd, prefix = _strip_prefix(dict(sd))
    return sd, _ReadInfo(fmt, wrapper, prefix, _dataset_classes(obj))


def read_state_dict(path: str | Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict in a `.pth`/`.pt`/`.bin`/`.safetensors` file, unwrapped and prefix-stripped (names as stored:
    v0 names are not renamed here, see `adapt_legacy_keys`). `key` picks the wrapper entry (default: the first of
    `model`, `model_ema`, `state_dict` present, or the file itself when it is a bare state dict)."""
    return _read(path, key)[0]


# --------------------------------------------------------------------------------------------------------------------
# Matching a state dict against the configs


@lru_cache(maxsize=64)
def expected_shapes(cfg: VMambaConfig) -> Shapes:
    """Key -> shape of a model of `cfg` (its task's module), built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = build_from_config(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@dataclass
class KeyDiff:
    """How a state dict differs from a model's: missing / unexpected keys and (key, file shape, model shape)."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    @property
    def total(self) -> int:
        return len(self.missing) + len(self.unexpected) + len(self.mismatched)

    def counts(self) -> str:
        return f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, {len(self.mismatched)} mis-shaped"

    def describe(self) -> str:
        """Counts with up to MAX_EXAMPLES examples of each kind, in one line."""
        parts = []
        for label, items in (("missing", self.missing), ("unexpected", self.unexpected)):
            if items:
                more = ", ..." if len(items) > MAX_EXAMPLES else ""
                parts.append(f"{len(items)} {label} (e.g. {', '.join(map(_shown, items[:MAX_EXAMPLES]))}{more})")
            else:
                parts.append(f"0 {label}")
        if self.mismatched:
            shown = "; ".join(
                f"{_shown(k)}: file {list(a)} vs model {list(b)}" for k, a, b in self.mismatched[:MAX_EXAMPLES]
            )
            more = "; ..." if len(self.mismatched) > MAX_EXAMPLES else ""
            parts.append(f"{len(self.mismatched)} mis-shaped (e.g. {shown}{more})")
        else:
            parts.append("0 mis-shaped")
        return ", ".join(parts)

    def to_dict(self, limit: int = 10) -> dict:
        """Counts and the first `limit` names of each kind (for --json)."""
        return {
            "missing": {"count": len(self.missing), "examples": [_shown(k) for k in self.missing[:limit]]},
            "unexpected": {"count": len(self.unexpected), "examples": [_shown(k) for k in self.unexpected[:limit]]},
            "mis_shaped": {
                "count": len(self.mismatched),
                "examples": [
                    {"key": _shown(k), "file": list(a), "model": list(b)} for k, a, b in self.mismatched[:limit]
                ],
            },
        }


def compare_shapes(found: Shapes, expected: Shapes) -> KeyDiff:
    diff = KeyDiff()
    for k, shape in expected.items():
        if k not in found:
            diff.missing.append(k)
        elif tuple(found[k]) != shape:
            diff.mismatched.append((k, tuple(found[k]), shape))
    diff.unexpected = [k for k in found if k not in expected]
    return diff


def _shapes(sd: dict[str, torch.Tensor]) -> Shapes:
    return {k: tuple(v.shape) for k, v in sd.items()}


def _head_classes(shapes: Shapes, cfg: VMambaConfig) -> int | None:
    """The class count of a replaced head (a fine-tune), when the head is the only thing that differs from cfg's."""
    w, b = shapes.get(HEAD_WEIGHT), shapes.get(HEAD_BIAS)
    if w is None or len(w) != 2 or w[1] != cfg.widths[-1] or w[0] < 1 or w[0] == cfg.num_classes:
        return None
    if b is not None and b != (w[0],):
        return None
    return w[0]


def with_num_classes(cfg: VMambaConfig, classes: int) -> VMambaConfig:
    """cfg with another class count; its labels are kept only if there is one per class (a fine-tune's classes are
    not the base model's: without labels from the user they are numbered)."""
    labels = cfg.input.labels
    if labels is not None and len(labels) != classes:
        labels = None
    return cfg.with_overrides(num_classes=classes, input=dataclasses.replace(cfg.input, labels=labels))


def _fit(shapes: Shapes, cfg: VMambaConfig) -> tuple[VMambaConfig, KeyDiff]:
    """cfg (with num_classes taken from a replaced head when that is all that differs) and the remaining diff."""
    diff = compare_shapes(shapes, expected_shapes(cfg))
    if not diff.exact and {k for k, _, _ in diff.mismatched} <= {HEAD_WEIGHT, HEAD_BIAS}:
        classes = _head_classes(shapes, cfg)
        if classes is not None:
            cfg = with_num_classes(cfg, classes)
            diff = compare_shapes(shapes, expected_shapes(cfg))
    return cfg, diff


_STAGE_BLOCK = re.compile(r"layers\.(\d+)\.blocks\.(\d+)\.")


def _depths(shapes: Shapes, max_stages: int) -> tuple[int, ...] | None:
    """Blocks per stage as the key names show them (layers.i.blocks.j.*); None when a stage index is one no known
    config has (a number read from a key name is never used as a count or a size: `layers.999999999999...`)."""
    blocks: dict[int, set[str]] = {}
    for key in shapes:
        m = _STAGE_BLOCK.match(key)
        if m:
            stage = m.group(1)
            if len(stage) > 3 or int(stage) >= max_stages:
                return None
            blocks.setdefault(int(stage), set()).add(m.group(2))
    return tuple(len(blocks.get(i, ())) for i in range(max(blocks, default=-1) + 1))


def _model_modules(cfg: VMambaConfig) -> set[str]:
    """The model's top-level module names (patch_embed, layers, classifier)."""
    return {k.split(".", 1)[0] for k in expected_shapes(cfg)}


def _droppable(diff: KeyDiff, cfg: VMambaConfig) -> tuple[list[str], list[str]]:
    """(unexpected keys --non-strict may drop, those it may not). Only keys outside the model's own modules are
    dropped (an auxiliary head, a teacher, a loss buffer): an extra `layers.*` key means other weights (a deeper
    model of the same family fits a shallower config plus unexpected blocks) and must be named with ignore_keys."""
    modules = _model_modules(cfg)
    inside = [k for k in diff.unexpected if k.split(".", 1)[0] in modules]
    outside = [k for k in diff.unexpected if k.split(".", 1)[0] not in modules]
    return outside, inside


def _acceptable(diff: KeyDiff, cfg: VMambaConfig, drop_unexpected: bool) -> bool:
    if diff.exact:
        return True
    return drop_unexpected and not diff.missing and not diff.mismatched and not _droppable(diff, cfg)[1]


@dataclass(frozen=True)
class Detection:
    name: str  # the registered config the weights belong to
    config: VMambaConfig  # that config, with num_classes from the file's head (and task, head width for dense files)
    head_replaced: bool  # the head has another class count than the registered config (a fine-tune)

    @property
    def task(self) -> str:
        return self.config.task


def _detect_dense(sd: dict[str, torch.Tensor]) -> Detection:
    """Detection of a segmentation or backbone/detection state dict (dense_checkpoint.py)."""
    from .dense_checkpoint import file_task, pick_dense

    layout = file_task(sd)
    with torch.device("meta"):
        meta = {k: torch.empty(v.shape) for k, v in sd.items()}
    try:
        pick = pick_dense(meta, None, layout, layout)
    except ConfigDetectionError:  # already the kind detect() raises
        raise
    except CheckpointError as exc:
        raise ConfigDetectionError(str(exc)) from None
    base = get_config(pick.name)
    return Detection(pick.name, pick.config, pick.config.num_classes != base.num_classes)


def _detection_error(message: str, diff: KeyDiff | None) -> ConfigDetectionError:
    err = ConfigDetectionError(message)
    err.diff = diff  # the closest config's difference, for inspect --json
    return err


def detect(
    sd: dict[str, torch.Tensor], candidates: list[VMambaConfig] | None = None, drop_unexpected: bool = False
) -> Detection:
    """Which config the state dict (current or v0 names) belongs to, from key names and shapes alone.

    An exact match of every key and shape wins; a match of everything but the classifier head's class count is
    accepted as a fine-tune of that backbone. With `drop_unexpected`, keys outside the model's modules may be left
    over (the config with the fewest wins). No match, or two matches, raise ConfigDetectionError.

    Without `candidates`, a segmentation or backbone/detection state dict (decode_head.* or backbone.* keys) is
    detected by dense_checkpoint.py: the Detection's config then has that task (and classes, head width).
    """
    problem = _non_string_keys(sd)
    if problem:
        raise ConfigDetectionError(problem)
    if candidates is None:
        from .dense_checkpoint import file_task

        if file_task(sd) != "classification":
            return _detect_dense(sd)
    try:
        shapes = _shapes(adapt_legacy_keys(sd))
    except ValueError as exc:
        raise ConfigDetectionError(str(exc)) from None
    if candidates is None:  # classifiers (dense files went to _detect_dense; dense configs share their backbones' keys)
        candidates = [c for c in list_configs() if c.task == "classification"]
    candidates = list(candidates)
    # Building a meta model per config costs ~0.2 s for the big ones: try those with the file's block layout first
    # and compare against all of them only to explain a failure.
    depths = _depths(shapes, max((len(c.depths) for c in candidates), default=0))
    likely = [c for c in candidates if tuple(c.depths) == depths]
    fits = [(base, *_fit(shapes, base)) for base in likely]
    if not any(_acceptable(diff, cfg, drop_unexpected) for _, cfg, diff in fits):
        fits = [(base, *_fit(shapes, base)) for base in candidates]
    exact = [(base, cfg, diff) for base, cfg, diff in fits if _acceptable(diff, cfg, drop_unexpected)]
    if len(exact) > 1:
        fewest = min(len(diff.unexpected) for _, _, diff in exact)
        exact = [f for f in exact if len(f[2].unexpected) == fewest]
    if len(exact) > 1:
        # A config whose head fits as is beats one that only fits with a replaced head.
        as_is = [f for f in exact if f[1].num_classes == f[0].num_classes]
        exact = as_is if len(as_is) == 1 else exact
    if len(exact) == 1:
        base, cfg, _ = exact[0]
        return Detection(base.name, cfg, cfg.num_classes != base.num_classes)
    if len(exact) > 1:
        names = ", ".join(base.name for base, _, _ in exact)
        raise ConfigDetectionError(f"ambiguous weights: they fit {len(exact)} configs exactly ({names}); pass a name")
    ranked = sorted(fits, key=lambda f: f[2].total)[:3]
    if not ranked:
        raise _detection_error(f"the {len(shapes)} tensors match no known config (no configs to compare)", None)
    closest = "; ".join(f"{base.name}: {diff.counts()}" for base, _, diff in ranked)
    best, best_cfg, best_diff = ranked[0]
    raise _detection_error(
        f"the {len(shapes)} tensors match no known config; closest: {closest}. Against {best.name}: "
        f"{best_diff.describe()}{_hint(best_diff, best_cfg, drop_unexpected)}. Pass a model name to check against "
        "another",
        best_diff,
    )


def detect_config(sd: dict[str, torch.Tensor], candidates: list[VMambaConfig] | None = None) -> str:
    """The name of the config the state dict belongs to (see `detect`; `num_classes` may differ for a fine-tune)."""
    return detect(sd, candidates).name


# --------------------------------------------------------------------------------------------------------------------
# Choosing keys and loading


def _hint(diff: KeyDiff, cfg: VMambaConfig, drop_unexpected: bool) -> str:
    """What the user can do about unexpected keys when they are all that is wrong."""
    if not diff.unexpected or diff.missing or diff.mismatched:
        return ""
    if not drop_unexpected:
        return "; to drop the unexpected keys pass --ignore-keys PATTERN (a glob, repeatable) or --non-strict"
    modules = ", ".join(sorted(_model_modules(cfg)))
    return (
        f"; --non-strict drops only keys outside the model's modules ({modules}): name these with --ignore-keys "
        "PATTERN if they are meant to be dropped"
    )


def _apply_ignore(sd: dict[str, torch.Tensor], patterns: Sequence[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """sd without the keys a pattern matches (a key as stored, or its current name for a v0 key), and those keys."""
    if not patterns:
        return sd, []
    kept: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    used: set[str] = set()
    for key, value in sd.items():
        names = {key, legacy_key(key)}
        hits = [p for p in patterns if any(fnmatch.fnmatchcase(n, p) for n in names)]
        if hits:
            ignored.append(key)
            used.update(hits)
        else:
            kept[key] = value
    unused = [p for p in patterns if p not in used]
    if unused:
        raise CheckpointError(
            f"--ignore-keys {unused[0]!r} matches none of its {len(sd)} keys (a glob: * ? [...], matched against "
            "the key names `vmamba-export inspect` lists)"
        )
    if not kept:
        raise CheckpointError(f"--ignore-keys {', '.join(map(repr, patterns))} drops all {len(sd)} keys")
    return kept, ignored


@dataclass
class Selection:
    """What a load takes from a state dict: the config, the tensors (current names) and the keys left out."""

    config: VMambaConfig
    head_replaced: bool
    state_dict: dict[str, torch.Tensor]
    diff: KeyDiff  # what still differs from the config's keys (a strict load refuses any of it)
    ignored: list[str] = field(default_factory=list)  # dropped by ignore_keys patterns (names as stored)
    dropped: list[str] = field(default_factory=list)  # unexpected keys dropped by drop_unexpected (current names)
    # Dense tasks (dense_checkpoint.py): keys the task does not use (an auxiliary head, a detector's neck and heads,
    # a classifier; names as stored), and keys the file lacks that were initialised (a classifier's out-norms).
    task_dropped: list[str] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)
    name: str | None = None  # the config name the weights were matched to (a dense file's may be its backbone's)
    class_names: list[str] | None = None  # the file's meta.dataset_meta.classes (mmengine training files)


def _select_classification(
    sd: dict[str, torch.Tensor], name: str | None, drop_unexpected: bool = False
) -> tuple[VMambaConfig, bool, dict[str, torch.Tensor]]:
    """(config, head replaced, tensors under current names) of a classification state dict."""
    try:
        sd = adapt_legacy_keys(sd)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    if name is None:
        found = detect(sd, drop_unexpected=drop_unexpected)
        return found.config, found.head_replaced, sd
    base = get_config(name)
    cfg, _ = _fit(_shapes(sd), base)
    return cfg, cfg.num_classes != base.num_classes, sd


def _select(
    sd: dict[str, torch.Tensor],
    name: str | None,
    ignore_keys: Sequence[str] = (),
    drop_unexpected: bool = False,
    task: str | None = None,
) -> Selection:
    from .dense_checkpoint import file_task, pick_dense, resolve_task

    problem = _non_string_keys(sd)
    if problem:
        raise CheckpointError(problem)
    patterns = (ignore_keys,) if isinstance(ignore_keys, str) else tuple(ignore_keys)  # one pattern, not its letters
    sd, ignored = _apply_ignore(sd, patterns)
    layout = file_task(sd)
    task = resolve_task(layout, name, task)
    task_dropped: list[str] = []
    initialised: list[str] = []
    if task == "classification":
        cfg, head_replaced, sd = _select_classification(sd, name, drop_unexpected)
        name = name or cfg.name
    else:
        pick = pick_dense(sd, name, task, layout)
        cfg, sd, name = pick.config, pick.state_dict, pick.name
        head_replaced = cfg.num_classes != get_config(name).num_classes and task == "segmentation"
        task_dropped, initialised = pick.task_dropped, pick.initialised
    diff = compare_shapes(_shapes(sd), expected_shapes(cfg))
    dropped: list[str] = []
    if drop_unexpected and diff.unexpected:
        dropped, kept_unexpected = _droppable(diff, cfg)
        gone = set(dropped)
        sd = {k: v for k, v in sd.items() if k not in gone}
        diff = dataclasses.replace(diff, unexpected=kept_unexpected)
    return Selection(cfg, head_replaced, sd, diff, ignored, dropped, task_dropped, initialised, name)


def _mismatch_error(name: str, sel: Selection, drop_unexpected: bool) -> StateDictMismatchError:
    message = f"weights do not fit {name}: {sel.diff.describe()}"
    try:
        other = detect(sel.state_dict).name
    except ConfigDetectionError:
        other = name
    if other != name:
        message += f"; they fit {other}"
    err = StateDictMismatchError(message + _hint(sel.diff, sel.config, drop_unexpected))
    err.diff = sel.diff
    return err


def _as_float32(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Every parameter of the model is float32; fp16/bf16 files are widened so the model keeps one dtype. Integer
    # buffers (BatchNorm's num_batches_tracked) stay as they are.
    return {k: v if v.dtype == torch.float32 or not v.is_floating_point() else v.float() for k, v in sd.items()}


def _build_loaded(cfg: VMambaConfig, sd: dict[str, torch.Tensor], strict: bool) -> AnyModel:
    sd = _as_float32(sd)
    if strict:
        # Build on meta and adopt the file's tensors: skips initialising weights that are replaced anyway.
        with torch.device("meta"):
            model = build_from_config(cfg)
        model.load_state_dict(sd, strict=True, assign=True)
    else:
        model = build_from_config(cfg)  # missing keys keep their initial values
        model.load_state_dict(sd, strict=False)
    return model.eval()


def _load_sd(
    sd: dict[str, torch.Tensor],
    name: str | None,
    strict: bool,
    ignore_keys: Sequence[str] = (),
    drop_unexpected: bool = False,
    build: bool = True,
    task: str | None = None,
) -> tuple[AnyModel | None, Selection]:
    sel = _select(sd, name, ignore_keys, drop_unexpected, task)
    if sel.diff.mismatched or (strict and not sel.diff.exact):
        raise _mismatch_error(name or sel.config.name, sel, drop_unexpected)
    return (_build_loaded(sel.config, sel.state_dict, strict) if build else None), sel


def load_state_dict_into_model(
    sd: dict[str, torch.Tensor],
    name: str | None = None,
    strict: bool = True,
    ignore_keys: Sequence[str] = (),
    drop_unexpected: bool = False,
    task: str | None = None,
) -> AnyModel:
    """A model (eval mode) holding the state dict's weights; config (and task) detected when `name` is None.

    strict=False tolerates missing and unexpected keys (missing ones keep their initial values) but never a
    mis-shaped tensor. A head with another class count is taken as a fine-tune: the model gets that many classes
    (and no labels unless the base config's fit). `ignore_keys` (globs) and `drop_unexpected` leave keys out before
    a strict load (see the module docstring); missing weights stay an error with them. `task` (classification,
    backbone, segmentation; None: the file's, or the named config's dense task) picks the model (dense_checkpoint.py).
    """
    return _load_sd(sd, name, strict, ignore_keys, drop_unexpected, task=task)[0]


def _with_path(path: Path | str, exc: CheckpointError) -> CheckpointError:
    err = type(exc)(f"{path}: {exc}")
    err.diff = getattr(exc, "diff", None)
    return err


def load_checkpoint_selection(
    path: str | Path,
    name: str | None = None,
    key: str | None = None,
    ignore_keys: Sequence[str] = (),
    drop_unexpected: bool = False,
    task: str | None = None,
) -> tuple[AnyModel, Selection]:
    """`load_checkpoint` (strict) that also returns what was taken and left out of the file, and the class names an
    mmengine training file records (`Selection.class_names`)."""
    sd, info = _read(path, key=key)
    try:
        model, sel = _load_sd(sd, name, True, ignore_keys, drop_unexpected, task=task)
    except CheckpointError as exc:
        raise _with_path(path, exc) from None
    sel.class_names = info.class_names
    return model, sel


def load_checkpoint(
    path: str | Path,
    name: str | None = None,
    strict: bool = True,
    key: str | None = None,
    ignore_keys: Sequence[str] = (),
    drop_unexpected: bool = False,
    labels: Sequence[str] | str | Path | None = None,
    task: str | None = None,
) -> AnyModel:
    """Read a checkpoint file and load it into a model of its config (detected when `name` is None), in eval mode.

    `labels` (a list, or a text file with one per line) name a fine-tune's classes; their count must match the head.
    """
    sd = read_state_dict(path, key=key)
    try:
        model = load_state_dict_into_model(sd, name, strict, ignore_keys, drop_unexpected, task=task)
    except CheckpointError as exc:
        raise _with_path(path, exc) from None
    if labels is not None:
        from .model_source import apply_labels  # model_source imports this module

        apply_labels(model, labels)
    return model


def _tensors(n: int) -> str:
    return "1 tensor" if n == 1 else f"{n} tensors"


def _examples(names: list[str]) -> str:
    return ", ".join(map(_shown, names[:MAX_EXAMPLES])) + (", ..." if len(names) > MAX_EXAMPLES else "")


def _key_list(names: list[str], limit: int = 10) -> dict:
    return {"count": len(names), "examples": [_shown(k) for k in names[:limit]]}


def inspect_checkpoint(
    path: str | Path,
    name: str | None = None,
    key: str | None = None,
    ignore_keys: Sequence[str] = (),
    drop_unexpected: bool = False,
    labels: Sequence[str] | None = None,
    task: str | None = None,
) -> dict:
    """What a checkpoint holds and whether it loads, without building a real model.

    Raises CheckpointError when the file cannot be read at all; a file that reads but does not fit a config comes
    back with loadable False and the reason in `error` (and in `problems`), the keys that differ in `key_diff`.
    `labels` (one per class) are checked against the head's class count, as export checks them. `task` as for
    load_checkpoint; the report says which task loads, and for dense tasks what was dropped or initialised.
    """
    path = Path(path)
    sd, info = _read(path, key)
    legacy = is_legacy(sd)
    dtypes = Counter(str(v.dtype).removeprefix("torch.") for v in sd.values())
    problems: list[str] = []
    nonfinite = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if nonfinite:
        problems.append(f"{_tensors(len(nonfinite))} with NaN or Inf: {_examples(nonfinite)}")
    not_f32 = [k for k, v in sd.items() if v.is_floating_point() and v.dtype != torch.float32]
    if not_f32:
        kinds = ", ".join(sorted({str(sd[k].dtype).removeprefix("torch.") for k in not_f32}))
        problems.append(f"{_tensors(len(not_f32))} not float32 ({kinds}; widened on load): {_examples(not_f32)}")
    report = {
        "path": str(path),
        "format": info.format,
        "wrapper": info.wrapper,
        "stripped_prefix": info.stripped_prefix,
        "file_size": path.stat().st_size,
        "sha256": sha256_file(path),
        "tensors": len(sd),
        "elements": sum(v.numel() for v in sd.values()),
        "dtypes": dict(dtypes),
        "legacy_names": legacy,
        "config": None,
        "task": None,
        "num_classes": None,
        "head_channels": None,
        "head_replaced": False,
        "labels_known": False,
        "labels": None,
        "params": None,
        "loadable": False,
        "error": None,
        "key_diff": None,
        "ignored_keys": _key_list([]),
        "dropped_unexpected_keys": _key_list([]),
        "task_dropped_keys": _key_list([]),
        "out_norms": None,
        "problems": problems,
    }
    try:
        with torch.device("meta"):
            # Cheap on meta: the same key/shape checks as a real strict load.
            meta_sd = {k: torch.empty(v.shape, dtype=torch.float32) for k, v in sd.items()}
        _, sel = _load_sd(meta_sd, name, True, ignore_keys, drop_unexpected, build=False, task=task)
    except CheckpointError as exc:
        report["error"] = f"{path}: {exc}"
        diff = getattr(exc, "diff", None)
        report["key_diff"] = diff.to_dict() if diff is not None else None
        problems.append(_one_line(str(exc)))
        return report
    cfg = sel.config
    known = list(cfg.input.labels) if cfg.input.labels is not None else None
    if labels is not None:
        if len(labels) != cfg.num_classes:
            message = f"{len(labels)} labels given for a head of {cfg.num_classes} classes"
            report["error"] = f"{path}: {message}"
            problems.append(message)
            return report
        known = list(labels)
    from .dense_checkpoint import dropped_record

    report.update(
        config=sel.name or cfg.name,
        task=cfg.task,
        num_classes=cfg.num_classes if cfg.task != "backbone" else 0,
        head_channels=cfg.head_channels if cfg.task == "segmentation" else None,
        task_dropped_keys=dropped_record(sel.task_dropped),
        out_norms="initialised" if any(k.startswith("outnorm") for k in sel.initialised) else None,
        head_replaced=sel.head_replaced,
        labels_known=known is not None,
        labels=known,
        params=sum(math.prod(s) for s in expected_shapes(cfg).values()),
        loadable=True,
        ignored_keys=_key_list(sel.ignored),
        dropped_unexpected_keys=_key_list(sel.dropped),
    )
    return report


__all__ = [
    "Detection",
    "KeyDiff",
    "Selection",
    "adapt_legacy_keys",
    "compare_shapes",
    "detect",
    "detect_config",
    "expected_shapes",
    "inspect_checkpoint",
    "load_checkpoint",
    "load_checkpoint_selection",
    "load_state_dict_into_model",
    "read_state_dict",
    "with_num_classes",
]
