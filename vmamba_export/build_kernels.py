"""Build the native scan libraries: `python -m vmamba_export.build_kernels [--platform P] [--force] [--quiet]`.

Outputs (vmamba_export/_native/ for this machine; vmamba_export/_native/<platform>/ when cross-building):
  libvmamba_scan.so  C API of the CPU kernel (kernels/cpu), loaded by the torch op through ctypes
  libvmamba_ort.so   ONNX Runtime custom-op library (kernels/onnxruntime), ops ai.vmamba::SelectiveScan2D and
                     ai.vmamba::ChannelLayerNorm (kernels/cpu/channel_layer_norm.cpp)
  libvmamba_ort_cuda.so  the same plus the op's CUDAExecutionProvider kernel (kernels/cuda), only with --cuda
  libvmamba_openvino.so  OpenVINO extension (kernels/openvino), when the openvino package is installed

The CUDA library is built on request (`--cuda`, or VMAMBA_BUILD_CUDA=1) because nvcc for sm_80/87/89/90 plus PTX
takes minutes (about 90 s of wall time per architecture on a 2-core CI machine), against seconds for the rest; it
is skipped with a message when nvcc is absent. VMAMBA_CUDA_ARCHS="90" (space- or comma-separated) narrows the
architectures for a quick local build. It is linked with `-cudart static` and never against ONNX Runtime.

g++ is called directly (no CMake): a few small translation units compiled in parallel take seconds, which matters
because CI builds on every fresh clone. The OpenVINO extension still builds against the CMake config the openvino
wheel ships: its compile definitions, include directory and libraries are read from the wheel's
cmake/OpenVINOTargets*.cmake and TBBTargets-release.cmake (`openvino_toolchain`). The CPU kernels (the scan and, in
the ONNX Runtime libraries, the channel LayerNorm) are compiled once per instruction-set variant of the platform
(vmamba_export/platforms.py; x86-64: baseline, x86-64-v3 = AVX2/FMA, x86-64-v4 = AVX-512, picked at run time from
CPUID; aarch64: armv8-a NEON and armv8.2-a+fp16+dotprod, picked from getauxval(AT_HWCAP); one dispatcher for both,
kernels/cpu/isa_dispatch.h), so the libraries are portable; never -march=native.

Cross-building (`--platform linux-aarch64` on x86-64) uses the platform's Debian cross compiler
(aarch64-linux-gnu-g++: apt-get install g++-aarch64-linux-gnu, or scripts/arm64_env.sh) and the same ONNX Runtime
headers (the C API is the same on every architecture); it builds libvmamba_scan.so and libvmamba_ort.so, and the
OpenVINO extension against the platform's openvino wheel of the installed release (its headers, CMake config and
libraries: fetched once with `pip download --platform manylinux_2_35_aarch64 ...` into kernels/build/<platform>/;
`build_openvino_for_platform`), skipped with the reason when that wheel cannot be had.

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
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .kernels_paths import (
    NATIVE_DIR,
    OPENVINO_LIBRARY_NAME,
    ORT_CUDA_LIBRARY_NAME,
    ORT_LIBRARY_NAME,
    SCAN_LIBRARY_NAME,
    native_dir,
)
from .platforms import PLATFORMS, KernelVariant, Platform, elf_machine, host_platform

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


def target_platform(name: str | None) -> Platform:
    """The platform to build for (None: this machine). A host that platforms.py does not list builds the
    portable `generic` kernel alone, as before platforms existed."""
    host = host_platform()
    name = name or host
    if name in PLATFORMS:
        return PLATFORMS[name]
    if name == host:
        return Platform(host, platform.machine(), CXX, (KernelVariant("generic", ()),), (), "none (one variant)")
    raise BuildError(f"unknown platform {name!r}; known platforms: {', '.join(PLATFORMS)}")


def _compiler_for(plat: Platform) -> str:
    """g++ (or $CXX) for this machine's own platform, the platform's cross compiler otherwise."""
    return CXX if plat.name == host_platform() else os.environ.get("VMAMBA_CROSS_CXX", plat.cross_cxx)


def _obj_dir(plat: Platform) -> Path:
    return BUILD / "obj" if plat.name == host_platform() else BUILD / "obj" / plat.name


def _variant_units(plat: Platform, source: str, prefix: str) -> list[Unit]:
    """A kernel's instruction-set variants for `plat` (platforms.py): kernels/cpu/`source` compiled once per variant;
    the first is the baseline and also compiles the dispatcher (isa_dispatch.h), which knows the others through
    dispatch_flags."""
    src = KERNELS / "cpu" / source
    obj = _obj_dir(plat)
    units = []
    for i, variant in enumerate(plat.kernel_variants):
        flags = [*variant.flags, f"-DVMAMBA_SCAN_VARIANT={variant.name}"]
        if i == 0:
            flags += ["-DVMAMBA_SCAN_DISPATCH", *plat.dispatch_flags]
        units.append(Unit(src, obj / f"{prefix}_{variant.name}.o", flags))
    return units


def _scan_units(plat: Platform) -> list[Unit]:
    """The scan kernel's variants (kernels/cpu/selective_scan_2d.cpp), in every library."""
    return _variant_units(plat, "selective_scan_2d.cpp", "scan")


def _norm_units(plat: Platform) -> list[Unit]:
    """The channel LayerNorm's variants (kernels/cpu/channel_layer_norm.cpp), in the ONNX Runtime libraries only."""
    return _variant_units(plat, "channel_layer_norm.cpp", "norm")


def _compiler_id(cxx: str = CXX) -> str:
    if shutil.which(cxx) is None:
        # Debian names a cross g++ package after its triple: aarch64-linux-gnu-g++ is in g++-aarch64-linux-gnu.
        package = f"g++-{cxx.removesuffix('-g++')}" if cxx.endswith("-linux-gnu-g++") else "g++"
        raise BuildError(f"C++ compiler `{cxx}` not found: install it (Debian: apt-get install {package})")
    proc = subprocess.run([cxx, "--version"], capture_output=True, text=True)
    return proc.stdout.splitlines()[0] if proc.stdout else cxx


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


def _compile(units: Sequence[Unit], include: Sequence[Path], cxx: str = CXX) -> None:
    inc = [f"-I{p}" for p in include]

    def one(unit: Unit) -> None:
        unit.obj.parent.mkdir(parents=True, exist_ok=True)
        _run([cxx, *CXXFLAGS, *unit.flags, *inc, "-c", str(unit.source), "-o", str(unit.obj)])

    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        for future in [pool.submit(one, u) for u in units]:
            future.result()


def _link(objs: Sequence[Path], lib: Path, digest: str, cxx: str = CXX) -> None:
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{lib.name}.", suffix=".tmp", dir=lib.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _run([cxx, *[str(o) for o in objs], *LDFLAGS, "-o", str(tmp)])
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


NVCC = os.environ.get("VMAMBA_NVCC", "nvcc")
CUDA_ARCHS = ("80", "87", "89", "90")  # sm_80 A100, sm_87 Orin, sm_89 L4/L40/Ada, sm_90 H100/H200
CUDA_PTX_ARCH = "90"  # PTX too, so newer GPUs JIT-compile it
# kernels/cuda/<name>.cu compiled into libvmamba_ort_cuda.so
CUDA_SOURCES = (
    "selective_scan_2d",
    "layer_norm",
    "depthwise_conv",
    "scan_projections",
    "conv_projections",
    "scan_floor",
)
NVCCFLAGS = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC,-fvisibility=hidden", "--threads", "0"]


def _cuda_archs() -> list[str]:
    override = os.environ.get("VMAMBA_CUDA_ARCHS", "").replace(",", " ").split()
    return override or list(CUDA_ARCHS)


def _gencode(archs: Sequence[str]) -> list[str]:
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    if CUDA_PTX_ARCH in archs or not os.environ.get("VMAMBA_CUDA_ARCHS"):
        flags.append(f"-gencode=arch=compute_{CUDA_PTX_ARCH},code=compute_{CUDA_PTX_ARCH}")
    return flags


def build_cuda(
    kernel_units: Sequence[Unit],
    kernel_sources: Sequence[str | Path],
    force: bool = False,
    quiet: bool = False,
    norm_units: Sequence[Unit] = (),
) -> str:
    """libvmamba_ort_cuda.so: the ORT library (CPU kernels too: `kernel_units` the scan's, `norm_units` the channel
    LayerNorm's) plus the CUDA kernels. Returns what happened."""
    nvcc = shutil.which(NVCC)
    if nvcc is None:
        return f"skipped: `{NVCC}` not found (install the CUDA toolkit, or set VMAMBA_NVCC)"
    try:
        include = fetch_ort_headers(quiet)
    except BuildError as exc:
        return f"skipped: ONNX Runtime headers unavailable ({str(exc).splitlines()[0]})"
    proc = subprocess.run([nvcc, "--version"], capture_output=True, text=True)
    nvcc_id = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else nvcc
    cpu_dir, ort_dir, cuda_dir = KERNELS / "cpu", KERNELS / "onnxruntime", KERNELS / "cuda"
    obj = BUILD / "obj" / "cuda"
    archs = _cuda_archs()
    gencode = _gencode(archs)
    units = [Unit(u.source, obj / u.obj.name, u.flags) for u in (*kernel_units, *norm_units)]
    op = Unit(ort_dir / "custom_op.cpp", obj / "custom_op_cuda.o", ["-DVMAMBA_WITH_CUDA"])
    cuda_op = Unit(ort_dir / "cuda_op.cpp", obj / "cuda_op.o")
    cu_units = [Unit(cuda_dir / f"{name}.cu", obj / f"{name}_cu.o") for name in CUDA_SOURCES]
    link = ["-shared", "-cudart", "static", "-Xcompiler", "-pthread", "-Xlinker", "-z,defs", "-Xlinker", "-z,nodelete"]
    lib = NATIVE_DIR / ORT_CUDA_LIBRARY_NAME
    digest = _digest(
        [
            *kernel_sources,
            *sorted({u.source for u in norm_units}),
            nvcc_id,
            " ".join(NVCCFLAGS + gencode + link),
            op.source,
            cuda_op.source,
            ort_dir / "cuda_op.h",
            ort_dir / "shape_inference.h",
            ort_dir / "op_status.h",
            *sorted(cuda_dir.glob("*.cu*")),
            str(include),
            *sorted(include.glob("onnxruntime_*.h")),
        ]
    )
    if not force and _up_to_date(lib, digest):
        return "up to date"
    _say(quiet, f"compiling the CUDA kernel for sm_{', sm_'.join(archs)} (takes minutes)")
    start = time.perf_counter()
    obj.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=2) as pool:
        cuda_jobs = [
            pool.submit(_run, [nvcc, *NVCCFLAGS, *gencode, "-c", str(u.source), "-o", str(u.obj)]) for u in cu_units
        ]
        _compile([*units, op, cuda_op], [cpu_dir, include])
        for job in cuda_jobs:
            job.result()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{lib.name}.", suffix=".tmp", dir=NATIVE_DIR)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        objects = [str(u.obj) for u in (*units, op, cuda_op, *cu_units)]
        _run([nvcc, *link, *objects, "-o", str(tmp)])
        tmp.chmod(0o755)
        os.replace(tmp, lib)
    finally:
        tmp.unlink(missing_ok=True)
    _stamp(lib).write_text(digest + "\n")
    return f"built ({time.perf_counter() - start:.0f} s)"


@dataclass(frozen=True)
class OpenVINOToolchain:
    """What the openvino wheel's CMake config (cmake/OpenVINOTargets*.cmake, TBBTargets-release.cmake) gives a
    consumer of `openvino::runtime`: its compile definitions, include directory and the imported libraries (the
    versioned libopenvino.so.<YYYYMP> and the libtbb it depends on)."""

    version: str
    definitions: tuple[str, ...]
    include: Path
    libraries: tuple[Path, ...]


def _cmake_target_properties(cmake_file: Path, target: str, prefix: Path) -> dict[str, str]:
    """The properties a CMake export file sets on `target` (set_target_properties blocks), ${_IMPORT_PREFIX}
    replaced by `prefix`."""
    if not cmake_file.is_file():
        raise BuildError(f"the openvino wheel has no {cmake_file} (its CMake config): reinstall openvino")
    text = cmake_file.read_text()
    properties: dict[str, str] = {}
    for block in re.finditer(rf"set_target_properties\({re.escape(target)} PROPERTIES(.*?)\n\s*\)", text, re.S):
        for name, value in re.findall(r'^\s*([A-Z_]+) "([^"]*)"', block.group(1), re.M):
            properties[name] = value.replace("${_IMPORT_PREFIX}", str(prefix))
    if not properties:
        raise BuildError(f"{cmake_file} defines no target {target}")
    return properties


def openvino_toolchain() -> OpenVINOToolchain:
    """The installed openvino wheel as its CMake config describes `openvino::runtime`, read without importing
    openvino or running CMake: the extension is compiled with g++ directly (seconds), with exactly the definitions,
    include directory and libraries `find_package(OpenVINO)` + `target_link_libraries(... openvino::runtime)` would
    give it."""
    import importlib.util
    from importlib import metadata

    spec = importlib.util.find_spec("openvino")
    if spec is None or not spec.submodule_search_locations:
        raise BuildError("the openvino package is not installed (pip install openvino)")
    return openvino_toolchain_at(Path(list(spec.submodule_search_locations)[0]), metadata.version("openvino"))


def openvino_toolchain_at(root: Path, version: str) -> OpenVINOToolchain:
    """`openvino::runtime` as described by the CMake config of the openvino package folder `root` (an installed
    wheel, or one unpacked for another platform: the aarch64 wheel ships the same config)."""
    cmake, prefix = root / "cmake", root.parent  # the export files compute _IMPORT_PREFIX three levels up
    runtime = _cmake_target_properties(cmake / "OpenVINOTargets.cmake", "openvino::runtime", prefix)
    imported = _cmake_target_properties(cmake / "OpenVINOTargets-release.cmake", "openvino::runtime", prefix)
    tbb = _cmake_target_properties(cmake / "TBBTargets-release.cmake", "TBB::tbb", prefix)
    include = Path(runtime.get("INTERFACE_INCLUDE_DIRECTORIES", "").split(";")[0])
    if not (include / "openvino" / "core" / "version.hpp").is_file():
        raise BuildError(f"{include} (INTERFACE_INCLUDE_DIRECTORIES of openvino::runtime) holds no C++ headers")
    libraries = tuple(Path(props.get("IMPORTED_LOCATION_RELEASE", "")) for props in (imported, tbb))
    missing = [str(lib) for lib in libraries if not lib.is_file()]
    if missing:
        raise BuildError(f"libraries named by the openvino CMake config are missing: {', '.join(missing)}")
    definitions = tuple(d for d in runtime.get("INTERFACE_COMPILE_DEFINITIONS", "").split(";") if d)
    return OpenVINOToolchain(version, definitions, include, libraries)


def build_openvino(
    kernel_units: Sequence[Unit], kernel_sources: Sequence[str | Path], kernels_built: bool, force: bool
) -> str:
    """The OpenVINO extension library; "skipped: why" when openvino is not installed."""
    lib = NATIVE_DIR / OPENVINO_LIBRARY_NAME
    try:
        toolchain = openvino_toolchain()
    except BuildError as exc:
        return f"skipped: {exc}"
    ext = Unit(
        KERNELS / "openvino" / "extension.cpp",
        BUILD / "obj" / "openvino_extension.o",
        # The wheel's CMake config for openvino::runtime (openvino_toolchain); -isystem keeps the -Wextra noise of
        # OpenVINO's headers out of the build log.
        [*(f"-D{d}" for d in toolchain.definitions), "-isystem", str(toolchain.include)],
    )
    version, libraries = toolchain.version, list(toolchain.libraries)
    digest = _digest([*kernel_sources, ext.source, " ".join(ext.flags), version, *map(str, libraries)])
    if not force and _up_to_date(lib, digest):
        return "up to date"
    # The kernel objects are recompiled unless this run just did: they may be stale or absent otherwise.
    _compile([ext] if kernels_built else [*kernel_units, ext], [KERNELS / "cpu"])
    # Linked against the exact versioned libraries (no RPATH): the extension loads only into a process where this
    # OpenVINO release is already loaded, which `import openvino` does; another release fails to load it.
    _link([u.obj for u in kernel_units] + [ext.obj, *libraries], lib, digest)
    return f"built for openvino {version}"


# The OpenVINO extension for another platform than this machine's (issue #21: linux-aarch64 from x86-64). The IR is
# platform-neutral; the extension library is the platform's part. It is compiled with the platform's Debian cross
# compiler against the headers and CMake config of the platform's openvino wheel (the same release as the installed
# one: an artifact's IR comes from this machine's OpenVINO and both ends must be that release) and linked against
# that wheel's libopenvino and libtbb. The wheel is fetched once with pip into kernels/build/<platform>/.
# pip platform tags of the openvino wheels per platform: openvino 2026.4.1's aarch64 wheel is tagged
# manylinux_2_35_aarch64 only, which pip on x86-64 never picks unless asked for it.
OPENVINO_WHEEL_TAGS = {
    "linux-aarch64": ("manylinux_2_35_aarch64", "manylinux_2_28_aarch64", "manylinux2014_aarch64"),
}


def _openvino_wheel_tags(platform_name: str) -> tuple[str, ...]:
    if platform_name not in OPENVINO_WHEEL_TAGS:
        raise BuildError(
            f"no cross-build of the OpenVINO extension for platform {platform_name!r} "
            f"(known: {', '.join(OPENVINO_WHEEL_TAGS)})"
        )
    return OPENVINO_WHEEL_TAGS[platform_name]


def fetch_openvino_wheel(platform_name: str, version: str | None = None, quiet: bool = False) -> Path:
    """The `openvino` package folder (cmake/, include/, libs/) of the `platform_name` wheel of OpenVINO `version`
    (default: the installed release), downloaded with pip and unpacked under kernels/build/<platform>/ once."""
    import zipfile
    from importlib import metadata

    tags = _openvino_wheel_tags(platform_name)
    if version is None:
        try:
            version = metadata.version("openvino")
        except metadata.PackageNotFoundError:
            raise BuildError("the openvino package is not installed (pip install openvino==2026.4.1)") from None
    base = BUILD / platform_name
    site = base / f"openvino-{version}"
    root = site / "openvino"
    if (root / "cmake" / "OpenVINOTargets.cmake").is_file():
        return root
    wheels = base / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    python = f"{sys.version_info.major}{sys.version_info.minor}"  # the C++ libraries are the same in every cpXY wheel
    _say(quiet, f"downloading the {platform_name} openvino {version} wheel into {wheels.relative_to(REPO)}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet"]
    cmd += [a for tag in tags for a in ("--platform", tag)]
    cmd += ["--python-version", python, "--implementation", "cp", f"openvino=={version}", "-d", str(wheels)]
    _run(cmd)
    found = sorted(wheels.glob(f"openvino-{version}-*.whl"))
    if not found:
        raise BuildError(f"pip download left no openvino-{version} wheel for {platform_name} in {wheels}")
    tmp = Path(tempfile.mkdtemp(prefix=".openvino-", dir=base))
    try:
        with zipfile.ZipFile(found[-1]) as wheel:
            # Only what a C++ consumer needs: the CMake config, the headers and the shared libraries.
            members = [
                n for n in wheel.namelist() if n.startswith(("openvino/cmake/", "openvino/include/", "openvino/libs/"))
            ]
            wheel.extractall(tmp, members)
        if not (tmp / "openvino" / "cmake" / "OpenVINOTargets.cmake").is_file():
            raise BuildError(f"{found[-1].name} holds no openvino/cmake/OpenVINOTargets.cmake")
        if site.exists():
            shutil.rmtree(site)
        os.replace(tmp, site)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return root


def openvino_package_version(root: Path) -> str:
    """The release of the openvino package folder `root`, as its CMake config states it ("2026.4.1")."""
    config = root / "cmake" / "OpenVINOConfig-version.cmake"
    if not config.is_file():
        raise BuildError(f"{config} is missing: {root} is not an openvino package folder")
    parts = dict(re.findall(r"set\(PACKAGE_VERSION_(MAJOR|MINOR|PATCH) (\d+)\)", config.read_text()))
    if len(parts) != 3:
        raise BuildError(f"{config} states no PACKAGE_VERSION_MAJOR/MINOR/PATCH")
    return f"{parts['MAJOR']}.{parts['MINOR']}.{parts['PATCH']}"


def build_openvino_for_platform(
    platform_name: str = "linux-aarch64",
    cxx: str | None = None,
    openvino_root: Path | None = None,
    out_dir: Path | None = None,
    kernel_units: Sequence[Unit] | None = None,
    force: bool = False,
    quiet: bool = False,
) -> tuple[Path, str, str]:
    """The OpenVINO extension cross-compiled for `platform_name`: (library, the OpenVINO release it is built for,
    what happened).

    `cxx`: the cross compiler (default: the platform's, platforms.py, or $VMAMBA_CROSS_CXX); `openvino_root`: the
    platform's openvino package folder (default: its wheel of the installed release, fetch_openvino_wheel); `out_dir`:
    default vmamba_export/_native/<platform>/; `kernel_units`: the scan kernel's variants (default: the platform's,
    compiled again here with `cxx`)."""
    _openvino_wheel_tags(platform_name)  # a platform without an openvino wheel fails before anything is fetched
    plat = target_platform(platform_name)
    cxx = cxx or _compiler_for(plat)
    compiler = _compiler_id(cxx)
    root = openvino_root or fetch_openvino_wheel(platform_name, quiet=quiet)
    toolchain = openvino_toolchain_at(root, openvino_package_version(root))
    version = toolchain.version
    src = KERNELS / "cpu" / "selective_scan_2d.cpp"
    units = list(kernel_units or _scan_units(plat))
    ext = Unit(
        KERNELS / "openvino" / "extension.cpp",
        _obj_dir(plat) / "openvino_extension.o",
        # the baseline variant's flags: the extension's own code runs on every CPU of the platform
        [
            *plat.kernel_variants[0].flags,
            *(f"-D{d}" for d in toolchain.definitions),
            "-isystem",
            str(toolchain.include),
        ],
    )
    lib = (out_dir or native_dir(plat.name)) / OPENVINO_LIBRARY_NAME
    libs_dir = toolchain.libraries[0].parent
    # libopenvino's own dependencies (libhwloc, ...) are found beside it at link time, never on this machine
    link = [f"-Wl,-rpath-link,{libs_dir}"]
    digest = _digest(
        [
            compiler,
            " ".join(CXXFLAGS + LDFLAGS + link),
            *sorted((KERNELS / "cpu").glob("*.h")),
            src,
            *[" ".join(u.flags) for u in units],
            ext.source,
            " ".join(ext.flags),
            version,
            *map(str, toolchain.libraries),
        ]
    )
    if not force and _up_to_date(lib, digest):
        return lib, version, "up to date"
    inc = [f"-I{KERNELS / 'cpu'}"]
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        jobs = []
        for unit in [*units, ext]:
            unit.obj.parent.mkdir(parents=True, exist_ok=True)
            cmd = [cxx, *CXXFLAGS, *unit.flags, *inc, "-c", str(unit.source), "-o", str(unit.obj)]
            jobs.append(pool.submit(_run, cmd))
        for job in jobs:
            job.result()
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{lib.name}.", suffix=".tmp", dir=lib.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        objects = [str(u.obj) for u in (*units, ext)]
        _run([cxx, *objects, *map(str, toolchain.libraries), *LDFLAGS, *link, "-o", str(tmp)])
        built = elf_machine(tmp)
        if built != plat.machine:
            raise BuildError(f"`{cxx}` produced a {built} library, {platform_name} needs {plat.machine}")
        tmp.chmod(0o755)
        os.replace(tmp, lib)
    finally:
        tmp.unlink(missing_ok=True)
    _stamp(lib).write_text(digest + "\n")
    return lib, version, f"built for openvino {version} ({platform_name}, {cxx})"


def build(
    force: bool = False, quiet: bool = False, cuda: bool | None = None, platform_name: str | None = None
) -> dict[str, str]:
    """Build the libraries for `platform_name` (None: this machine) if out of date (the CUDA one only with `cuda`,
    default: env VMAMBA_BUILD_CUDA=1, and only for this machine). Returns {library name: "built" | "up to date" |
    "skipped: why"}."""
    if cuda is None:
        cuda = os.environ.get("VMAMBA_BUILD_CUDA", "") == "1"
    start = time.perf_counter()
    plat = target_platform(platform_name)
    cross = plat.name != host_platform()
    cxx = _compiler_for(plat)
    out_dir = native_dir(plat.name)
    compiler = _compiler_id(cxx)
    cpu_dir = KERNELS / "cpu"
    kernel_units = _scan_units(plat)
    norm_units = _norm_units(plat)
    c_api = Unit(cpu_dir / "c_api.cpp", _obj_dir(plat) / "c_api.o")
    kernel_sources: list[str | Path] = [
        compiler,
        " ".join(CXXFLAGS + LDFLAGS),
        *sorted(cpu_dir.glob("*.h")),
        cpu_dir / "selective_scan_2d.cpp",
        *[" ".join(u.flags) for u in kernel_units],
    ]
    results: dict[str, str] = {}

    scan_lib = out_dir / SCAN_LIBRARY_NAME
    scan_digest = _digest([*kernel_sources, c_api.source])
    kernels_built = False
    if not force and _up_to_date(scan_lib, scan_digest):
        results[SCAN_LIBRARY_NAME] = "up to date"
    else:
        _compile([*kernel_units, c_api], [cpu_dir], cxx)
        kernels_built = True
        _link([u.obj for u in kernel_units] + [c_api.obj], scan_lib, scan_digest, cxx)
        results[SCAN_LIBRARY_NAME] = "built"

    ort_lib = out_dir / ORT_LIBRARY_NAME
    try:
        include = fetch_ort_headers(quiet)
    except BuildError as exc:
        results[ORT_LIBRARY_NAME] = f"skipped: ONNX Runtime headers unavailable ({str(exc).splitlines()[0]})"
    else:
        op = Unit(KERNELS / "onnxruntime" / "custom_op.cpp", _obj_dir(plat) / "custom_op.o")
        headers = sorted(include.glob("onnxruntime_*.h"))
        ort_digest = _digest(
            [
                *kernel_sources,
                norm_units[0].source,
                op.source,
                op.source.with_name("shape_inference.h"),
                op.source.with_name("op_status.h"),
                str(include),
                *headers,
            ]
        )
        if not force and _up_to_date(ort_lib, ort_digest):
            results[ORT_LIBRARY_NAME] = "up to date"
        else:
            _compile([*norm_units, op] if kernels_built else [*kernel_units, *norm_units, op], [cpu_dir, include], cxx)
            _link([u.obj for u in (*kernel_units, *norm_units, op)], ort_lib, ort_digest, cxx)
            results[ORT_LIBRARY_NAME] = "built"

    if cross:
        try:
            _, _, what = build_openvino_for_platform(
                plat.name, cxx, out_dir=out_dir, kernel_units=kernel_units, force=force, quiet=quiet
            )
        except BuildError as exc:  # no openvino wheel for the platform, no network: the other libraries still count
            what = f"skipped: {str(exc).splitlines()[0]}"
        results[OPENVINO_LIBRARY_NAME] = what
    else:
        results[OPENVINO_LIBRARY_NAME] = build_openvino(kernel_units, kernel_sources, kernels_built, force)

    if cuda and not cross:
        NATIVE_DIR.mkdir(parents=True, exist_ok=True)
        results[ORT_CUDA_LIBRARY_NAME] = build_cuda(kernel_units, kernel_sources, force, quiet, norm_units)

    for name, what in results.items():
        _say(quiet, f"{name}: {what}")
    _say(quiet, f"done in {time.perf_counter() - start:.1f} s ({out_dir.relative_to(REPO)}, {plat.name})")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmamba_export.build_kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even when the sources are unchanged")
    parser.add_argument("--quiet", action="store_true", help="print only errors")
    parser.add_argument(
        "--cuda", action="store_true", help="also build libvmamba_ort_cuda.so with nvcc (minutes; VMAMBA_BUILD_CUDA=1)"
    )
    parser.add_argument(
        "--platform",
        choices=sorted(PLATFORMS),
        help=f"platform to build for (default: this machine, {host_platform()}); another one is cross-compiled",
    )
    args = parser.parse_args(argv)
    try:
        build(force=args.force, quiet=args.quiet, cuda=args.cuda or None, platform_name=args.platform)
    except BuildError as exc:
        print(f"build_kernels: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
