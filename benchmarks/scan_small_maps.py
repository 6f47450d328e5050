"""The d_state-1 scan at vmamba_tiny_s1l8's four stage shapes (224 input), batch 1 and 128, float32 and float16: the
automatic path (the warp kernel for maps of at most 256 positions at batch 1, else the line kernel) against the line
kernel forced, GPU time inside CUDA graphs, and at batch 1 the relative L2 error of each against the float64
reference (stage 4 skipped: the reference's 768 channels take long on the CPU).

On the GPU machine (vmamba_export/_native carried): python3 benchmarks/scan_small_maps.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

STAGES = ((96, 56), (192, 28), (384, 14), (768, 7))  # (Di, side)


def main() -> int:
    import torch
    from gpu_check import graph_time_ms, rel_l2, scan_inputs

    from vmamba_export import cuda_kernel
    from vmamba_export.scan.reference import selective_scan_reference

    print(torch.cuda.get_device_name(0))
    for di, side in STAGES:
        for dtype in (torch.float32, torch.float16):
            for batch in (1, 128):
                ins = scan_inputs(batch, di, 1, side, side, dtype, "cuda", 0)
                y = torch.empty_like(ins[0])
                cells = []
                for variant in ("auto", "lines"):
                    cuda_kernel.apply_variant(variant)
                    try:
                        y.fill_(float("nan"))
                        cuda_kernel.selective_scan_2d_cuda(*ins, out=y)
                        torch.cuda.synchronize()
                        kernel = cuda_kernel.last_config().split()[0]
                        err = float("nan")
                        if batch == 1 and di <= 384:
                            ref = selective_scan_reference(*[t.double().cpu() for t in ins]).numpy()
                            err = rel_l2(y.double().cpu().numpy(), ref)
                        us = 1e3 * graph_time_ms(
                            lambda a=ins, o=y: cuda_kernel.selective_scan_2d_cuda(*a, out=o),
                            calls=20 if batch == 1 else 3,
                        )
                    finally:
                        cuda_kernel.apply_variant("auto")
                    cells.append(f"{variant}: {us:8.1f} us rel {err:.1e} [{kernel}]")
                name = str(dtype).removeprefix("torch.")
                print(f"{di:4d}x{side:<3d} b{batch:<4d} {name:8s} " + "  ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
