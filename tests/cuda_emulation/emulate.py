"""Build a CUDA kernel source (kernels/cuda/*.cu) as a host library whose kernels run on CPU threads (the shim in
include/), for tests of what a kernel computes on machines without a GPU. The source is compiled unchanged but for
two mechanical rewrites the C++ compiler needs: `kernel<<<grid, block, smem, stream>>>(args)` becomes a call of the
shim's launcher, and `extern __shared__ T name[];` a pointer to the shim's dynamic shared memory. Timing means
nothing here; the GPU tests (tests/test_cuda.py) run the same source compiled by nvcc.

What the shim covers is what DepthwiseConvSiLU, ScanProjections and DepthwiseConvProjections use: one-dimensional
blocks of whole warps, `__syncthreads`, full-warp `__shfl_xor_sync`, static and dynamic shared memory, `__half`,
stream-ordered allocation. Not covered: inline PTX (the scan kernels' `ex2.approx` and L2 prefetch), partial-warp or
`up`/indexed shuffles; a source using them does not build here."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

SHIM = Path(__file__).parent / "include"
KERNELS = Path(__file__).resolve().parents[2] / "kernels" / "cuda"
COMPILER = "g++"
_LAUNCH = re.compile(r"(\w+(?:<[^<>;]*>)?)<<<(.*?)>>>\(")
_DYNAMIC_SMEM = re.compile(r"extern __shared__ (\w+) (\w+)\[\];")


def available() -> bool:
    """Whether a C++20 compiler with _Float16 (GCC 12 or newer on x86-64) is here."""
    if shutil.which(COMPILER) is None:
        return False
    probe = subprocess.run(
        [COMPILER, "-std=c++20", "-fsyntax-only", "-x", "c++", "-"],
        input="#include <barrier>\n_Float16 h = 1.0f;\n",
        capture_output=True,
        text=True,
    )
    return probe.returncode == 0


def host_source(source: Path) -> str:
    """`source` with its launches and dynamic shared memory rewritten for the shim."""
    text = source.read_text()
    text = _DYNAMIC_SMEM.sub(r"\1* const \2 = reinterpret_cast<\1*>(::vmamba_emulate::dynamic_smem.data());", text)
    return _LAUNCH.sub(r"::vmamba_emulate::launch(\1, \2, ", text)


def build(name: str, folder: Path) -> ctypes.CDLL:
    """kernels/cuda/`name`.cu as a host shared library in `folder`, loaded."""
    cpp = folder / f"{name}_emulated.cpp"
    cpp.write_text(host_source(KERNELS / f"{name}.cu"))
    lib = folder / f"lib{name}_emulated.so"
    cmd = [COMPILER, "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-I", str(SHIM), "-I", str(KERNELS)]
    proc = subprocess.run([*cmd, str(cpp), "-o", str(lib)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"emulated build of {name}.cu failed:\n{proc.stderr[-4000:]}")
    return ctypes.CDLL(str(lib))
