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
import os
import platform
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


def _umask() -> int:
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
    keep = ~_umask() & 0o777
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


def read_manifest(folder: Path) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"{folder} is not an artifact folder (no such directory)")
    path = folder / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{folder} is not an artifact folder: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} must hold a JSON object, got {type(manifest).__name__}")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ArtifactError(f"{path} has schema_version {version!r}; this vmamba-export reads {SCHEMA_VERSION}")
    problem = manifest_problem(manifest)
    if problem:
        raise ArtifactError(f"{path}: {problem}")
    return manifest


# What the loader relies on, key path -> expected type(s). Everything else in a manifest is informational.
_REQUIRED_FIELDS: dict[str, type | tuple[type, ...]] = {
    "model": dict,
    "model.name": str,
    "target": dict,
    "target.name": str,
    "target.runtime": str,
    "precision": str,
    "input": dict,
    "input.channels": int,
    "input.min_size": int,
    "input.max_size": int,
    "input.preprocessing": dict,
    "input.preprocessing.image_size": int,
    "input.preprocessing.resize": int,
    "input.preprocessing.interpolation": str,
    "input.preprocessing.mean": list,
    "input.preprocessing.std": list,
    "input.preprocessing.channel_order": str,
    "output": dict,
    "output.num_classes": int,
    "entry": dict,
    "entry.model": str,
    "files": dict,
}


def manifest_problem(manifest: dict) -> str | None:
    """The first structural problem of a manifest, or None: a missing key or a value of the wrong type."""
    for dotted, expected in _REQUIRED_FIELDS.items():
        value: object = manifest
        for part in dotted.split("."):
            if not isinstance(value, dict) or part not in value:
                return f"lacks the required key {dotted!r}"
            value = value[part]
        if not isinstance(value, expected) or isinstance(value, bool):
            return f"{dotted!r} must be {getattr(expected, '__name__', expected)}, got {type(value).__name__}"
    spec = manifest["input"]["preprocessing"]
    for key in ("mean", "std"):
        if len(spec[key]) != manifest["input"]["channels"] or not all(isinstance(v, (int, float)) for v in spec[key]):
            return f"'input.preprocessing.{key}' must hold one number per channel"
    labels = spec.get("labels")
    if labels is not None and (not isinstance(labels, list) or len(labels) != manifest["output"]["num_classes"]):
        return "'input.preprocessing.labels' must be null or list one label per class"
    for name, entry in manifest["files"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            return f"files[{name!r}] must be an object with a sha256"
    for key in ("custom_op_library", "extension_library"):
        if key in manifest["entry"] and manifest["entry"][key] not in manifest["files"]:
            return f"entry.{key} names a file that is not among its hashed files"
    if manifest["entry"]["model"] not in manifest["files"] and not any(
        f.startswith(manifest["entry"]["model"].rstrip("/") + "/") for f in manifest["files"]
    ):
        return "entry.model names a file that is not among its hashed files"
    return None


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
