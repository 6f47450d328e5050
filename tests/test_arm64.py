"""linux-aarch64 artifacts built on this x86-64 machine: platform records, the loader's refusal, the cross-built scan
kernel under qemu, and (slow) the whole emulated check of scripts/arm64_check.sh.

The kernel test needs Debian's g++-aarch64-linux-gnu and qemu-user-static (scripts/arm64_env.sh installs them) and
skips without them; the emulated self-checks also need the arm64 Python of scripts/arm64_env.sh.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from vmamba_export.build import BuildPlan, build
from vmamba_export.errors import ArtifactError, TargetUnavailableError
from vmamba_export.exporter import export_artifact
from vmamba_export.kernels_paths import ort_library_path
from vmamba_export.model_source import resolve_model
from vmamba_export.platforms import elf_machine, host_platform
from vmamba_export.runtime import load
from vmamba_export.targets import get_target

ROOT = Path(__file__).resolve().parent.parent
CROSS_CXX = shutil.which("aarch64-linux-gnu-g++")
QEMU = shutil.which("qemu-aarch64-static")
on_x86 = pytest.mark.skipif(host_platform() != "linux-x86_64", reason="cross-building from linux-x86_64 only")
needs_cross = pytest.mark.skipif(
    CROSS_CXX is None or QEMU is None,
    reason="needs g++-aarch64-linux-gnu and qemu-user-static (bash scripts/arm64_env.sh)",
)


def elf_header(e_machine: int, little: bool = True) -> bytes:
    """The first 20 bytes of a 64-bit ELF shared object (System V ABI layout) for architecture `e_machine`."""
    order = "<" if little else ">"
    ident = b"\x7fELF" + bytes([2, 1 if little else 2, 1]) + bytes(9)
    return ident + struct.pack(f"{order}HH", 3, e_machine)  # e_type ET_DYN, e_machine


def test_elf_machine_reads_the_header(tmp_path):
    cases = {"aarch64": elf_header(183), "x86_64": elf_header(62), "arm": elf_header(40, little=False)}
    for want, header in cases.items():
        path = tmp_path / f"{want}.so"
        path.write_bytes(header + bytes(100))
        assert elf_machine(path) == want
    (tmp_path / "text.so").write_text("not an ELF file at all")
    assert elf_machine(tmp_path / "text.so") is None
    (tmp_path / "short.so").write_bytes(b"\x7fELF")
    assert elf_machine(tmp_path / "short.so") is None


@on_x86
def test_the_cross_built_library_is_aarch64_code():
    host = ort_library_path()
    cross = ort_library_path("linux-aarch64")
    if host is None or cross is None:
        pytest.skip("run python -m vmamba_export.build_kernels [--platform linux-aarch64]")
    assert elf_machine(host) == "x86_64"
    assert elf_machine(cross) == "aarch64"
    assert cross.parent.name == "linux-aarch64"


def tiny_artifact(folder: Path, platform: dict | None) -> Path:
    """A minimal valid ONNX Runtime artifact made by hand (no export: seconds, not minutes): the logits are the
    per-channel means of the input, so its outputs are known exactly."""
    import onnx
    from onnx import TensorProto, helper

    folder.mkdir(parents=True)
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["pixel_values", "axes"], ["logits"], keepdims=0)],
        "tiny",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.save(model, str(folder / "model.onnx"))
    payload = (folder / "model.onnx").read_bytes()
    manifest = {
        "schema_version": 1,
        "model": {"name": "tiny"},
        "target": {"name": "onnx-portable", "runtime": "onnxruntime"},
        "precision": "fp32",
        "input": {
            "channels": 3,
            "min_size": 1,
            "max_size": 64,
            "preprocessing": {
                "image_size": 8,
                "resize": 8,
                "interpolation": "bilinear",
                "mean": [0.5, 0.5, 0.5],
                "std": [0.5, 0.5, 0.5],
                "channel_order": "RGB",
            },
        },
        "output": {"num_classes": 3},
        "entry": {"model": "model.onnx"},
        "files": {"model.onnx": {"sha256": hashlib.sha256(payload).hexdigest()}},
    }
    if platform is not None:
        manifest["platform"] = platform
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@on_x86
def test_an_artifact_without_native_code_runs_anywhere(tmp_path):
    folder = tiny_artifact(tmp_path / "a", {"name": "linux-aarch64", "binaries": {}, "runs_anywhere": True})
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 7), dtype=np.float32)
    np.testing.assert_allclose(load(folder)(x), x.mean(axis=(2, 3)), rtol=1e-6)


@on_x86
def test_loader_refuses_another_platform_in_one_line(tmp_path):
    platform = {"name": "linux-aarch64", "binaries": {"libvmamba_ort.so": "aarch64"}, "runs_anywhere": False}
    folder = tiny_artifact(tmp_path / "a", platform)
    with pytest.raises(ArtifactError) as info:
        load(folder)
    assert str(info.value) == f"artifact {folder} was built for linux-aarch64; this machine is linux-x86_64"
    folder = tiny_artifact(tmp_path / "b", {"name": 7})
    with pytest.raises(ArtifactError, match="'platform' must be an object with a 'name' string"):
        load(folder)


@on_x86
def test_loader_reads_the_libraries_not_only_the_manifest(tmp_path, monkeypatch):
    """A manifest without a platform record (older artifacts, or edited) still cannot smuggle in aarch64 code: the
    ELF header of every listed .so is checked before ONNX Runtime would see it."""
    folder = tiny_artifact(tmp_path / "b", None)
    payload = elf_header(183) + bytes(200)
    (folder / "libvmamba_ort.so").write_bytes(payload)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["libvmamba_ort.so"] = {"sha256": hashlib.sha256(payload).hexdigest()}
    manifest["entry"]["custom_op_library"] = "libvmamba_ort.so"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    loaded = []
    import onnxruntime

    monkeypatch.setattr(onnxruntime.SessionOptions, "register_custom_ops_library", lambda *a: loaded.append(a))
    with pytest.raises(ArtifactError, match=r"built for linux-aarch64 \(libvmamba_ort.so is aarch64 code\)"):
        load(folder)
    assert loaded == []  # refused before any library was handed to the runtime


def test_targets_without_an_aarch64_build_say_why(tmp_path):
    source = resolve_model("vmamba_test_v2", random_weights=True)
    with pytest.raises(TargetUnavailableError, match="cuda-onnxruntime cannot be built for linux-aarch64: "):
        export_artifact(source, get_target("cuda-onnxruntime"), tmp_path / "x", platform="linux-aarch64")
    assert not (tmp_path / "x").exists()
    from vmamba_export.cli import main

    assert main(["export", "--target", "cuda-tvm", "--platform", "linux-aarch64", "--out", str(tmp_path / "y")]) == 2
    # An unknown platform is refused by the parser: one line, exit 2 (cli.py turns argparse errors into that).
    argv = ["export", "--target", "cpu-onnxruntime", "--platform", "windows-x86", "--out", str(tmp_path / "z")]
    assert main(argv) == 2
    assert not (tmp_path / "z").exists()


@pytest.mark.slow
@on_x86
def test_build_for_aarch64_without_an_emulator(tmp_path, monkeypatch):
    """`build --platform linux-aarch64` with no emulator: cpu-onnxruntime is built (shipping the aarch64 library)
    and marked not run; onnx-portable (no native code) is validated here; cuda-onnxruntime is listed with why it
    was not built; nothing is benchmarked. Slow: two real exports (minutes on a shared 2-core machine)."""
    if ort_library_path("linux-aarch64") is None or ort_library_path() is None:
        pytest.skip("run python -m vmamba_export.build_kernels --platform linux-aarch64")
    from vmamba_export import emulation

    monkeypatch.setattr(emulation, "emulated_python", lambda platform: None)
    source = resolve_model("vmamba_test_v2", random_weights=True, seed=2)
    plan = BuildPlan(
        targets=[get_target("cpu-onnxruntime"), get_target("onnx-portable"), get_target("cuda-onnxruntime")],
        precisions=["fp32"],
        platform="linux-aarch64",
    )
    summary = build(source, plan, tmp_path, show_progress=False)
    rows = {r["target"]: r for r in summary["artifacts"]}
    assert rows["cpu-onnxruntime"]["status"] == "built for linux-aarch64, not run here"
    assert rows["cuda-onnxruntime"]["status"] == "not built for linux-aarch64"
    assert "CUDA" in rows["cuda-onnxruntime"]["note"]
    assert rows["onnx-portable"]["status"] == "validated"
    assert rows["onnx-portable"]["note"] == "no native code: validated on linux-x86_64"
    assert "latency" not in rows["cpu-onnxruntime"] and "latency" not in rows["onnx-portable"]
    portable = json.loads((Path(rows["onnx-portable"]["artifact"]) / "manifest.json").read_text())
    assert portable["platform"] == {"name": "linux-aarch64", "binaries": {}, "runs_anywhere": True}
    folder = Path(rows["cpu-onnxruntime"]["artifact"])
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["platform"] == {
        "name": "linux-aarch64",
        "binaries": {"libvmamba_ort.so": "aarch64"},
        "runs_anywhere": False,
    }
    assert (folder / "libvmamba_ort.so").read_bytes() == ort_library_path("linux-aarch64").read_bytes()
    with pytest.raises(ArtifactError, match="built for linux-aarch64; this machine is linux-x86_64"):
        load(folder)
    assert "Built for: linux-aarch64" in (tmp_path / "report.md").read_text()


def _check_harness_on_both_cpus(
    tmp_path: Path, harness: str, aarch64_objects: list[str], host_globs: tuple[str, ...]
) -> Iterator[str]:
    """Cross-compile kernels/cpu/`harness`.cpp (a float64-reference check of a kernel, printing `<harness>: variant
    V` and `<harness>: PASS`) with the aarch64 objects, run it under qemu on its default CPU (dot-product and fp16:
    the armv8.2-a variant) and on a Cortex-A53 (neither: the armv8-a baseline, chosen by the run-time dispatch), then
    the same harness with this machine's objects: its reference agrees with the host kernel too. Yields each
    emulated run's output; the host run comes when the caller has taken both."""
    from vmamba_export.build_kernels import BUILD, build

    build(quiet=True, platform_name="linux-aarch64")
    obj = BUILD / "obj" / "linux-aarch64"
    source = str(ROOT / "kernels" / "cpu" / f"{harness}.cpp")
    exe = tmp_path / harness
    objects = [str(obj / n) for n in aarch64_objects]
    subprocess.run([CROSS_CXX, "-O1", "-std=c++17", source, *objects, "-pthread", "-o", str(exe)], check=True)
    qemu = [QEMU, "-L", "/usr/aarch64-linux-gnu"]
    for cpu, want in ((None, "armv8.2-a+fp16+dotprod"), ("cortex-a53", "armv8-a")):
        cmd = [*qemu, *(["-cpu", cpu] if cpu else []), str(exe), want]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"{harness}: variant {want}" in proc.stdout and f"{harness}: PASS" in proc.stdout, proc.stdout
        yield proc.stdout
    host_objects = [str(p) for pattern in host_globs for p in sorted((BUILD / "obj").glob(pattern))]
    host_exe = tmp_path / f"{harness}_host"
    subprocess.run(["g++", "-O1", "-std=c++17", source, *host_objects, "-pthread", "-o", str(host_exe)], check=True)
    assert f"{harness}: PASS" in subprocess.run([str(host_exe)], capture_output=True, text=True).stdout


@on_x86
@needs_cross
def test_scan_kernel_cross_compiled_runs_under_qemu_and_dispatches(tmp_path):
    """The aarch64 scan kernel against the float64 reference of kernels/cpu/scan_check.cpp (d_state 1, 16 and 3,
    odd sizes, batch > 1), both variants, and the host kernel against the same reference (which
    tests/test_native_kernel.py checks against the torch float64 reference)."""
    objects = ["scan_armv8_a.o", "scan_armv8_2_a.o", "c_api.o"]
    for out in _check_harness_on_both_cpus(tmp_path, "scan_check", objects, ("scan_*.o", "c_api.o")):
        assert "d_state 16" in out and "d_state 1 " in out


@on_x86
@needs_cross
def test_channel_norm_kernel_cross_compiled_runs_under_qemu_and_dispatches(tmp_path):
    """The aarch64 channel LayerNorm (ai.vmamba::ChannelLayerNorm's and LastAxisLayerNorm's kernel) against the
    float64 reference of kernels/cpu/channel_norm_check.cpp (C 1 to 1000, pixel counts around every vector width,
    batch > 1, a large offset, 1 and 2 threads): both variants, picked by the run-time dispatch as for the scan."""
    objects = ["norm_armv8_a.o", "norm_armv8_2_a.o"]
    assert len(list(_check_harness_on_both_cpus(tmp_path, "channel_norm_check", objects, ("norm_*.o",)))) == 2


@pytest.mark.slow
@on_x86
@needs_cross
def test_arm64_check_under_emulation(tmp_path):
    """scripts/arm64_check.sh end to end: kernel variants and dispatch under qemu, both bundled models built for
    linux-aarch64 (cpu-onnxruntime and onnx-portable, fp32 and int8), each self-checked in the emulated torch-free
    runtime; the bundled segmenter's fp32 self-check, its int8 held-out mIoU drop and a mask there. Minutes: the
    arm64 bench is set up on first use."""
    env = {"VMAMBA_PYTHON": sys.executable, "PATH": "/usr/sbin:/usr/bin:/bin"}
    import os

    env = {**os.environ, **env}
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "arm64_check.sh"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "arm64_check: PASS" in proc.stdout
    for model in ("vmamba_digits_v2", "vmamba_digits_v0"):
        report = json.loads((tmp_path / "out" / model / "report.json").read_text())
        rows = {(r["target"], r["precision"]): r for r in report["artifacts"]}
        assert set(rows) == {(t, p) for t in ("cpu-onnxruntime", "onnx-portable") for p in ("fp32", "int8")}
        for row in rows.values():
            assert row["status"] == "validated" and "qemu-aarch64" in row["note"], row
    # The bundled segmenter: its output upsampling runs as our BilinearResize op, on aarch64 code; int8 is judged by
    # its held-out mIoU drop there, against PyTorch's mIoU as the export recorded it (the emulated Python has no torch).
    assert "last node: ai.vmamba BilinearResize" in proc.stdout
    assert (tmp_path / "out" / "masks").is_dir() and any((tmp_path / "out" / "masks").glob("*.png"))
    for precision in ("fp32", "int8"):
        folder = tmp_path / "out" / f"vmamba_shapes_seg-cpu-onnxruntime-{precision}"
        validation = json.loads((folder / "manifest.json").read_text())["validation"]
        assert validation["status"] == "pass" and "qemu-aarch64" in validation["ran_on"], validation
    acc = validation["accuracy"]
    assert acc["source"] == "shapes:holdout" and acc["num_images"] == 500
    assert acc["torch_from"] == "recorded at export (references.accuracy)" and 0 <= acc["drop_points"] <= 1.0


def test_workflow_runs_the_aarch64_artifacts_on_an_arm_runner_without_torch():
    yaml = pytest.importorskip("yaml")
    jobs = yaml.safe_load((ROOT / ".github" / "workflows" / "build.yml").read_text())["jobs"]
    builder, arm = jobs["arm64-artifacts"], jobs["arm64"]
    assert builder["runs-on"] == "ubuntu-24.04" and arm["runs-on"] == "ubuntu-24.04-arm"
    assert arm["needs"] == "arm64-artifacts"
    build_steps = " ".join(step.get("run", "") for step in builder["steps"])
    assert "--platform linux-aarch64" in build_steps and "export_convnext_onnx" in build_steps
    uploaded = next(s["with"]["name"] for s in builder["steps"] if "upload-artifact" in s.get("uses", ""))
    downloaded = next(s["with"]["name"] for s in arm["steps"] if "download-artifact" in s.get("uses", ""))
    assert uploaded == downloaded
    arm_runs = " ".join(step.get("run", "") for step in arm["steps"])
    # The runtime only: no set-up script (it installs torch), an install without the export extra that fails if
    # torch came with it, then the self-check and the bench against the peer.
    installs = [line for line in arm_runs.splitlines() if "pip install" in line]
    assert installs and not any("torch" in line or "export" in line for line in installs)
    assert "setup.sh" not in arm_runs and 'python -c "import torch"' in arm_runs
    assert 'vmamba-export" validate' in arm_runs and "benchmarks/arm64_bench.py" in arm_runs
    assert any("upload-artifact" in s.get("uses", "") for s in arm["steps"])
