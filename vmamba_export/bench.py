"""Latency of an artifact: median, p90 and throughput after warm-up, per batch size and thread count, and peak memory.

Each (batch, threads, size) point runs in its own process, so thread settings do not leak between points and the
peak resident memory measured is that point's alone (ONNX Runtime does not give memory back). Also the helpers the
benchmarks/ scripts share: CUDA-event timing, and interleaved rounds with paired ratios against a peer.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .artifact import read_manifest, update_manifest
from .errors import VMambaExportError
from .progress import progress_bar


def time_calls(fn: Callable[[], object], warmup: int, runs: int) -> dict:
    """Median, p90, mean and min of `runs` timed calls after `warmup` untimed ones, in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p90_ms": times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))],
        "mean_ms": statistics.fmean(times),
        "min_ms": times[0],
    }


def cuda_time_ms(fn: Callable[[], object], runs: int = 20, warmup: int = 3) -> float:
    """Median CUDA-event time of fn() on torch's current stream, in milliseconds (GPU benchmarks only)."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def write_results(out: Path | None, table: str, rows: list | dict) -> None:
    """Print a benchmark's Markdown table; with `out`, also keep it there and its rows as JSON beside it."""
    print(table)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table + "\n")
        out.with_suffix(".json").write_text(json.dumps(rows, indent=2, default=str) + "\n")


def peak_rss_mb() -> float:
    """Peak resident memory of this process, MB. Linux: VmHWM, which exec resets; ru_maxrss is not reset by exec
    (the kernel carries the forking parent's peak into it), so a worker started from a big parent would report the
    parent's memory."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / 2**20


def interleaved(keys: Iterable, measure: Callable[[Any], dict], rounds: int, name: Callable[[Any], str] = str) -> dict:
    """Run `measure(key)` for every key, `rounds` times, round-robin: {key: [result of round 0, 1, ...]}. Each
    result's median_ms is printed to stderr as it comes.

    On a shared machine speed drifts by tens of percent over minutes; timing a model and its peer in alternation and
    comparing them round by round (`paired_ratio`) keeps that drift out of the ratio."""
    samples: dict = {key: [] for key in keys}
    for _ in range(rounds):
        for key, results in samples.items():
            results.append(measure(key))
            print(f"{name(key)}: {results[-1]['median_ms']:.1f} ms", file=sys.stderr)
    return samples


def add_round_arguments(parser, *, runs: int, rounds: int, warmup: int = 5) -> None:
    """The flags every interleaved-rounds benchmark in benchmarks/ takes: threads, warm-up, runs per round, rounds,
    a folder to keep its exports in, and where to write its table (Markdown, JSON beside it)."""
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--runs", type=int, default=runs, help="timed runs per round")
    parser.add_argument("--rounds", type=int, default=rounds, help="each model timed once per round, in turn")
    parser.add_argument("--workdir", type=Path, help="keep the exported models here (default: a temp folder)")
    parser.add_argument("--out", type=Path, help="also write the table (Markdown) and JSON next to it")


def merge_rounds(results: list[dict]) -> dict:
    """One row from the rounds of one measurement: medians of the per-round figures, the best minimum, the largest
    peak memory, and the per-round medians themselves."""
    merged = {
        "median_ms": statistics.median(r["median_ms"] for r in results),
        "p90_ms": statistics.median(r["p90_ms"] for r in results),
        "min_ms": min(r["min_ms"] for r in results),
        "round_medians_ms": [r["median_ms"] for r in results],
    }
    if all("peak_rss_mb" in r for r in results):
        merged["peak_rss_mb"] = max(r["peak_rss_mb"] for r in results)
    return merged


def paired_ratio(results: list[dict], peer_results: list[dict]) -> float:
    """Median over rounds of (median ms / the peer's median ms in the same round)."""
    return statistics.median(r["median_ms"] / p["median_ms"] for r, p in zip(results, peer_results, strict=True))


class _AnsweredBackend:
    """A backend whose runs return outputs computed once beforehand; every other attribute is the real backend's."""

    def __init__(self, real, batch: np.ndarray):
        self._real = real
        # One run of the runtime: `run` gives the first of `run_outputs` where a backend has both.
        self._outputs = real.run_outputs(batch) if hasattr(real, "run_outputs") else [real.run(batch)]
        self._output = self._outputs[0]

    def __getattr__(self, name: str):
        return getattr(self._real, name)

    def run(self, batch: np.ndarray):
        return self._output

    def run_outputs(self, batch: np.ndarray):
        return self._outputs


def predictor_overhead_us(predictor, batch: np.ndarray, calls: int = 2000, budget_s: float = 0.5) -> float:
    """The predictor's own cost per call in microseconds, measured directly: the same `predictor(batch)` call with the
    runtime's work taken out (its backend answers from outputs computed once), so what is left is the input checks,
    conversion and dispatch a user's call pays on top of the runtime. (The difference of two timed medians of the
    full call is noise at this size.) At most `calls` calls, fewer (not under 20) where they would take more than
    about `budget_s` (big batches: the input check reads every value)."""
    real = predictor.backend
    predictor.backend = _AnsweredBackend(real, batch)
    try:
        start = time.perf_counter()
        predictor(batch)
        once = max(time.perf_counter() - start, 1e-9)
        calls = max(20, min(calls, int(budget_s / once)))
        return time_calls(lambda: predictor(batch), min(100, calls), calls)["median_ms"] * 1e3
    finally:
        predictor.backend = real


def bench_point(folder: Path, batch: int, threads: int, size: int, warmup: int, runs: int) -> dict:
    """One measurement in this process (the worker side). A cuda-onnxruntime artifact is timed twice: launching every
    kernel from the host (the plain figures) and replaying its CUDA graph (`cuda_graph`: the predictor's default)."""
    from .runtime import load

    predictor = load(folder, threads=threads, cuda_graph=False)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, predictor.channels, size, size), dtype=np.float32)
    stats = time_calls(lambda: predictor(x), warmup, runs)
    row = {
        "batch": batch,
        "threads": threads,
        "size": size,
        **stats,
        "throughput": batch / (stats["median_ms"] / 1e3),
        "predictor_overhead_us": predictor_overhead_us(predictor, x),
    }
    if getattr(predictor.backend, "on_cuda", False):
        graphed = load(folder, threads=threads)
        graph_stats = time_calls(lambda: graphed(x), warmup, runs)
        row["cuda_graph"] = {
            **graph_stats,
            "throughput": batch / (graph_stats["median_ms"] / 1e3),
            "model": graphed.backend.graph_model_path(x.shape).name,  # model.batch1.onnx at batch 1, where it exists
        }
    row["peak_rss_mb"] = peak_rss_mb()
    return row


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()}"


def bench_artifact(
    folder: Path,
    batches: list[int] | None = None,
    threads: list[int] | None = None,
    sizes: list[int] | None = None,
    warmup: int = 5,
    runs: int = 20,
    show_progress: bool = True,
    record: bool = False,
) -> dict:
    """Time the artifact at every (batch, threads, size) point, each in its own process. With `record`, also write the
    results into its manifest and report (the folder must then be writable); by default nothing is written."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    batches = batches or [1]
    threads = threads or [min(2, os.cpu_count() or 1)]
    if sizes:
        from .validate import check_sizes

        check_sizes(sizes, int(manifest["input"]["min_size"]), int(manifest["input"]["max_size"]))
    sizes = sizes or [manifest["input"]["preprocessing"]["image_size"]]
    points = [(b, t, s) for s in sizes for b in batches for t in threads]
    results = []
    with progress_bar(show_progress) as progress:
        task = progress.add_task("bench", total=len(points))
        for b, t, s in points:
            cmd = [
                sys.executable,
                "-m",
                "vmamba_export.bench",
                str(folder),
                str(b),
                str(t),
                str(s),
                str(warmup),
                str(runs),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise VMambaExportError(f"benchmark of {folder} (batch {b}, threads {t}, size {s}) failed: {last}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            progress.advance(task)
    bench = {"machine": machine_description(), "warmup": warmup, "runs": runs, "results": results}
    if record:
        update_manifest(folder, benchmark=bench)
    return bench


if __name__ == "__main__":  # worker: python -m vmamba_export.bench DIR BATCH THREADS SIZE WARMUP RUNS
    folder_arg, *nums = sys.argv[1:]
    b_, t_, s_, w_, r_ = (int(v) for v in nums)
    print(json.dumps(bench_point(Path(folder_arg), b_, t_, s_, w_, r_)))
