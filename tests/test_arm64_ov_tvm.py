"""cpu-openvino and cpu-tvm for linux-aarch64, built on this x86-64 machine: the OpenVINO extension cross-built
against the aarch64 openvino wheel, TVM code for an aarch64 LLVM triple linked by the cross compiler, and (slow) both
artifacts run under qemu with the torch-free runtime against the x86-64 ones (benchmarks/arm64_ov_tvm_check.py).

The cross-compile tests need Debian's g++-aarch64-linux-gnu (scripts/arm64_env.sh installs it) and skip without it;
the emulated check also needs qemu-aarch64-static and an arm64 Python tree (scripts/arm64_env.sh's root).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmamba_export.build_kernels import BuildError, build_openvino_for_platform, openvino_package_version
from vmamba_export.errors import TargetUnavailableError
from vmamba_export.exporter import export_artifact
from vmamba_export.kernels_paths import native_dir
from vmamba_export.lowering import ExportOptions
from vmamba_export.model_source import resolve_model
from vmamba_export.platforms import elf_machine, host_platform
from vmamba_export.targets import get_target

ROOT = Path(__file__).resolve().parent.parent
CROSS_CXX = shutil.which("aarch64-linux-gnu-g++")
OBJDUMP = shutil.which("aarch64-linux-gnu-objdump")
QEMU = shutil.which("qemu-aarch64-static")
on_x86 = pytest.mark.skipif(host_platform() != "linux-x86_64", reason="cross-building from linux-x86_64 only")
needs_cross = pytest.mark.skipif(
    CROSS_CXX is None or OBJDUMP is None, reason="needs g++-aarch64-linux-gnu (bash scripts/arm64_env.sh)"
)


def test_openvino_package_version_reads_the_cmake_config(tmp_path):
    cmake = tmp_path / "openvino" / "cmake"
    cmake.mkdir(parents=True)
    (cmake / "OpenVINOConfig-version.cmake").write_text(
        "set(PACKAGE_VERSION_MAJOR 2031)\nset(PACKAGE_VERSION_MINOR 7)\nset(PACKAGE_VERSION_PATCH 12)\n"
    )
    assert openvino_package_version(tmp_path / "openvino") == "2031.7.12"
    with pytest.raises(BuildError, match=r"OpenVINOConfig-version.cmake is missing: .* is not an openvino package"):
        openvino_package_version(tmp_path)


def test_cross_building_the_extension_for_an_unknown_platform_says_which_exist():
    with pytest.raises(BuildError, match=r"platform 'linux-riscv64' \(known: linux-aarch64\)") as info:
        build_openvino_for_platform("linux-riscv64")
    assert "\n" not in str(info.value)


@on_x86
def test_cpu_tvm_target_for_aarch64_is_the_armv8_a_baseline():
    pytest.importorskip("tvm")
    from vmamba_export.lowering.tvm_relax import make_target

    target, spec = make_target("cpu", {"tvm_num_cores": 2}, "linux-aarch64")
    assert spec["mtriple"] == "aarch64-linux-gnu" and spec["mcpu"] == "generic" and spec["mattr"] == ["+neon"]
    attrs = json.loads(str(target))  # what TVM made of it: an AArch64 target with NEON and nothing newer
    assert attrs["feature.is_aarch64"] and attrs["feature.has_asimd"]
    assert not attrs["feature.has_dotprod"] and not attrs["feature.has_sve"]
    _, mine = make_target("cpu", {}, None)
    assert "mtriple" not in mine  # this machine's build is unchanged
    _, newer = make_target("cpu", {"tvm_mcpu": "neoverse-n1"}, "linux-aarch64")
    assert newer["mcpu"] == "neoverse-n1"
    with pytest.raises(TargetUnavailableError, match="native names this machine's CPU, not one of .*linux-aarch64"):
        make_target("cpu", {"tvm_mcpu": "native"}, "linux-aarch64")


@on_x86
def test_cpu_tvm_for_aarch64_refuses_tuning_here(tmp_path):
    pytest.importorskip("tvm")
    if CROSS_CXX is None:
        pytest.skip("needs g++-aarch64-linux-gnu")
    source = resolve_model("vmamba_test_v2", random_weights=True)
    options = ExportOptions(extra={"tune_budget": 60})
    with pytest.raises(TargetUnavailableError, match="meta-schedule tunes by measuring on this machine"):
        export_artifact(source, get_target("cpu-tvm"), tmp_path / "x", options=options, platform="linux-aarch64")
    assert not (tmp_path / "x").exists()


@on_x86
@needs_cross
def test_tvm_scan_kernel_compiles_for_aarch64_with_neon(tmp_path):
    """The TIR scan kernel (scheduled with 16-lane vectors for x86) lowered for aarch64-linux-gnu and linked by the
    cross compiler: an aarch64 library whose scan body holds 128-bit NEON arithmetic (fmla/fmul on v registers .4s)."""
    tvm = pytest.importorskip("tvm")
    from vmamba_export.lowering.tvm_relax import make_target
    from vmamba_export.lowering.tvm_scan import scheduled_scan

    target, _ = make_target("cpu", {"tvm_num_cores": 2}, "linux-aarch64")
    func = scheduled_scan(32, 4, 4, 16, "llvm").with_attr("global_symbol", "scan_d32_n16")
    lib = tvm.compile(tvm.IRModule({"scan_d32_n16": func}), target=target)
    path = tmp_path / "scan.so"
    lib.export_library(str(path), cc=CROSS_CXX)
    assert elf_machine(path) == "aarch64"
    asm = subprocess.run([OBJDUMP, "-d", str(path)], capture_output=True, text=True, check=True).stdout
    # the kernel's body: from its symbol to the next one
    body = re.search(r"<scan_d32_n16_compute_>:\n(.*?)(?:\n[0-9a-f]+ <|\Z)", asm, re.S)
    assert body is not None, "no scan_d32_n16_compute_ symbol in the library"
    vector_fma = [line for line in body.group(1).splitlines() if re.search(r"\bfmla\s+v\d+\.4s", line)]
    assert len(vector_fma) >= 8, "no NEON fused multiply-adds in the scan kernel"


@on_x86
def test_the_cross_built_openvino_extension_is_aarch64_code():
    library = native_dir("linux-aarch64") / "libvmamba_openvino.so"
    if not library.is_file():
        pytest.skip("run python -m vmamba_export.build_kernels --platform linux-aarch64")
    assert elf_machine(library) == "aarch64"
    readelf = shutil.which("aarch64-linux-gnu-readelf") or shutil.which("readelf")
    if readelf is None:
        pytest.skip("needs readelf")
    dynamic = subprocess.run([readelf, "-dW", "--dyn-syms", str(library)], capture_output=True, text=True).stdout
    # linked against the aarch64 wheel's versioned OpenVINO and its TBB, nothing of this machine's
    assert "[libopenvino.so.2641]" in dynamic and "[libtbb.so.12]" in dynamic
    assert "create_extensions" in dynamic and "vmamba_openvino_version" in dynamic


def _arm64_env() -> Path | None:
    env = Path(os.environ.get("VMAMBA_ARM64_ENV") or ROOT / ".arm64")
    return env if (env / "root" / "usr" / "bin" / "python3.11").is_file() else None


@pytest.mark.slow
@on_x86
@needs_cross
def test_aarch64_openvino_and_tvm_artifacts_under_qemu(tmp_path):
    """benchmarks/arm64_ov_tvm_check.py on vmamba_digits_v2: cpu-openvino fp32 and int8 and cpu-tvm fp32 built for
    linux-aarch64, self-checked under qemu with the torch-free runtime (openvino / tvm_ffi + libtvm_runtime.so
    aarch64 wheels), and matching the x86-64 artifacts of the same run. Slow: six exports and an emulated run
    (about 15 minutes on a shared 2-core machine)."""
    env = _arm64_env()
    if QEMU is None or env is None:
        pytest.skip("needs qemu-aarch64-static and the arm64 bench of scripts/arm64_env.sh")
    cases = "cpu-openvino:fp32,cpu-openvino:int8,cpu-openvino:bf16,cpu-tvm:fp32"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "arm64_ov_tvm_check.py"), "--env", str(env)]
    cmd += ["--models", "vmamba_digits_v2", "--cases", cases, "--out", str(tmp_path), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=ROOT)
    assert (tmp_path / "results.json").is_file(), proc.stderr[-2000:]
    rows = json.loads((tmp_path / "results.json").read_text())
    assert proc.returncode == 0, [r["failures"] for r in rows]
    by_name = {r["name"]: r for r in rows}
    # bf16 is refused for aarch64 with the reason (the ARM plugin runs it as f16), not built to fail there
    assert "ARM CPU plugin has no bf16" in by_name.pop("vmamba_digits_v2-cpu-openvino-bf16")["not_built"]
    for name, row in by_name.items():
        assert row["machine"] == "aarch64" and row["torch"] is False, name
        assert row["self_check"]["status"] == "pass" and row["self_check"]["mode"] == "self-check", name
        assert row["binaries"] and set(row["binaries"].values()) == {"aarch64"}, name
    fp32 = by_name["vmamba_digits_v2-cpu-openvino-fp32"]
    assert fp32["model_files_identical"]  # the IR is platform-neutral: only the extension differs
    assert fp32["vs_x86"]["rel_l2"] <= 1e-5 and "OpenVINO" in fp32["self_check"]["evaluated_with"]
    tvm = by_name["vmamba_digits_v2-cpu-tvm-fp32"]
    assert tvm["vs_x86"]["rel_l2"] <= 1e-5 and "runtime only" in tvm["self_check"]["evaluated_with"]
    assert by_name["vmamba_digits_v2-cpu-openvino-int8"]["vs_x86"]["cosine_min"] >= 0.99
