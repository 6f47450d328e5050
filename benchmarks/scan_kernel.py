"""Time the C++ selective-scan kernel at VMamba-T stage-1 shapes.

    python benchmarks/scan_kernel.py [--threads 2] [--runs 30] [--json]

Per shape: the C API through the torch op (`torch.ops.vmamba.selective_scan_2d`), the ONNX Runtime custom op in a
one-node model, and the portable torch form (`selective_scan_portable`) in the same run; median milliseconds, the
bandwidth achieved against the bytes the op must move (sum of its input and output tensor sizes: a floor, every
byte read or written once), and the portable form's time over the kernel's. Needs `python -m
vmamba_export.build_kernels` first.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vmamba_export.bench import time_calls  # noqa: E402
from vmamba_export.kernels_paths import ort_library_path, scan_library_path  # noqa: E402
from vmamba_export.scan import native, selective_scan_portable  # noqa: E402

# Stage-1 scan shapes at 224x224 (56x56 map): (name, d_inner, d_state).
SHAPES = [("vmamba_tiny_s1l8", 96, 1), ("vmamba_tiny_s2l5", 192, 1), ("vanilla_vmamba_tiny", 192, 16)]
NAMES = ["u", "delta", "A_logs", "B", "C", "D", "delta_bias"]


def make_inputs(d_inner: int, d_state: int, h: int = 56, w: int = 56, batch: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    k = 4
    return (
        torch.randn(batch, d_inner, h, w, generator=g),
        torch.randn(batch, k, d_inner, h, w, generator=g),
        torch.randn(k * d_inner, d_state, generator=g) * 0.5,
        torch.randn(batch, k, d_state, h, w, generator=g),
        torch.randn(batch, k, d_state, h, w, generator=g),
        torch.randn(k * d_inner, generator=g),
        torch.randn(k * d_inner, generator=g) * 0.1,
    )


def median_ms(fn: Callable[[], object], runs: int, warmup: int = 3) -> float:
    return time_calls(fn, warmup, runs)["median_ms"]


def ort_runner(args: tuple[torch.Tensor, ...], threads: int) -> Callable[[], object] | None:
    library = ort_library_path()
    if library is None:
        return None
    import onnxruntime as ort

    from vmamba_export.lowering.onnx_export import one_node_scan_model

    model = one_node_scan_model(shapes=[tuple(t.shape) for t in args])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.register_custom_ops_library(str(library))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {n: t.numpy() for n, t in zip(NAMES, args)}
    return lambda: session.run(["y"], feeds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args()
    if scan_library_path() is None or not native.available():
        print("libvmamba_scan.so is not built: run `python -m vmamba_export.build_kernels`", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    lib = ctypes.CDLL(str(scan_library_path()))
    lib.vmamba_scan_isa.restype = ctypes.c_char_p
    isa = lib.vmamba_scan_isa().decode()

    rows = []
    for name, d_inner, d_state in SHAPES:
        inputs = make_inputs(d_inner, d_state)
        floor_bytes = sum(t.numel() * t.element_size() for t in inputs) + inputs[0].numel() * 4  # + output y
        row = {"model": name, "d_inner": d_inner, "d_state": d_state, "hw": "56x56", "floor_mb": floor_bytes / 1e6}
        with torch.inference_mode():
            row["torch_op_ms"] = median_ms(lambda x=inputs: torch.ops.vmamba.selective_scan_2d(*x), args.runs)
            ort_run = ort_runner(inputs, args.threads)
            row["ort_ms"] = median_ms(ort_run, args.runs) if ort_run else None
            # The portable form takes seconds here (N = 16: (B, 4, Di, N, L) tensors per prefix level): 3 runs.
            row["portable_ms"] = median_ms(lambda x=inputs: selective_scan_portable(*x), 3, warmup=0)
        row["torch_op_gbs"] = floor_bytes / row["torch_op_ms"] / 1e6
        row["ort_gbs"] = floor_bytes / row["ort_ms"] / 1e6 if row["ort_ms"] else None
        row["portable_over_kernel"] = row["portable_ms"] / row["torch_op_ms"]
        rows.append(row)

    if args.json:
        print(json.dumps({"threads": args.threads, "isa": isa, "rows": rows}, indent=2))
        return 0
    print(f"selective_scan_2d, batch 1, stage 1 (56x56), {args.threads} threads, kernel variant {isa}")
    header = (
        f"{'model':<21} {'Di':>4} {'N':>3} {'floor MB':>8} {'torch op ms':>11} {'GB/s':>6} {'ORT ms':>8} {'GB/s':>6}"
        f" {'portable ms':>11} {'portable/op':>11}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        ort_ms = f"{r['ort_ms']:8.3f}" if r["ort_ms"] else f"{'n/a':>8}"
        ort_gbs = f"{r['ort_gbs']:6.2f}" if r["ort_gbs"] else f"{'n/a':>6}"
        print(
            f"{r['model']:<21} {r['d_inner']:>4} {r['d_state']:>3} {r['floor_mb']:8.2f} {r['torch_op_ms']:11.3f}"
            f" {r['torch_op_gbs']:6.2f} {ort_ms} {ort_gbs} {r['portable_ms']:11.2f} {r['portable_over_kernel']:10.1f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
