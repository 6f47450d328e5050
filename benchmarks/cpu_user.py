"""CPU latency as a user measures it: our artifacts through the public loader against ConvNeXt-T run the way a user
would run it, same runtime and precision, in the same rounds.

    python benchmarks/cpu_user.py [--models vmamba_tiny_s1l8 ...] [--rows ort-fp32 ort-int8 ov-fp32 ov-bf16 ov-int8]
                                  [--thread-counts 2] [--batches 1] [--rounds 3] [--runs 20] [--out F.md]

Ours: `vmamba_export.load(artifact, threads=T)` and `predictor(batch)` on a float32 numpy batch, whatever the
predictor costs per call included; its own overhead per call is reported beside it, measured directly
(`vmamba_export.bench.predictor_overhead_us`: the same call with the runtime's work answered from a cache). The
peer, ConvNeXt-T (benchmarks/convnext.py), exported with
`torch.onnx.export` twice, at a fixed input shape and with a dynamic batch, and run directly by the runtime with its
documented latency settings: ONNX Runtime `InferenceSession` with `intra_op_num_threads`, int8 in ONNX Runtime's
QOperator U8S8 per-channel form (the project's quantizer, calibrated on the built-in photos); OpenVINO
`compile_model(..., {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": ..., "INFERENCE_NUM_THREADS": T})`,
int8 through NNCF's default `quantize` on the same photos. Each (row, model, threads, batch) is timed in its own
process once per round, in turn with the peers; the ratio is the median over rounds of ours / the fixed-shape peer's
median in the same round (the dynamic-shape peer's ratio is reported too). Random weights: speed does not depend on
them. 224 x 224.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# row -> (target, precision, runtime, OpenVINO inference precision hint)
ROWS = {
    "ort-fp32": ("cpu-onnxruntime", "fp32", "onnxruntime", None),
    "ort-int8": ("cpu-onnxruntime", "int8", "onnxruntime", None),
    "ov-fp32": ("cpu-openvino", "fp32", "openvino", "f32"),
    "ov-bf16": ("cpu-openvino", "bf16", "openvino", "bf16"),
    "ov-int8": ("cpu-openvino", "int8", "openvino", "f32"),
}
SIZE = 224


# ---- worker side: one measurement in this process ----


def time_artifact(folder: str, threads: int, batch: int, warmup: int, runs: int) -> dict:
    from vmamba_export import load
    from vmamba_export.bench import peak_rss_mb, predictor_overhead_us, time_calls

    predictor = load(folder, threads=threads)
    x = np.random.default_rng(0).standard_normal((batch, 3, SIZE, SIZE), dtype=np.float32)
    stats = time_calls(lambda: predictor(x), warmup, runs)
    return {**stats, "predictor_overhead_us": predictor_overhead_us(predictor, x), "peak_rss_mb": peak_rss_mb()}


def time_peer(path: str, runtime: str, hint: str | None, threads: int, batch: int, warmup: int, runs: int) -> dict:
    from vmamba_export.bench import peak_rss_mb, time_calls

    x = np.random.default_rng(0).standard_normal((batch, 3, SIZE, SIZE), dtype=np.float32)
    if runtime == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        stats = time_calls(lambda: session.run(None, {name: x}), warmup, runs)
    else:
        import openvino as ov

        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads}
        request = ov.Core().compile_model(path, "CPU", config).create_infer_request()
        stats = time_calls(lambda: request.infer({0: x}), warmup, runs)
    return {**stats, "peak_rss_mb": peak_rss_mb()}


def measure(spec: dict, args) -> dict:
    """One timing in its own process (runtimes' thread pools never share a process: an idle pool spins)."""
    from worker import run_in_worker

    return run_in_worker(__file__, {**spec, "warmup": args.warmup, "runs": args.runs})


def run_worker(spec: dict) -> dict:
    kind = spec.pop("kind")
    if kind == "artifact":
        return time_artifact(spec["path"], spec["threads"], spec["batch"], spec["warmup"], spec["runs"])
    return time_peer(
        spec["path"], spec["runtime"], spec["hint"], spec["threads"], spec["batch"], spec["warmup"], spec["runs"]
    )


# ---- building the models ----


def export_peer_onnx(path: Path, batch: int | None) -> Path:
    """ConvNeXt-T through torch.onnx.export: a fixed (batch, 3, 224, 224) input, or a dynamic batch when None."""
    if not path.exists():
        from convnext import export_convnext_onnx

        export_convnext_onnx(str(path), fixed_batch=batch)
    return path


def calibration_images(count: int = 16) -> np.ndarray:
    from vmamba_export.data.sources import load_batch
    from vmamba_export.models.configs import InputSpec

    batch, _, _ = load_batch("builtin", InputSpec(image_size=SIZE, resize=256), count)
    return batch


def peer_int8_onnx(fp32: Path, workdir: Path, calib: np.ndarray, fixed_batch: int | None = None) -> Path:
    """ConvNeXt-T int8 for ONNX Runtime: QOperator U8S8 per-channel, the project's quantizer, calibrated on photos.
    `fixed_batch`: the batch size a fixed-shape model takes (its calibration batches are that size); None for a
    dynamic batch (one image per calibration batch)."""
    from vmamba_export.quantize.onnxruntime_int8 import calibrate, prepare_model, quantize_with_cache

    out = workdir / f"{fp32.stem}_qop-u8s8.onnx"
    if not out.exists():
        prepared = prepare_model(fp32, workdir / f"{fp32.stem}_prepared.onnx")
        cache = workdir / f"{fp32.stem}_ranges.json"
        batch = fixed_batch or 1
        images = np.resize(calib, (-(-len(calib) // batch) * batch, *calib.shape[1:]))  # whole batches of it
        calibrate(prepared, images, "minmax", cache, None, show_progress=False, batch_size=batch)
        quantize_with_cache(prepared, out, cache, "minmax", "qop-u8s8", prepared.scan_feeders)
    return out


def peer_ir(onnx_path: Path, int8: bool, calib: np.ndarray) -> Path:
    """ConvNeXt-T as OpenVINO IR (ov.convert_model of the ONNX file); int8 through NNCF's default quantize."""
    import openvino as ov

    xml = onnx_path.with_name(onnx_path.stem + ("_nncf-int8" if int8 else "") + ".xml")
    if not xml.exists():
        model = ov.convert_model(str(onnx_path))
        if int8:
            import nncf

            batch_dim = model.inputs[0].get_partial_shape()[0]
            n = batch_dim.get_length() if batch_dim.is_static else 1  # a fixed-batch model takes batches of its size
            model = nncf.quantize(
                model, nncf.Dataset([np.repeat(calib[i : i + 1], n, axis=0) for i in range(len(calib))])
            )
        ov.save_model(model, str(xml), compress_to_fp16=False)
    return xml


def build(args, workdir: Path) -> dict:
    """{(row, model or peer label, batch): worker spec without threads}."""
    from vmamba_export.exporter import export_artifact
    from vmamba_export.lowering import ExportOptions
    from vmamba_export.model_source import resolve_model
    from vmamba_export.targets import get_target

    specs: dict = {}
    calib = calibration_images()
    for name in args.models:
        source = None
        for row in args.rows:
            target, precision, _, _ = ROWS[row]
            folder = workdir / f"{name}-{target}-{precision}"
            if not (folder / "manifest.json").exists():
                source = source or resolve_model(name, random_weights=True)
                t0 = time.perf_counter()
                options = ExportOptions(calib="builtin", calib_samples=16, extra={"show_progress": False})
                export_artifact(
                    source, get_target(target), folder, precision=precision, overwrite=True, options=options
                )
                print(f"exported {folder.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            for batch in args.batches:
                specs[(row, name, batch)] = {"kind": "artifact", "path": str(folder), "batch": batch}
    for batch in args.batches:
        for shape in ("fixed", "dynamic"):
            fp32 = export_peer_onnx(workdir / f"convnext_{shape}_b{batch}.onnx", batch if shape == "fixed" else None)
            for row in args.rows:
                _, precision, runtime, hint = ROWS[row]
                if runtime == "onnxruntime":
                    fixed = batch if shape == "fixed" else None
                    path = peer_int8_onnx(fp32, workdir, calib, fixed) if precision == "int8" else fp32
                else:
                    path = peer_ir(fp32, precision == "int8", calib)
                peer = {"kind": "peer", "path": str(path), "runtime": runtime, "hint": hint, "batch": batch}
                specs[(row, f"convnext_tiny ({shape} shape)", batch)] = peer
    return specs


def main() -> int:
    from vmamba_export.bench import add_round_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vmamba_tiny_s1l8"])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--thread-counts", nargs="+", type=int, help="default: --threads (2)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1])
    add_round_arguments(parser, runs=20, rounds=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0

    from vmamba_export.bench import interleaved, machine_description, merge_rounds, paired_ratio, write_results

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vmamba-cpu-user-"))
    workdir.mkdir(parents=True, exist_ok=True)
    specs = build(args, workdir)
    thread_counts = args.thread_counts or [args.threads]
    keys = [(*key, t) for key in specs for t in thread_counts]
    samples = interleaved(
        keys, lambda k: measure({**specs[k[:3]], "threads": k[3]}, args), args.rounds, lambda k: " ".join(map(str, k))
    )
    rows = []
    for row, name, batch, threads in keys:
        if name.startswith("convnext"):
            continue
        results = samples[(row, name, batch, threads)]
        fixed = samples[(row, "convnext_tiny (fixed shape)", batch, threads)]
        dynamic = samples[(row, "convnext_tiny (dynamic shape)", batch, threads)]
        rows.append(
            {
                "row": row,
                "model": name,
                "batch": batch,
                "threads": threads,
                **merge_rounds(results),
                "peer_fixed_median_ms": merge_rounds(fixed)["median_ms"],
                "peer_dynamic_median_ms": merge_rounds(dynamic)["median_ms"],
                "vs_convnext_fixed": paired_ratio(results, fixed),
                "vs_convnext_dynamic": paired_ratio(results, dynamic),
                "predictor_overhead_us": float(np.median([r["predictor_overhead_us"] for r in results])),
            }
        )
    lines = [
        f"{machine_description()}, {os.cpu_count()} threads available; {SIZE}x{SIZE}; {args.rounds} interleaved rounds "
        f"of {args.runs} runs after {args.warmup} warm-up; ratios: median over rounds of ours / ConvNeXt-T in the same "
        "round, same runtime and precision (goal <= 1.00 against the fixed-shape peer)",
        "",
        "| runtime precision | model | batch | threads | median ms | p90 ms | ConvNeXt-T fixed ms | x fixed | "
        "ConvNeXt-T dynamic ms | x dynamic | predictor overhead |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        share = r["predictor_overhead_us"] / 1e3 / r["median_ms"]
        lines.append(
            f"| {r['row']} | {r['model']} | {r['batch']} | {r['threads']} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | "
            f"{r['peer_fixed_median_ms']:.1f} | {r['vs_convnext_fixed']:.2f} | {r['peer_dynamic_median_ms']:.1f} | "
            f"{r['vs_convnext_dynamic']:.2f} | {r['predictor_overhead_us']:.0f} us ({100 * share:.2f}%) |"
        )
    write_results(args.out, "\n".join(lines), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
