"""The CUDA scan kernel called directly (ctypes) on torch CUDA tensors: for tests and benchmarks on a GPU machine.

The kernel lives in libvmamba_ort_cuda.so (`python -m vmamba_export.build_kernels --cuda`), whose C launcher
`vmamba_selective_scan_2d_cuda` (kernels/cuda/selective_scan_2d.cuh) queues on a given stream. Models never go
through here: artifacts run it inside ONNX Runtime.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from .errors import TargetUnavailableError
from .kernels_paths import ort_cuda_library_path

F32, F16 = 0, 1
PATHS = {"auto": 0, "smem": 1, "global": 2, "block": 3, "lines": 4, "warps": 5}


_I, _P, _L = ctypes.c_int, ctypes.c_void_p, ctypes.c_int64


def _launcher(pointers: int, sizes: int) -> tuple:
    """A C launcher's signature: (dtype, `pointers` device pointers, `sizes` int64 sizes, stream) -> message or null."""
    return ctypes.c_char_p, [_I] + [_P] * pointers + [_L] * sizes + [_P]


# The library's C entry points: name -> (restype, argtypes)
_SIGNATURES = {
    "vmamba_selective_scan_2d_cuda": _launcher(8, 5),
    "vmamba_selective_scan_2d_packed_cuda": _launcher(7, 6),
    "vmamba_selective_scan_2d_merged_cuda": (ctypes.c_char_p, [_I, _P, _P, _L, _P, _L] + [_P] * 4 + [_L] * 5 + [_P]),
    "vmamba_scan_projections_cuda": _launcher(6, 5),
    "vmamba_narrow_pointwise_conv_cuda": _launcher(3, 4),
    "vmamba_depthwise_conv_silu_cuda": _launcher(4, 4),
    "vmamba_depthwise_conv_projections_cuda": _launcher(9, 6),
    "vmamba_depthwise_conv_projections_cuda_set_tile": (_I, [_I]),
    "vmamba_depthwise_conv_projections_cuda_tile": (_I, [_L] * 6),
    "vmamba_selective_scan_2d_cuda_force_path": (None, [_I]),
    "vmamba_selective_scan_2d_cuda_last_config": (ctypes.c_char_p, []),
    "vmamba_selective_scan_2d_cuda_set_tuning": (None, [_I, _I]),
    "vmamba_selective_scan_2d_cuda_set_block_variant": (None, [_I]),
    "vmamba_scan_floor": (ctypes.c_char_p, [_I, _I, _I, _P, _P]),
    "vmamba_scan_floor_threads": (_I, []),
    "vmamba_exp2_poly": (ctypes.c_char_p, [_P, _P, _L, _P]),
}


@functools.cache
def load_library(path: str | None = None) -> ctypes.CDLL:
    lib_path = Path(path) if path else ort_cuda_library_path()
    if lib_path is None:
        raise TargetUnavailableError("libvmamba_ort_cuda.so is not built: python -m vmamba_export.build_kernels --cuda")
    lib = ctypes.CDLL(str(lib_path))
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def force_path(path: str = "auto", lib: ctypes.CDLL | None = None) -> None:
    """Pick the kernel path for later calls: "auto", "warps" (warp kernel, d_state 1, maps up to 256 positions),
    "lines" (line kernel, d_state 1, maps up to about 56 x 56), "block" (block scan, d_state 1), "smem" (chunked
    shared-memory kernel) or "global" (fallback)."""
    (lib or load_library()).vmamba_selective_scan_2d_cuda_force_path(PATHS[path])


def set_tuning(channels_per_block: int = 0, chunk_threads: int = 0, lib: ctypes.CDLL | None = None) -> None:
    """Channels per block of the shared-memory and line kernels, chunk threads per channel of the shared-memory
    kernel (0: automatic)."""
    (lib or load_library()).vmamba_selective_scan_2d_cuda_set_tuning(channels_per_block, chunk_threads)


def set_block_variant(variant: int = 0, lib: ctypes.CDLL | None = None) -> None:
    """Block-scan kernel variant: 0 automatic, 1 one channel a block, 2 two channels, 4 two channels uncapped."""
    (lib or load_library()).vmamba_selective_scan_2d_cuda_set_block_variant(variant)


# set_block_variant's argument per variant name (bits documented in kernels/cuda/selective_scan_2d.cuh)
BLOCK_VARIANT_BITS = {
    "block1": 1,
    "block2": 2,
    "block2r": 4,
    "block2s": 2 + 8,
    "block2odd": 2 + 32,
    "smem-chmajor": 16,
    "smem-nosplit": 64,
    "lines-noprefetch": 128,
    "nowarps": 256,
    "packed-unpack": 512,
}


def apply_variant(variant: str, lib: ctypes.CDLL | None = None) -> None:
    """Select a kernel variant by name for tests and benchmarks (reset with "auto").

    auto, warps, lines, block, global, smem: paths; nowarps: automatic without the warp kernel;
    lines1 / lines4: the line kernel with one / four channels a block;
    lines-noprefetch: the line kernel without its L2 prefetch;
    block1 / block2: the block kernel with one / two channels a block
    (block2 falls back to one when d_inner is odd); block2r: two channels, registers uncapped; block2s: two
    channels, scalar staging loads; tile3: the chunked kernel
    with 3 channels a block (partial tiles when Di % 3 != 0); chunks3: the chunked kernel with 3 chunks of lines;
    smem-chmajor: the chunked kernel with its threads channel-major (the lanes of a warp on 32 lines of one channel);
    block2odd: two channels, planes at the odd row stride (not the one with the fewest bank conflicts);
    smem-nosplit: the chunked kernel with one lane per (channel, chunk) for all 16 states (default for d_state 16:
    two lanes, eight states each); packed-unpack: automatic, but the packed op's X is unpacked rather than read in
    place by the line kernel.
    """
    path = "block" if variant.startswith("block") else {"tile3": "smem", "chunks3": "smem"}.get(variant, variant)
    path = "smem" if variant in ("smem-chmajor", "smem-nosplit") else path
    path = "lines" if variant.startswith("lines") else path
    path = "auto" if variant in ("nowarps", "packed-unpack") else path
    force_path(path, lib)
    channels = {"tile3": 3, "lines1": 1, "lines4": 4}.get(variant, 0)
    set_tuning(channels, 3 if variant == "chunks3" else 0, lib)
    set_block_variant(BLOCK_VARIANT_BITS.get(variant, 0), lib)


KERNEL_VARIANTS = (
    "auto",
    "warps",
    "lines",
    "lines1",
    "lines4",
    "block1",
    "block2",
    "block2s",
    "block2odd",
    "smem",
    "smem-chmajor",
    "smem-nosplit",
    "tile3",
    "chunks3",
    "global",
)


def last_config(lib: ctypes.CDLL | None = None) -> str:
    return (lib or load_library()).vmamba_selective_scan_2d_cuda_last_config().decode()


def _check_tensors(tensors: tuple[torch.Tensor, ...]) -> torch.dtype:
    dtype = tensors[0].dtype
    if dtype not in (torch.float32, torch.float16):
        raise TypeError(f"float32 or float16 tensors expected, got {dtype}")
    for t in tensors:
        if not t.is_cuda or t.dtype != dtype or not t.is_contiguous():
            raise ValueError("every input must be a contiguous CUDA tensor of u's dtype")
    return dtype


def _launch(name: str, dtype: torch.dtype, device: torch.device, *args) -> None:
    """Queue the library's C launcher `name` on torch's current stream of `device`: its dtype code, `args`, the
    stream; a launcher's message becomes a RuntimeError naming it."""
    stream = torch.cuda.current_stream(device).cuda_stream
    err = getattr(load_library(), name)(F16 if dtype == torch.float16 else F32, *args, stream)
    if err is not None:
        raise RuntimeError(f"{name}: {err.decode()}")


def selective_scan_2d_cuda(u, delta, A_logs, B, C, D, delta_bias, out: torch.Tensor | None = None) -> torch.Tensor:
    """y for CUDA tensors, all float32 or all float16 (contiguous), on torch's current stream."""
    tensors = (u, delta, A_logs, B, C, D, delta_bias)
    dtype = _check_tensors(tensors)
    batch, d_inner, height, width = u.shape
    d_state = A_logs.shape[1]
    y = out if out is not None else torch.empty_like(u)
    pointers = [t.data_ptr() for t in (*tensors, y)]
    _launch("vmamba_selective_scan_2d_cuda", dtype, u.device, *pointers, batch, d_inner, d_state, height, width)
    return y


def selective_scan_2d_packed_cuda(u, x, dt_weight, A_logs, D, delta_bias, out: torch.Tensor | None = None):
    """y of the packed scan (SelectiveScan2DPacked, docs/scan-op.md): x (B, 4 R + 8 N, H, W) holds the dt-rank inputs,
    B and C; dt_weight (4, Di, R). CUDA tensors, all float32 or all float16, on torch's current stream."""
    tensors = (u, x, dt_weight, A_logs, D, delta_bias)
    dtype = _check_tensors(tensors)
    batch, d_inner, height, width = u.shape
    rank, d_state = dt_weight.shape[2], A_logs.shape[1]
    if tuple(x.shape) != (batch, 4 * rank + 8 * d_state, height, width):
        raise ValueError(f"x must be {(batch, 4 * rank + 8 * d_state, height, width)}, got {tuple(x.shape)}")
    y = out if out is not None else torch.empty_like(u)
    pointers = [t.data_ptr() for t in (*tensors, y)]
    _launch(
        "vmamba_selective_scan_2d_packed_cuda", dtype, u.device, *pointers, batch, d_inner, d_state, rank, height, width
    )
    return y


def selective_scan_2d_merged_cuda(u, delta, x, A_logs, D, delta_bias, out: torch.Tensor | None = None):
    """y of the merged scan (SelectiveScan2DMerged, docs/scan-op.md): delta (B, Cd, H*W) whose first 4 Di channels
    are the scan's delta, x (B, Cx, H*W) whose last 8 N channels are B then C (delta and x may be one tensor). CUDA
    tensors, all float32 or all float16, on torch's current stream."""
    tensors = (u, delta, x, A_logs, D, delta_bias)
    dtype = _check_tensors(tensors)
    batch, d_inner, height, width = u.shape
    d_state = A_logs.shape[1]
    for name, t, least in (("delta", delta, 4 * d_inner), ("x", x, 8 * d_state)):
        if t.dim() != 3 or t.shape[0] != batch or t.shape[2] != height * width or t.shape[1] < least:
            raise ValueError(f"{name} must be ({batch}, >= {least}, {height * width}), got {tuple(t.shape)}")
    y = out if out is not None else torch.empty_like(u)
    _launch(
        "vmamba_selective_scan_2d_merged_cuda",
        dtype,
        u.device,
        u.data_ptr(),
        delta.data_ptr(),
        delta.shape[1],
        x.data_ptr(),
        x.shape[1],
        *[t.data_ptr() for t in (A_logs, D, delta_bias, y)],
        batch,
        d_inner,
        d_state,
        height,
        width,
    )
    return y


def scan_projections_cuda(u, w_x, dt_weight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(delta, B, C) of the ScanProjections op (kernels/cuda/scan_projections.cuh): u (N, Di, H, W), w_x (4 R + 8 S,
    Di), dt_weight (4, Di, R). CUDA tensors, all float32 or all float16, on torch's current stream."""
    dtype = _check_tensors((u, w_x, dt_weight))
    batch, d_inner, height, width = u.shape
    rank = dt_weight.shape[2]
    d_state = (w_x.shape[0] - 4 * rank) // 8
    if tuple(dt_weight.shape) != (4, d_inner, rank) or tuple(w_x.shape) != (4 * rank + 8 * d_state, d_inner):
        raise ValueError(f"w_x {tuple(w_x.shape)} and dt_weight {tuple(dt_weight.shape)} do not fit u {tuple(u.shape)}")
    delta = u.new_empty((batch, 4, d_inner, height, width))
    b, c = (u.new_empty((batch, 4, d_state, height, width)) for _ in range(2))
    pointers = [t.data_ptr() for t in (u, w_x, dt_weight, delta, b, c)]
    _launch("vmamba_scan_projections_cuda", dtype, u.device, *pointers, batch, d_inner, rank, d_state, height * width)
    return delta, b, c


def narrow_pointwise_conv_cuda(x, weight) -> torch.Tensor:
    """y = Conv(x, weight), 1 x 1 and bias-free, of the NarrowPointwiseConv op (kernels/cuda/scan_projections.cuh):
    x (N, C, H, W), weight (M, C, 1, 1). CUDA tensors, both float32 or both float16, on torch's current stream."""
    dtype = _check_tensors((x, weight))
    batch, channels, height, width = x.shape
    if weight.dim() != 4 or weight.shape[1] != channels or tuple(weight.shape[2:]) != (1, 1):
        raise ValueError(f"weight must be (M, {channels}, 1, 1), got {tuple(weight.shape)}")
    y = x.new_empty((batch, weight.shape[0], height, width))
    pointers = [t.data_ptr() for t in (x, weight, y)]
    rows = weight.shape[0]
    _launch("vmamba_narrow_pointwise_conv_cuda", dtype, x.device, *pointers, batch, channels, rows, height * width)
    return y


def depthwise_conv_silu_cuda(x, weight, bias=None) -> torch.Tensor:
    """y (N, C, H, W) of the DepthwiseConvSiLU op (kernels/cuda/depthwise_conv.cuh): x (N, H, W, C) channels-last,
    weight (C, 1, 3, 3), bias (C,) or None. CUDA tensors of one dtype, on torch's current stream."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    dtype = _check_tensors(tensors)
    batch, height, width, channels = x.shape
    y = x.new_empty((batch, channels, height, width))
    bias_ptr = None if bias is None else bias.data_ptr()
    pointers = [x.data_ptr(), weight.data_ptr(), bias_ptr, y.data_ptr()]
    _launch("vmamba_depthwise_conv_silu_cuda", dtype, x.device, *pointers, batch, height, width, channels)
    return y


def depthwise_conv_projections_cuda(x, weight, w_x, dt_weight, bias=None) -> tuple[torch.Tensor, ...]:
    """(u, delta, B, C) of the DepthwiseConvProjections op (kernels/cuda/conv_projections.cuh): x (N, H, W, Di)
    channels-last, weight (Di, 1, 3, 3), w_x (4 R + 8 S, Di), dt_weight (4, Di, R), bias (Di,) or None. CUDA tensors
    of one dtype, on torch's current stream."""
    tensors = (x, weight, w_x, dt_weight) if bias is None else (x, weight, w_x, dt_weight, bias)
    dtype = _check_tensors(tensors)
    batch, height, width, d_inner = x.shape
    rank = dt_weight.shape[2]
    d_state = (w_x.shape[0] - 4 * rank) // 8
    if tuple(dt_weight.shape) != (4, d_inner, rank) or tuple(w_x.shape) != (4 * rank + 8 * d_state, d_inner):
        raise ValueError(f"w_x {tuple(w_x.shape)} and dt_weight {tuple(dt_weight.shape)} do not fit x {tuple(x.shape)}")
    u = x.new_empty((batch, d_inner, height, width))
    delta = x.new_empty((batch, 4, d_inner, height, width))
    b, c = (x.new_empty((batch, 4, d_state, height, width)) for _ in range(2))
    pointers = [x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr()]
    pointers += [t.data_ptr() for t in (w_x, dt_weight, u, delta, b, c)]
    sizes = (batch, height, width, d_inner, rank, d_state)
    _launch("vmamba_depthwise_conv_projections_cuda", dtype, x.device, *pointers, *sizes)
    return u, delta, b, c


def set_conv_projections_tile(tile: int = 0) -> int:
    """Positions a DepthwiseConvProjections block takes in later calls: 1, 2, 4, 8, 16, 32, or 0 (automatic)."""
    return load_library().vmamba_depthwise_conv_projections_cuda_set_tile(tile)


def conv_projections_tile(batch: int, height: int, width: int, d_inner: int, rank: int, d_state: int) -> int:
    """The tile a DepthwiseConvProjections call of these sizes takes on the current GPU."""
    return load_library().vmamba_depthwise_conv_projections_cuda_tile(batch, height, width, d_inner, rank, d_state)


# The d_state-16 scan's arithmetic floor (kernels/cuda/scan_floor.cu): exponentials on the FMA-pipe polynomial for
# this many of the 16 states, the rest on the special-function units.
FLOOR_POLY_STATES = (0, 2, 3, 4, 5, 6, 8, 16)


def scan_floor_rate(poly_states: int, steps: int = 2048, waves: int = 8, runs: int = 5) -> float:
    """State elements per second that the register-only d_state-16 scan step (scan_floor.cu) reaches on the current
    GPU with `poly_states` polynomial exponentials: an upper bound on any d_state-16 scan kernel's rate."""
    from .bench import cuda_time_ms

    lib = load_library()
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    threads = lib.vmamba_scan_floor_threads()
    blocks = props.multi_processor_count * waves * (2048 // threads)
    out = torch.empty(blocks * threads, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream

    def run() -> None:
        err = lib.vmamba_scan_floor(poly_states, blocks, steps, out.data_ptr(), stream)
        if err is not None:
            raise RuntimeError(f"vmamba_scan_floor: {err.decode()}")

    ms = cuda_time_ms(run, runs=runs)
    if not torch.isfinite(out).all():
        raise RuntimeError("scan floor kernel produced non-finite sums")
    return blocks * threads * steps * 16 / (ms * 1e-3)


def exp2_poly(x: torch.Tensor) -> torch.Tensor:
    """2^x (float32 CUDA tensor, x >= -126) by the floor kernel's FMA-pipe polynomial."""
    if not x.is_cuda or x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError("a contiguous float32 CUDA tensor expected")
    y = torch.empty_like(x)
    err = load_library().vmamba_exp2_poly(
        x.data_ptr(), y.data_ptr(), x.numel(), torch.cuda.current_stream().cuda_stream
    )
    if err is not None:
        raise RuntimeError(f"vmamba_exp2_poly: {err.decode()}")
    return y
