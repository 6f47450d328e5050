"""Platforms are data: what an artifact's native code is built for, and how.

A platform names the operating system and CPU architecture an artifact runs on (`linux-x86_64`, `linux-aarch64`),
the C++ compiler that builds its libraries from this (x86-64 Debian) machine, the scan kernel's instruction-set
variants (kernels/cpu/selective_scan_2d.cpp is compiled once per variant; the first also holds the dispatcher) and
how the dispatcher detects the CPU's features at RUN time (never from the build machine), and which targets can be
built for it. Reading ELF headers and naming the host are here too: stdlib only, so the runtime loader can use them
without the builder's packages.
"""

from __future__ import annotations

import platform as _platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import TargetUnavailableError

# ELF e_machine values (System V ABI) of the architectures an artifact may ship code for.
ELF_MACHINES = {3: "i386", 40: "arm", 62: "x86_64", 183: "aarch64", 243: "riscv64"}


@dataclass(frozen=True)
class KernelVariant:
    name: str  # namespace in selective_scan_2d.cpp (-DVMAMBA_SCAN_VARIANT=name)
    flags: tuple[str, ...]  # its instruction-set flags


@dataclass(frozen=True)
class Platform:
    name: str
    machine: str  # architecture as ELF_MACHINES and platform.machine() name it
    cross_cxx: str  # the compiler when building on another machine (Debian's cross g++)
    kernel_variants: tuple[KernelVariant, ...]  # [0] is the baseline and holds the dispatcher
    dispatch_flags: tuple[str, ...]  # -D flags of the baseline unit naming the other variants it may pick
    feature_detection: str  # how the dispatcher picks a variant at run time (recorded in manifests)
    # Targets that cannot be built for this platform, and why (one line each, shown by `build`).
    unsupported_targets: dict[str, str] = field(default_factory=dict)


PLATFORMS: dict[str, Platform] = {
    p.name: p
    for p in (
        Platform(
            name="linux-x86_64",
            machine="x86_64",
            cross_cxx="x86_64-linux-gnu-g++",
            kernel_variants=(
                KernelVariant("generic", ()),
                KernelVariant("x86_64_v3", ("-march=x86-64-v3",)),  # AVX2, FMA
                KernelVariant("x86_64_v4", ("-march=x86-64-v4",)),  # AVX-512
            ),
            dispatch_flags=("-DVMAMBA_SCAN_HAVE_X86_64_V3", "-DVMAMBA_SCAN_HAVE_X86_64_V4"),
            feature_detection="CPUID (__builtin_cpu_supports x86-64-v4 / x86-64-v3)",
        ),
        Platform(
            name="linux-aarch64",
            machine="aarch64",
            cross_cxx="aarch64-linux-gnu-g++",
            kernel_variants=(
                KernelVariant("armv8_a", ("-march=armv8-a",)),  # NEON (Advanced SIMD) is part of armv8-a
                KernelVariant("armv8_2_a", ("-march=armv8.2-a+fp16+dotprod",)),
            ),
            dispatch_flags=("-DVMAMBA_SCAN_HAVE_ARMV8_2_A",),
            feature_detection="getauxval(AT_HWCAP): HWCAP_ASIMDDP and HWCAP_ASIMDHP",
            unsupported_targets={
                "cuda-onnxruntime": "no CUDA build for aarch64 (Jetson: docs/platforms.md)",
                "cuda-tvm": "no CUDA build for aarch64",
                "metal-tvm": "Metal runs on Apple platforms only",
                "apple-coreml": "Core ML runs on Apple platforms only",
            },
        ),
    )
}


def host_platform() -> str:
    """This machine's platform name (`linux-x86_64`, `linux-aarch64`, or e.g. `darwin-arm64` for one not listed)."""
    machine = _platform.machine().lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine) if sys.platform == "linux" else machine
    system = "linux" if sys.platform.startswith("linux") else sys.platform
    return f"{system}-{machine}"


def get_platform(name: str | None) -> Platform:
    """The platform called `name` (None: this machine's)."""
    name = name or host_platform()
    if name not in PLATFORMS:
        raise TargetUnavailableError(f"unknown platform {name!r}; known platforms: {', '.join(PLATFORMS)}")
    return PLATFORMS[name]


def is_host(name: str) -> bool:
    return name == host_platform()


def elf_machine(path: Path) -> str | None:
    """The architecture an ELF file is built for (`x86_64`, `aarch64`, ...), or None when `path` is not ELF.
    Reads the e_machine field of the header only (offset 18, two bytes in the file's own byte order)."""
    with open(path, "rb") as fh:
        head = fh.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF" or head[5] not in (1, 2):
        return None
    number = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    return ELF_MACHINES.get(number, f"elf-machine-{number}")


def binaries(folder: Path) -> dict[str, str]:
    """{file name: architecture} of every ELF shared library in an artifact folder (its top level)."""
    found = {}
    for path in sorted(Path(folder).glob("*.so")):
        machine = elf_machine(path)
        if machine is not None:
            found[path.name] = machine
    return found


def platform_record(name: str, folder: Path) -> dict:
    """What a manifest records about the platform of the artifact in `folder`: its name, each binary's
    architecture (read from the files, not assumed) and whether it runs anywhere (no native code)."""
    found = binaries(folder)
    return {"name": name, "binaries": found, "runs_anywhere": not found}


def cannot_build_reason(target: str, name: str) -> str | None:
    """Why `target` cannot be built for platform `name` (None: it can, as far as the platform is concerned)."""
    return get_platform(name).unsupported_targets.get(target)
