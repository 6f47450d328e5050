"""Refuse an artifact built for another platform before any of its libraries is loaded.

Loading an aarch64 library into an x86-64 process fails with the misleading "cannot open shared object file: No such
file or directory"; this check says instead which platform the artifact was built for and which this machine is. It
trusts neither the manifest alone nor the file names: the manifest's `platform` record (artifacts without one predate
platforms) and the ELF header of every shared library the manifest lists must both fit this machine.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ArtifactError
from ..platforms import elf_machine, host_platform


def _host_machine(host: str) -> str:
    return host.split("-", 1)[1] if "-" in host else host


def check_platform(folder: Path, manifest: dict) -> None:
    """Raise ArtifactError (one line) if the artifact in `folder` cannot run on this machine's platform."""
    host = host_platform()
    record = manifest.get("platform")
    if record is not None:
        if not isinstance(record, dict) or not isinstance(record.get("name"), str):
            raise ArtifactError(f"artifact {folder}: manifest key 'platform' must be an object with a 'name' string")
        built_for = record["name"]
        if built_for != host and record.get("runs_anywhere") is not True:
            raise ArtifactError(f"artifact {folder} was built for {built_for}; this machine is {host}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        return  # the manifest's own checks report it
    root = Path(folder).resolve()
    want = _host_machine(host)
    for name in files:
        if not isinstance(name, str) or not name.endswith(".so"):
            continue
        path = (root / name).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            continue  # outside the folder or missing: verify_files reports it
        try:
            machine = elf_machine(path)
        except OSError as exc:
            raise ArtifactError(f"artifact {folder}: cannot read {name}: {exc.strerror or exc}") from None
        if machine is not None and machine != want:
            built_for = f"{host.split('-', 1)[0]}-{machine}" if "-" in host else machine
            raise ArtifactError(
                f"artifact {folder} was built for {built_for} ({name} is {machine} code); this machine is {host}"
            )
