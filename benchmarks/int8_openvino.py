"""int8 vs fp32 latency through OpenVINO CPU (NNCF), with ConvNeXt-T fp32/int8 as the peer, all in one run.

    python benchmarks/int8_openvino.py [--model vmamba_tiny_s1l8] [--rounds 5] [--runs 15] [--calib builtin:32]
                                       [--workdir DIR] [--out benchmarks/results/int8-openvino.md]

VMamba goes through the project's pipeline (export_artifact for cpu-openvino, fp32 and int8: NNCF with the scan ops and
the projections feeding them float, quantize/openvino_int8.py). ConvNeXt-T (benchmarks/convnext.py) goes ONNX ->
ov.convert_model, and is quantized by the same `quantize_model` call (same NNCF settings, same calibration images,
nothing kept float). Everything is compiled with INFERENCE_PRECISION_HINT f32 (int8 layers run int8, the rest f32),
batch 1, 224x224, the given threads; each model in its own process, all timed in turn round after round, so drift
of a shared machine moves every model alike. Ratios (median over rounds of the ratio within a round): int8 over its
own fp32 (goal <= 0.6) and VMamba int8 over ConvNeXt-T int8 (goal <= 1.3). Cosine: VMamba int8 vs fp32 logits on the
built-in photos. Random weights (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def build_vmamba(args, workdir: Path) -> dict:
    """{precision: (xml, library)} for the VMamba artifacts, exported once into workdir."""
    from vmamba_export.exporter import export_artifact
    from vmamba_export.lowering import ExportOptions
    from vmamba_export.model_source import resolve_model
    from vmamba_export.targets import get_target

    out, source = {}, None
    for precision in ("fp32", "int8"):
        folder = workdir / f"{args.model}-cpu-openvino-{precision}"
        if not (folder / "manifest.json").exists():
            source = source or resolve_model(args.model, random_weights=True)
            options = ExportOptions(
                precision=precision,
                calib=args.calib,
                calib_samples=args.calib_samples,
                extra={"show_progress": False},
            )
            t0 = time.perf_counter()
            export_artifact(source, get_target("cpu-openvino"), folder, precision, overwrite=True, options=options)
            print(f"exported {folder.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        entry = json.loads((folder / "manifest.json").read_text())["entry"]
        out[precision] = (folder / entry["model"], folder / entry["extension_library"])
    return out


def build_convnext(args, workdir: Path, calib: np.ndarray) -> dict:
    """{precision: (xml, None)} for ConvNeXt-T, fp32 IR and its NNCF int8 twin."""
    import openvino as ov
    from convnext import export_convnext_onnx

    from vmamba_export.lowering import ExportOptions
    from vmamba_export.quantize.openvino_int8 import nncf_settings, quantize_model

    fp32_xml, int8_xml = workdir / "convnext_tiny_fp32.xml", workdir / "convnext_tiny_int8.xml"
    if not int8_xml.exists():
        onnx_path = workdir / "convnext_tiny.onnx"
        if not onnx_path.exists():
            export_convnext_onnx(str(onnx_path))
        model = ov.convert_model(str(onnx_path))
        ov.save_model(model, str(fp32_xml), compress_to_fp16=False)
        t0 = time.perf_counter()
        settings = nncf_settings(ExportOptions(precision="int8", calib_method="minmax"))
        ov.save_model(quantize_model(model, calib, [], settings), str(int8_xml), compress_to_fp16=False)
        print(f"quantized convnext_tiny in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return {"fp32": (fp32_xml, None), "int8": (int8_xml, None)}


def time_interleaved(models: dict, args) -> tuple[dict, dict]:
    """{label: merged rounds}, {label: per-round results}: each compiled model timed in its own process (f32 hint: the
    int8 layers run int8, the rest f32) once per round, in turn (benchmarks/cpu_openvino.py's worker). Models never
    share a process, so no idle thread pool competes with the one being timed."""
    from cpu_openvino import time_in_subprocess

    from vmamba_export.bench import interleaved, merge_rounds

    samples = interleaved(models, lambda label: time_in_subprocess(*models[label], "f32", args), args.rounds)
    return {label: merge_rounds(results) for label, results in samples.items()}, samples


def cosine(models: dict, images: np.ndarray) -> dict:
    from vmamba_export.runtime.openvino_backend import compile_ir
    from vmamba_export.validate import parity_metrics

    def logits(xml, lib):
        compiled = compile_ir(xml, lib, "f32", None)
        return np.concatenate([compiled(images[i : i + 1])[0] for i in range(len(images))])

    return parity_metrics(logits(*models["int8"]), logits(*models["fp32"]))


def main() -> int:
    from vmamba_export.bench import add_round_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vmamba_tiny_s1l8")
    parser.add_argument("--calib", default="builtin")
    parser.add_argument("--calib-samples", type=int, default=32)
    add_round_arguments(parser, runs=15, rounds=5)
    args = parser.parse_args()

    from vmamba_export.bench import machine_description, paired_ratio, write_results
    from vmamba_export.data.sources import load_batch
    from vmamba_export.model_source import resolve_model
    from vmamba_export.quantize.calibration import load_calibration_batch
    from vmamba_export.runtime.openvino_backend import cpu_capabilities, installed_openvino_version

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vmamba-ov-int8-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    spec = resolve_model(args.model, random_weights=True).model.config.input  # ImageNet preprocessing, as ConvNeXt
    vmamba = build_vmamba(args, workdir)
    calib, _ = load_calibration_batch(args.calib, spec, args.calib_samples, show_progress=False)
    convnext = build_convnext(args, workdir, calib)
    models = {f"{args.model} {p}": v for p, v in vmamba.items()} | {
        f"convnext_tiny {p}": v for p, v in convnext.items()
    }
    timing, samples = time_interleaved(models, args)
    photos, _, _ = load_batch("builtin", spec, None)
    parity = cosine(vmamba, photos)

    pairs = {
        f"{args.model} int8/fp32": (f"{args.model} int8", f"{args.model} fp32"),
        "convnext_tiny int8/fp32": ("convnext_tiny int8", "convnext_tiny fp32"),
        f"{args.model} int8 / convnext_tiny int8": (f"{args.model} int8", "convnext_tiny int8"),
        f"{args.model} fp32 / convnext_tiny fp32": (f"{args.model} fp32", "convnext_tiny fp32"),
    }
    ratios = {name: paired_ratio(samples[a], samples[b]) for name, (a, b) in pairs.items()}
    goals = {f"{args.model} int8/fp32": 0.6, f"{args.model} int8 / convnext_tiny int8": 1.3}
    lines = [
        f"# int8 vs fp32, OpenVINO {installed_openvino_version()} CPU ({args.threads} threads, batch 1, 224x224, "
        f"{args.rounds} interleaved rounds of {args.runs} runs)",
        "",
        f"Machine: {machine_description()}; CPU plugin capabilities: {', '.join(cpu_capabilities())}. Calibration: "
        f"{args.calib} ({len(calib)} images), NNCF minmax, transformer model type, fast bias correction.",
        "",
        "| model | median ms | min ms |",
        "|---|---:|---:|",
    ]
    lines += [f"| {label} | {t['median_ms']:.1f} | {t['min_ms']:.1f} |" for label, t in timing.items()]
    lines += ["", "| ratio (median over rounds of the ratio within a round) | value | goal |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.2f} | {'<= ' + str(goals[k]) if k in goals else '-'} |" for k, v in ratios.items()]
    lines += [
        "",
        f"{args.model} int8 vs fp32 logits on {len(photos)} built-in photos: cosine min {parity['cosine_min']:.5f}, "
        f"top-1 agreement {parity['top1_agreement']:.3f}.",
    ]
    write_results(args.out, "\n".join(lines), {"timing": timing, "ratios": ratios, "parity": parity})
    return 0


if __name__ == "__main__":
    sys.exit(main())
