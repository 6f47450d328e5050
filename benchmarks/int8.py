"""int8 vs fp32 latency through ONNX Runtime CPU, with ConvNeXt-T fp32/int8 as the peer, all in one run.

    python benchmarks/int8.py [--model vmamba_tiny_s1l8] [--scan custom-op|portable] [--formats qdq-u8s8 ...]
                              [--rounds 5] [--runs 15] [--calib builtin:16] [--workdir DIR] [--out FILE.md]

Every model is quantized with the project's pipeline (vmamba_export/quantize/onnxruntime_int8.py: calibrated once,
Conv/MatMul/Gemm per-channel int8, scan and its feeding projections float). Timing: batch 1, 224x224, every model in
its own process, all timed in turn round after round, so drift of a shared machine moves every model alike; ratios
against the model's own fp32 and against ConvNeXt-T int8 are medians over rounds of the ratio within a round.
Cosine: int8 logits vs the fp32 ONNX logits (which match PyTorch fp32 within rel L2 1e-5) on the builtin photos.
Random weights (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def build(args, workdir: Path) -> tuple[dict, np.ndarray, str]:
    """{label: (path, library)} for every model to time (fp32 exports cached in workdir), the calibration images, and
    the VMamba model's label."""
    from convnext import export_convnext_onnx

    from vmamba_export.data.sources import load_batch
    from vmamba_export.kernels_paths import ort_library_path
    from vmamba_export.lowering.onnx_export import export_onnx
    from vmamba_export.model_source import resolve_model
    from vmamba_export.quantize.onnxruntime_int8 import calibrate, prepare_model, quantize_with_cache

    library = ort_library_path()
    source = resolve_model(args.model, random_weights=True)
    spec = source.model.config.input
    calib, _, _ = load_batch(args.calib, spec, None)
    models: dict[str, tuple[Path, Path | None]] = {}
    # onnx-portable: the scan as standard ops, so no custom-op library (and QDQ, the portable lowering's format).
    label, model_lib = (args.model, library) if args.scan == "custom-op" else (f"{args.model} portable", None)
    for name, export, lib in (
        (label, lambda p: export_onnx(source.model.eval(), p, scan=args.scan, max_size=1024), model_lib),
        ("convnext_tiny", lambda p: export_convnext_onnx(str(p)), None),
    ):
        stem = name.replace(" ", "_")
        fp32 = workdir / f"{stem}_fp32.onnx"
        if not fp32.exists():
            print(f"exporting {name}", file=sys.stderr)
            export(fp32)
        models[f"{name} fp32"] = (fp32, lib)
        prepared = prepare_model(fp32, workdir / f"{stem}_prepared.onnx")
        cache = workdir / f"{stem}_ranges.json"
        if not cache.exists():
            print(f"calibrating {name}", file=sys.stderr)
            calibrate(prepared, calib, "minmax", cache, lib, show_progress=False)
        formats = args.formats if name == label else [args.peer_format]
        for fmt in formats:
            out = workdir / f"{stem}_{fmt}.onnx"
            quantize_with_cache(prepared, out, cache, "minmax", fmt, prepared.scan_feeders)
            models[f"{name} int8 {fmt}"] = (out, lib)
    return models, calib, label


def time_interleaved(models: dict, args) -> dict:
    """{label: merged rounds} and {label: per-round results}: each model timed in its own process once per round,
    in turn (benchmarks/cpu_onnxruntime.py's worker). Sessions never share a process: an idle ONNX Runtime pool
    spins after each run and would slow the next model's threads on a 2-core machine."""
    from cpu_onnxruntime import time_in_subprocess

    from vmamba_export.bench import interleaved, merge_rounds

    samples = interleaved(models, lambda label: time_in_subprocess(*models[label], args), args.rounds)
    return {label: merge_rounds(results) for label, results in samples.items()}, samples


def cosines(models: dict, calib: np.ndarray, model_name: str) -> dict:
    from vmamba_export.runtime.onnxruntime_backend import make_session
    from vmamba_export.validate import parity_metrics

    def logits(path, lib):
        s = make_session(path, lib, None)
        return np.concatenate(
            [s.run(None, {s.get_inputs()[0].name: calib[i : i + 4]})[0] for i in range(0, len(calib), 4)]
        )

    out = {}
    for prefix in (model_name, "convnext_tiny"):
        ref = logits(*models[f"{prefix} fp32"])
        for label, (path, lib) in models.items():
            if label.startswith(prefix) and "int8" in label:
                out[label] = parity_metrics(logits(path, lib), ref)
    return out


def main() -> int:
    from vmamba_export.bench import add_round_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vmamba_tiny_s1l8")
    parser.add_argument("--formats", nargs="+", default=["qdq-u8s8", "qdq-s8s8", "qop-u8s8", "qop-s8s8"])
    parser.add_argument(
        "--scan",
        choices=["custom-op", "portable"],
        default="custom-op",
        help="the model's lowering: custom-op (cpu-onnxruntime) or portable (onnx-portable; use --formats qdq-u8s8)",
    )
    parser.add_argument("--peer-format", default="qdq-u8s8", help="int8 format for ConvNeXt-T")
    parser.add_argument("--calib", default="builtin:16")
    add_round_arguments(parser, runs=15, rounds=5)
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vmamba-int8-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    models, calib, model_label = build(args, workdir)
    timing, samples = time_interleaved(models, args)
    parity = cosines(models, calib, model_label)
    peer_int8 = samples[f"convnext_tiny int8 {args.peer_format}"]
    from vmamba_export.bench import machine_description, paired_ratio

    lines = [
        f"# int8 vs fp32, ONNX Runtime CPU ({args.threads} threads, batch 1, 224x224, {args.rounds} interleaved rounds "
        f"of {args.runs} runs; ratios: median over rounds of the ratio within a round)",
        "",
        f"Machine: {machine_description()}. Calibration: {args.calib} ({len(calib)} images), minmax, per-channel.",
        "",
        "| model | median ms | min ms | vs own fp32 | vs ConvNeXt-T int8 | cosine min vs fp32 | top-1 agree |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, t in timing.items():
        own = samples[f"{model_label if label.startswith(model_label) else 'convnext_tiny'} fp32"]
        p = parity.get(label, {})
        cos = f"{p['cosine_min']:.5f}" if p else "-"
        agree = f"{p['top1_agreement']:.3f}" if p else "-"
        lines.append(
            f"| {label} | {t['median_ms']:.1f} | {t['min_ms']:.1f} | {paired_ratio(samples[label], own):.2f} | "
            f"{paired_ratio(samples[label], peer_int8):.2f} | {cos} | {agree} |"
        )
    from vmamba_export.bench import write_results

    write_results(args.out, "\n".join(lines), {"timing": timing, "parity": parity})
    return 0


if __name__ == "__main__":
    sys.exit(main())
