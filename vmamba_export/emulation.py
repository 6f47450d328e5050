"""Run an artifact built for another platform under an emulator, for correctness (never for speed).

linux-aarch64 on an x86-64 machine: the test bench of scripts/arm64_env.sh (qemu-aarch64-static, an arm64 Debian
Python with only the runtime's aarch64 wheels: numpy, onnxruntime, pillow, rich; no torch). The artifact's
self-check, `vmamba-export validate DIR` against the reference inputs and logits it carries, runs there with this
package imported from its source tree, so what passes is the torch-free runtime on aarch64 code. Emulation is
hundreds of times slower than hardware: nothing here measures time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from .errors import VMambaExportError
from .platforms import host_platform

REPO = Path(__file__).resolve().parent.parent
ENV_VARIABLE = "VMAMBA_ARM64_ENV"  # where scripts/arm64_env.sh put the bench (default: <repo>/.arm64)
EMULATORS = {"linux-aarch64": "qemu-aarch64-static"}


def emulated_python(platform: str) -> Path | None:
    """The emulated Python for `platform` on this machine, or None when there is none (not set up, or no qemu)."""
    if platform not in EMULATORS or host_platform() != "linux-x86_64" or shutil.which(EMULATORS[platform]) is None:
        return None
    python = Path(os.environ.get(ENV_VARIABLE) or REPO / ".arm64") / "python"
    return python if os.access(python, os.X_OK) else None


def emulator_description(platform: str) -> str:
    return f"{platform} under {EMULATORS.get(platform, '?')} (emulated on {host_platform()}; no speed measured)"


def validate_emulated(folder: Path, platform: str, accuracy_source: str | None = None, timeout: float = 3600) -> dict:
    """`vmamba-export validate DIR --json` in the emulated Python: the artifact's self-check on `platform`'s code,
    and with `accuracy_source` its score there (the PyTorch side as the artifact recorded it at export, accuracy.py).
    Returns the validation dict (recorded in the manifest here, with `ran_on` added)."""
    python = emulated_python(platform)
    if python is None:
        raise VMambaExportError(f"no emulator for {platform} here: run bash scripts/arm64_env.sh")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)  # the package from its source tree: the emulated site has the runtime, not torch
    cmd = [str(python), "-m", "vmamba_export", "validate", str(Path(folder).resolve()), "--json"]
    if accuracy_source:
        cmd += ["--accuracy", accuracy_source]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise VMambaExportError(f"validate of {folder} under emulation ran past {timeout:.0f} s") from None
    try:
        result = json.loads(proc.stdout)
    except json.JSONDecodeError:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise VMambaExportError(
            f"validate of {folder} under emulation failed (exit {proc.returncode}): {tail[0]}"
        ) from None
    from .artifact import update_manifest

    result["ran_on"] = emulator_description(platform)
    update_manifest(folder, validation=result)
    return result
