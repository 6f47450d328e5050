"""Where one CUDA-graph replay's time goes at batch 1: kernels or the gaps between them.

Nsight Compute (benchmarks/gpu_profile.py) times each kernel alone, caches flushed, so its sums overstate small
kernels whose inputs a graph replay finds in L2, and it says nothing of the time between kernels. This script times
the replays themselves: CUPTI (through torch.profiler) records every kernel a replay of ONNX Runtime's captured graph
runs, with its start and end on the GPU. Per replay it reports the span (first kernel start to last kernel end), the
summed kernel time and the idle time between kernels, and per kernel kind where the busy time goes, for
vmamba_tiny_s1l8 (cuda-onnxruntime artifact, `--fusions` forms) and ConvNeXt-T exported and run the same way.

Two probes beside it: the cost of one node in a chain of dependent empty kernels in a CUDA graph (the floor any
graph of that many kernels pays), and cuBLASLt's fused bias + GELU epilogue against a GEMM followed by its own
bias-GELU kernel at the MLP shapes (torch's `_addmm_activation`), the fusion ONNX Runtime does not make.

On the GPU machine (onnxruntime-gpu first on PYTHONPATH, vmamba_export/_native carried):

    python3 benchmarks/gpu_timeline.py [--fusions on folded] [--precisions fp16 fp32] [--replays 30]

Results: $OUT (else ./gpu_results)/gpu_timeline.{json,log}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_profile import GROUPS  # noqa: E402

OUT = Path(os.environ.get("OUT", ROOT / "gpu_results"))
LOG_LINES: list[str] = []


def log(message: str) -> None:
    print(message, flush=True)
    LOG_LINES.append(message)


def kernel_group(name: str) -> str:
    return next((group for group, pattern in GROUPS if re.search(pattern, name)), "other")


def replay_kernels(replay, replays: int) -> list[list[dict]]:
    """The GPU activity (kernels, copies, memsets) of `replays` calls of `replay`, one list per call in start order.
    Calls are separated by a synchronize and a 2 ms pause, so a gap above 1 ms splits them."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(5):
        replay()
    torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(replays):
                replay()
                torch.cuda.synchronize()
                time.sleep(0.002)
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    gpu = [
        {"name": e["name"], "cat": e["cat"], "start": float(e["ts"]), "dur": float(e.get("dur", 0.0))}
        for e in events
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
    ]
    gpu.sort(key=lambda e: e["start"])
    calls: list[list[dict]] = []
    last_end = None
    for event in gpu:
        if last_end is None or event["start"] - last_end > 1000.0:
            calls.append([])
        calls[-1].append(event)
        last_end = max(last_end or 0.0, event["start"] + event["dur"])
    return calls


def summarize_calls(calls: list[list[dict]]) -> dict:
    """Median span, busy and idle time of the calls (us), and the median call's busy time per kernel kind and per
    kernel name."""
    spans, busies, counts = [], [], []
    per_kind: dict[str, list[float]] = defaultdict(list)
    per_name: dict[str, list[float]] = defaultdict(list)
    launches: dict[str, int] = {}
    for call in calls:
        start = call[0]["start"]
        end = max(e["start"] + e["dur"] for e in call)
        busy = sum(e["dur"] for e in call)
        spans.append(end - start)
        busies.append(busy)
        counts.append(len(call))
        kinds: dict[str, float] = defaultdict(float)
        names: dict[str, float] = defaultdict(float)
        name_count: dict[str, int] = defaultdict(int)
        for e in call:
            kind = e["cat"] if e["cat"] != "kernel" else kernel_group(e["name"])
            kinds[kind] += e["dur"]
            names[e["name"]] += e["dur"]
            name_count[e["name"]] += 1
        for kind, us in kinds.items():
            per_kind[kind].append(us)
        for name, us in names.items():
            per_name[name].append(us)
        launches = dict(name_count)
    gaps = [s - b for s, b in zip(spans, busies, strict=True)]
    return {
        "calls": len(calls),
        "kernels_per_call": statistics.median(counts),
        "span_us": statistics.median(spans),
        "busy_us": statistics.median(busies),
        "idle_us": statistics.median(gaps),
        "busy_by_kind_us": {k: statistics.median(v) for k, v in sorted(per_kind.items(), key=lambda kv: -sum(kv[1]))},
        "top_kernels": [
            {"name": name[:110], "us": statistics.median(v), "launches": launches.get(name, 0)}
            for name, v in sorted(per_name.items(), key=lambda kv: -statistics.median(kv[1]))[:15]
        ],
    }


def report(label: str, wall_ms: float, summary: dict) -> None:
    log(
        f"\n{label}: replay wall {wall_ms:.3f} ms (median, no profiler); profiled: span {summary['span_us']:.0f} us, "
        f"kernels busy {summary['busy_us']:.0f} us, idle between them {summary['idle_us']:.0f} us, "
        f"{summary['kernels_per_call']:.0f} kernels a replay ({summary['calls']} replays)"
    )
    for kind, us in summary["busy_by_kind_us"].items():
        log(f"    {kind:14s} {us:7.1f} us")
    log("  top kernels (median us per replay, launches):")
    for row in summary["top_kernels"]:
        log(f"    {row['us']:7.1f} us {row['launches']:4d}x  {row['name']}")


def vmamba_runner(precision: str, fusions: str, work: Path, batch: int, batch1_fusions: str = "default"):
    """batch1_fusions: the artifact's cuda_batch1_fusions ("default": the exporter's choice)."""
    from gpu_check import export_or_load

    from vmamba_export import load
    from vmamba_export.runtime.cuda_graphs import CudaGraphRunner

    settings = {"cuda_fusions": fusions}
    if batch1_fusions != "default":
        settings["cuda_batch1_fusions"] = batch1_fusions
    name = f"{precision}-{fusions}-batch1-{batch1_fusions}"
    folder = export_or_load("vmamba_tiny_s1l8", name, precision, settings, None, work)
    plain = load(folder, cuda_graph=False)
    graphed = load(folder)
    runner = CudaGraphRunner(graphed.backend.graphs.make_session, plain.backend.session)
    return graph_of(runner, batch)


def convnext_runner(precision: str, work: Path, batch: int):
    from gpu_check import convnext_onnx

    from vmamba_export.runtime.cuda_graphs import CudaGraphRunner
    from vmamba_export.runtime.onnxruntime_backend import CUDA_PROVIDER, dim_overrides_for, make_session

    path = convnext_onnx(precision, None, work)
    cuda_options = {"use_tf32": "0"} if precision == "fp32" else {}
    session = make_session(path, None, None, [(CUDA_PROVIDER, cuda_options), "CPUExecutionProvider"])
    graph_providers = [(CUDA_PROVIDER, {**cuda_options, "enable_cuda_graph": "1"}), "CPUExecutionProvider"]
    runner = CudaGraphRunner(
        lambda shape: make_session(path, None, None, graph_providers, dim_overrides_for(session, shape)), session
    )
    return graph_of(runner, batch)


def graph_of(runner, batch: int):
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
    runner.run_numpy(x)
    graph = runner._graph_for(x.shape)
    graph.replay()  # ONNX Runtime's warm-up runs and the capture
    return graph.replay


def disable_optimizers(ort, names: list[str]) -> None:
    """Every InferenceSession made from here on is made with `disabled_optimizers=names` (ONNX Runtime's own
    keyword), the runtime's sessions and the peer's alike."""
    base = ort.InferenceSession

    class Session(base):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("disabled_optimizers", names)
            super().__init__(*args, **kwargs)

    ort.InferenceSession = Session


def node_floor() -> dict:
    """GPU time per node of a CUDA graph of dependent one-element kernels (torch), from chains of 1 and 201."""
    import torch

    from vmamba_export.bench import cuda_time_ms

    x = torch.zeros(1, device="cuda")
    times = {}
    for n in (1, 201):
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            for _ in range(n):
                x.add_(1.0)
        times[n] = cuda_time_ms(graph.replay, runs=50)
    per_node_us = (times[201] - times[1]) * 1e3 / 200
    log(f"\nnode floor: a graph of 201 dependent one-element kernels {times[201]:.3f} ms: {per_node_us:.2f} us a node")
    return {"chain_1_ms": times[1], "chain_201_ms": times[201], "per_node_us": per_node_us}


def gelu_epilogue_probe() -> list[dict]:
    """fc1 of each stage of vmamba_tiny_s1l8 at 224 (rows = batch x positions, C -> 4C), fp16, inside CUDA graphs:
    GEMM + bias, then GELU (two kernels) against cuBLASLt's GELU_BIAS epilogue (one)."""
    import torch
    from gpu_check import graph_time_ms

    rows = []
    for batch, side, c in ((1, 56, 96), (1, 28, 192), (1, 14, 384), (1, 7, 768), (128, 56, 96), (128, 14, 384)):
        m = batch * side * side
        x = torch.randn(m, c, device="cuda", dtype=torch.float16)
        w = torch.randn(c, 4 * c, device="cuda", dtype=torch.float16) / c**0.5
        bias = torch.randn(4 * c, device="cuda", dtype=torch.float16)
        calls = 20 if batch == 1 else 3
        timed = {}
        for label, fn in (
            (
                "gemm_then_gelu",
                lambda b=bias, a=x, m=w: torch.nn.functional.gelu(torch.addmm(b, a, m), approximate="tanh"),
            ),
            ("gelu_epilogue", lambda b=bias, a=x, m=w: torch._addmm_activation(b, a, m, use_gelu=True)),
        ):
            timed[label] = graph_time_ms(fn, calls=calls, runs=20) * 1e3
        ref = torch.nn.functional.gelu(torch.addmm(bias, x, w).float(), approximate="none")
        err = (torch._addmm_activation(bias, x, w, use_gelu=True).float() - ref).abs().max().item()
        row = {"batch": batch, "side": side, "c": c, **timed, "max_abs_vs_erf_gelu": err}
        rows.append(row)
        log(
            f"fc1 b{batch} {side}x{side} C {c}: GEMM then GELU {timed['gemm_then_gelu']:.1f} us, GELU epilogue "
            f"{timed['gelu_epilogue']:.1f} us (x{timed['gemm_then_gelu'] / timed['gelu_epilogue']:.2f}); "
            f"epilogue vs erf GELU max abs {err:.1e}"
        )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fusions", nargs="+", default=["on", "folded"], help="vmamba cuda_fusions forms")
    parser.add_argument(
        "--batch1-fusions",
        nargs="+",
        default=["default"],
        help="vmamba cuda_batch1_fusions forms, each with every --fusions form (default: the exporter's choice)",
    )
    parser.add_argument("--precisions", nargs="+", default=["fp16", "fp32"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--replays", type=int, default=30)
    parser.add_argument("--skip-probes", action="store_true")
    parser.add_argument(
        "--disable-optimizers",
        nargs="+",
        default=[],
        metavar="NAME",
        help="ONNX Runtime graph optimizers to turn off in every session of the run, ours and the peer's alike (a "
        "probe: e.g. MatMulAddFusion, which with fixed shapes turns MatMul + bias into Gemm with its own bias kernel)",
    )
    args = parser.parse_args(argv)
    import onnxruntime as ort
    import torch

    from vmamba_export.bench import time_calls

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    if args.disable_optimizers:
        disable_optimizers(ort, args.disable_optimizers)
    OUT.mkdir(parents=True, exist_ok=True)
    results: dict = {"gpu": torch.cuda.get_device_name(0), "onnxruntime": ort.__version__, "rows": {}}
    results["disabled_optimizers"] = args.disable_optimizers
    log(
        f"{results['gpu']}, onnxruntime {ort.__version__}, torch {torch.__version__}, batch {args.batch}, "
        f"optimizers off: {args.disable_optimizers or 'none'}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        configs = [(f"convnext_tiny {p}", lambda p=p: convnext_runner(p, work, args.batch)) for p in args.precisions]
        configs += [
            (
                f"vmamba_tiny_s1l8 {p} {f}" + ("" if b1 == "default" else f" batch1 {b1}"),
                lambda p=p, f=f, b1=b1: vmamba_runner(p, f, work, args.batch, b1),
            )
            for p in args.precisions
            for f in args.fusions
            for b1 in args.batch1_fusions
        ]
        for label, make in configs:
            try:
                replay = make()
                wall = time_calls(replay, warmup=10, runs=200)["median_ms"]
                summary = summarize_calls(replay_kernels(replay, args.replays))
                summary["wall_ms"] = wall
                results["rows"][label] = summary
                report(label, wall, summary)
            except Exception as exc:  # one failed row must not lose the others
                log(f"{label} FAILED: {exc!r}")
                results["rows"][label] = {"error": repr(exc)}
    if not args.skip_probes:
        for name, probe in (("node_floor", node_floor), ("gelu_epilogue", gelu_epilogue_probe)):
            try:
                results[name] = probe()
            except Exception as exc:
                log(f"{name} FAILED: {exc!r}")
                results[name] = {"error": repr(exc)}
    (OUT / "gpu_timeline.json").write_text(json.dumps(results, indent=1))
    (OUT / "gpu_timeline.log").write_text("\n".join(LOG_LINES) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
