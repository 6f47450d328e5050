"""The artifact folder: one per (model, target, precision), with manifest.json and report.md.

Written into a hidden temporary folder beside the destination and renamed into place, so a failed or interrupted
build leaves nothing behind. `manifest.json` lists every payload file with its sha256; loading verifies them.
The manifest and report themselves are metadata, rewritten (atomically) when `validate` or `bench` is asked to
record (`--record`, `build`, `export --validate`); by default they write nothing, so a read-only artifact works.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import re
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

from .errors import ArtifactError

SCHEMA_VERSION = 1
ARTIFACT_FORMAT = "vmamba-export-artifact"  # manifest["format"]: marks a folder as ours, one --overwrite may replace
MANIFEST = "manifest.json"
REPORT = "report.md"
METADATA_FILES = {MANIFEST, REPORT}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def toolchain_versions(packages: tuple[str, ...] = ()) -> dict:
    versions = {"python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine()}
    for name in ("vmamba-export", "torch", "numpy", *packages):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class Terminated(SystemExit):
    """SIGTERM, raised as an exception while an artifact is being written so that its cleanup runs.

    A SystemExit with status 143 (128 + SIGTERM), the status a shell reports for a process the signal killed: the
    command line exits with it, without a traceback, after every cleanup on the way out has run."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(128 + signum)


def artifact_problem(folder: Path) -> str | None:
    """Why `folder` is not an artifact folder of ours, or None if it is: a real folder (not a link) whose manifest.json
    is a JSON object with our schema_version and `format`. Artifacts written before the format marker existed count
    when their manifest has our schema_version and the target, entry and files sections every artifact has."""
    folder = Path(folder)
    if folder.is_symlink():
        return "it is a symbolic link"
    if not folder.is_dir():
        return "it is a file, not a folder" if folder.exists() else "it does not exist"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return f"it has no {MANIFEST}"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"its {MANIFEST} cannot be read as JSON ({type(exc).__name__})"
    if not isinstance(manifest, dict) or manifest.get("schema_version") != SCHEMA_VERSION:
        return f"its {MANIFEST} has no schema_version {SCHEMA_VERSION}"
    if manifest.get("format") == ARTIFACT_FORMAT:
        return None
    legacy = "format" not in manifest and all(isinstance(manifest.get(k), dict) for k in ("target", "entry", "files"))
    return None if legacy else f"its {MANIFEST} does not say format {ARTIFACT_FORMAT!r}"


def _output_path(out: Path) -> Path:
    """`out` made absolute with its parent's links resolved but not its own name's ('.' and '..' are resolved, so the
    temporary folder always goes beside the destination, never inside it)."""
    out = Path(out)
    if out.name in ("", ".", ".."):
        return out.resolve()
    return out.parent.resolve() / out.name


def _refuse_unsafe_destination(out: Path, overwrite: bool) -> None:
    """Raise unless writing the artifact at `out` can only replace an artifact of ours (and only with `overwrite`)."""
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the working directory was removed: nothing to protect there
        cwd = None
    real = out.resolve()
    if cwd is not None and (real == cwd or real in cwd.parents):
        where = "is the current directory" if real == cwd else f"contains the current directory {cwd}"
        raise ArtifactError(f"{out} {where}; refusing to replace it: choose a new folder for the artifact")
    if not (out.exists() or out.is_symlink()):
        return
    problem = artifact_problem(out)
    if problem:
        raise ArtifactError(
            f"{out} already exists and is not a vmamba-export artifact ({problem}); refusing to touch it: "
            "choose a new folder for the artifact"
        )
    if not overwrite:
        raise ArtifactError(f"{out} already exists; pass --overwrite to replace it")


def _make_parents(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; return those created, deepest last (to remove them on failure)."""
    missing = []
    for path in (folder, *folder.parents):
        if path.exists() or path.is_symlink():
            if not path.is_dir():
                raise ArtifactError(f"cannot create a folder under {path}: it is a file, not a folder")
            break
        missing.append(path)
    created = []
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            if not path.is_dir():
                _remove_empty(created)
                raise ArtifactError(f"cannot create a folder under {path}: it is a file, not a folder") from None
            continue
        except OSError as exc:
            _remove_empty(created)
            raise ArtifactError(f"cannot create {path}: {exc.strerror or exc}") from None
        created.append(path)
    return created


def _remove_empty(created: list[Path]) -> None:
    for path in reversed(created):
        with contextlib.suppress(OSError):
            path.rmdir()  # only if still empty: never anything else put there meanwhile


def current_umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def publish_permissions(folder: Path) -> None:
    """Make `folder` readable by others, as files a user copies are: folders 0755, files 0644 (0755 where the owner
    may execute them, e.g. shared libraries), less the umask. mkdtemp makes 0700 folders, which other users (a service
    account running the model) could not open."""
    keep = ~current_umask() & 0o777
    os.chmod(folder, 0o755 & keep)
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                continue  # chmod would follow it out of the artifact
            wanted = 0o755 if stat.S_ISDIR(mode) or mode & stat.S_IXUSR else 0o644
            os.chmod(path, wanted & keep)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """For the duration, SIGTERM raises Terminated (in the main thread, where Python runs signal handlers) instead of
    killing the process outright, so `finally`/`except` cleanups run, as they do for Ctrl-C. Left alone where the
    program already handles or ignores SIGTERM itself, or off the main thread (signal.signal works only there)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def raise_terminated(signum, frame):
        raise Terminated(signum)

    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM for the duration (a few renames, or a cleanup), then deliver them to the handlers in
    place before: an interruption must not cut a replacement in half. Main thread only (elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if callable(handler):  # SIG_DFL / SIG_IGN / None: nothing Python-level to defer
            previous[signum] = handler
            signal.signal(signum, lambda s, f: caught.append(s))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(caught):
            signal.raise_signal(signum)


@contextlib.contextmanager
def atomic_artifact(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it becomes `out`, on any error it is removed.

    `out` may only be new, or (with `overwrite`) an artifact folder of ours, which is replaced whole: anything else
    there (a user's folder or file, a link, the current directory or a folder holding it) is refused before any work,
    and again just before the rename. Folders and parents created here are removed on failure, on Ctrl-C and on
    SIGTERM (turned into Terminated, exit status 143, while this runs in the main thread)."""
    out = _output_path(out)
    _refuse_unsafe_destination(out, overwrite)
    created: list[Path] = []
    tmp = None
    with _sigterm_raises():  # from before anything is created: a SIGTERM at any point finds its cleanup in place
        try:
            with _signals_deferred():  # what was created is known before a signal can cut in
                created = _make_parents(out.parent)
                try:
                    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
                except OSError as exc:
                    raise ArtifactError(f"cannot write into {out.parent}: {exc.strerror or exc}") from None
            yield tmp
            publish_permissions(tmp)
            with _signals_deferred():
                _refuse_unsafe_destination(out, overwrite)  # something may have appeared there during the build
                _move_into_place(tmp, out)
        except BaseException:
            with _signals_deferred():
                if tmp is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
                _remove_empty(created)
            raise


def _move_into_place(tmp: Path, out: Path) -> None:
    try:
        if not (out.exists() or out.is_symlink()):
            os.rename(tmp, out)
            return
        # Replace an old artifact: move it aside first (a rename cannot replace a non-empty folder), then remove it.
        holder = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        try:
            os.rename(out, holder / "artifact")
        except BaseException:
            holder.rmdir()
            raise
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(holder / "artifact", out)  # put the old artifact back
            holder.rmdir()
            raise
    except OSError as exc:
        raise ArtifactError(f"cannot move the new artifact into place at {out}: {exc.strerror or exc}") from None
    shutil.rmtree(holder, ignore_errors=True)


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write `path` through a temporary file beside it; an OSError (a read-only folder) is one ArtifactError line."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise ArtifactError(f"cannot write {path}: {exc.strerror or exc}") from None


def file_entries(folder: Path) -> dict:
    """sha256 and size of every payload file in `folder` (not the manifest or report)."""
    entries = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel in METADATA_FILES or rel.startswith("."):
            continue
        entries[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return entries


def manifest_sha256(folder: Path) -> str:
    """sha256 of the manifest.json bytes: the value `load(..., expected_sha256=...)` and `--expect-sha256` pin."""
    return sha256_file(Path(folder) / MANIFEST)


def read_manifest(folder: Path, expected_sha256: str | None = None) -> dict:
    """The manifest of an artifact folder, checked against the schema (manifest_problem).

    `expected_sha256` pins the manifest's bytes (checked before they are parsed): since the manifest lists every
    payload file's sha256, and load() verifies them, one trusted hash pins the whole artifact."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"{folder} is not an artifact folder (no such directory)")
    path = folder / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{folder} is not an artifact folder: {MANIFEST} is missing")
    if expected_sha256 is not None:
        if not isinstance(expected_sha256, str) or not _SHA256_RE.fullmatch(expected_sha256.strip().lower()):
            raise ArtifactError(f"expected_sha256 must be 64 hexadecimal digits, got {expected_sha256!r}")
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{path} is {size:,} bytes; a manifest is at most {MAX_MANIFEST_BYTES:,}")
    data = path.read_bytes()
    if expected_sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256.strip().lower():
            raise ArtifactError(
                f"{path} has sha256 {actual}, not the expected {expected_sha256.strip().lower()}: this is not the "
                "artifact that was pinned (modified, corrupt or another one)"
            )
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ArtifactError(f"{path} is not a manifest: JSON nested too deeply") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} must hold a JSON object, got {type(manifest).__name__}")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise ArtifactError(f"{path} has schema_version {version!r}; this vmamba-export reads {SCHEMA_VERSION}")
    problem = manifest_problem(manifest)
    if problem:
        raise ArtifactError(f"{path}: {problem}")
    return manifest


# Limits on what a manifest may ask of the loader (README "Artifacts"): values beyond them are
# refused with the field named, so no manifest can make the loader allocate without bound.
MAX_MANIFEST_BYTES = 16 << 20
MAX_INPUT_SIDE = 4096  # input.max_size and so image_size: one 3 x 4096 x 4096 float32 image is 201 MB
MAX_RESIZE = 4 * MAX_INPUT_SIDE  # preprocessing.resize only sets the scale: the work is bounded by image_size
MAX_CLASSES = 1_000_000
MAX_BATCH = 1 << 16
MAX_NORM_VALUE = 1e3  # |mean| and std, in units of the [0, 1] pixel scale the preprocessing divides into
MIN_STD = 1e-6  # smaller divides pixels into float32 overflow
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")  # data/preprocess.py _RESAMPLE
CHANNEL_ORDERS = ("RGB", "BGR")
PREPROCESSING_KEYS = ("image_size", "resize", "interpolation", "mean", "std", "channel_order", "labels", "crop")
# What each runtime's backend opens: entry key -> accepted suffixes; required keys first.
RUNTIME_ENTRY = {
    "onnxruntime": {"model": (".onnx",), "custom_op_library": (".so", ".dylib", ".dll"), "batch1_model": (".onnx",)},
    "openvino": {"model": (".xml",), "extension_library": (".so", ".dylib", ".dll"), "weights": (".bin",)},
    "tvm": {"model": (".so", ".tar", ".dylib"), "cuda_binary": (".fatbin", ".cubin", ".ptx")},
    "coreml": {"model": (".mlpackage", ".mlmodel")},
}
_RUNTIME_REQUIRED = {
    "onnxruntime": ("model",),
    "openvino": ("model", "extension_library"),
    "tvm": ("model",),
    "coreml": ("model",),
}
OPENVINO_PRECISIONS = ("f32", "bf16", "f16")
TVM_DEVICE_TYPES = {1: "cpu", 2: "cuda", 8: "metal"}  # DLPack device codes the TVM backend can run
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


class _Bad(Exception):
    """A schema violation: the message names the field."""


def _get(manifest: dict, dotted: str, required: bool = True) -> object:
    value: object = manifest
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not isinstance(value, dict):
            raise _Bad(f"{'.'.join(parts[:i])!r} must be an object, got {_type_name(value)}")
        if part not in value:
            if required:
                raise _Bad(f"lacks the required key {dotted!r}")
            return None
        value = value[part]
    return value


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _typed(manifest: dict, dotted: str, kind: type | tuple[type, ...], required: bool = True) -> object:
    value = _get(manifest, dotted, required)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, kind):
        name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise _Bad(f"{dotted!r} must be {name}, got {_type_name(value)} {_short(value)}")
    return value


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _int_in(manifest: dict, dotted: str, low: int, high: int, required: bool = True) -> int | None:
    value = _typed(manifest, dotted, int, required)
    if value is None:
        return None
    if not low <= value <= high:
        raise _Bad(f"{dotted!r} must be an integer in {low}..{high:,}, got {_short(value)}")
    return value


def _number(value: object, where: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Bad(f"{where} must be a number, got {_type_name(value)} {_short(value)}")
    if not math.isfinite(value) or not low <= value <= high:
        raise _Bad(f"{where} must be a finite number in {low:g}..{high:g}, got {value!r}")
    return float(value)


def _relative_path(value: str, where: str) -> None:
    parts = value.replace("\\", "/").split("/")
    if not value or value.startswith(("/", "\\")) or ".." in parts or (len(value) > 1 and value[1] == ":"):
        raise _Bad(f"{where} must be a path inside the artifact folder, got {_short(value)}")


def _file_listed(manifest: dict, name: str, where: str) -> None:
    files = manifest["files"]
    if name not in files and not any(f.startswith(name.rstrip("/") + "/") for f in files):
        raise _Bad(f"{where} names a file that is not among its hashed files ({_short(name)})")


def fit_preprocessing(input_section: dict) -> dict:
    """The preprocessing of an artifact whose fixed input side (min_size = max_size, TVM and Core ML) differs from the
    config's crop: the crop becomes that side and the resize keeps its ratio to the crop (224/256 -> 64/73)."""
    spec = dict(input_section["preprocessing"])
    low, high = input_section["min_size"], input_section["max_size"]
    size = spec["image_size"]
    if low <= size <= high:
        return spec
    fitted = min(max(size, low), high)
    spec["resize"] = max(fitted, round(fitted * spec["resize"] / size))
    spec["image_size"] = fitted
    return spec


def manifest_problem(manifest: dict) -> str | None:
    """The first problem of a manifest against the schema the loader relies on, or None. Each problem is one line
    naming the field (dotted path) and what was expected; everything not checked here is informational."""
    try:
        _check_schema(manifest)
    except _Bad as exc:
        return str(exc)
    return None


def _check_schema(m: dict) -> None:
    _typed(m, "model", dict)
    _typed(m, "model.name", str)
    if _typed(m, "model.weights", dict, required=False) is not None:  # validate rebuilds the PyTorch model from it
        for key in ("kind", "name", "file", "path", "sha256", "state_digest"):
            _typed(m, f"model.weights.{key}", str, required=False)
        _typed(m, "model.weights.seed", int, required=False)
        _typed(m, "model.weights.dropped_keys", int, required=False)
        ignore_keys = _typed(m, "model.weights.ignore_keys", list, required=False)  # re-applied by validate
        if ignore_keys is not None and not all(isinstance(k, str) for k in ignore_keys):
            raise _Bad("'model.weights.ignore_keys' must list glob patterns (strings)")
        non_strict = _get(m, "model.weights.non_strict", False)
        if non_strict is not None and not isinstance(non_strict, bool):
            raise _Bad(f"'model.weights.non_strict' must be true or false, got {_short(non_strict)}")
    _typed(m, "target", dict)
    _typed(m, "target.name", str)
    runtime = _typed(m, "target.runtime", str)
    _typed(m, "target.device", str, required=False)
    _typed(m, "precision", str)

    # files first: the entry's files are checked against it
    files = _typed(m, "files", dict)
    for name, entry in files.items():
        _relative_path(name, f"files[{_short(name)}]")
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise _Bad(f"files[{_short(name)}] must be an object with a sha256")
        if not _SHA256_RE.fullmatch(entry["sha256"]):
            raise _Bad(f"files[{_short(name)}].sha256 must be 64 lowercase hexadecimal digits")
        size = entry.get("bytes")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise _Bad(f"files[{_short(name)}].bytes must be a non-negative integer, got {_short(size)}")

    # input: sizes, channels, preprocessing
    _typed(m, "input", dict)
    channels = _typed(m, "input.channels", int)
    if channels not in (1, 3):
        raise _Bad(f"'input.channels' must be 1 or 3, got {channels!r}")
    min_size = _int_in(m, "input.min_size", 1, MAX_INPUT_SIDE)
    max_size = _int_in(m, "input.max_size", 1, MAX_INPUT_SIDE)
    if min_size > max_size:
        raise _Bad(f"'input.min_size' ({min_size}) must not exceed 'input.max_size' ({max_size})")
    unknown = sorted(set(_typed(m, "input.preprocessing", dict)) - set(PREPROCESSING_KEYS))
    if unknown:  # the predictor builds its InputSpec from exactly these keys
        raise _Bad(
            f"'input.preprocessing' has unknown key {_short(unknown[0])}; known: {', '.join(PREPROCESSING_KEYS)}"
        )
    image_size = _int_in(m, "input.preprocessing.image_size", 1, MAX_INPUT_SIDE)
    if not min_size <= image_size <= max_size:
        raise _Bad(
            f"'input.preprocessing.image_size' ({image_size}) must lie in input.min_size..input.max_size "
            f"({min_size}..{max_size})"
        )
    _int_in(m, "input.preprocessing.resize", 1, MAX_RESIZE)
    interpolation = _typed(m, "input.preprocessing.interpolation", str)
    if interpolation.lower() not in INTERPOLATIONS:
        raise _Bad(
            f"'input.preprocessing.interpolation' must be one of {', '.join(INTERPOLATIONS)}, "
            f"got {_short(interpolation)}"
        )
    order = _typed(m, "input.preprocessing.channel_order", str)
    if order.upper() not in CHANNEL_ORDERS:
        raise _Bad(f"'input.preprocessing.channel_order' must be RGB or BGR, got {_short(order)}")
    for key in ("mean", "std"):
        values = _typed(m, f"input.preprocessing.{key}", list)
        if len(values) != channels:
            raise _Bad(
                f"'input.preprocessing.{key}' must hold one number per channel ({channels}), got {len(values)} values"
            )
        low = MIN_STD if key == "std" else -MAX_NORM_VALUE
        for i, value in enumerate(values):
            _number(value, f"'input.preprocessing.{key}[{i}]'", low, MAX_NORM_VALUE)

    crop = _get(m, "input.preprocessing.crop", required=False)  # absent before dense tasks: True
    if crop is not None and not isinstance(crop, bool):
        raise _Bad(f"'input.preprocessing.crop' must be true or false, got {_short(crop)}")

    # output and labels
    _typed(m, "output", dict)
    task = _check_outputs(m)
    num_classes = _int_in(
        m, "output.num_classes", 0 if task == "backbone" else 1, 0 if task == "backbone" else MAX_CLASSES
    )
    labels = _get(m, "input.preprocessing.labels", required=False)
    if labels is not None:
        if not isinstance(labels, list) or len(labels) != num_classes:
            count = f"{len(labels)} labels" if isinstance(labels, list) else _type_name(labels)
            raise _Bad(
                f"'input.preprocessing.labels' must be null or list one label per class (output.num_classes "
                f"{num_classes}), got {count}"
            )
        for i, label in enumerate(labels):
            if not isinstance(label, str):
                raise _Bad(f"'input.preprocessing.labels[{i}]' must be a string, got {_type_name(label)}")

    # entry: the files the runtime opens, matching the runtime
    entry = _typed(m, "entry", dict)
    model = _typed(m, "entry.model", str)
    _relative_path(model, "'entry.model'")
    suffixes = RUNTIME_ENTRY.get(runtime)  # an unknown runtime is refused by the loader, naming it
    if suffixes is None:
        _file_listed(m, model, "entry.model")
    if suffixes is not None:
        required = _RUNTIME_REQUIRED[runtime]
        if runtime == "onnxruntime" and str(m["target"].get("scan_lowering", "")).startswith("custom-op"):
            required = (*required, "custom_op_library")  # its graph holds our op: without the library it cannot load
        for key in required:
            _typed(m, f"entry.{key}", str)
        for key, allowed in suffixes.items():
            name = _typed(m, f"entry.{key}", str, required=False)
            if name is None:
                continue
            if not name.lower().endswith(allowed):
                raise _Bad(
                    f"'entry.{key}' of a {runtime} artifact must end in {' or '.join(allowed)}, got {_short(name)}"
                )
            _relative_path(name, f"'entry.{key}'")
            _file_listed(m, name, f"entry.{key}")
    for key in ("custom_op_library", "extension_library"):  # the native code loaded into the process: always hashed
        name = entry.get(key)
        if name is not None:
            if not isinstance(name, str):
                raise _Bad(f"'entry.{key}' must be str, got {_type_name(name)}")
            _file_listed(m, name, f"entry.{key}")
    providers = entry.get("providers")
    if providers is not None and (not isinstance(providers, list) or not all(isinstance(p, str) for p in providers)):
        raise _Bad(f"'entry.providers' must be a list of strings, got {_short(providers)}")
    if runtime == "openvino":
        hint = _typed(m, "entry.inference_precision", str)
        if hint not in OPENVINO_PRECISIONS:
            raise _Bad(f"'entry.inference_precision' must be one of {', '.join(OPENVINO_PRECISIONS)}, got {hint!r}")
        _typed(m, "entry.openvino_version", str, required=False)
    if runtime == "tvm":
        device_type = _typed(m, "entry.vm_device_type", int)
        if device_type not in TVM_DEVICE_TYPES:
            raise _Bad(
                f"'entry.vm_device_type' must be one of {sorted(TVM_DEVICE_TYPES)} (DLPack cpu, cuda, metal), "
                f"got {device_type}"
            )
        _typed(m, "entry.device", str, required=False)
        _check_params(m)
    if runtime in ("tvm", "coreml"):
        _check_fixed_shape(m, channels, image_size, runtime)

    # thresholds (validate compares its metrics with them)
    thresholds = _get(m, "thresholds", required=False)
    if thresholds is not None:
        if not isinstance(thresholds, dict):
            raise _Bad(f"'thresholds' must be an object, got {_type_name(thresholds)}")
        for key, value in thresholds.items():
            _number(value, f"'thresholds.{key}'", -1e9, 1e9)


def _check_outputs(m: dict) -> str:
    """`output.task` (absent: a classifier, as every artifact before dense tasks) and, for a dense task, its
    `output.outputs` list ({name, shape, stride, channels} per output, outputs.py); returns the task."""
    from .outputs import DENSE_TASKS, FEATURE_PREFIX, LOGITS, TASKS

    task = _typed(m, "output.task", str, required=False)
    if task is None:
        return "classification"
    if task not in TASKS:
        raise _Bad(f"'output.task' must be one of {', '.join(TASKS)}, got {_short(task)}")
    if task not in DENSE_TASKS:
        return task
    outputs = _typed(m, "output.outputs", list)
    if not outputs or len(outputs) > 16:
        raise _Bad(f"'output.outputs' must list 1..16 outputs, got {len(outputs)}")
    names = []
    for i, out in enumerate(outputs):
        where = f"'output.outputs[{i}]"
        if not isinstance(out, dict):
            raise _Bad(f"{where}' must be an object, got {_type_name(out)}")
        name = out.get("name")
        if not isinstance(name, str) or not name:
            raise _Bad(f"{where}.name' must be a non-empty string, got {_short(name)}")
        shape = out.get("shape")
        if not isinstance(shape, list) or len(shape) != 4:
            raise _Bad(f"{where}.shape' must be a list of 4 (N, C, H, W), got {_short(shape)}")
        for key in ("stride", "channels"):
            value = out.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CLASSES:
                raise _Bad(f"{where}.{key}' must be a positive integer, got {_short(value)}")
        names.append(name)
    if len(set(names)) != len(names):
        raise _Bad(f"'output.outputs' names must be distinct, got {names}")
    if task == "segmentation":
        if names != [LOGITS]:
            raise _Bad(f"'output.outputs' of a segmentation artifact must be one {LOGITS!r} output, got {names}")
        if outputs[0]["channels"] != m["output"].get("num_classes"):
            raise _Bad("'output.outputs[0].channels' of a segmentation artifact must equal output.num_classes")
    elif names != [f"{FEATURE_PREFIX}{i}" for i in range(len(names))]:
        raise _Bad(
            f"'output.outputs' of a backbone artifact must be {FEATURE_PREFIX}0, {FEATURE_PREFIX}1, ...; got {names}"
        )
    return task


def _check_fixed_shape(m: dict, channels: int, image_size: int, runtime: str) -> None:
    """Fixed-shape runtimes (TVM, Core ML): lowering.input_shape is [batch, channels, side, side] as built."""
    shape = _typed(m, "lowering.input_shape", list)
    if len(shape) != 4:
        raise _Bad(f"'lowering.input_shape' must have 4 entries (N, C, H, W), got {len(shape)}")
    batch, c, h, w = shape
    if not (batch == "batch" or (isinstance(batch, int) and not isinstance(batch, bool) and 1 <= batch <= MAX_BATCH)):
        raise _Bad(f"'lowering.input_shape[0]' must be \"batch\" or an integer in 1..{MAX_BATCH}, got {_short(batch)}")
    if c != channels or isinstance(c, bool):
        raise _Bad(f"'lowering.input_shape[1]' must equal input.channels ({channels}), got {_short(c)}")
    min_size, max_size = m["input"]["min_size"], m["input"]["max_size"]
    for i, side in ((2, h), (3, w)):
        if isinstance(side, bool) or not isinstance(side, int) or not min_size <= side <= max_size:
            raise _Bad(
                f"'lowering.input_shape[{i}]' must be an integer in input.min_size..input.max_size "
                f"({min_size}..{max_size}), got {_short(side)}"
            )
    batch_range = _get(m, "lowering.batch_range", required=False)
    if batch_range is not None:
        ok = (
            isinstance(batch_range, list)
            and len(batch_range) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in batch_range)
            and 1 <= batch_range[0] <= batch_range[1] <= MAX_BATCH
        )
        if not ok:
            raise _Bad(f"'lowering.batch_range' must be [low, high] with 1 <= low <= high <= {MAX_BATCH}")


def _check_params(m: dict) -> None:
    """TVM weights kept outside the library: entry.params = {"file", "tensors": [{"shape": [...]}, ...]}."""
    params = _get(m, "entry.params", required=False)
    if params is None:
        return
    if not isinstance(params, dict):
        raise _Bad(f"'entry.params' must be an object, got {_type_name(params)}")
    name = _typed(m, "entry.params.file", str)
    _relative_path(name, "'entry.params.file'")
    _file_listed(m, name, "entry.params.file")
    tensors = _typed(m, "entry.params.tensors", list)
    total = 0
    for i, tensor in enumerate(tensors):
        shape = tensor.get("shape") if isinstance(tensor, dict) else None
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise _Bad(f"'entry.params.tensors[{i}].shape' must be a list of non-negative integers")
        total += math.prod(shape)
    size = m["files"].get(name, {}).get("bytes")
    if isinstance(size, int) and total * 4 != size:
        raise _Bad(f"'entry.params.tensors' list {total:,} float32 values, but files[{name!r}] holds {size:,} bytes")


def verify_files(folder: Path, manifest: dict) -> None:
    """Refuse an artifact whose payload files are missing or differ from the hashes in its manifest."""
    folder = Path(folder).resolve()
    problems = []
    for rel, entry in manifest["files"].items():
        path = (folder / rel).resolve()
        if folder not in path.parents:
            problems.append(f"{rel}: path leaves the artifact folder")
            continue
        if not path.is_file():
            problems.append(f"{rel}: missing")
            continue
        expected = entry.get("sha256") if isinstance(entry, dict) else None
        if not expected or sha256_file(path) != expected:
            problems.append(f"{rel}: sha256 does not match the manifest (modified or corrupt)")
    if problems:
        raise ArtifactError(f"artifact {folder} failed verification: " + "; ".join(problems))


def update_manifest(folder: Path, **sections) -> dict:
    """Merge `sections` into the manifest (e.g. validation=..., benchmark=...) and re-render the report."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    manifest.update(sections)
    manifest["updated"] = utc_now()
    write_json_atomic(folder / MANIFEST, manifest)
    write_text_atomic(folder / REPORT, render_report(manifest))
    return manifest


def render_report(manifest: dict) -> str:
    from .report import render_artifact_report

    return render_artifact_report(manifest)
