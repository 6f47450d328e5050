"""The C++ scan kernel (torch op through ctypes, and the ONNX Runtime custom-op library) against the float64 reference.

Needs the libraries from `python -m vmamba_export.build_kernels`; skips with that hint when they are not built.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from vmamba_export.kernels_paths import ort_library_path, scan_library_path
from vmamba_export.scan import native, selective_scan_reference

BUILD_HINT = "run `python -m vmamba_export.build_kernels`"
needs_scan = pytest.mark.skipif(scan_library_path() is None, reason=f"libvmamba_scan.so not built: {BUILD_HINT}")
needs_ort = pytest.mark.skipif(ort_library_path() is None, reason=f"libvmamba_ort.so not built: {BUILD_HINT}")

TOLERANCE = 1e-5  # relative L2 against the float64 reference


def make_inputs(
    batch: int,
    d_inner: int,
    d_state: int,
    height: int,
    width: int,
    delta_shift: float = 0.0,
    a_shift: float = 0.0,
    seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    """Random float32 inputs; delta_shift moves delta (pre-softplus), a_shift moves A_logs (|A| = exp(A_logs))."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    k = 4
    return (
        randn(batch, d_inner, height, width),
        randn(batch, k, d_inner, height, width) + delta_shift,
        randn(k * d_inner, d_state) * 0.5 + a_shift,
        randn(batch, k, d_state, height, width),
        randn(batch, k, d_state, height, width),
        randn(k * d_inner),
        randn(k * d_inner) * 0.1,
    )


def rel_l2(y: torch.Tensor | np.ndarray, ref: torch.Tensor) -> float:
    y = torch.as_tensor(y).double()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-300))


# (batch, d_inner, d_state, H, W, delta_shift, a_shift). Reference cost ~ L * directions Python steps: keep big L with
# small d_inner. d_inner 16k+-1 exercises the padded tail block; widths not multiples of the vector width exercise
# the transposes' scalar tails.
CASES = [
    (1, 16, 1, 1, 1, 0.0, 0.0),
    (1, 16, 16, 1, 1, 0.0, 0.0),
    (2, 17, 1, 3, 5, 0.0, 0.0),
    (2, 31, 16, 7, 4, 0.0, 0.0),
    (1, 40, 4, 5, 9, 0.0, 0.0),
    (3, 8, 3, 6, 6, 0.0, 0.0),
    (1, 33, 1, 14, 14, 10.0, 2.0),  # large dt and large |A|: decays underflow to 0
    (2, 20, 16, 9, 11, 10.0, 2.0),
    (1, 33, 1, 14, 14, -10.0, 0.0),  # tiny dt: softplus in its log1p(small) regime
    (2, 20, 16, 9, 11, -10.0, 0.0),
    (1, 3, 1, 56, 56, 0.0, 0.0),  # L = 3136, a real stage-1 map
    (1, 2, 16, 56, 56, 0.0, 0.0),
    (1, 5, 1, 24, 40, 0.0, 0.0),  # H != W
    (1, 4, 16, 40, 24, -3.0, 1.0),
]


@needs_scan
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}_di{}_n{}_{}x{}_dt{:+g}_a{:+g}".format(*c))
def test_native_matches_reference(case: tuple) -> None:
    args = make_inputs(*case)
    ref = selective_scan_reference(*args)
    y = native.selective_scan_2d(*args)
    assert y.shape == args[0].shape and y.dtype == torch.float32
    assert torch.isfinite(y).all()
    assert rel_l2(y, ref) <= TOLERANCE


@needs_scan
def test_torch_op_uses_native_kernel() -> None:
    args = make_inputs(2, 24, 16, 6, 7, seed=3)
    assert native.available()
    y = torch.ops.vmamba.selective_scan_2d(*args)
    assert rel_l2(y, selective_scan_reference(*args)) <= TOLERANCE


@needs_scan
@pytest.mark.parametrize("threads", [1, 2, 5])
def test_thread_counts_agree(threads: int) -> None:
    # Work items never share outputs, so any thread count gives bit-identical results.
    args = make_inputs(2, 40, 4, 8, 9, seed=5)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = native.selective_scan_2d(*args)
        torch.set_num_threads(threads)
        yn = native.selective_scan_2d(*args)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(y1, yn)


@needs_scan
@pytest.mark.parametrize("isa", ["generic", "x86-64-v3"])
def test_instruction_set_variants(isa: str) -> None:
    _run_with_isa(
        isa,
        "import torch\n"
        "from tests.test_native_kernel import make_inputs, rel_l2\n"
        "from vmamba_export.scan import native, selective_scan_reference\n"
        "for case in [(1, 17, 1, 5, 7, 0.0, 0.0), (2, 20, 16, 9, 11, 10.0, 2.0), (1, 9, 3, 4, 4, -10.0, 0.0)]:\n"
        "    args = make_inputs(*case)\n"
        "    err = rel_l2(native.selective_scan_2d(*args), selective_scan_reference(*args))\n"
        "    assert err <= 1e-5, (case, err)\n",
    )


def _run_with_isa(isa: str, code: str) -> None:
    """Run `code` in a child process with the kernel variant `isa` forced: the variant is picked once per process."""
    env = {**os.environ, "VMAMBA_SCAN_ISA": isa}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=_repo_root())
    assert proc.returncode == 0, proc.stderr[-2000:]


@needs_scan
def test_c_api_rejects_bad_arguments() -> None:
    lib = ctypes.CDLL(str(scan_library_path()))
    fn = lib.vmamba_selective_scan_2d_f32
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_int64] * 6 + [ctypes.c_int]
    args = make_inputs(1, 4, 1, 2, 2)
    y = torch.empty_like(args[0])
    ptrs = [t.data_ptr() for t in (*args, y)]
    assert fn(*ptrs, 1, 4, 4, 1, 2, 2, 1) == 0
    assert fn(*ptrs, 1, 3, 4, 1, 2, 2, 1) == 1  # k != 4
    assert fn(*ptrs, 1, 4, 4, 0, 2, 2, 1) == 1  # d_state 0
    assert fn(*([None] * 8), 1, 4, 4, 1, 2, 2, 1) == 1  # null pointers


@needs_scan
def test_arithmetic_floor_runs_every_row_on_any_thread_count() -> None:
    # The benchmark floor (benchmarks/cpu_profile.py) splits its rows into fixed work items: the checksum is the
    # same on 1 and 3 threads, finite, and changes with the number of rows (the loop is not optimised away).
    lib = ctypes.CDLL(str(scan_library_path()))
    fn = lib.vmamba_scan_arithmetic_floor
    fn.argtypes = [ctypes.c_int64, ctypes.c_int]
    fn.restype = ctypes.c_float
    one, three = fn(4096, 1), fn(4096, 3)
    assert np.isfinite(one) and one != 0.0
    assert one == three
    assert fn(8192, 2) != one


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- ONNX Runtime ----


def _one_node_model(d_state_dim: int | str = "N"):
    pytest.importorskip("onnx")
    from vmamba_export.lowering.onnx_export import one_node_scan_model

    model = one_node_scan_model(d_state_dim)
    return model.SerializeToString()


def _ort_session():
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.register_custom_ops_library(str(ort_library_path()))
    return ort.InferenceSession(_one_node_model(), options, providers=["CPUExecutionProvider"])


def _feeds(args: tuple[torch.Tensor, ...]) -> dict[str, np.ndarray]:
    names = ["u", "delta", "A_logs", "B", "C", "D", "delta_bias"]
    return {n: t.numpy() for n, t in zip(names, args)}


@needs_ort
@pytest.mark.parametrize(
    "case",
    [
        (1, 16, 1, 1, 1, 0.0, 0.0),
        (2, 17, 1, 5, 7, 0.0, 0.0),
        (2, 31, 16, 7, 4, 10.0, 2.0),
        (1, 20, 4, 6, 9, -10.0, 0.0),
        (1, 3, 1, 56, 56, 0.0, 0.0),
        (1, 2, 16, 40, 24, 0.0, 0.0),
    ],
    ids=lambda c: "b{}_di{}_n{}_{}x{}_dt{:+g}_a{:+g}".format(*c),
)
def test_ort_op_matches_reference(case: tuple) -> None:
    session = _ort_session()
    args = make_inputs(*case)
    (y,) = session.run(["y"], _feeds(args))
    assert y.shape == tuple(args[0].shape) and y.dtype == np.float32
    assert rel_l2(y, selective_scan_reference(*args)) <= TOLERANCE


@needs_ort
def test_ort_op_bad_shape_is_an_error() -> None:
    session = _ort_session()
    args = list(make_inputs(1, 8, 1, 4, 4))
    args[5] = torch.randn(7)  # D must be (4 * Di,) = (32,)
    with pytest.raises(Exception, match="input 'D' must have shape"):
        session.run(["y"], _feeds(tuple(args)))
    args = list(make_inputs(1, 8, 1, 4, 4))
    args[3] = torch.randn(1, 4, 1, 4, 5)  # B with the wrong width
    with pytest.raises(Exception, match="input 'B' must have shape"):
        session.run(["y"], _feeds(tuple(args)))
    # The session still works after the errors.
    good = make_inputs(1, 8, 1, 4, 4)
    (y,) = session.run(["y"], _feeds(good))
    assert rel_l2(y, selective_scan_reference(*good)) <= TOLERANCE


# ---- ONNX Runtime, dt projection fused into the op (input 8, dt_weight) ----

# (batch, d_inner, d_state, H, W, dt_rank): ranks up to 8 are projected inside the scan loop (the d_state-1 pair
# loop on AVX-512, the generic loop for d_state 16), larger ones into the delta tile first; d_inner 17 and 40 end
# in a padded block.
FUSED_CASES = [
    (1, 16, 1, 1, 1, 1),
    (2, 17, 1, 5, 7, 6),
    (1, 40, 1, 14, 14, 8),
    (2, 31, 16, 7, 4, 6),
    (1, 24, 1, 9, 11, 12),
    (1, 40, 16, 6, 5, 24),
]


def _fused_session(d_state: int):
    """An ONNX Runtime session of one SelectiveScan2D node with the 8th input dt_weight: delta (the projection's
    input) and dt_weight of any shape, so the op's own shape checks are what a test meets."""
    import onnx
    import onnxruntime as ort

    from vmamba_export.lowering.onnx_export import one_node_scan_model

    model = one_node_scan_model(d_state)
    model.graph.node[0].input.append("dt_weight")
    model.graph.input.append(onnx.helper.make_tensor_value_info("dt_weight", onnx.TensorProto.FLOAT, None))
    next(i for i in model.graph.input if i.name == "delta").type.tensor_type.ClearField("shape")
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(ort_library_path()))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def fused_projection_error(case: tuple, seed: int = 0) -> float:
    """Relative L2 error of the fused op (delta from the projection's input and weights) against the float64
    reference scan of the projected delta."""

    batch, d_inner, d_state, height, width, rank = case
    args = list(make_inputs(batch, d_inner, d_state, height, width, seed=seed))
    g = torch.Generator().manual_seed(seed + 1)
    low = torch.randn(batch, 4 * rank, height, width, generator=g)
    weight = torch.randn(4, d_inner, rank, generator=g) / rank**0.5
    args[1] = torch.einsum("kdj,bkjhw->bkdhw", weight.double(), low.double().view(batch, 4, rank, height, width))
    session = _fused_session(d_state)
    feeds = _feeds(tuple(a.float() for a in args))
    feeds.update(delta=low.numpy(), dt_weight=weight.numpy())
    (y,) = session.run(["y"], feeds)
    return rel_l2(y, selective_scan_reference(*args))


@needs_ort
@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: "b{}_di{}_n{}_{}x{}_r{}".format(*c))
def test_ort_op_with_fused_dt_projection_matches_reference(case: tuple) -> None:
    pytest.importorskip("onnxruntime")
    assert fused_projection_error(case) <= TOLERANCE


@needs_ort
@pytest.mark.parametrize("isa", ["generic", "x86-64-v3"])
def test_fused_dt_projection_on_instruction_set_variants(isa: str) -> None:
    pytest.importorskip("onnxruntime")
    _run_with_isa(
        isa,
        "from tests.test_native_kernel import FUSED_CASES, fused_projection_error\n"
        "for case in FUSED_CASES:\n"
        "    err = fused_projection_error(case)\n"
        "    assert err <= 1e-5, (case, err)\n",
    )


@needs_ort
def test_ort_op_fused_dt_projection_bad_shapes_are_errors() -> None:
    pytest.importorskip("onnxruntime")
    session = _fused_session(1)
    feeds = _feeds(make_inputs(1, 8, 1, 4, 4))
    feeds["delta"] = np.zeros((1, 12, 4, 4), np.float32)  # 4 directions x rank 3
    feeds["dt_weight"] = np.zeros((4, 9, 3), np.float32)  # Di must be 8
    with pytest.raises(Exception, match=r"input 'dt_weight' must be \(K, Di, R\) with Di = 8"):
        session.run(["y"], feeds)
    feeds["dt_weight"] = np.zeros((4, 8, 2), np.float32)  # rank 2: delta must be (1, 8, 4, 4)
    with pytest.raises(Exception, match=r"with dt_weight, input 'delta' must be \(B, K\*R, H, W\)"):
        session.run(["y"], feeds)
