"""The artifact folder: one per (model, target, precision), with manifest.json and report.md.

Written into a hidden temporary folder beside the destination and renamed into place, so a failed or interrupted
build leaves nothing behind. `manifest.json` lists every payload file with its sha256; loading verifies them.
The manifest and report themselves are metadata, rewritten (atomically) by `validate` and `bench`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

from .errors import ArtifactError

SCHEMA_VERSION = 1
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


@contextlib.contextmanager
def atomic_artifact(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it becomes `out`, on any error it is removed."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "artifact")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
