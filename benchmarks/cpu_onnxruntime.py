"""CPU benchmark through ONNX Runtime: VMamba-T models in both ONNX lowerings against a ConvNeXt-T peer, same run.

    python benchmarks/cpu_onnxruntime.py [--models ...] [--threads 2] [--rounds 3] [--runs 20] [--out results/x.md]

Every model is timed in its own process (batch 1, 224x224, the given threads), after warm-up, once per round, the
models and ConvNeXt-T in turn; each ratio is the median over rounds of the ratio within a round, so the drift of a
shared machine's speed (tens of percent over minutes, seen here) moves both sides. For the custom-op artifacts ONNX
Runtime's profiler gives the share of time spent in the scan nodes. Random weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

DEFAULT_MODELS = ["vmamba_tiny_s1l8", "vmamba_tiny_s2l5", "vanilla_vmamba_tiny"]
LOWERINGS = ["cpu-onnxruntime", "onnx-portable"]


def worker(model_path: str, library: str, batch: int, threads: int, size: int, warmup: int, runs: int) -> dict:
    from vmamba_export.bench import peak_rss_mb, time_calls
    from vmamba_export.runtime.onnxruntime_backend import make_session

    session = make_session(Path(model_path), Path(library) if library != "-" else None, threads)
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
    name = session.get_inputs()[0].name
    stats = time_calls(lambda: session.run(None, {name: x}), warmup, runs)
    return {**stats, "peak_rss_mb": peak_rss_mb()}


def time_in_subprocess(model_path: Path, library: Path | None, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(model_path), str(library or "-")]
    cmd += [str(v) for v in (1, args.threads, 224, args.warmup, args.runs)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"timing {model_path} failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def scan_share(model_path: Path, library: Path, threads: int, runs: int = 10) -> float:
    """Fraction of node time spent in SelectiveScan2D nodes, from ONNX Runtime's profiler."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "profile")
        options.register_custom_ops_library(str(library))
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
        for _ in range(runs + 2):
            session.run(None, {session.get_inputs()[0].name: x})
        events = json.loads(Path(session.end_profiling()).read_text())
    total = scan = 0
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        total += event["dur"]
        if event.get("args", {}).get("op_name") == "SelectiveScan2D":
            scan += event["dur"]
    return scan / total if total else float("nan")


def main() -> int:
    from vmamba_export.bench import add_round_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--lowerings", nargs="+", default=LOWERINGS)
    add_round_arguments(parser, runs=20, rounds=3)
    parser.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        path, lib, *nums = args.worker
        print(json.dumps(worker(path, lib, *(int(n) for n in nums))))
        return 0

    from convnext import export_convnext_onnx

    from vmamba_export.bench import interleaved, machine_description, merge_rounds, paired_ratio
    from vmamba_export.exporter import export_artifact
    from vmamba_export.model_source import resolve_model
    from vmamba_export.targets import get_target

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vmamba-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    peer_path = workdir / "convnext_tiny.onnx"
    if not peer_path.exists():
        export_convnext_onnx(str(peer_path))
    peer_key = ("convnext_tiny (peer)", "standard ONNX")
    graphs = {peer_key: (peer_path, None)}  # (model, lowering) -> (onnx file, custom-op library or None)
    for name in args.models:
        source = resolve_model(name, random_weights=True)
        for lowering in args.lowerings:
            folder = workdir / f"{name}-{lowering}"
            if not (folder / "manifest.json").exists():
                t0 = time.perf_counter()
                export_artifact(source, get_target(lowering), folder, overwrite=True)
                print(f"exported {folder.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            manifest = json.loads((folder / "manifest.json").read_text())
            library = manifest["entry"].get("custom_op_library")
            graphs[(name, lowering)] = (folder / manifest["entry"]["model"], folder / library if library else None)

    samples = interleaved(graphs, lambda key: time_in_subprocess(*graphs[key], args), args.rounds, " ".join)
    rows = []
    for key, results in samples.items():
        row = {"model": key[0], "lowering": key[1], **merge_rounds(results)}
        row["vs_convnext"] = paired_ratio(results, samples[peer_key])
        custom = samples.get((key[0], "cpu-onnxruntime"))
        if key[1] == "onnx-portable" and custom:
            row["vs_custom_op"] = paired_ratio(results, custom)
        library = graphs[key][1]
        if library is not None:
            row["scan_share"] = scan_share(graphs[key][0], library, args.threads)
        rows.append(row)
    lines = [
        f"CPU ONNX Runtime {ort_version()}, {machine_description()}; batch 1, 224x224, {args.threads} threads; "
        f"{args.rounds} interleaved rounds of {args.runs} "
        f"runs after {args.warmup} warm-up; ratios: median over rounds of the ratio within a round",
        "",
        "| model | lowering | median ms | p90 ms | x ConvNeXt-T | portable / custom-op | scan share | peak RSS MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        share = f"{100 * r['scan_share']:.1f}%" if "scan_share" in r else "-"
        vs_custom = f"{r['vs_custom_op']:.2f}" if "vs_custom_op" in r else "-"
        lines.append(
            f"| {r['model']} | {r['lowering']} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | {r['vs_convnext']:.2f} | "
            f"{vs_custom} | {share} | {r['peak_rss_mb']:.0f} |"
        )
    from vmamba_export.bench import write_results

    write_results(args.out, "\n".join(lines), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
