"""Build the native scan libraries: `python -m vmamba_export.build_kernels [--force] [--quiet]`.

Outputs (vmamba_export/_native/):
  libvmamba_scan.so  C API of the CPU kernel (kernels/cpu), loaded by the torch op through ctypes
  libvmamba_ort.so   ONNX Runtime custom-op library (kernels/onnxruntime), op ai.vmamba::SelectiveScan2D

g++ is called directly (no CMake): five small translation units compiled in parallel take seconds, which matters
because CI builds on every fresh clone. On x86-64 the kernel is compiled three times (baseline, x86-64-v3 = AVX2/FMA,
x86-64-v4 = AVX-512) and picks one at run time from CPUID, so the libraries are portable; never -march=native.

ONNX Runtime's pip wheels ship no C/C++ headers. They come from Debian trixie's `libonnxruntime-dev` (1.21), fetched
with `apt-get download` through a one-off sources list and unpacked with `dpkg -x` under kernels/build/ (git-ignored):
nothing on the system changes. VMAMBA_ORT_INCLUDE=<dir holding onnxruntime_cxx_api.h> uses existing headers instead.
If the headers cannot be had, libvmamba_scan.so is still built and the ORT library is skipped (exit status 0).

Each library is rebuilt only when the hash of its sources, flags and compiler changes (stamp next to it); outputs
are written to a temporary name and renamed, so a concurrent reader never sees a half-written library.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .kernels_paths import NATIVE_DIR, ORT_LIBRARY_NAME, SCAN_LIBRARY_NAME

REPO = Path(__file__).resolve().parent.parent
KERNELS = REPO / "kernels"
BUILD = KERNELS / "build"
ORT_ROOT = BUILD / "ort"  # dpkg -x target
ORT_INCLUDE = ORT_ROOT / "usr" / "include" / "onnxruntime"
DEBIAN_MIRROR = os.environ.get("VMAMBA_DEBIAN_MIRROR", "http://deb.debian.org/debian")
ORT_DEB = "libonnxruntime-dev"

CXX = os.environ.get("CXX", "g++")
CXXFLAGS = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wextra", "-Wno-psabi"]
# ORT unloads a custom-op library with its SessionOptions; nodelete keeps code alive for sessions that outlive them.
LDFLAGS = ["-shared", "-pthread", "-Wl,-z,defs", "-Wl,-z,nodelete"]


class BuildError(Exception):
    """A step failed; the message is one line for the user."""


@dataclass
class Unit:
    source: Path
    obj: Path
    flags: list[str] = field(default_factory=list)


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        print(f"build_kernels: {message}", flush=True)


def _run(cmd: Sequence[str], cwd: Path | None = None) -> None:
    proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise BuildError(f"`{' '.join(cmd[:2])} ...` failed:\n{detail}")


def _scan_units() -> list[Unit]:
    """The kernel's instruction-set variants (see kernels/cpu/selective_scan_2d.cpp) and the C API."""
    src = KERNELS / "cpu" / "selective_scan_2d.cpp"
    obj = BUILD / "obj"
    if platform.machine().lower() in ("x86_64", "amd64"):
        dispatch = ["-DVMAMBA_SCAN_DISPATCH", "-DVMAMBA_SCAN_HAVE_X86_64_V3", "-DVMAMBA_SCAN_HAVE_X86_64_V4"]
        units = [
            Unit(src, obj / "scan_generic.o", ["-DVMAMBA_SCAN_VARIANT=generic", *dispatch]),
            Unit(src, obj / "scan_x86_64_v3.o", ["-march=x86-64-v3", "-DVMAMBA_SCAN_VARIANT=x86_64_v3"]),
            Unit(src, obj / "scan_x86_64_v4.o", ["-march=x86-64-v4", "-DVMAMBA_SCAN_VARIANT=x86_64_v4"]),
        ]
    else:
        units = [Unit(src, obj / "scan_generic.o", ["-DVMAMBA_SCAN_VARIANT=generic", "-DVMAMBA_SCAN_DISPATCH"])]
    return units


def _compiler_id() -> str:
    if shutil.which(CXX) is None:
        raise BuildError(f"C++ compiler `{CXX}` not found: install g++ (Debian: apt-get install g++)")
    proc = subprocess.run([CXX, "--version"], capture_output=True, text=True)
    return proc.stdout.splitlines()[0] if proc.stdout else CXX


def _digest(parts: Sequence[str | Path]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.read_bytes() if isinstance(part, Path) else part.encode())
        h.update(b"\0")
    return h.hexdigest()


def _stamp(lib: Path) -> Path:
    return lib.with_name(f".{lib.name}.sha256")


def _up_to_date(lib: Path, digest: str) -> bool:
    stamp = _stamp(lib)
    return lib.is_file() and stamp.is_file() and stamp.read_text().strip() == digest


def _compile(units: Sequence[Unit], include: Sequence[Path]) -> None:
    inc = [f"-I{p}" for p in include]

    def one(unit: Unit) -> None:
        unit.obj.parent.mkdir(parents=True, exist_ok=True)
        _run([CXX, *CXXFLAGS, *unit.flags, *inc, "-c", str(unit.source), "-o", str(unit.obj)])

    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        for future in [pool.submit(one, u) for u in units]:
            future.result()


def _link(objs: Sequence[Path], lib: Path, digest: str) -> None:
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{lib.name}.", suffix=".tmp", dir=lib.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _run([CXX, *[str(o) for o in objs], *LDFLAGS, "-o", str(tmp)])
        tmp.chmod(0o755)
        os.replace(tmp, lib)  # atomic: a process loading the library sees the old file or the new one
    finally:
        tmp.unlink(missing_ok=True)
    _stamp(lib).write_text(digest + "\n")


def fetch_ort_headers(quiet: bool = False) -> Path:
    """Directory holding onnxruntime_cxx_api.h: VMAMBA_ORT_INCLUDE, the cache, or a fresh Debian download."""
    override = os.environ.get("VMAMBA_ORT_INCLUDE")
    if override:
        if not (Path(override) / "onnxruntime_cxx_api.h").is_file():
            raise BuildError(f"VMAMBA_ORT_INCLUDE={override} holds no onnxruntime_cxx_api.h")
        return Path(override)
    if (ORT_INCLUDE / "onnxruntime_cxx_api.h").is_file() and (ORT_INCLUDE / "onnxruntime_lite_custom_op.h").is_file():
        return ORT_INCLUDE
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise BuildError(f"`{tool}` not found (needed to fetch the ONNX Runtime headers from Debian)")
    apt = BUILD / "apt"
    for sub in ("lists/partial", "cache/archives/partial"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    sources = apt / "sources.list"
    sources.write_text(f"deb {DEBIAN_MIRROR} trixie main\n")
    # A private sources list, package lists and cache: the system's apt state is neither read nor changed.
    opts = [
        f"-oDir::Etc::SourceList={sources}",
        "-oDir::Etc::SourceParts=/dev/null",
        f"-oDir::State::Lists={apt / 'lists'}",
        f"-oDir::Cache={apt / 'cache'}",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        opts.append("-oAPT::Sandbox::User=root")  # the _apt user cannot write into the build folder
    _say(quiet, f"fetching ONNX Runtime headers ({ORT_DEB}, Debian trixie) into {apt.relative_to(REPO)}")
    _run(["apt-get", "-q", *opts, "update"])
    for old in apt.glob(f"{ORT_DEB}_*.deb"):
        old.unlink()
    _run(["apt-get", "-q", *opts, "download", ORT_DEB], cwd=apt)
    debs = sorted(apt.glob(f"{ORT_DEB}_*.deb"))
    if not debs:
        raise BuildError(f"apt-get download left no {ORT_DEB} package")
    if ORT_ROOT.exists():
        shutil.rmtree(ORT_ROOT)
    _run(["dpkg", "-x", str(debs[-1]), str(ORT_ROOT)])
    if not (ORT_INCLUDE / "onnxruntime_cxx_api.h").is_file():
        raise BuildError(f"{debs[-1].name} holds no onnxruntime_cxx_api.h")
    return ORT_INCLUDE


def build(force: bool = False, quiet: bool = False) -> dict[str, str]:
    """Build both libraries if out of date. Returns {library name: "built" | "up to date" | "skipped: why"}."""
    start = time.perf_counter()
    compiler = _compiler_id()
    cpu_dir = KERNELS / "cpu"
    kernel_units = _scan_units()
    c_api = Unit(cpu_dir / "c_api.cpp", BUILD / "obj" / "c_api.o")
    kernel_sources: list[str | Path] = [
        compiler,
        " ".join(CXXFLAGS + LDFLAGS),
        *sorted(cpu_dir.glob("*.h")),
        cpu_dir / "selective_scan_2d.cpp",
        *[" ".join(u.flags) for u in kernel_units],
    ]
    results: dict[str, str] = {}

    scan_lib = NATIVE_DIR / SCAN_LIBRARY_NAME
    scan_digest = _digest([*kernel_sources, c_api.source])
    kernels_built = False
    if not force and _up_to_date(scan_lib, scan_digest):
        results[SCAN_LIBRARY_NAME] = "up to date"
    else:
        _compile([*kernel_units, c_api], [cpu_dir])
        kernels_built = True
        _link([u.obj for u in kernel_units] + [c_api.obj], scan_lib, scan_digest)
        results[SCAN_LIBRARY_NAME] = "built"

    ort_lib = NATIVE_DIR / ORT_LIBRARY_NAME
    try:
        include = fetch_ort_headers(quiet)
    except BuildError as exc:
        results[ORT_LIBRARY_NAME] = f"skipped: ONNX Runtime headers unavailable ({str(exc).splitlines()[0]})"
    else:
        op = Unit(KERNELS / "onnxruntime" / "custom_op.cpp", BUILD / "obj" / "custom_op.o")
        headers = sorted(include.glob("onnxruntime_*.h"))
        ort_digest = _digest([*kernel_sources, op.source, str(include), *headers])
        if not force and _up_to_date(ort_lib, ort_digest):
            results[ORT_LIBRARY_NAME] = "up to date"
        else:
            _compile([op] if kernels_built else [*kernel_units, op], [cpu_dir, include])
            _link([u.obj for u in kernel_units] + [op.obj], ort_lib, ort_digest)
            results[ORT_LIBRARY_NAME] = "built"

    for name, what in results.items():
        _say(quiet, f"{name}: {what}")
    _say(quiet, f"done in {time.perf_counter() - start:.1f} s ({NATIVE_DIR.relative_to(REPO)})")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmamba_export.build_kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even when the sources are unchanged")
    parser.add_argument("--quiet", action="store_true", help="print only errors")
    args = parser.parse_args(argv)
    try:
        build(force=args.force, quiet=args.quiet)
    except BuildError as exc:
        print(f"build_kernels: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
