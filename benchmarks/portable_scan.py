"""The onnx-portable scan alone in ONNX Runtime, against the custom op, at every stage shape of a model.

    python benchmarks/portable_scan.py [--models vmamba_tiny_s1l8 ...] [--forms custom prefix blocked16 ...]
                                       [--threads 2] [--runs 10] [--repeats 3] [--max-size 1024]

Per model and form: one one-node scan model (the custom op `ai.vmamba::SelectiveScan2D`, or the portable ONNX function
inlined exactly as the onnx-portable lowering does, with the recursion depth for `--max-size`), timed at each stage's
224x224 shape (batch 1) in this process, forms interleaved and the whole round repeated `--repeats` times, so machine
load moves every form alike. A model's scan time is the sum over stages of depth x median per-block time. Forms:
`custom` (needs the custom-op library), `prefix` (the log-depth form the lowering used before), `blockedT` (the
blocked scan with chunk T), `cumsumT` (the cumsum form with chunk T, d_state 1 only).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_form(form: str) -> tuple[str, int, bool]:
    """ "prefix", "cumsumT" (d_state 1), or "blockedT" with an optional "keep"/"rebuild" suffix (pass 2 reuses or
    rebuilds the decays)."""
    if form == "prefix":
        return "prefix", 16, True
    if form.startswith("cumsum"):
        return "cumsum", int(form.removeprefix("cumsum")), True
    keep = not form.endswith("rebuild")
    return "blocked", int(form.removeprefix("blocked").removesuffix("keep").removesuffix("rebuild")), keep


def build_session(form: str, d_state: int, max_length: int, threads: int):
    import onnxruntime as ort

    from vmamba_export.kernels_paths import ort_library_path
    from vmamba_export.lowering.onnx_export import inline_portable_scan, one_node_scan_model

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    proto = one_node_scan_model(d_state)
    if form == "custom":
        options.register_custom_ops_library(str(ort_library_path()))
        nodes = 1
    else:
        kind, chunk, keep = parse_form(form)
        proto = inline_portable_scan(proto, max_length, d_state, kind, chunk, keep)
        nodes = len(proto.graph.node)
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"]), nodes


def stage_shapes(name: str, size: int = 224) -> list[tuple[int, int, int, int]]:
    """(blocks, Di, d_state, side) per stage of a model at size x size."""
    from vmamba_export.models import get_config

    cfg = get_config(name)
    out = []
    for i, depth in enumerate(cfg.depths):
        dim = cfg.dims * 2**i
        out.append((depth, int(cfg.ssm_ratio * dim), cfg.d_state, size // 4 // 2**i))
    return out


def feeds(di: int, n: int, side: int) -> dict:
    rng = np.random.default_rng(0)
    f = {
        "u": rng.standard_normal((1, di, side, side)),
        "delta": rng.standard_normal((1, 4, di, side, side)) - 2.0,
        "A_logs": np.log(np.tile(np.arange(1, n + 1), (4 * di, 1))),
        "B": rng.standard_normal((1, 4, n, side, side)),
        "C": rng.standard_normal((1, 4, n, side, side)),
        "D": rng.standard_normal(4 * di),
        "delta_bias": 0.1 * rng.standard_normal(4 * di),
    }
    return {k: v.astype(np.float32) for k, v in f.items()}


def median_ms(session, feed: dict, runs: int) -> tuple[float, float]:
    """Median wall and CPU (all threads of this process) milliseconds per run. On a shared machine the CPU time is
    the steadier figure: waiting for a core counts in wall time only."""
    session.run(None, feed)  # warm-up: allocations, first-run kernels
    walls, cpus = [], []
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        session.run(None, feed)
        walls.append((time.perf_counter() - t0) * 1e3)
        cpus.append((time.process_time() - c0) * 1e3)
    return statistics.median(walls), statistics.median(cpus)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vmamba_tiny_s1l8", "vmamba_tiny_s2l5", "vanilla_vmamba_tiny"])
    parser.add_argument("--forms", nargs="+", default=["custom", "prefix", "blocked16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-size", type=int, default=1024, help="largest input side the graph must take")
    args = parser.parse_args()
    stage1 = -(-args.max_size // 4)
    for name in args.models:
        shapes = stage_shapes(name)
        d_state = shapes[0][2]
        sessions = {}
        for form in args.forms:
            t0 = time.perf_counter()
            sessions[form] = build_session(form, d_state, stage1 * stage1, args.threads)
            print(f"{name} {form}: {sessions[form][1]} nodes, built in {time.perf_counter() - t0:.0f} s", flush=True)
        per_stage: dict[str, list[list[tuple[float, float]]]] = {f: [[] for _ in shapes] for f in args.forms}
        for _ in range(args.repeats):
            for s, (_, di, n, side) in enumerate(shapes):
                feed = feeds(di, n, side)
                for form in args.forms:
                    per_stage[form][s].append(median_ms(sessions[form][0], feed, args.runs))
        totals = {}
        for form in args.forms:
            walls = [statistics.median(w for w, _ in v) for v in per_stage[form]]
            cpus = [statistics.median(c for _, c in v) for v in per_stage[form]]
            wall = sum(depth * m for (depth, *_), m in zip(shapes, walls, strict=True))
            cpu = sum(depth * m for (depth, *_), m in zip(shapes, cpus, strict=True))
            totals[form] = (wall, cpu)
            stages = " ".join(f"{m:7.2f}" for m in walls)
            print(f"  {form:>10}: wall ms per block by stage [{stages}]  scan wall {wall:7.1f} ms, cpu {cpu:7.1f} ms")
        if "custom" in totals:
            base_wall, base_cpu = totals["custom"]
            ratios = ", ".join(
                f"{f} {totals[f][0] / base_wall:.1f}x wall, {totals[f][1] / base_cpu:.1f}x cpu"
                for f in args.forms
                if f != "custom"
            )
            print(f"  scan time over the custom op: {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
