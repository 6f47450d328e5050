"""CUDA kernels built for the host by tests/cuda_emulation (each block's threads as CPU threads, barriers and warp
shuffles emulated) and checked against float64 numpy: what the kernel computes (index arithmetic, tiles, bounds,
barriers, the warp reductions), on a machine without a GPU. Speed is not checked here, and the GPU tests
(tests/test_cuda.py) run the same sources compiled by nvcc."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from cuda_emulation import emulate

pytestmark = pytest.mark.skipif(not emulate.available(), reason="no C++20 compiler with _Float16 (GCC >= 12)")

F32, F16 = 0, 1


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """name -> kernels/cuda/<name>.cu built for the host (once per module)."""
    folder = tmp_path_factory.mktemp("emulated")
    built: dict[str, ctypes.CDLL] = {}

    def library(name: str) -> ctypes.CDLL:
        if name not in built:
            built[name] = emulate.build(name, folder)
        return built[name]

    return library


def _signed(lib: ctypes.CDLL, *names: str) -> ctypes.CDLL:
    """`lib` with the named entry points given the signatures the GPU library is called with (cuda_kernel.py)."""
    from vmamba_export.cuda_kernel import _SIGNATURES

    for name in names:
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = _SIGNATURES[name]
    return lib


@pytest.fixture(scope="module")
def conv_projections(emulated) -> ctypes.CDLL:
    prefix = "vmamba_depthwise_conv_projections_cuda"
    return _signed(emulated("conv_projections"), prefix, f"{prefix}_set_tile", f"{prefix}_tile")


def _silu(v):
    return v / (1.0 + np.exp(-v))


def conv_projections_reference(x, conv_w, conv_b, w_x, dt_w, np_type):
    """u, delta, B, C of DepthwiseConvProjections in float64 from the op's inputs (x channels-last), u rounded to the
    tensor type before the projections as the op does."""
    batch, height, width, di = x.shape
    rank = dt_w.shape[2]
    n = (w_x.shape[0] - 4 * rank) // 8
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    conv = np.zeros((batch, height, width, di)) + (conv_b if conv_b is not None else 0.0)
    for i in range(3):
        for j in range(3):
            conv += padded[:, i : i + height, j : j + width, :] * conv_w[:, 0, i, j]
    u = _silu(conv).astype(np_type).astype(np.float64).transpose(0, 3, 1, 2).reshape(batch, di, height * width)
    xs = np.einsum("jc,bcp->bjp", w_x, u)
    delta = np.einsum("kcr,bkrp->bkcp", dt_w, xs[:, : 4 * rank].reshape(batch, 4, rank, -1))
    shape = (batch, 4, -1, height, width)
    return {
        "u": u.reshape(batch, di, height, width),
        "delta": delta.reshape(shape),
        "B": xs[:, 4 * rank : 4 * rank + 4 * n].reshape(shape),
        "C": xs[:, 4 * rank + 4 * n :].reshape(shape),
    }


def _rel_l2(got, want) -> float:
    return float(np.linalg.norm(got.astype(np.float64) - want) / max(np.linalg.norm(want), 1e-30))


# (batch, H, W, Di, R, N): maps that leave the last tile partial and tiles that cross map rows, a 1 x 1 map (padding
# only), batch 2, d_state 2, Di not a multiple of 32 (lanes past the channels), R larger than the warp count
SHAPES = [(1, 5, 7, 96, 6, 1), (2, 3, 4, 38, 3, 2), (1, 1, 1, 64, 4, 1), (1, 4, 3, 192, 12, 1)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tile", [0, 1, 2, 4, 8, 16, 32])
@pytest.mark.parametrize("float16", [False, True])
def test_depthwise_conv_projections_kernel_matches_float64(conv_projections, shape, tile, float16):
    batch, height, width, di, rank, n = shape
    np_type = np.float16 if float16 else np.float32
    rng = np.random.default_rng(abs(hash(shape)) % 2**32)
    inputs = {
        "x": rng.standard_normal((batch, height, width, di)),
        "conv_w": rng.standard_normal((di, 1, 3, 3)) / 3,
        "conv_b": rng.standard_normal(di) / 3 if batch == 2 else None,
        "w_x": rng.standard_normal((4 * rank + 8 * n, di)) / di**0.5,
        "dt_w": rng.standard_normal((4, di, rank)) / rank**0.5,
    }
    typed = {k: None if v is None else np.ascontiguousarray(v, dtype=np_type) for k, v in inputs.items()}
    want = conv_projections_reference(
        *[None if v is None else v.astype(np.float64) for v in typed.values()], np_type=np_type
    )
    outputs = {key: np.full(value.shape, np.nan, dtype=np_type) for key, value in want.items()}
    assert conv_projections.vmamba_depthwise_conv_projections_cuda_set_tile(tile) == tile
    try:
        err = conv_projections.vmamba_depthwise_conv_projections_cuda(
            F16 if float16 else F32,
            *[None if v is None else v.ctypes.data for v in typed.values()],
            *[v.ctypes.data for v in outputs.values()],
            batch,
            height,
            width,
            di,
            rank,
            n,
            None,
        )
    finally:
        conv_projections.vmamba_depthwise_conv_projections_cuda_set_tile(0)
    assert err is None, err.decode()
    for name, got in outputs.items():
        assert np.isfinite(got).all(), f"{name}: positions left unwritten"
        assert _rel_l2(got, want[name]) < (1e-3 if float16 else 1e-6), name


def test_automatic_tile_fills_the_gpu_at_batch_1(conv_projections):
    """The automatic tile at vmamba_tiny's four stages at batch 1 (132 multiprocessors, as an H100): the largest tile
    that leaves at least one block for every two multiprocessors; at batch 8 the largest that fits shared memory, and a
    d_inner whose u tile fills shared memory takes a smaller one."""
    tile = conv_projections.vmamba_depthwise_conv_projections_cuda_tile
    stages = ((56, 96, 6), (28, 192, 12), (14, 384, 24), (7, 768, 48))
    assert [tile(1, side, side, di, rank, 1) for side, di, rank in stages] == [32, 32, 8, 2]
    assert [tile(8, side, side, di, rank, 1) for side, di, rank in stages] == [32, 32, 16, 8]
    assert tile(8, 56, 56, 1024, 64, 1) == 8  # 1024 x 33 floats are more than 48 KB; 1024 x 17 too; 1024 x 9 fit


def _typed(arrays: dict, float16: bool) -> dict:
    """The arrays in the kernel's type (float16 or float32), contiguous."""
    np_type = np.float16 if float16 else np.float32
    return {k: np.ascontiguousarray(v, dtype=np_type) for k, v in arrays.items()}


@pytest.mark.parametrize(
    ("shape", "float16"),
    # the last: 1024 blocks of one row, so tiles of four rows (float32 only: the slowest case here)
    [
        *[(s, f16) for s in ((1, 9, 40, 64), (2, 7, 9, 34), (1, 1, 1, 6)) for f16 in (False, True)],
        ((8, 16, 32, 1024), False),
    ],
)
def test_depthwise_conv_silu_kernel_matches_float64(emulated, shape, float16):
    """DepthwiseConvSiLU (kernels/cuda/depthwise_conv.cu, the default graph's kernel): partial column and channel
    tiles, a 1 x 1 map, and tiles of four rows, against the convolution and SiLU in float64."""
    lib = _signed(emulated("depthwise_conv"), "vmamba_depthwise_conv_silu_cuda")
    batch, height, width, channels = shape
    rng = np.random.default_rng(channels)
    typed = _typed(
        {"x": rng.standard_normal(shape), "w": rng.standard_normal((channels, 1, 3, 3)) / 3,
         "b": rng.standard_normal(channels) / 3},
        float16,
    )  # fmt: skip
    x, w, b = (typed[k].astype(np.float64) for k in ("x", "w", "b"))
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    conv = b + sum(padded[:, i : i + height, j : j + width, :] * w[:, 0, i, j] for i in range(3) for j in range(3))
    want = _silu(conv).transpose(0, 3, 1, 2)
    got = np.full(want.shape, np.nan, dtype=typed["x"].dtype)
    pointers = [typed[k].ctypes.data for k in ("x", "w", "b")] + [got.ctypes.data]
    err = lib.vmamba_depthwise_conv_silu_cuda(F16 if float16 else F32, *pointers, *shape, None)
    assert err is None, err.decode()
    assert _rel_l2(got, want) < (1e-3 if float16 else 1e-6)


@pytest.mark.parametrize(
    "shape",
    # (batch, Di, R, N, H, W): row groups of 4 and of 8, d_state 16 rows, a map smaller than a tile, Di not a multiple
    # of 4, and 16 K positions (two a lane)
    [(1, 96, 6, 1, 14, 14), (2, 64, 4, 16, 9, 11), (3, 40, 3, 1, 1, 2), (2, 38, 5, 1, 6, 10), (4, 32, 2, 1, 64, 64)],
)
@pytest.mark.parametrize("float16", [False, True])
def test_scan_projections_kernels_match_float64(emulated, shape, float16):
    """ScanProjections (kernels/cuda/scan_projections.cu, the default batch-1 graph's two kernels): delta, B and C
    against x = W_x u and delta = dt_weight x_dt in float64."""
    lib = _signed(emulated("scan_projections"), "vmamba_scan_projections_cuda")
    batch, di, rank, n, h, w = shape
    rng = np.random.default_rng(di)
    typed = _typed(
        {"u": rng.standard_normal((batch, di, h * w)), "w_x": rng.standard_normal((4 * rank + 8 * n, di)) / di**0.5,
         "dt": rng.standard_normal((4, di, rank)) / rank**0.5},
        float16,
    )  # fmt: skip
    u, w_x, dt = (typed[k].astype(np.float64) for k in ("u", "w_x", "dt"))
    x = np.einsum("jc,bcp->bjp", w_x, u)
    want = {
        "delta": np.einsum("kcr,bkrp->bkcp", dt, x[:, : 4 * rank].reshape(batch, 4, rank, -1)),
        "B": x[:, 4 * rank : 4 * rank + 4 * n].reshape(batch, 4, n, -1),
        "C": x[:, 4 * rank + 4 * n :].reshape(batch, 4, n, -1),
    }
    got = {k: np.full(v.shape, np.nan, dtype=typed["u"].dtype) for k, v in want.items()}
    pointers = [typed[k].ctypes.data for k in ("u", "w_x", "dt")] + [v.ctypes.data for v in got.values()]
    err = lib.vmamba_scan_projections_cuda(F16 if float16 else F32, *pointers, batch, di, rank, n, h * w, None)
    assert err is None, err.decode()
    for name, out in got.items():
        assert _rel_l2(out, want[name]) < (1e-3 if float16 else 1e-6), name


# (batch, Di, N, H, W) per kernel: warp kernel (2 and 8 steps a lane, idle lanes), line kernel (partial 8-step chunks
# at the row ends; 7-step chunks), block kernel, d_state 16 (the fallback kernel)
SCAN_SHAPES = [(2, 3, 1, 7, 9), (1, 2, 1, 14, 14), (1, 2, 1, 16, 20), (2, 2, 1, 28, 30), (2, 3, 16, 9, 7)]
# Not the chunked shared-memory kernel ("smem", and "auto" at d_state 16, which takes it): under the emulation its
# threads wait on each other for ever (its split lanes' shuffles are not the uniform, whole-warp kind the shim
# emulates); the GPU tests cover it.
SCAN_VARIANTS = ["auto", "warps", "lines", "block1", "block2", "global"]


@pytest.mark.parametrize("shape", SCAN_SHAPES)
@pytest.mark.parametrize("variant", SCAN_VARIANTS)
@pytest.mark.parametrize("float16", [False, True])
def test_selective_scan_kernels_match_float64(emulated, shape, variant, float16):
    """The scan kernels (kernels/cuda/selective_scan_2d.cu), each path forced as tests/test_cuda.py forces it on a
    GPU, against the float64 reference scan (vmamba_export.scan); exp2 stands in for the special-function ex2."""
    import torch
    from test_cuda import _inputs  # the GPU test's inputs for the same kernels

    from vmamba_export import cuda_kernel
    from vmamba_export.scan import selective_scan_reference

    if variant in ("block1", "block2", "lines", "warps") and shape[2] != 1:
        pytest.skip("the block, line and warp kernels are d_state-1 paths")
    if variant == "auto" and shape[2] != 1:
        pytest.skip("automatic at d_state 16 is the chunked shared-memory kernel, not emulated (SCAN_VARIANTS)")
    lib = _signed(emulated("selective_scan_2d"), *[name for name in cuda_kernel._SIGNATURES if "scan_2d" in name])
    batch, di, n, h, w = shape
    typed = [t.contiguous() for t in _inputs(*shape, torch.float16 if float16 else torch.float32)]
    want = selective_scan_reference(*[t.double() for t in typed]).numpy()
    y = torch.full_like(typed[0], float("nan"))
    cuda_kernel.apply_variant(variant, lib)
    try:
        err = lib.vmamba_selective_scan_2d_cuda(
            F16 if float16 else F32, *[t.data_ptr() for t in (*typed, y)], batch, di, n, h, w, None
        )
        config = cuda_kernel.last_config(lib)
    finally:
        cuda_kernel.apply_variant("auto", lib)
    if err is not None and variant in ("lines", "warps") and b"kernel takes maps" in err:
        pytest.skip(f"the map is too large for the {variant} kernel: {err.decode()}")
    assert err is None, err.decode()
    want_path = {"block1": "block", "block2": "block"}.get(variant, variant)
    if variant != "auto":
        assert config.startswith(want_path), config
    assert _rel_l2(y.double().numpy(), want) < (3e-3 if float16 else 2e-5), config
