"""Whole models in ONNX Runtime: the onnx-portable scan forms against the custom-op lowering, same process, interleaved.

    python benchmarks/portable_model.py [--models vmamba_tiny_s1l8 ...] [--forms custom prefix blocked16 ...]
                                        [--threads 2] [--runs 10] [--repeats 3] [--workdir DIR] [--rss]

Each model is exported once with the custom op (`export_onnx(..., scan="custom-op")`, random weights); every portable
form is that graph with the scan function inlined, exactly as the onnx-portable lowering does (`prefix`: the log-depth
form the lowering exported before; `blockedT`: the blocked scan with chunk T; `cumsumT`: the cumsum form, d_state 1
only; the lowering exports cumsum8 for d_state 1 and blocked16 for d_state 16). All
forms are timed in this process, batch 1, 224x224, round-robin `--repeats` times, so machine load moves each alike;
the table gives medians of wall and CPU (all threads of the process) milliseconds and each form over `custom`. With
`--rss`, each form also runs alone in a fresh process that reports its peak resident memory (one model per process).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from portable_scan import parse_form  # noqa: E402  (the form names are the scan benchmark's)


def model_file(workdir: Path, name: str, form: str) -> Path:
    """The ONNX file of `name` with the scan lowered as `form`, exported on first use."""
    import onnx

    from vmamba_export.lowering.onnx_export import export_onnx, inline_portable_scan
    from vmamba_export.model_source import resolve_model
    from vmamba_export.models import get_config

    path = workdir / f"{name}-{form}.onnx"
    if path.exists():
        return path
    custom = workdir / f"{name}-custom.onnx"
    if not custom.exists():
        model = resolve_model(name, random_weights=True).model.eval()
        export_onnx(model, custom, scan="custom-op")
    if form == "custom":
        return custom
    proto = onnx.load(str(custom))
    d_state = get_config(name).d_state
    kind, chunk, keep = parse_form(form)
    max_length = 256 * 256  # stage 1 of the default max_size 1024, as export_onnx does
    proto = inline_portable_scan(proto, max_length, d_state, kind, chunk, keep)
    proto.ir_version = 10
    onnx.save_model(proto, str(path))
    return path


def session(path: Path, threads: int):
    from vmamba_export.kernels_paths import ort_library_path
    from vmamba_export.runtime.onnxruntime_backend import make_session

    library = ort_library_path() if path.stem.endswith("-custom") else None
    return make_session(path, library, threads)


def timed(sess, x: np.ndarray, runs: int) -> tuple[float, float]:
    name = sess.get_inputs()[0].name
    sess.run(None, {name: x})
    walls, cpus = [], []
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        sess.run(None, {name: x})
        walls.append((time.perf_counter() - t0) * 1e3)
        cpus.append((time.process_time() - c0) * 1e3)
    return statistics.median(walls), statistics.median(cpus)


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over fork and
    exec, so a worker started by a large parent reports the parent's peak."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_worker(path: str, threads: int) -> None:
    sess = session(Path(path), threads)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
    wall, cpu = timed(sess, x, 3)
    peak = peak_rss_mb()
    print(json.dumps({"peak_rss_mb": peak, "wall_ms": wall, "cpu_ms": cpu}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vmamba_tiny_s1l8", "vmamba_tiny_s2l5"])
    parser.add_argument("--forms", nargs="+", default=["custom", "prefix", "blocked16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vmamba-portable-bench"))
    parser.add_argument("--rss", action="store_true", help="also peak RSS per form, each in its own process")
    parser.add_argument("--no-timing", action="store_true", help="only the --rss runs")
    parser.add_argument("--rss-worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_worker:
        rss_worker(args.rss_worker[0], int(args.rss_worker[1]))
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
    for name in args.models:
        paths = {}
        for form in args.forms:
            t0 = time.perf_counter()
            paths[form] = model_file(args.workdir, name, form)
            print(f"{name} {form}: {paths[form].name} ready in {time.perf_counter() - t0:.0f} s", flush=True)
        if not args.no_timing:
            sessions = {form: session(path, args.threads) for form, path in paths.items()}
            results: dict[str, list[tuple[float, float]]] = {form: [] for form in args.forms}
            for _ in range(args.repeats):
                for form in args.forms:
                    results[form].append(timed(sessions[form], x, args.runs))
            base = results.get("custom")
            print(f"{name}: batch 1, 224x224, {args.threads} threads, {args.repeats} x {args.runs} runs")
            for form in args.forms:
                wall = statistics.median(w for w, _ in results[form])
                cpu = statistics.median(c for _, c in results[form])
                line = f"  {form:>10}: wall {wall:8.1f} ms  cpu {cpu:8.1f} ms"
                if base and form != "custom":
                    base_wall = statistics.median(w for w, _ in base)
                    base_cpu = statistics.median(c for _, c in base)
                    line += f"   vs custom: {wall / base_wall:5.2f}x wall, {cpu / base_cpu:5.2f}x cpu"
                print(line, flush=True)
            del sessions
        if args.rss:
            for form, path in paths.items():
                cmd = [sys.executable, __file__, "--rss-worker", str(path), str(args.threads)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"  {form}: rss run failed: {proc.stderr.strip()[-500:]}")
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                print(f"  {form:>10}: peak RSS {r['peak_rss_mb']:7.0f} MB (alone: wall {r['wall_ms']:.0f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
