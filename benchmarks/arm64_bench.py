"""A VMamba artifact against ConvNeXt-T on ONNX Runtime, on the machine it runs on, with the runtime only (no torch).

What the workflow's ARM job runs on GitHub's ubuntu-24.04-arm runner: the x86 job exports both (the VMamba artifact
cross-built with `--platform linux-aarch64`, ConvNeXt-T to ONNX by benchmarks/convnext.py) and this times them here
in alternating rounds (bench.interleaved; the ratio is the median over rounds of the ratio within a round), in this
process, through ONNX Runtime with the same threads, batch and input size. The goal on real ARM hardware:
vmamba_tiny_s1l8 fp32 within 1.3x of ConvNeXt-T. Never run it under an emulator: qemu's speed says nothing.

    python benchmarks/arm64_bench.py --artifact DIR --peer convnext_tiny.onnx --out report/arm64_bench.md
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import numpy as np

from vmamba_export.bench import (
    add_round_arguments,
    interleaved,
    machine_description,
    merge_rounds,
    paired_ratio,
    time_calls,
    write_results,
)

GOAL = 1.3  # vmamba_tiny_s1l8 fp32 time / ConvNeXt-T time on ONNX Runtime, same ARM CPU


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, required=True, help="VMamba artifact folder (cpu-onnxruntime)")
    parser.add_argument("--peer", type=Path, required=True, help="ConvNeXt-T ONNX file (benchmarks/convnext.py)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    add_round_arguments(parser, runs=20, rounds=5)
    args = parser.parse_args()

    import onnxruntime as ort

    from vmamba_export import load

    predictor = load(args.artifact, threads=args.threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    peer = ort.InferenceSession(str(args.peer), options, providers=["CPUExecutionProvider"])
    peer_input = peer.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((args.batch, 3, args.size, args.size), dtype=np.float32)
    calls = {"vmamba": lambda: predictor(x), "convnext_tiny": lambda: peer.run(None, {peer_input: x})}
    samples = interleaved(calls, lambda key: time_calls(calls[key], args.warmup, args.runs), args.rounds)
    ratio = paired_ratio(samples["vmamba"], samples["convnext_tiny"])
    manifest = predictor.manifest
    rows = {key: merge_rounds(results) for key, results in samples.items()}
    rows["ratio"] = ratio
    rows["goal"] = GOAL
    name = manifest["model"]["name"]
    table = "\n".join(
        [
            f"# {name} vs ConvNeXt-T on ONNX Runtime {ort.__version__}, {platform.machine()}",
            "",
            f"- Machine: {machine_description()}",
            f"- Artifact: {args.artifact} ({manifest['target']['name']} {manifest['precision']}, built for "
            f"{(manifest.get('platform') or {}).get('name', '?')})",
            f"- Batch {args.batch}, {args.size}x{args.size}, {args.threads} threads, {args.rounds} rounds of "
            f"{args.runs} runs (ratio: median over rounds of the ratio within a round)",
            "",
            "| model | median ms | p90 ms | min ms |",
            "|---|---:|---:|---:|",
            *(
                f"| {key} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | {r['min_ms']:.2f} |"
                for key, r in rows.items()
                if isinstance(r, dict)
            ),
            "",
            f"{name} / ConvNeXt-T: **{ratio:.2f}x** (goal <= {GOAL}x: {'met' if ratio <= GOAL else 'not met'})",
        ]
    )
    write_results(args.out, table, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
