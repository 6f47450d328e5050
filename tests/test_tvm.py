"""TVM targets: the TIR scan kernel against the float64 reference, cpu-tvm artifacts against PyTorch, cuda-tvm and
metal-tvm code generation (no GPU here: the generated device source is checked, not run)."""

from __future__ import annotations

import json
import re
import shutil
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
from vmamba_export.lowering import ExportOptions  # noqa: E402
from vmamba_export.lowering.tvm_scan import fast_exp_nonpos, fast_softplus, scheduled_scan  # noqa: E402
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


def test_fast_math_matches_float64_on_extreme_inputs():
    """The polynomial exp/softplus of the CPU scan kernel, over the whole float range the kernel can see."""
    from tvm.script import tirx as T

    x = np.concatenate([[-1e4, -120.0, -87.5, -87.0, -30.0, -1e-6, 0.0, 1e-6, 19.99, 20.0, 20.01, 90.0]])
    x = np.concatenate([x, np.linspace(-40.0, 40.0, 4001)]).astype(np.float32)
    n = len(x)

    @T.prim_func
    def f(a: T.Buffer((n,), "float32"), e: T.Buffer((n,), "float32"), sp: T.Buffer((n,), "float32")):
        for i in range(n):
            e[i] = fast_exp_nonpos(T.min(a[i], T.float32(0)))
            sp[i] = fast_softplus(a[i])

    lib = tvm.compile(tvm.IRModule({"main": f}), target=Target({"kind": "llvm", "num-cores": 2}))
    e, sp = tvm.runtime.empty((n,), "float32"), tvm.runtime.empty((n,), "float32")
    lib["main"](tvm.runtime.tensor(x), e, sp)
    x64 = x.astype(np.float64)
    exp_ref = np.exp(np.minimum(x64, 0.0))
    sp_ref = np.where(x64 > 20, x64, np.log1p(np.exp(np.minimum(x64, 20))))
    # relative error within a few float32 ulps; exp below -87 flushes to 0 (absolute error < 2e-38)
    assert np.all(np.abs(e.numpy() - exp_ref) <= 4e-7 * exp_ref + 2e-38)
    assert np.all(np.abs(sp.numpy() - sp_ref) <= 4e-7 * sp_ref + 2e-38)


def test_polynomial_activations_match_float64_and_leave_no_libm_call():
    """cpu-tvm's GELU and sigmoid (lowering/tvm_fast_math.py) against float64, over the range they can see; the
    legalized functions must hold no erf/exp intrinsic (LLVM's scalar libm calls are what they replace)."""
    from scipy.special import erf
    from tvm import relax
    from tvm.script import relax as R

    from vmamba_export.lowering.tvm_fast_math import polynomial_activations

    x = np.concatenate([[-1e4, -90.0, -20.0, -9.0, -4.0, -1e-6, 0.0, 1e-6, 4.0, 9.0, 90.0, 1e4]])
    x = np.concatenate([x, np.linspace(-12.0, 12.0, 4001)]).astype(np.float32)
    n = len(x)

    @tvm.script.ir_module
    class Activations:
        @R.function
        def main(a: R.Tensor((n,), "float32")):
            with R.dataflow():
                g = R.nn.gelu(a)
                s = R.sigmoid(a)
                out = R.concat((g, s))
                R.output(out)
            return out

    mod, replaced = polynomial_activations(Activations)
    assert replaced == {"relax.nn.gelu": 1, "relax.sigmoid": 1}
    legalized = relax.get_pipeline("zero")(mod)
    tir_text = "\n".join(f.script() for _, f in legalized.functions_items() if not isinstance(f, relax.Function))
    assert "T.erf" not in tir_text and "T.exp" not in tir_text and "T.sigmoid" not in tir_text
    executable = tvm.compile(mod, target=Target({"kind": "llvm", "num-cores": 2}))
    out = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    x64 = x.astype(np.float64)
    gelu_ref = 0.5 * x64 * (1.0 + erf(x64 / np.sqrt(2.0)))
    sigmoid_ref = 0.5 * (1.0 + np.tanh(0.5 * x64))
    assert np.abs(out[:n] - gelu_ref).max() <= 2e-6 + 1e-6 * np.abs(gelu_ref).max()
    assert np.all(np.abs(out[:n] - gelu_ref) <= 2e-6 + 2e-7 * np.abs(gelu_ref))
    # sigmoid: relative to the value where it is not tiny, absolute (flushing below e^-87) where it is
    assert np.all(np.abs(out[n:] - sigmoid_ref) <= 1e-6 * sigmoid_ref + 1e-37)


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
    assert predictor.manifest["lowering"]["residual_layout"] == "channels-last"  # v2 by default, v0 by definition
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
    # every block's SiLUs as polynomial sigmoids (lowering/tvm_fast_math.py)
    assert m["lowering"]["polynomial_activations"]["relax.sigmoid"] >= m["lowering"]["scan_nodes"]
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


@pytest.mark.slow  # 80 s of MetaSchedule tuning: in `pytest -m slow`, out of the default suite's 20-minute budget
def test_cpu_tvm_tuning_saves_and_reuses_its_database(tmp_path):
    """A tiny tuning run (one round of the costliest op) on a small config: the schedule it found is in the artifact's
    database (hashed in the manifest), the artifact still matches PyTorch, and a second build started from that
    artifact tunes nothing and applies the same schedule."""
    source = resolve_model("vmamba_test_v0", random_weights=True, seed=1)
    first = tmp_path / "tuned"
    extra = {"tune_trials": 8, "tune_budget": 1, "show_progress": False}
    m = export_artifact(source, get_target("cpu-tvm"), first, max_size=SIZE, options=ExportOptions(extra=extra))
    tuning = m["lowering"]["tuning"]
    assert tuning["trials"] >= 1 and tuning["tuning_seconds"] > 0 and tuning["tasks_reused"] == 0
    assert 1 <= tuning["tasks_covered"] < tuning["tasks"]  # scan kernels are not tasks; the rest stays default
    assert {"tuning/database_workload.json", "tuning/database_tuning_record.json"} <= set(m["files"])
    assert m["lowering"]["tvm_target"]["mcpu"]  # tuned for this machine's CPU
    assert m["lowering"]["batch_range"] == [1, 1]  # meta-schedule tunes static shapes
    assert m["lowering"]["residual_layout"] == "channels-last"  # v0: channels-last by definition
    records = (first / "tuning" / "database_tuning_record.json").read_text()
    assert len(records.splitlines()) == tuning["tasks_covered"]  # the best record per tuned op, nothing else
    predictor = load(first)
    x = np.random.default_rng(0).standard_normal((3, 3, SIZE, SIZE), dtype=np.float32)  # 3 runs of the batch-1 lib
    out, ref = predictor(x), torch_logits("vmamba_test_v0", x)
    assert rel_l2(out, ref) <= 1e-5 and (out.argmax(1) == ref.argmax(1)).all()

    second = tmp_path / "reused"
    extra = {"tune_db": str(first), "show_progress": False}  # no budget: apply the database, tune nothing
    m2 = export_artifact(source, get_target("cpu-tvm"), second, max_size=SIZE, options=ExportOptions(extra=extra))
    t2 = m2["lowering"]["tuning"]
    assert t2["trials"] == 0 and t2["tuning_seconds"] == 0 and t2["database_from"] == str(first / "tuning")
    assert t2["tasks_reused"] == t2["tasks_covered"] == tuning["tasks_covered"]
    assert (second / "tuning" / "database_tuning_record.json").read_text() == records
    assert rel_l2(load(second)(x), ref) <= 1e-5

    third = tmp_path / "again"  # --tune-again: the covered ops are tuned further, from the database
    extra = {"tune_db": str(first), "tune_again": True, "tune_trials": 8, "tune_budget": 1, "show_progress": False}
    m3 = export_artifact(source, get_target("cpu-tvm"), third, max_size=SIZE, options=ExportOptions(extra=extra))
    t3 = m3["lowering"]["tuning"]
    assert t3["retune"] and t3["trials"] >= 1 and t3["tasks_reused"] == tuning["tasks_covered"]
    assert t3["tasks_covered"] >= tuning["tasks_covered"]
    assert rel_l2(load(third)(x), ref) <= 1e-5


def test_tuning_rounds_go_to_unmeasured_ops_first_then_where_the_time_is():
    from vmamba_export.lowering.tvm_tune import _TimeWeightedScheduler

    best_s = [None, 2e-3, 1e-3]  # op 0 not measured yet; op 1 takes twice op 2's time per call
    sched = _TimeWeightedScheduler(None, [1.0, 1.0, 1.0], best_s)
    assert sched._pick([0, 1, 2]) == 0
    best_s[0], sched.task_rounds[0] = 1e-4, 1
    assert sched._pick([0, 1, 2]) == 1  # the most time per image
    sched.task_rounds[1] = 8  # 2e-3 / sqrt(9) < 1e-3 / sqrt(1): the next round goes to op 2
    assert sched._pick([0, 1, 2]) == 2
    sched.weights[0] = 100.0  # called 100 times per image: 1e-2 s per image, the most
    assert sched._pick([0, 1, 2]) == 0
    assert sched._pick([1, 2]) == 2  # terminated tasks are not offered


def test_cpu_tvm_with_weights_outside_the_library(tmp_path):
    """separate_params (the cuda-tvm default): main takes the weights as inputs from params.bin, whose bytes are
    reproducible from the state_dict (the GPU check rebuilds the file from the seed)."""
    from vmamba_export.lowering.tvm_relax import params_bytes

    source = resolve_model("vmamba_test_v2", random_weights=True, seed=1)
    folder = tmp_path / "params"
    extra = {"separate_params": True}
    m = export_artifact(source, get_target("cpu-tvm"), folder, max_size=SIZE, options=ExportOptions(extra=extra))
    spec = m["entry"]["params"]
    assert spec["file"] == "params.bin" and "params.bin" in m["files"]
    assert params_bytes(source.model.state_dict(), spec) == (folder / "params.bin").read_bytes()
    largest = max(source.model.state_dict().values(), key=lambda t: t.numel()).numpy().tobytes()
    assert largest not in (folder / "model.so").read_bytes()  # code only: the weights are not compiled in
    x = np.random.default_rng(5).standard_normal((2, 3, SIZE, SIZE), dtype=np.float32)
    out, ref = load(folder)(x), torch_logits("vmamba_test_v2", x)
    assert rel_l2(out, ref) <= 1e-5


def test_tune_db_errors_are_actionable(tmp_path):
    from vmamba_export.errors import VMambaExportError
    from vmamba_export.lowering.tvm_tune import database_folder

    with pytest.raises(VMambaExportError, match="no meta-schedule database"):
        database_folder(tmp_path)


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
    # Weights beside the library, not in it; the kernels precompiled for the GPU machine's runtime-only loader.
    assert m["entry"]["params"]["file"] in m["files"]
    if shutil.which("nvcc"):
        assert m["entry"]["cuda_binary"] in m["files"] and m["lowering"]["cuda_binary"]["arch"] == "sm_90"
        assert (folder / m["entry"]["cuda_binary"]).read_bytes()[:4] == b"\x50\xed\x55\xba"  # fatbin magic
    if _cuda_visible():
        return  # a GPU here: test_cuda_tvm_runs_on_the_gpu runs it
    with pytest.raises(TargetUnavailableError):  # no GPU on this machine: a clear refusal, not a crash
        load(folder)


def _cuda_visible() -> bool:
    from vmamba_export.runtime.onnxruntime_backend import _cuda_device_count

    return _cuda_device_count() > 0


@pytest.mark.gpu
def test_cuda_tvm_runs_on_the_gpu(tmp_path):
    if not _cuda_visible():
        pytest.skip("no CUDA GPU visible")
    folder = tmp_path / "cuda"
    source = resolve_model("vmamba_test_v0", random_weights=True, seed=1)
    export_artifact(source, get_target("cuda-tvm"), folder, max_size=SIZE)
    x = np.random.default_rng(2).standard_normal((3, 3, SIZE, SIZE), dtype=np.float32)
    out, ref = load(folder)(x), torch_logits("vmamba_test_v0", x)
    assert rel_l2(out, ref) <= 1e-4 and (out.argmax(1) == ref.argmax(1)).all()


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
