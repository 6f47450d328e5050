"""A/B of two builds of the CUDA scan kernel on the same inputs in the same process (GPU machine).

    python benchmarks/scan_ab.py OLD.so NEW.so [--runs 50]

Each library is `kernels/cuda/selective_scan_2d.cu` compiled on its own, e.g. for an earlier revision:

    git show REV:kernels/cuda/selective_scan_2d.cu > /tmp/old.cu && cp kernels/cuda/*.cuh /tmp/
    nvcc -O3 -std=c++17 -shared -Xcompiler -fPIC -cudart static -gencode arch=compute_90,code=sm_90 /tmp/old.cu \\
        -o old.so

(the same for the working tree's file). For vmamba_tiny_s1l8's four stage shapes (d_state 1) at batch 128 and 1,
float32 and float16: the median CUDA-event time of `vmamba_selective_scan_2d_cuda` from each library, the better of
two interleaved rounds, their ratio, and whether both wrote bit-identical outputs. It shows whether a change to the
kernel source moved the default path's time (ptxas register allocation is sensitive to any change in a kernel).
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vmamba_export.bench import cuda_time_ms  # noqa: E402

# vmamba_tiny_s1l8's scans at 224 x 224: (d_inner, map side) per stage
STAGES = ((96, 56), (192, 28), (384, 14), (768, 7))


def scan_function(path: str):
    fn = ctypes.CDLL(path).vmamba_selective_scan_2d_cuda
    fn.restype = ctypes.c_char_p
    fn.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 8 + [ctypes.c_int64] * 5 + [ctypes.c_void_p]
    return fn


def inputs(batch: int, di: int, side: int, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=g)

    tensors = [
        randn(batch, di, side, side),
        randn(batch, 4, di, side, side) * 0.5 - 1,
        randn(4 * di, 1) * 0.5,
        randn(batch, 4, 1, side, side),
        randn(batch, 4, 1, side, side),
        randn(4 * di),
        randn(4 * di) * 0.5,
    ]
    return [t.to(dtype) for t in tensors]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", help="the reference build (.so)")
    parser.add_argument("new", help="the build under test (.so)")
    parser.add_argument("--runs", type=int, default=50, help="timed calls per round at batch 128 (batch 1: 4x)")
    args = parser.parse_args()
    libraries = {"old": scan_function(args.old), "new": scan_function(args.new)}
    stream = torch.cuda.current_stream().cuda_stream
    for batch in (128, 1):
        for di, side in STAGES:
            for dtype in (torch.float32, torch.float16):
                ts = inputs(batch, di, side, dtype)
                outputs, times = {}, {name: [] for name in libraries}
                for _ in range(2):  # interleaved rounds: clock and thermal drift hit both alike
                    for name, fn in libraries.items():
                        y = torch.empty_like(ts[0])
                        code = 1 if dtype == torch.float16 else 0
                        call_args = (code, *[t.data_ptr() for t in ts], y.data_ptr(), batch, di, 1, side, side, stream)

                        def call(fn=fn, call_args=call_args):
                            err = fn(*call_args)
                            if err is not None:
                                raise RuntimeError(err.decode())

                        runs = args.runs if batch > 1 else 4 * args.runs
                        times[name].append(cuda_time_ms(call, runs=runs))
                        outputs[name] = y
                old, new = min(times["old"]), min(times["new"])
                print(
                    f"b{batch} {di}x{side} {str(dtype).removeprefix('torch.')}: old {old:.4f} ms new {new:.4f} ms "
                    f"ratio {new / old:.3f} identical {torch.equal(outputs['old'], outputs['new'])}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
