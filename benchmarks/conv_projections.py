"""A v2 block's depthwise convolution + SiLU, the scan's input projections and the scan, the two ways a batch-1 graph
can compute them, at the four stage shapes of vmamba_tiny_s1l8 at 224, float16 and float32, GPU time inside CUDA
graphs of repeated calls:

- separate: DepthwiseConvSiLU, ScanProjections (two kernels), SelectiveScan2D (`--cuda-fusions projected`, the
  default batch-1 graph);
- fused: DepthwiseConvProjections (one kernel), SelectiveScan2D (`--cuda-fusions conv-projected`).

Also the convolution and projections alone both ways (no scan), the fused kernel at every tile (positions a block)
to check the automatic choice, and the fused outputs' largest relative L2 error against float64.

On the GPU machine (vmamba_export/_native carried): python3 benchmarks/conv_projections.py [--batches 1 8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# (Di, R, side) per stage of vmamba_tiny_s1l8 at 224 (d_state 1)
STAGES = ((96, 6, 56), (192, 12, 28), (384, 24, 14), (768, 48, 7))
TILES = (1, 2, 4, 8, 16, 32)


def measure(dtype, batch: int, di: int, rank: int, side: int) -> dict:
    """us per call of each form, with and without the scan; the fused kernel's time at each tile that fits; the
    fused outputs' largest relative L2 error against float64."""
    import torch
    from gpu_check import graph_time_ms

    from vmamba_export import cuda_kernel

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, side, side, di, device="cuda", dtype=dtype, generator=g)
    conv_w = (torch.randn(di, 1, 3, 3, device="cuda", generator=g) / 3).to(dtype)
    w_x = (torch.randn(4 * rank + 8, di, device="cuda", generator=g) / di**0.5).to(dtype)
    dt = (torch.randn(4, di, rank, device="cuda", generator=g) / rank**0.5).to(dtype)
    a_logs = (torch.randn(4 * di, 1, device="cuda", generator=g) * 0.5).to(dtype)
    d = torch.randn(4 * di, device="cuda", generator=g).to(dtype)
    bias = (torch.randn(4 * di, device="cuda", generator=g) * 0.5 - 1.0).to(dtype)

    def separate_projections():
        u = cuda_kernel.depthwise_conv_silu_cuda(x, conv_w)
        return (u, *cuda_kernel.scan_projections_cuda(u, w_x, dt))

    def fused_projections():
        return cuda_kernel.depthwise_conv_projections_cuda(x, conv_w, w_x, dt)

    def scan(u, delta, b, c):
        return cuda_kernel.selective_scan_2d_cuda(u, delta, a_logs, b, c, d, bias)

    forms = {
        "separate": lambda: scan(*separate_projections()),
        "fused": lambda: scan(*fused_projections()),
        "separate_no_scan": separate_projections,
        "fused_no_scan": fused_projections,
    }
    row: dict = {"tile": cuda_kernel.conv_projections_tile(batch, side, side, di, rank, 1)}
    conv = torch.nn.functional.conv2d(x.double().permute(0, 3, 1, 2), conv_w.double(), padding=1, groups=di)
    u64 = torch.nn.functional.silu(conv).to(dtype).double().reshape(batch, di, -1)
    x64 = torch.einsum("jc,bcp->bjp", w_x.double(), u64)
    delta64 = torch.einsum("kcr,bkrp->bkcp", dt.double(), x64[:, : 4 * rank].reshape(batch, 4, rank, -1))
    want = (u64, delta64, x64[:, 4 * rank : 4 * rank + 4], x64[:, 4 * rank + 4 :])
    got = fused_projections()
    row["fused_rel"] = max(
        float((o.double().reshape(w.shape) - w).norm() / w.norm()) for o, w in zip(got, want, strict=True)
    )
    calls = 20 if batch == 1 else 5
    for name, fn in forms.items():
        row[f"{name}_us"] = graph_time_ms(fn, calls=calls) * 1e3
    for tile in TILES:
        if cuda_kernel.set_conv_projections_tile(tile) != tile:
            continue
        try:
            row[f"tile{tile}_us"] = graph_time_ms(fused_projections, calls=calls) * 1e3
        except RuntimeError:  # the tile does not fit shared memory at this Di
            pass
        finally:
            cuda_kernel.set_conv_projections_tile(0)
    return row


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args(argv)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    print(f"{torch.cuda.get_device_name(0)}; us per call, CUDA graphs of repeated calls")
    print(
        "dtype    batch   Di side  separate     fused  ratio | no scan: separate  fused  ratio | tile  "
        + " ".join(f"{'t' + str(t):>6s}" for t in TILES)
        + "  fused rel L2"
    )
    for dtype in (torch.float16, torch.float32):
        for batch in args.batches:
            for di, rank, side in STAGES:
                row = measure(dtype, batch, di, rank, side)
                name = str(dtype).removeprefix("torch.")
                tiles = " ".join(f"{row[f'tile{t}_us']:6.1f}" if f"tile{t}_us" in row else f"{'-':>6s}" for t in TILES)
                print(
                    f"{name:8s} {batch:5d} {di:4d} {side:4d} {row['separate_us']:9.1f} {row['fused_us']:9.1f}"
                    f" {row['fused_us'] / row['separate_us']:6.2f} |           {row['separate_no_scan_us']:7.1f}"
                    f" {row['fused_no_scan_us']:6.1f} {row['fused_no_scan_us'] / row['separate_no_scan_us']:6.2f} |"
                    f" {row['tile']:4d}  {tiles}  {row['fused_rel']:12.1e}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
