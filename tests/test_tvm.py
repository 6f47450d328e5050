"""TVM targets: the TIR scan kernel against the float64 reference, cpu-tvm artifacts against PyTorch, cuda-tvm and
metal-tvm code generation (no GPU here: the generated device source is checked, not run)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("tvm", reason="apache-tvm not installed")

import tvm  # noqa: E402
from tvm.target import Target  # noqa: E402

from vmamba_export import load  # noqa: E402
from vmamba_export.errors import InputError, TargetUnavailableError  # noqa: E402
from vmamba_export.exporter import export_artifact  # noqa: E402
from vmamba_export.lowering.tvm_scan import scheduled_scan  # noqa: E402
from vmamba_export.model_source import resolve_model  # noqa: E402
from vmamba_export.scan.op import torch_scan  # noqa: E402
from vmamba_export.scan.reference import selective_scan_reference  # noqa: E402
from vmamba_export.targets import get_target  # noqa: E402

SIZE = 64  # small fixed input side keeps the builds short


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def scan_inputs(bsz: int, di: int, h: int, w: int, n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = 4
    return [
        torch.randn(bsz, di, h, w, generator=g),
        torch.randn(bsz, k, di, h, w, generator=g) * 2,  # wide enough to reach the softplus > 20 branch rarely
        torch.randn(k * di, n, generator=g) * 0.5,
        torch.randn(bsz, k, n, h, w, generator=g),
        torch.randn(bsz, k, n, h, w, generator=g),
        torch.randn(k * di, generator=g),
        torch.randn(k * di, generator=g),
    ]


@pytest.mark.parametrize("n", [1, 16])
@pytest.mark.parametrize(("di", "h", "w"), [(16, 6, 5), (12, 3, 7)])  # 16: vectorised lanes; 12: lanes 4
def test_tir_scan_kernel_matches_float64_reference(n, di, h, w):
    func = scheduled_scan(di, h, w, n, "llvm")
    assert func.attrs["tirx.is_scheduled"]
    lib = tvm.compile(tvm.IRModule({"main": func}), target=Target({"kind": "llvm", "num-cores": 2}))
    for bsz in (1, 3):  # one kernel, any batch (symbolic batch variable)
        args = scan_inputs(bsz, di, h, w, n, seed=bsz)
        expected = selective_scan_reference(*args).numpy()
        out = tvm.runtime.empty((bsz, di, h, w), "float32", tvm.cpu())
        lib["main"](*[tvm.runtime.tensor(a.numpy()) for a in args], out)
        assert rel_l2(out.numpy(), expected) <= 1e-6


@pytest.fixture(scope="module")
def cpu_artifacts(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tvm")
    built = {}
    for name in ("vmamba_test_v2", "vmamba_test_v0"):
        folder = root / f"{name}-cpu-tvm"
        export_artifact(resolve_model(name, random_weights=True, seed=1), get_target("cpu-tvm"), folder, max_size=SIZE)
        built[name] = folder
    return built


def torch_logits(name: str, x: np.ndarray) -> np.ndarray:
    model = resolve_model(name, random_weights=True, seed=1).model.set_scan(torch_scan)
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("name", ["vmamba_test_v2", "vmamba_test_v0"])
def test_cpu_tvm_artifact_matches_pytorch(cpu_artifacts, name):
    predictor = load(cpu_artifacts[name])
    assert predictor.backend.evaluated_with.startswith("TVM runtime only"), predictor.backend.load_errors
    for bsz in (1, 3):  # dynamic batch
        x = np.random.default_rng(bsz).standard_normal((bsz, 3, SIZE, SIZE), dtype=np.float32)
        out = predictor(x)
        ref = torch_logits(name, x)
        assert out.shape == (bsz, 10)
        assert rel_l2(out, ref) <= 1e-5
        assert (out.argmax(1) == ref.argmax(1)).all()


def test_cpu_tvm_manifest_and_fixed_size(cpu_artifacts):
    folder = cpu_artifacts["vmamba_test_v0"]
    m = json.loads((folder / "manifest.json").read_text())
    assert m["input"]["min_size"] == m["input"]["max_size"] == SIZE
    assert m["runtime"] == {"name": "tvm", "version": tvm_version()}
    assert m["entry"]["model"] == "model.so" and m["entry"]["device"] == "cpu"
    assert m["lowering"]["scan_nodes"] == sum(m["model"]["config"]["depths"])
    assert all(k.endswith("_n16") for k in m["lowering"]["scan_kernels"])  # v0: d_state 16
    assert m["thresholds"] == {"max_rel_l2": 1e-5, "min_top1_agreement": 1.0}
    predictor = load(folder)
    with pytest.raises(InputError):
        predictor(np.zeros((1, 3, SIZE - 8, SIZE - 8), np.float32))


def tvm_version() -> str:
    from importlib import metadata

    return metadata.version("apache-tvm")


def test_cpu_tvm_runs_without_importing_tvm(cpu_artifacts):
    """The deployed library needs TVM's runtime only: loading and running must not import the compiler package."""
    code = (
        "import sys, numpy as np\n"
        "from vmamba_export import load\n"
        f"p = load({str(cpu_artifacts['vmamba_test_v2'])!r})\n"
        f"y = p(np.zeros((2, 3, {SIZE}, {SIZE}), np.float32))\n"
        "print(y.shape, 'tvm' in sys.modules, p.backend.evaluated_with)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.startswith("(2, 10) False TVM runtime only"), out.stdout + out.stderr


def test_cuda_tvm_builds_with_cuda_kernels_in_the_library(tmp_path):
    folder = tmp_path / "cuda"
    source = resolve_model("vmamba_test_v0", random_weights=True, seed=1)
    m = export_artifact(source, get_target("cuda-tvm"), folder, max_size=SIZE)
    assert m["lowering"]["tvm_target"]["kind"] == "cuda" and m["entry"]["vm_device_type"] == 2
    assert m["lowering"]["device_source_bytes"]["cuda"] > 0
    data = (folder / "model.so").read_bytes()
    # One scan kernel per block shape, one thread per (batch, direction, channel), d_state 16 in registers.
    for kernel in m["lowering"]["scan_kernels"]:
        assert f"__global__ void __launch_bounds__(128) selective_scan_2d_{kernel}_kernel(".encode() in data
    assert b"float state_ptr[16];" in data and b"for (int t = 0; t < 256; ++t)" in data
    with pytest.raises(TargetUnavailableError):  # no GPU on this machine: a clear refusal, not a crash
        load(folder)


def test_metal_tvm_generates_scan_kernel_source(tmp_path):
    folder = tmp_path / "metal"
    source = resolve_model("vmamba_test_v0", random_weights=True, seed=1)
    m = export_artifact(source, get_target("metal-tvm"), folder, max_size=SIZE)
    assert m["entry"]["model"] == "model.tar" and m["entry"]["vm_device_type"] == 8
    assert {"lib0.o", "devc.o"} <= set(_tar_names(folder / "model.tar"))
    src = (folder / "metal_kernels.metal").read_text()
    h = SIZE // 4  # v0 stage-1 side
    kernel = _metal_kernel(src, f"selective_scan_2d_d32_h{h}_w{h}_n16_kernel")
    assert "uint threadIdx [[thread_position_in_threadgroup]]" in kernel
    assert "thread float state[16];" in kernel  # d_state fixed at compile time, state in registers
    assert re.search(rf"for \(int t = 0; t < {h * h}; \+\+t\)", kernel)  # the sequential scan over positions
    assert "log1p" not in src  # the Metal Shading Language has no log1p
    with pytest.raises(TargetUnavailableError):
        load(folder)


def _tar_names(path) -> list[str]:
    import tarfile

    with tarfile.open(path) as tar:
        return tar.getnames()


def _metal_kernel(src: str, name: str) -> str:
    start = src.index(f"kernel void {name}(")
    nxt = src.find("kernel void ", start + 1)
    return src[start : nxt if nxt > 0 else len(src)]
