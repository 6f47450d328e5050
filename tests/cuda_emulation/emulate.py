"""Build a CUDA kernel source (kernels/cuda/*.cu) as a host library whose kernels run on CPU threads (the shim in
include/), for tests of what a kernel computes on machines without a GPU. The source is compiled unchanged but for
mechanical rewrites the C++ compiler needs: `kernel<<<grid, block, smem, stream>>>(args)` becomes a call of the
shim's launcher, `extern __shared__ T name[];` a pointer to the shim's dynamic shared memory, and two PTX statements
(below). Timing means nothing here; the GPU tests (tests/test_cuda.py) run the same source compiled by nvcc.

What the shim covers is what the kernels tested with it use: blocks of any size (a partial last warp included),
`__syncthreads`, `__shfl_xor_sync`, `__shfl_up_sync` and `__shfl_sync` called by every live lane of a warp, static and
dynamic shared memory, `__half`, stream-ordered allocation and copies. Two PTX statements are rewritten: the
special-function 2^x (`ex2.approx`, exp2 stands in) and the L2 prefetch hint (dropped). Not covered: shuffles that only
part of a warp calls (the chunked d_state-16 kernel's split lanes: it hangs here), and any other inline PTX."""

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
# PTX the host compiler cannot take: the special-function 2^x (exp2 stands in) and the L2 prefetch hint (dropped)
_EX2 = re.compile(r'asm\("ex2\.approx\.ftz\.f32 %0, %1;" : "=f"\((\w+)\) : "f"\((\w+)\)\);')
_PREFETCH = re.compile(r'asm volatile\("prefetch\.global\.L2 \[%0\];" ::"l"\((.*?)\)\);')


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
    """`source` with its launches, dynamic shared memory and PTX rewritten for the shim."""
    text = source.read_text()
    text = _DYNAMIC_SMEM.sub(r"\1* const \2 = reinterpret_cast<\1*>(::vmamba_emulate::dynamic_smem.data());", text)
    text = _EX2.sub(r"\1 = std::exp2(\2);", text)
    text = _PREFETCH.sub(r"(void)(\1);", text)
    return _LAUNCH.sub(r"::vmamba_emulate::launch(\1, \2, ", text)


def build(name: str, folder: Path) -> ctypes.CDLL:
    """kernels/cuda/`name`.cu as a host shared library in `folder`, loaded."""
    cpp = folder / f"{name}_emulated.cpp"
    cpp.write_text(host_source(KERNELS / f"{name}.cu"))
    for header in KERNELS.glob("*.cuh"):  # beside the source, so its quoted includes find these first
        (folder / header.name).write_text(host_source(header))
    lib = folder / f"lib{name}_emulated.so"
    # nvcc includes the runtime header before the source; so does this
    cmd = [COMPILER, "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-I", str(SHIM), "-include", "cuda_runtime.h"]
    proc = subprocess.run([*cmd, str(cpp), "-o", str(lib)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"emulated build of {name}.cu failed:\n{proc.stderr[-4000:]}")
    return ctypes.CDLL(str(lib))
