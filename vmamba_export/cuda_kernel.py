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
PATHS = {"auto": 0, "smem": 1, "global": 2, "block": 3}


@functools.cache
def load_library(path: str | None = None) -> ctypes.CDLL:
    lib_path = Path(path) if path else ort_cuda_library_path()
    if lib_path is None:
        raise TargetUnavailableError("libvmamba_ort_cuda.so is not built: python -m vmamba_export.build_kernels --cuda")
    lib = ctypes.CDLL(str(lib_path))
    fn = lib.vmamba_selective_scan_2d_cuda
    fn.restype = ctypes.c_char_p
    fn.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 8 + [ctypes.c_int64] * 5 + [ctypes.c_void_p]
    lib.vmamba_selective_scan_2d_cuda_force_path.argtypes = [ctypes.c_int]
    lib.vmamba_selective_scan_2d_cuda_force_path.restype = None
    lib.vmamba_selective_scan_2d_cuda_last_config.restype = ctypes.c_char_p
    lib.vmamba_selective_scan_2d_cuda_set_tuning.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.vmamba_selective_scan_2d_cuda_set_tuning.restype = None
    lib.vmamba_selective_scan_2d_cuda_set_block_variant.argtypes = [ctypes.c_int]
    lib.vmamba_selective_scan_2d_cuda_set_block_variant.restype = None
    return lib


def force_path(path: str = "auto") -> None:
    """Pick the kernel path for later calls: "auto", "block" (block scan, d_state 1), "smem" (chunked
    shared-memory kernel) or "global" (fallback)."""
    load_library().vmamba_selective_scan_2d_cuda_force_path(PATHS[path])


def set_tuning(channels_per_block: int = 0, chunk_threads: int = 0) -> None:
    """Channels per block and chunk threads per channel of the shared-memory kernel (0: automatic)."""
    load_library().vmamba_selective_scan_2d_cuda_set_tuning(channels_per_block, chunk_threads)


def set_block_variant(variant: int = 0) -> None:
    """Block-scan kernel variant: 0 automatic, 1 one channel a block, 2 two channels, 4 two channels uncapped."""
    load_library().vmamba_selective_scan_2d_cuda_set_block_variant(variant)


# set_block_variant's argument per variant name (bits documented in kernels/cuda/selective_scan_2d.cuh)
BLOCK_VARIANT_BITS = {"block1": 1, "block2": 2, "block2r": 4, "block2s": 2 + 8, "block2odd": 2 + 32, "smem-chmajor": 16}


def apply_variant(variant: str) -> None:
    """Select a kernel variant by name for tests and benchmarks (reset with "auto").

    auto, block, global, smem: paths; block1 / block2: the block kernel with one / two channels a block
    (block2 falls back to one when d_inner is odd); block2r: two channels, registers uncapped; block2s: two
    channels, scalar staging loads; tile3: the chunked kernel
    with 3 channels a block (partial tiles when Di % 3 != 0); chunks3: the chunked kernel with 3 chunks of lines;
    smem-chmajor: the chunked kernel with its threads channel-major (the lanes of a warp on 32 lines of one channel);
    block2odd: two channels, planes at the odd row stride (not the one with the fewest bank conflicts).
    """
    path = "block" if variant.startswith("block") else {"tile3": "smem", "chunks3": "smem"}.get(variant, variant)
    path = "smem" if variant == "smem-chmajor" else path
    force_path(path)
    set_tuning(3 if variant == "tile3" else 0, 3 if variant == "chunks3" else 0)
    set_block_variant(BLOCK_VARIANT_BITS.get(variant, 0))


KERNEL_VARIANTS = (
    "auto",
    "block1",
    "block2",
    "block2s",
    "block2odd",
    "smem",
    "smem-chmajor",
    "tile3",
    "chunks3",
    "global",
)


def last_config() -> str:
    return load_library().vmamba_selective_scan_2d_cuda_last_config().decode()


def selective_scan_2d_cuda(u, delta, A_logs, B, C, D, delta_bias, out: torch.Tensor | None = None) -> torch.Tensor:
    """y for CUDA tensors, all float32 or all float16 (contiguous), on torch's current stream."""
    tensors = (u, delta, A_logs, B, C, D, delta_bias)
    dtype = u.dtype
    if dtype not in (torch.float32, torch.float16):
        raise TypeError(f"float32 or float16 tensors expected, got {dtype}")
    for t in tensors:
        if not t.is_cuda or t.dtype != dtype or not t.is_contiguous():
            raise ValueError("every input must be a contiguous CUDA tensor of u's dtype")
    batch, d_inner, height, width = u.shape
    d_state = A_logs.shape[1]
    y = out if out is not None else torch.empty_like(u)
    stream = torch.cuda.current_stream(u.device).cuda_stream
    err = load_library().vmamba_selective_scan_2d_cuda(
        F16 if dtype == torch.float16 else F32,
        *[t.data_ptr() for t in tensors],
        y.data_ptr(),
        batch,
        d_inner,
        d_state,
        height,
        width,
        stream,
    )
    if err is not None:
        raise RuntimeError(f"vmamba_selective_scan_2d_cuda: {err.decode()}")
    return y
