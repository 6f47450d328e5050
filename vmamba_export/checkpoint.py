"""Reading VMamba checkpoint files safely, recognising their config, and loading them into a model.

Safety: torch files are read with `torch.load(weights_only=True)` only, so nothing in a file is ever executed; a file
that needs code (any pickled global outside torch's allow-list) is refused with the global's name. `.safetensors`
files hold tensors only.

Accepted layouts: a bare state dict, or a training dict holding one under `model`, `model_ema` or `state_dict`.
`model` wins when several are present: the released VMamba files keep the evaluated weights there (the EMA copy,
when training kept one, is reported separately by the paper); pass `key=` to pick another. A `module.` (DDP) or
`_orig_mod.` (torch.compile) prefix shared by every key is stripped, and v0 key names are renamed
(models/adapt.py).

Every error is a CheckpointError subclass whose message is one line and starts with the file's path.
"""

from __future__ import annotations

import collections
import pickle
import re
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from .artifact import sha256_file
from .errors import CheckpointError, ConfigDetectionError, StateDictMismatchError
from .models import VMamba, VMambaConfig, get_config, list_configs
from .models.adapt import adapt_legacy_keys, is_legacy

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"
WRAPPER_KEYS = ("model", "model_ema", "state_dict")
STRIP_PREFIXES = ("module.", "_orig_mod.")
HEAD_WEIGHT, HEAD_BIAS = "classifier.head.weight", "classifier.head.bias"
MAX_EXAMPLES = 3

Shapes = dict[str, tuple[int, ...]]


# --------------------------------------------------------------------------------------------------------------------
# Reading files


@dataclass
class _ReadInfo:
    format: str  # "torch-zip", "torch-legacy" (pre-1.6 non-zip serialisation) or "safetensors"
    wrapper: str | None  # the dict key the state dict came from; None for a bare state dict
    stripped_prefix: str | None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


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


def _torch_load(path: Path, fmt: str):
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(_INERT_CONFIG_CLASSES):
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
            raise _fail(path, f"entry {k!r} is not a state dict: {bad!r} holds a {type(inner[bad]).__name__}")
    if candidates:
        raise _fail(path, f"holds no tensors under {', '.join(repr(c) for c in candidates)}")
    if not any(isinstance(v, torch.Tensor) for v in obj.values()):
        shown = ", ".join(map(str, list(obj)[:10])) or "none"
        raise _fail(path, f"holds no tensors (top-level keys: {shown}); expected a state dict or one under 'model'")
    bad = next(n for n, v in obj.items() if not isinstance(v, torch.Tensor))
    raise _fail(path, f"is not a state dict: entry {bad!r} holds a {type(obj[bad]).__name__}, not a tensor")


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
    sd, prefix = _strip_prefix(dict(sd))
    return sd, _ReadInfo(fmt, wrapper, prefix)


def read_state_dict(path: str | Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict in a `.pth`/`.pt`/`.bin`/`.safetensors` file, unwrapped and prefix-stripped (names as stored:
    v0 names are not renamed here, see `adapt_legacy_keys`). `key` picks the wrapper entry (default: the first of
    `model`, `model_ema`, `state_dict` present, or the file itself when it is a bare state dict)."""
    return _read(path, key)[0]


# --------------------------------------------------------------------------------------------------------------------
# Matching a state dict against the configs


@lru_cache(maxsize=64)
def expected_shapes(cfg: VMambaConfig) -> Shapes:
    """Key -> shape of a model of `cfg`, from a model built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = VMamba(cfg)
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
                parts.append(f"{len(items)} {label} (e.g. {', '.join(items[:MAX_EXAMPLES])}{more})")
            else:
                parts.append(f"0 {label}")
        if self.mismatched:
            shown = "; ".join(f"{k}: file {list(a)} vs model {list(b)}" for k, a, b in self.mismatched[:MAX_EXAMPLES])
            more = "; ..." if len(self.mismatched) > MAX_EXAMPLES else ""
            parts.append(f"{len(self.mismatched)} mis-shaped (e.g. {shown}{more})")
        else:
            parts.append("0 mis-shaped")
        return ", ".join(parts)


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


def _fit(shapes: Shapes, cfg: VMambaConfig) -> tuple[VMambaConfig, KeyDiff]:
    """cfg (with num_classes taken from a replaced head when that is all that differs) and the remaining diff."""
    diff = compare_shapes(shapes, expected_shapes(cfg))
    if not diff.exact and {k for k, _, _ in diff.mismatched} <= {HEAD_WEIGHT, HEAD_BIAS}:
        classes = _head_classes(shapes, cfg)
        if classes is not None:
            cfg = cfg.with_overrides(num_classes=classes)
            diff = compare_shapes(shapes, expected_shapes(cfg))
    return cfg, diff


def _depths(shapes: Shapes) -> tuple[int, ...]:
    """Blocks per stage as the key names show them (layers.i.blocks.j.*)."""
    blocks: dict[int, set[int]] = {}
    for key in shapes:
        m = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return tuple(len(blocks.get(i, ())) for i in range(max(blocks, default=-1) + 1))


@dataclass(frozen=True)
class Detection:
    name: str  # the registered config the weights belong to
    config: VMambaConfig  # that config, with num_classes from the file's head
    head_replaced: bool  # the head has another class count than the registered config (a fine-tune)


def detect(sd: dict[str, torch.Tensor], candidates: list[VMambaConfig] | None = None) -> Detection:
    """Which config the state dict (current or v0 names) belongs to, from key names and shapes alone.

    An exact match of every key and shape wins; a match of everything but the classifier head's class count is
    accepted as a fine-tune of that backbone. No match, or two matches, raise ConfigDetectionError.
    """
    try:
        shapes = _shapes(adapt_legacy_keys(sd))
    except ValueError as exc:
        raise ConfigDetectionError(str(exc)) from None
    candidates = list_configs() if candidates is None else list(candidates)
    # Building a meta model per config costs ~0.2 s for the big ones: try those with the file's block layout first
    # and compare against all of them only to explain a failure.
    depths = _depths(shapes)
    likely = [c for c in candidates if tuple(c.depths) == depths]
    fits = [(base, *_fit(shapes, base)) for base in likely]
    if not any(diff.exact for _, _, diff in fits):
        fits = [(base, *_fit(shapes, base)) for base in candidates]
    exact = [(base, cfg) for base, cfg, diff in fits if diff.exact]
    if len(exact) > 1:
        # A config whose head fits as is beats one that only fits with a replaced head.
        as_is = [(base, cfg) for base, cfg in exact if cfg.num_classes == base.num_classes]
        exact = as_is if len(as_is) == 1 else exact
    if len(exact) == 1:
        base, cfg = exact[0]
        return Detection(base.name, cfg, cfg.num_classes != base.num_classes)
    if len(exact) > 1:
        names = ", ".join(base.name for base, _ in exact)
        raise ConfigDetectionError(f"ambiguous weights: they fit {len(exact)} configs exactly ({names}); pass a name")
    ranked = sorted(fits, key=lambda f: f[2].total)[:3]
    closest = "; ".join(f"{base.name}: {diff.counts()}" for base, _, diff in ranked)
    raise ConfigDetectionError(
        f"the {len(shapes)} tensors match no known config; closest: {closest}. Pass a model name to see which keys"
    )


def detect_config(sd: dict[str, torch.Tensor], candidates: list[VMambaConfig] | None = None) -> str:
    """The name of the config the state dict belongs to (see `detect`; `num_classes` may differ for a fine-tune)."""
    return detect(sd, candidates).name


# --------------------------------------------------------------------------------------------------------------------
# Loading


def _config_for(sd: dict[str, torch.Tensor], name: str | None) -> tuple[VMambaConfig, bool]:
    """(config to build, head replaced?) for a state dict with current names."""
    if name is None:
        found = detect(sd)
        return found.config, found.head_replaced
    base = get_config(name)
    cfg, _ = _fit(_shapes(sd), base)
    return cfg, cfg.num_classes != base.num_classes


def _mismatch_message(name: str, diff: KeyDiff, sd: dict[str, torch.Tensor]) -> str:
    message = f"weights do not fit {name}: {diff.describe()}"
    try:
        other = detect(sd).name
    except ConfigDetectionError:
        return message
    return f"{message}; they fit {other}" if other != name else message


def _as_float32(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Every parameter of the model is float32; fp16/bf16 files are widened so the model keeps one dtype.
    return {k: v if v.dtype == torch.float32 else v.float() for k, v in sd.items()}


def _build_loaded(cfg: VMambaConfig, sd: dict[str, torch.Tensor], strict: bool) -> VMamba:
    sd = _as_float32(sd)
    if strict:
        # Build on meta and adopt the file's tensors: skips initialising weights that are replaced anyway.
        with torch.device("meta"):
            model = VMamba(cfg)
        model.load_state_dict(sd, strict=True, assign=True)
    else:
        model = VMamba(cfg)  # missing keys keep their initial values
        model.load_state_dict(sd, strict=False)
    return model.eval()


def _load_sd(sd: dict[str, torch.Tensor], name: str | None, strict: bool) -> tuple[VMamba, bool]:
    try:
        sd = adapt_legacy_keys(sd)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    cfg, head_replaced = _config_for(sd, name)
    diff = compare_shapes(_shapes(sd), expected_shapes(cfg))
    if diff.mismatched or (strict and not diff.exact):
        raise StateDictMismatchError(_mismatch_message(name or cfg.name, diff, sd))
    return _build_loaded(cfg, sd, strict), head_replaced


def load_state_dict_into_model(sd: dict[str, torch.Tensor], name: str | None = None, strict: bool = True) -> VMamba:
    """A model (eval mode) holding the state dict's weights; config detected when `name` is None.

    strict=False tolerates missing and unexpected keys (missing ones keep their initial values) but never a
    mis-shaped tensor. A head with another class count is taken as a fine-tune: the model gets that many classes.
    """
    return _load_sd(sd, name, strict)[0]


def load_checkpoint(path: str | Path, name: str | None = None, strict: bool = True, key: str | None = None) -> VMamba:
    """Read a checkpoint file and load it into a model of its config (detected when `name` is None), in eval mode."""
    sd = read_state_dict(path, key=key)
    try:
        return load_state_dict_into_model(sd, name=name, strict=strict)
    except CheckpointError as exc:
        raise type(exc)(f"{path}: {exc}") from None


def _tensors(n: int) -> str:
    return "1 tensor" if n == 1 else f"{n} tensors"


def _examples(names: list[str]) -> str:
    return ", ".join(names[:MAX_EXAMPLES]) + (", ..." if len(names) > MAX_EXAMPLES else "")


def inspect_checkpoint(path: str | Path, name: str | None = None, key: str | None = None) -> dict:
    """What a checkpoint holds and whether it loads, without building a real model.

    Raises CheckpointError when the file cannot be read at all; a file that reads but does not fit a config comes
    back with loadable False and the reason in `error` (and in `problems`).
    """
    path = Path(path)
    sd, info = _read(path, key)
    legacy = is_legacy(sd)
    dtypes = Counter(str(v.dtype).removeprefix("torch.") for v in sd.values())
    problems: list[str] = []
    nonfinite = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if nonfinite:
        problems.append(f"{_tensors(len(nonfinite))} with NaN or Inf: {_examples(nonfinite)}")
    not_f32 = [k for k, v in sd.items() if v.dtype != torch.float32]
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
        "num_classes": None,
        "head_replaced": False,
        "params": None,
        "loadable": False,
        "error": None,
        "problems": problems,
    }
    try:
        with torch.device("meta"):
            # Cheap on meta: the same key/shape checks as a real strict load.
            meta_sd = {k: torch.empty(v.shape, dtype=torch.float32) for k, v in sd.items()}
        model, head_replaced = _load_sd(meta_sd, name, strict=True)
    except CheckpointError as exc:
        report["error"] = f"{path}: {exc}"
        problems.append(_one_line(str(exc)))
        return report
    cfg = model.config
    report.update(
        config=cfg.name,
        num_classes=cfg.num_classes,
        head_replaced=head_replaced,
        params=sum(p.numel() for p in model.parameters()),
        loadable=True,
    )
    return report


__all__ = [
    "Detection",
    "KeyDiff",
    "adapt_legacy_keys",
    "compare_shapes",
    "detect",
    "detect_config",
    "expected_shapes",
    "inspect_checkpoint",
    "load_checkpoint",
    "load_state_dict_into_model",
    "read_state_dict",
]
