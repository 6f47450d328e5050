"""cpu-tvm (meta-schedule tuned) against cpu-onnxruntime fp32, same model, same run, same threads.

    python benchmarks/tvm_cpu.py [--model vmamba_tiny_s1l8] [--tune-budget 300] [--tune-db DIR [--tune-again]]
                                 [--threads 2] [--rounds 3] [--runs 20] [--parity] [--workdir DIR]
                                 [--out results/tvm_cpu.md]

Builds (unless already in --workdir) the cpu-onnxruntime artifact and a cpu-tvm artifact tuned on this machine for
--tune-budget seconds (starting from --tune-db if given: a previous artifact or its tuning/ folder), then times both at
batch 1, 224x224, random weights, each in its own process, in turn, round after round. Prints the latency ratio
TVM / ONNX Runtime (median over rounds of the ratio within a round; goal: <= 1.5) and the tuning time spent.
--parity also validates the cpu-tvm artifact on the built-in photos against PyTorch fp32 (rel L2 <= 1e-5, top-1 100%).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GOAL_RATIO = 1.5


def worker(folder: str, threads: int, warmup: int, runs: int) -> dict:
    import numpy as np

    from vmamba_export.bench import peak_rss_mb, time_calls
    from vmamba_export.runtime import load

    predictor = load(Path(folder), threads=threads)
    size = predictor.input_spec.image_size
    x = np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)
    stats = time_calls(lambda: predictor(x), warmup, runs)
    return {**stats, "peak_rss_mb": peak_rss_mb(), "evaluated_with": getattr(predictor.backend, "evaluated_with", None)}


def time_in_subprocess(folder: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(folder), str(args.threads), str(args.warmup), str(args.runs)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"timing {folder} failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    from vmamba_export.bench import add_round_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vmamba_tiny_s1l8")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--tune-budget", type=float, default=300.0, help="seconds of tuning (0: apply --tune-db only)")
    parser.add_argument("--tune-db", type=Path, help="start from this database (artifact folder or its tuning/)")
    parser.add_argument("--tune-again", action="store_true", help="with --tune-db: tune the covered ops too")
    parser.add_argument("--layout", choices=("channels-first", "channels-last"), help="cpu-tvm graph layout (v2)")
    add_round_arguments(parser, runs=20, rounds=3, warmup=3)
    parser.add_argument("--parity", action="store_true", help="also validate cpu-tvm on the built-in photos")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        folder, threads, warmup, runs = args.worker
        print(json.dumps(worker(folder, int(threads), int(warmup), int(runs))))
        return 0

    from vmamba_export.bench import machine_description, write_results
    from vmamba_export.exporter import export_artifact
    from vmamba_export.lowering import ExportOptions
    from vmamba_export.model_source import resolve_model
    from vmamba_export.targets import get_target

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vmamba-tvm-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    source = resolve_model(args.model, random_weights=True, seed=0)
    ort_dir = workdir / f"{args.model}-cpu-onnxruntime"
    if not (ort_dir / "manifest.json").exists():
        export_artifact(source, get_target("cpu-onnxruntime"), ort_dir, max_size=args.size, overwrite=True)
    tvm_dir = workdir / f"{args.model}-cpu-tvm"
    extra = {"tvm_num_cores": args.threads, "input_size": args.size, "tvm_mcpu": "native", "batch": 1}
    if args.layout:
        extra["layout"] = args.layout
    if args.tune_budget:
        extra["tune_budget"] = args.tune_budget
    if args.tune_db:
        extra["tune_db"] = str(args.tune_db)
        extra["tune_again"] = args.tune_again
    elif args.tune_budget == 0:
        raise SystemExit("--tune-budget 0 needs --tune-db (nothing to apply otherwise)")
    start = time.perf_counter()
    manifest = export_artifact(
        source, get_target("cpu-tvm"), tvm_dir, max_size=args.size, overwrite=True, options=ExportOptions(extra=extra)
    )
    build_s = time.perf_counter() - start
    tuning = manifest["lowering"]["tuning"]
    print(
        f"cpu-tvm built in {build_s:.0f} s; tuning {tuning['tuning_seconds']:.0f} s, {tuning['trials']} trials, "
        f"{tuning['tasks_covered']}/{tuning['tasks']} ops tuned ({tuning['tasks_reused']} reused)",
        file=sys.stderr,
    )
    from vmamba_export.bench import interleaved, merge_rounds, paired_ratio

    folders = {"ort": ort_dir, "tvm": tvm_dir}
    samples = interleaved(folders, lambda key: time_in_subprocess(folders[key], args), args.rounds)
    ort, tvm = merge_rounds(samples["ort"]), merge_rounds(samples["tvm"])
    ratio = paired_ratio(samples["tvm"], samples["ort"])
    parity = None
    if args.parity:
        from vmamba_export.validate import validate_artifact

        v = validate_artifact(tvm_dir, show_progress=False)
        parity = {"status": v["status"], "rel_l2": v["runs"][0]["rel_l2"], "top1": v["runs"][0]["top1_agreement"]}
        parity["images"] = v["num_images"]
    rows = {
        "machine": machine_description(),
        "model": args.model,
        "threads": args.threads,
        "runs": args.runs,
        "warmup": args.warmup,
        "onnxruntime": ort,
        "tvm": tvm,
        "ratio": ratio,
        "goal_ratio": GOAL_RATIO,
        "build_seconds": build_s,
        "tuning": tuning,
        "tvm_target": manifest["lowering"]["tvm_target"],
        "parity": parity,
        "workdir": str(workdir),
    }
    lines = [
        f"cpu-tvm (meta-schedule tuned) vs cpu-onnxruntime fp32: {args.model}, random weights, batch 1, "
        f"{args.size}x{args.size}, {args.threads} threads, {args.rounds} interleaved rounds of {args.runs} runs after "
        f"{args.warmup} warm-up (ratio: median over rounds of the ratio within a round)",
        f"Machine: {rows['machine']}; TVM target {manifest['lowering']['tvm_target']}",
        "",
        "| target | median ms | p90 ms | min ms | peak RSS MB |",
        "|---|---:|---:|---:|---:|",
        f"| cpu-onnxruntime | {ort['median_ms']:.1f} | {ort['p90_ms']:.1f} | {ort['min_ms']:.1f} | "
        f"{ort['peak_rss_mb']:.0f} |",
        f"| cpu-tvm | {tvm['median_ms']:.1f} | {tvm['p90_ms']:.1f} | {tvm['min_ms']:.1f} | {tvm['peak_rss_mb']:.0f} |",
        "",
        f"TVM / ONNX Runtime: **{ratio:.2f}x** (goal <= {GOAL_RATIO}x: {'met' if ratio <= GOAL_RATIO else 'missed'})",
        f"Tuning: {tuning['tuning_seconds']:.0f} s of a {tuning['budget_seconds'] or 0:.0f} s budget, "
        f"{tuning['trials']} trials; {tuning['tasks_covered']}/{tuning['tasks']} ops have a tuned schedule "
        f"({tuning['tasks_reused']} reused from {tuning['database_from'] or 'no database'}); build {build_s:.0f} s",
    ]
    if parity:
        lines.append(
            f"Parity of cpu-tvm vs PyTorch fp32 on {parity['images']} built-in photos: rel L2 {parity['rel_l2']:.2e}, "
            f"top-1 agreement {100 * parity['top1']:.0f}% ({parity['status']})"
        )
    write_results(args.out, "\n".join(lines), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
