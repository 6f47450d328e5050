"""Where an fp16 inference through ONNX Runtime CUDA spends its GPU time: vmamba_tiny_s1l8 and ConvNeXt-T.

On the GPU machine (onnxruntime-gpu first on PYTHONPATH, vmamba_export/_native carried), under Nsight Compute, which
times only what runs between the profiler start and stop that this script calls around one inference:

    ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --csv --page raw \\
        --log-file $OUT/ncu_s1l8.csv python3 benchmarks/gpu_profile.py run vmamba_tiny_s1l8
    (the same with convnext_tiny; `--batch 1` for batch 1 (default 128); `--fusions off`: our graph without the fused
    ops of lowering/cuda_fusions.py; `run scan`: the scan kernel alone at the stage-1 shapes, for `--set full`)

Here, afterwards: `python benchmarks/gpu_profile.py summarize ncu_s1l8.csv [ncu_convnext.csv]` groups the kernels by
kind (convolution/GEMM, layout, normalization, elementwise, scan, casts) and prints each group's share.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from vmamba_export.targets import CUDA_FUSIONS  # noqa: E402

# Kernel-name patterns, first match wins (cuDNN/cuBLAS/ORT kernel names as ncu prints them).
GROUPS = [
    ("scan", r"scan_block_kernel|scan_lines|scan_warps|scan_smem|selective|scan_chunk|vmamba"),
    ("gemm/conv", r"gemm|conv|cudnn|cutlass|sm90_|xmma|implicit|winograd|fft|dgrad|wgrad|fprop"),
    ("layout", r"transpose|Transpose|nchw|nhwc|permute|Permute|reorder|copy|Copy|Concat|Slice|Gather|Split"),
    ("normalization", r"norm|Norm|reduce|Reduce"),
    ("cast", r"[Cc]ast"),
    ("elementwise", r"elementwise|Elementwise|_UnaryElementWise|_BinaryElementWise|Gelu|gelu|Silu|Sigmoid|Add|Mul"),
]


def run(name: str, batch: int = 128, settings: dict | None = None) -> None:
    import numpy as np
    import onnxruntime as ort
    import torch

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    with tempfile.TemporaryDirectory() as tmp:
        if name == "convnext_tiny":
            import onnx
            from convnext import export_convnext_onnx

            from vmamba_export.lowering.fp16 import convert_model_to_fp16

            export_convnext_onnx(f"{tmp}/fp32.onnx")
            onnx.save_model(convert_model_to_fp16(onnx.load(f"{tmp}/fp32.onnx"), 10), f"{tmp}/fp16.onnx")
            options = ort.SessionOptions()
            session = ort.InferenceSession(f"{tmp}/fp16.onnx", options, providers=["CUDAExecutionProvider"])
        else:
            from vmamba_export import load
            from vmamba_export.exporter import export_artifact
            from vmamba_export.model_source import resolve_model
            from vmamba_export.targets import get_target

            folder = Path(tmp) / "artifact"
            source = resolve_model(name, random_weights=True, seed=0)
            from vmamba_export.lowering import ExportOptions

            options = ExportOptions(extra=dict(settings or {}))
            export_artifact(
                source, get_target("cuda-onnxruntime"), folder, precision="fp16", max_size=512, options=options
            )
            session = load(folder).backend.session
        x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
        binding = session.io_binding()
        binding.bind_ortvalue_input(session.get_inputs()[0].name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
        binding.bind_output(session.get_outputs()[0].name, "cuda")
        for _ in range(3):
            session.run_with_iobinding(binding)
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        session.run_with_iobinding(binding)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    print(f"profiled one batch-{batch} inference of {name} {settings or ''}")


def run_scan() -> None:
    """The scan kernel alone at the stage-1 shapes of gpu_check's bandwidth section (batch 128, float32), once each
    between profiler start and stop, for `ncu --set full` (stall reasons, pipe use, memory traffic)."""
    import torch
    from gpu_check import scan_inputs

    from vmamba_export import cuda_kernel

    for name, di, n_state in (("vmamba_tiny_s1l8", 96, 1), ("vanilla_vmamba_tiny", 192, 16)):
        ins = scan_inputs(128, di, n_state, 56, 56, torch.float32, "cuda", 0)
        y = torch.empty_like(ins[0])
        for _ in range(2):
            cuda_kernel.selective_scan_2d_cuda(*ins, out=y)
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        cuda_kernel.selective_scan_2d_cuda(*ins, out=y)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        print(f"profiled the scan at {name}'s stage-1 shape: {cuda_kernel.last_config()}")


def read_kernels(path: Path) -> tuple[dict[str, float], dict[str, int]]:
    """({kernel name: total ms}, {kernel name: launches}) from ncu's raw CSV page (one row per launch; units in the
    second row)."""
    lines = [line for line in path.read_text().splitlines() if line.startswith('"')]
    rows = list(csv.reader(lines))
    header, units, data = rows[0], rows[1], rows[2:]
    name_col, time_col = header.index("Kernel Name"), header.index("gpu__time_duration.sum")
    scale = {"ns": 1e-6, "nsecond": 1e-6, "us": 1e-3, "usecond": 1e-3, "ms": 1.0, "msecond": 1.0}[units[time_col]]
    totals: dict[str, float] = defaultdict(float)
    launches: dict[str, int] = defaultdict(int)
    for row in data:
        totals[row[name_col]] += float(row[time_col].replace(",", "")) * scale
        launches[row[name_col]] += 1
    return totals, launches


def summarize(paths: list[Path]) -> None:
    for path in paths:
        kernels, launches = read_kernels(path)
        total = sum(kernels.values())
        groups: dict[str, float] = defaultdict(float)
        for kernel, ms in kernels.items():
            group = next((g for g, pattern in GROUPS if re.search(pattern, kernel)), "other")
            groups[group] += ms
        print(f"\n{path.name}: {total:.3f} ms of kernel time in one inference, {sum(launches.values())} launches")
        for group, ms in sorted(groups.items(), key=lambda kv: -kv[1]):
            print(f"  {group:14s} {ms:8.2f} ms {100 * ms / total:5.1f}%")
        print("  top kernels:")
        for kernel, ms in sorted(kernels.items(), key=lambda kv: -kv[1])[:12]:
            print(f"    {ms:7.3f} ms {launches[kernel]:4d}x  {kernel[:100]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="on the GPU machine, under ncu")
    p.add_argument("model", choices=["vmamba_tiny_s1l8", "convnext_tiny", "scan"], help="scan: the kernel alone")
    p.add_argument("--batch", type=int, default=128, help="batch of the profiled inference (default 128)")
    p.add_argument(
        "--fusions",
        choices=CUDA_FUSIONS,
        default="on",
        help="vmamba: ExportOptions cuda_fusions (off: unfused; merged, folded, packed: scan projections rewritten)",
    )
    p = sub.add_parser("summarize", help="here: group ncu's CSV by kernel kind")
    p.add_argument("csv", nargs="+", type=Path)
    args = parser.parse_args()
    if args.command == "run" and args.model == "scan":
        run_scan()
    elif args.command == "run":
        run(args.model, args.batch, {"cuda_fusions": args.fusions})
    else:
        summarize(args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
