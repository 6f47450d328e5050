"""ctypes binding to the C++ CPU scan kernel (kernels/cpu), used by the torch op when the library is built.

The library is built by `python -m vmamba_export.build_kernels` (the README's set-up runs it); without it the op falls
back to the portable tensor form, which is correct but slower.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

NATIVE_DIR = Path(__file__).resolve().parent.parent / "_native"
SCAN_LIBRARY = NATIVE_DIR / "libvmamba_scan.so"

_lib: ctypes.CDLL | None = None
_tried = False


def _load() -> ctypes.CDLL | None:
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("VMAMBA_EXPORT_NO_NATIVE") or not SCAN_LIBRARY.exists():
        return None
    lib = ctypes.CDLL(str(SCAN_LIBRARY))
    fn = lib.vmamba_selective_scan_2d_f32
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_int64] * 6 + [ctypes.c_int]
    _lib = lib
    return _lib


def available() -> bool:
    return _load() is not None


def selective_scan_2d(
    u: torch.Tensor,
    delta: torch.Tensor,
    A_logs: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    delta_bias: torch.Tensor,
) -> torch.Tensor:
    """Run the C++ kernel on contiguous float32 CPU tensors with torch's intra-op thread count."""
    lib = _load()
    assert lib is not None, "native scan library is not built"
    bsz, di, h, w = u.shape
    k = delta.shape[1]
    n = A_logs.shape[1]
    y = torch.empty_like(u)
    ptrs = [t.data_ptr() for t in (u, delta, A_logs, B, C, D, delta_bias, y)]
    status = lib.vmamba_selective_scan_2d_f32(*ptrs, bsz, k, di, n, h, w, torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"native selective scan failed with status {status}")
    return y
