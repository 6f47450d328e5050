"""A d_state-1 scan with its input projections, the ways the cuda-onnxruntime graph can compute them, at the four
stage shapes of vmamba_tiny_s1l8 at 224, batch 1 and 128, float16 and float32, GPU time inside CUDA graphs:

- exporter: three 1 x 1 convolutions of u (cuDNN), the dt projection as a batched MatMul (cuBLAS), SelectiveScan2D
  (the default graph);
- projected: ScanProjections (two kernels of ours) and SelectiveScan2D (`--cuda-fusions projected`);
- packed: one cuDNN convolution X = [dt ranks | B | C] and SelectiveScan2DPacked, which computes delta from X
  (`--cuda-fusions packed`);
- narrow: the same with X from NarrowPointwiseConv (`--cuda-fusions narrow`).

The relative L2 error of each form's y against the float64 scan of the float64 projections is printed at batch 1;
ScanProjections' own outputs against float64 at every shape.

On the GPU machine (vmamba_export/_native carried): python3 benchmarks/scan_projections.py [--batches 1 128]
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
FORMS = ("exporter", "projected", "packed", "narrow")


def measure(dtype, batch: int, di: int, rank: int, side: int) -> dict:
    """us per call of each form, the configuration the packed scan chose, and (batch 1) each form's relative L2 error
    of y against float64; ScanProjections' own largest relative L2 error."""
    import torch
    from gpu_check import graph_time_ms

    from vmamba_export import cuda_kernel
    from vmamba_export.scan import selective_scan_reference

    g = torch.Generator(device="cuda").manual_seed(0)
    u = torch.randn(batch, di, side, side, device="cuda", dtype=dtype, generator=g)
    w_x = torch.randn(4 * rank + 8, di, device="cuda", dtype=dtype, generator=g) / di**0.5
    dt = torch.randn(4, di, rank, device="cuda", dtype=dtype, generator=g) / rank**0.5
    a_logs = (torch.randn(4 * di, 1, device="cuda", generator=g) * 0.5).to(dtype)
    d = torch.randn(4 * di, device="cuda", generator=g).to(dtype)
    bias = (torch.randn(4 * di, device="cuda", generator=g) * 0.5 - 1.0).to(dtype)
    w4 = w_x[..., None, None].contiguous()
    w_dt, w_b, w_c = (w.contiguous() for w in w4.split([4 * rank, 4, 4]))
    conv = torch.nn.functional.conv2d

    def scan(delta, b, c):
        return cuda_kernel.selective_scan_2d_cuda(u, delta, a_logs, b, c, d, bias)

    def exporter():
        x = conv(u, w_dt).reshape(batch, 4, rank, -1)
        b, c = (conv(u, w).reshape(batch, 4, 1, side, side) for w in (w_b, w_c))
        return scan(torch.matmul(dt, x).reshape(batch, 4, di, side, side), b, c)

    def projected():
        return scan(*cuda_kernel.scan_projections_cuda(u, w_x, dt))

    def packed():
        return cuda_kernel.selective_scan_2d_packed_cuda(u, conv(u, w4), dt, a_logs, d, bias)

    def narrow():
        return cuda_kernel.selective_scan_2d_packed_cuda(
            u, cuda_kernel.narrow_pointwise_conv_cuda(u, w4), dt, a_logs, d, bias
        )

    forms = {"exporter": exporter, "projected": projected, "packed": packed, "narrow": narrow}
    row: dict = {}
    narrow()
    row["packed_config"] = cuda_kernel.last_config()
    x64 = torch.einsum("jc,bcp->bjp", w_x.double(), u.double().reshape(batch, di, -1))
    x_dt = x64[:, : 4 * rank].reshape(batch, 4, rank, -1)
    delta64 = torch.einsum("kcr,bkrp->bkcp", dt.double(), x_dt)
    b64, c64 = x64[:, 4 * rank : 4 * rank + 4], x64[:, 4 * rank + 4 :]
    got = cuda_kernel.scan_projections_cuda(u, w_x, dt)
    want = (delta64, b64, c64)
    row["projections_rel"] = max(
        float((o.double().reshape(w.shape) - w).norm() / w.norm()) for o, w in zip(got, want, strict=True)
    )
    if batch == 1:
        shape5 = (batch, 4, -1, side, side)
        y64 = selective_scan_reference(
            u.double().cpu(),
            delta64.reshape(shape5).cpu(),
            a_logs.double().cpu(),
            b64.reshape(shape5).cpu(),
            c64.reshape(shape5).cpu(),
            d.double().cpu(),
            bias.double().cpu(),
        )
        for name, fn in forms.items():
            y = fn().double().cpu()
            row[f"{name}_rel"] = float((y - y64).norm() / y64.norm())
    calls = 20 if batch == 1 else 3
    for name, fn in forms.items():
        row[f"{name}_us"] = graph_time_ms(fn, calls=calls) * 1e3
    return row


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 128])
    args = parser.parse_args(argv)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    print(f"{torch.cuda.get_device_name(0)}; us per call (projections and scan), CUDA graphs of repeated calls")
    print(
        "dtype    batch   Di side " + " ".join(f"{f:>10s}" for f in FORMS) + "  narrow/exporter  "
        "y rel L2 (exporter, narrow)  ScanProjections rel L2  packed scan's path"
    )
    for dtype in (torch.float16, torch.float32):
        for batch in args.batches:
            for di, rank, side in STAGES:
                row = measure(dtype, batch, di, rank, side)
                name = str(dtype).removeprefix("torch.")
                errors = f"{row['exporter_rel']:.1e}, {row['narrow_rel']:.1e}" if "narrow_rel" in row else "-"
                print(
                    f"{name:8s} {batch:5d} {di:4d} {side:4d} "
                    + " ".join(f"{row[f + '_us']:10.1f}" for f in FORMS)
                    + f" {row['narrow_us'] / row['exporter_us']:16.2f}  {errors:>27s}  {row['projections_rel']:22.1e}"
                    + f"  {row['packed_config']}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
