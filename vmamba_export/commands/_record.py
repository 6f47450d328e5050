"""Where `validate` and `bench` put their results besides the screen: the artifact's manifest (`--record`) and/or a
JSON file (`--out FILE`). By default nothing is written, so both commands run on a read-only artifact (a mounted
image, a package); a write that fails after the work is done prints the results anyway, then one error line (exit 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..artifact import update_manifest, utc_now, write_json_atomic
from ..errors import ArtifactError, VMambaExportError

RESULTS_FORMAT = "vmamba-export-results"  # marks a results file of ours: the only kind of file --out replaces


def add_record_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--record",
        action="store_true",
        help=f"also record the {what} in the artifact's manifest.json and report.md (the folder must be writable)",
    )
    p.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        help=f"also write the {what} as JSON to FILE (a new file, or one written by --out before)",
    )


def check_results_file(path: Path | None) -> None:
    """Refuse, before any work, an --out that would overwrite something not written by --out, or cannot be created."""
    if path is None:
        return
    if path.is_symlink() or path.is_dir():
        raise ArtifactError(f"--out {path} is a {'link' if path.is_symlink() else 'folder'}; give a file name")
    if path.exists():
        try:
            ours = json.loads(path.read_text()).get("format") == RESULTS_FORMAT
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise ArtifactError(
                f"--out {path} already exists and is not a results file of vmamba-export; refusing to replace it"
            )
    elif not path.parent.is_dir():
        raise ArtifactError(f"--out {path}: the folder {path.parent} does not exist")


def save_results(args: argparse.Namespace, section: str, result: dict) -> list[str]:
    """Write `result` where the user asked (`--out`, `--record`); the error lines of what failed (never raises)."""
    errors = []
    if args.out is not None:
        document = {"format": RESULTS_FORMAT, "kind": section, "artifact": str(args.artifact), "created": utc_now()}
        try:
            write_json_atomic(args.out, document | {section: result})
        except VMambaExportError as exc:
            errors.append(f"could not write the {section} to --out: {exc}")
    if args.record:
        try:
            update_manifest(args.artifact, **{section: result})
        except VMambaExportError as exc:
            errors.append(f"could not record the {section} in {args.artifact} (--record): {exc}")
    return errors


def finish(errors: list[str], status: int) -> int:
    """Exit status after the results are printed: 2 with one line per failed write, else `status`."""
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    return 2 if errors else status
