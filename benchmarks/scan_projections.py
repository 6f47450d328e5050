"""The ScanProjections kernel (kernels/cuda/scan_projections.cu) against the exporter's form of the same work in
torch (three 1 x 1 convolutions of u and the dt projection as a batched MatMul, cuDNN and cuBLAS), at the four stage
shapes of vmamba_tiny_s1l8 at 224, batch 1 and 128, float16 and float32, GPU time inside CUDA graphs.

On the GPU machine (vmamba_export/_native carried): python3 benchmarks/scan_projections.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# (Di, R, side) per stage of vmamba_tiny_s1l8 at 224 (d_state 1)
STAGES = ((96, 6, 56), (192, 12, 28), (384, 24, 14), (768, 48, 7))


def measure(dtype, batch: int, di: int, rank: int, side: int) -> tuple[float, float, float]:
    """(kernel us, exporter form us, the kernel's largest relative L2 error against float64) at one shape."""
    import torch
    from gpu_check import graph_time_ms

    from vmamba_export import cuda_kernel

    g = torch.Generator(device="cuda").manual_seed(0)
    u = torch.randn(batch, di, side, side, device="cuda", dtype=dtype, generator=g)
    w_x = torch.randn(4 * rank + 8, di, device="cuda", dtype=dtype, generator=g) / di**0.5
    dt = torch.randn(4, di, rank, device="cuda", dtype=dtype, generator=g) / rank**0.5
    w_dt, w_b, w_c = (w[..., None, None] for w in w_x.split([4 * rank, 4, 4]))

    def exporter_form():
        x = torch.nn.functional.conv2d(u, w_dt).reshape(batch, 4, rank, -1)
        torch.nn.functional.conv2d(u, w_b)
        torch.nn.functional.conv2d(u, w_c)
        return torch.matmul(dt, x)

    delta, b, c = cuda_kernel.scan_projections_cuda(u, w_x, dt)
    x64 = torch.einsum("jc,bcp->bjp", w_x.double(), u.double().reshape(batch, di, -1))
    want = (
        torch.einsum("kcr,bkrp->bkcp", dt.double(), x64[:, : 4 * rank].reshape(batch, 4, rank, -1)),
        x64[:, 4 * rank : 4 * rank + 4],
        x64[:, 4 * rank + 4 :],
    )
    got = (delta.reshape(batch, 4, di, -1), b.reshape(batch, 4, -1), c.reshape(batch, 4, -1))
    rel = max(float((g.double() - w).norm() / w.norm()) for g, w in zip(got, want, strict=True))
    calls = 20 if batch == 1 else 3
    ours = graph_time_ms(lambda: cuda_kernel.scan_projections_cuda(u, w_x, dt), calls=calls) * 1e3
    return ours, graph_time_ms(exporter_form, calls=calls) * 1e3, rel


def main() -> int:
    import torch

    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    print(f"{torch.cuda.get_device_name(0)}; us per call, CUDA graphs of repeated calls")
    print("dtype    batch   Di side  kernel us  convs+bmm us  ratio  rel L2 vs float64")
    for dtype in (torch.float16, torch.float32):
        for batch in (1, 128):
            for di, rank, side in STAGES:
                ours, theirs, rel = measure(dtype, batch, di, rank, side)
                name = str(dtype).removeprefix("torch.")
                print(
                    f"{name:8s} {batch:5d} {di:4d} {side:4d} {ours:10.1f} {theirs:13.1f} {ours / theirs:6.2f} "
                    f"{rel:18.1e}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
