"""How fast could any onnx-portable scan be here? A floor from ONNX Runtime's own elementwise speed, same run.

    python benchmarks/portable_floor.py [--threads 2] [--rounds 3] [--runs 15] [--workdir DIR] [--out FILE.md]

onnx-portable writes the scan in standard ONNX ops without Loop/Scan. Whatever the formulation (sequential steps,
blocked, log-depth prefix, cumulative sums), each state element (position x channel x state x direction) needs at
least these tensors materialised, because standard ONNX has no fused multiply-add and no op that runs a recurrence:

- d_state > 1, state-sized: dt * A (Mul), its Exp, decay * h (Mul), + drive (Add), the drive x * B (Mul), C * h
  (Mul): five binary ops and one Exp. The channel-sized work (softplus, dt * u) and the reduction over the states
  are not counted.
- d_state 1, per element: delta + bias (Add), softplus (counted as one Exp, though ONNX Runtime's Softplus is slower),
  dt * A, dt * u, x * B, decay * h, + drive, C * h, the merge of the four directions (seven more binary ops) and
  exp(dt * A): eight binary ops and two Exp-class ops.

The floor multiplies those counts by the model's element counts at 224 x 224 and by the best time per element that
ONNX Runtime's Mul and Exp reach on this machine (chains of nodes over tensors of 16 K to 4 M elements, the given
threads; the best size wins). The per-node overhead and the recurrence's extra passes come on top, so a real portable
scan is slower than the floor. Each issue goal leaves the portable scan a time budget S, computed from the
cpu-onnxruntime artifacts timed in the same rounds (each model in its own process; every figure the fastest run, as
the floor is a best case too; non-scan time N = latency x (1 - the scan nodes' share in ONNX Runtime's profile)); the
benchmark prints budget / floor per round (below 1: unreachable even at the floor):

- vanilla_vmamba_tiny onnx-portable <= 3x its cpu-onnxruntime artifact: S = 3 x custom-op - N. For d_state 16 the
  benchmark also prints two structural bounds (docs/scan-op.md): any chunked form adds three state-sized passes (the
  sum over the states of C * h; the entering state's multiply and add at every position of a chunk), so it costs at
  least 8 binary ops and one Exp per element; a form without chunks runs the update (a Mul and an Add node) per
  position on that position's (4, N, Di) slice, timed here at each stage's slice size, and the other unavoidable
  passes at the floor's speed. Bounds are optimistic; the benchmark also times the leanest form of each class it
  could build, both without the direction gathers, softplus and merge a real form needs, at every stage of
  vanilla_vmamba_tiny: without chunks (the per-position chain alone) and chunked (7 state-sized passes and a MatMul
  for C h, one step of every chunk at a time, the best chunk and channel grouping per stage).
- vmamba_tiny_s1l8 onnx-portable int8 <= 0.6x its fp32: (N_int8 + S) / (N_fp32 + S) <= 0.6, i.e.
  S = (0.6 N_fp32 - N_int8) / 0.4, int8 the QDQ U8S8 graph onnx-portable uses.

Random weights (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SIZES = (1 << 14, 1 << 16, 1 << 18, 1 << 20, 1 << 22)
CHAIN = 60  # nodes per timed chain
# Op counts per element of the unavoidable work (module docstring): (binary ops, Exp-class ops).
OPS_PER_STATE_ELEMENT = {"d_state > 1": (5, 1), "d_state 1": (8, 2)}
PORTABLE_MAX_RATIO = 3.0  # issue 4: onnx-portable <= 3x the custom-op artifact
INT8_MAX_RATIO = 0.6  # issue 6: int8 <= 0.6x the same target's fp32
FLOOR_MODELS = ("vanilla_vmamba_tiny", "vmamba_tiny_s1l8")


def fastest_run_s(session, feeds: dict, warmup: int, runs: int) -> float:
    """Seconds of the fastest of `runs` runs after `warmup` (a floor: the least disturbed run)."""
    for _ in range(warmup):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return min(times)


def _chain_ns(op: str, threads: int, sizes: tuple[int, ...] = SIZES) -> dict[int, float]:
    """ns per element of one `op` node (Mul: x * c; Exp: exp(x)) by tensor size: the fastest of 9 runs of a chain of
    CHAIN nodes (a floor: the least disturbed run). The Exp chain overflows to inf after a few nodes, which does not
    change its speed (checked against Exp + Mul(-1) pairs less the Mul, whose values stay finite)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    out = {}
    for size in sizes:
        nodes, prev = [], "x"
        for i in range(CHAIN):
            nodes.append(helper.make_node(op, [prev, "c"] if op == "Mul" else [prev], [f"t{i}"]))
            prev = f"t{i}"
        nodes[-1].output[0] = "y"
        inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [size]) for n in ("x", "c")]
        output = helper.make_tensor_value_info("y", TensorProto.FLOAT, [size])
        model = helper.make_model(
            helper.make_graph(nodes, "chain", inputs if op == "Mul" else inputs[:1], [output]),
            opset_imports=[helper.make_opsetid("", 17)],
            ir_version=9,
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every node
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        feeds = {"x": np.full(size, -0.5, np.float32)}
        if op == "Mul":
            feeds["c"] = np.full(size, 0.9999, np.float32)
        out[size] = fastest_run_s(session, feeds, warmup=2, runs=9) / CHAIN / size * 1e9
    return out


def elementwise_ns(threads: int) -> dict:
    """ns per element of a Mul node and of an Exp node, by tensor size, and the best of each."""
    mul, exp = _chain_ns("Mul", threads), _chain_ns("Exp", threads)
    return {"Mul": mul, "Exp": exp, "best_mul": min(mul.values()), "best_exp": min(exp.values())}


def model_elements(name: str, size: int = 224) -> int:
    """Scan elements (position x channel x state x direction) of one image through every block of `name`."""
    from portable_scan import stage_shapes

    return sum(blocks * 4 * side * side * di * n for blocks, di, n, side in stage_shapes(name, size))


def unavoidable_ops(name: str) -> tuple[int, int]:
    """(binary ops, Exp-class ops) per scan element of `name` (module docstring)."""
    from vmamba_export.models import get_config

    return OPS_PER_STATE_ELEMENT["d_state 1" if get_config(name).d_state == 1 else "d_state > 1"]


def scan_floor_ms(name: str, ns_binary: float, ns_exp: float) -> float:
    binary, exp = unavoidable_ops(name)
    return model_elements(name) * (binary * ns_binary + exp * ns_exp) * 1e-6


def chunked_bound_ms(name: str, ns_binary: float, ns_exp: float) -> float:
    """d_state > 1: the unavoidable passes plus the three every chunked form adds (module docstring)."""
    binary, exp = unavoidable_ops(name)
    return model_elements(name) * ((binary + 3) * ns_binary + exp * ns_exp) * 1e-6


def position_slices(name: str, size: int = 224) -> list[tuple[int, int]]:
    """(positions per inference, elements of one position's (4, N, Di) slice) per stage of `name`."""
    from portable_scan import stage_shapes

    return [(blocks * side * side, 4 * n * di) for blocks, di, n, side in stage_shapes(name, size)]


def node_us(name: str, threads: int) -> dict[int, float]:
    """us per Mul node on one position's (4, N, Di) slice of each stage of `name` (fastest run of a chain)."""
    slices = position_slices(name)
    ns = _chain_ns("Mul", threads, tuple(sorted({el for _, el in slices})))
    return {el: v * el * 1e-3 for el, v in ns.items()}


def sequential_bound_ms(name: str, ns_binary: float, ns_exp: float, per_node_us: dict[int, float]) -> float:
    """A form without chunks: the state update h = decay * h + drive is a Mul and an Add node per position on that
    position's slice (`per_node_us`); the other unavoidable passes (dt * A, its Exp, x * B, C * h) at the floor's
    best per-element speed, however they are grouped."""
    binary, exp = unavoidable_ops(name)
    passes_ms = model_elements(name) * ((binary - 2) * ns_binary + exp * ns_exp) * 1e-6
    return passes_ms + sum(2 * positions * per_node_us[el] for positions, el in position_slices(name)) * 1e-3


def _lean_session(g, y: str, shapes: dict[str, list[int]], threads: int):
    """(session, random feeds) for a lean scan graph built in `g` (the onnx-portable lowering's graph builder) on
    inputs dt, x, B, C, A of `shapes`, with output `y`. Lean: inputs already laid out for the graph and already through
    softplus (no direction gathers, softplus or merge: a complete form adds those, so timing it bounds its class from
    below)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        g.nodes,
        "lean",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in shapes.items()],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()}
    feeds["dt"] = np.abs(feeds["dt"]) * 0.1
    feeds["A"] = -np.abs(feeds["A"])
    return session, feeds


def _split(g, name: str, pieces: int, axis: int) -> list[str]:
    return g.op("Split", name, axis=axis, num_outputs=pieces, outputs=pieces) if pieces > 1 else [name]


def _sequential_stage_session(positions: int, di: int, n: int, threads: int):
    """One block's state recursion written one position at a time, on inputs laid out position-major: per position
    Mul(dt, A), Exp, Mul(x, B), Mul(decay, h), Add(drive), Mul(C, h), ReduceSum over the states; one Split per input
    and one Concat of y."""
    from vmamba_export.lowering.onnx_portable_scan import _Builder

    g = _Builder()
    dt, x, b, c = (_split(g, name, positions, axis=0) for name in ("dt", "x", "B", "C"))
    state, ys = None, []
    for t in range(positions):
        decay = g.op("Exp", g.op("Mul", dt[t], "A"))
        drive = g.op("Mul", x[t], b[t])
        state = drive if state is None else g.op("Add", g.op("Mul", decay, state), drive)
        ys.append(g.op("ReduceSum", g.op("Mul", c[t], state), g.ints(2), keepdims=1))
    y = g.op("Concat", *ys, axis=0)
    shapes = {"dt": [positions, 4, 1, di], "x": [positions, 4, 1, di], "B": [positions, 4, n, 1]}
    return _lean_session(g, y, shapes | {"C": shapes["B"], "A": [1, 4, n, di]}, threads)


def _chunked_stage_session(positions: int, di: int, n: int, chunk: int, threads: int):
    """One block's state recursion in chunks of `chunk` positions, all chunks at once, on inputs laid out
    (chunks, chunk, 4, ., Di) (positions padded to whole chunks, as a real form pads), one step of every chunk at a
    time (a slice of cache size). Pass 1 per step: dt * A, Exp, x * B, the local state decay * h + drive. The states
    entering the chunks one chunk after the other, each chunk's decay exp(A * sum dt) from the channel-sized dt (a Mul
    and an Add on one chunk's (4, N, Di) end slice). Pass 2 per step: the true state decay * h + drive from the
    entering one (pass 1's decays and drives kept), and y = C h as one MatMul over the states. 7 state-sized passes
    and a MatMul reading the state: the unavoidable six plus the chunked bound's three (docs/scan-op.md), C * h and
    the sum over the states folded into the MatMul."""
    from vmamba_export.lowering.onnx_portable_scan import _Builder

    g = _Builder()
    chunks = -(-positions // chunk)
    dt, x, b, c = (_split(g, name, chunk, axis=1) for name in ("dt", "x", "B", "C"))
    decay = [g.op("Exp", g.op("Mul", dt[t], "A")) for t in range(chunk)]
    drive = [g.op("Mul", x[t], b[t]) for t in range(chunk)]
    state = drive[0]
    for t in range(1, chunk):
        state = g.op("Add", g.op("Mul", decay[t], state), drive[t])
    chunk_decay = g.op("Exp", g.op("Mul", g.op("ReduceSum", "dt", g.ints(1)), "A"))
    ends, end_decays = _split(g, state, chunks, axis=0), _split(g, chunk_decay, chunks, axis=0)
    entering = [g.op("Mul", ends[0], g.scalar(0.0))]  # zeros of a chunk's slice shape: no state enters chunk 0
    for k in range(1, chunks):
        entering.append(g.op("Add", g.op("Mul", end_decays[k - 1], entering[-1]), ends[k - 1]))
    state = g.op("Concat", *entering, axis=0)
    ys = []
    for t in range(chunk):
        state = g.op("Add", g.op("Mul", decay[t], state), drive[t])
        ys.append(g.op("MatMul", c[t], state))
    y = g.op("Concat", *ys, axis=1)
    shapes = {"dt": [chunks, chunk, 4, 1, di], "x": [chunks, chunk, 4, 1, di], "B": [chunks, chunk, 4, n, 1]}
    return _lean_session(g, y, shapes | {"C": [chunks, chunk, 4, 1, n], "A": [1, 1, 4, n, di]}, threads)


def sequential_form_sessions(name: str, threads: int) -> list[tuple[int, object, dict]]:
    """(blocks, session, feeds) per stage of `name` for `lean_form_ms`."""
    from portable_scan import stage_shapes

    return [
        (blocks, *_sequential_stage_session(side * side, di, n, threads)) for blocks, di, n, side in stage_shapes(name)
    ]


CHUNKED_CHUNKS = (8, 16, 32, 64)
CHUNKED_GROUPS = (1, 2, 4, 8)  # channel groups, each its own graph: smaller slices stay in L2 at the later stages


def chunked_form_sessions(name: str, threads: int) -> tuple[list[tuple[int, object, dict]], list[tuple[int, int]]]:
    """The lean chunked form's best (chunk, channel groups) per stage of `name` (fastest of 3 runs each, one
    candidate alive at a time), as ((blocks x groups, session, feeds) per stage for `lean_form_ms`, the choices).
    Groups are timed as one group's graph times the groups, without the Split and Concat a real form would add."""
    from portable_scan import stage_shapes

    stages, choices = [], []
    for blocks, di, n, side in stage_shapes(name):
        best = None
        for chunk in CHUNKED_CHUNKS:
            for groups in CHUNKED_GROUPS:
                session, feeds = _chunked_stage_session(side * side, di // groups, n, chunk, threads)
                ms = groups * fastest_run_s(session, feeds, warmup=1, runs=3)
                if best is None or ms < best[0]:
                    best = (ms, chunk, groups, session, feeds)
        _, chunk, groups, session, feeds = best
        stages.append((blocks * groups, session, feeds))
        choices.append((chunk, groups))
    return stages, choices


def lean_form_ms(stages: list[tuple[int, object, dict]]) -> float:
    """A lean form's time for a whole inference: per stage, its multiplicity x the fastest of 5 runs."""
    return sum(count * fastest_run_s(session, feeds, warmup=1, runs=5) * 1e3 for count, session, feeds in stages)


def build_models(workdir: Path) -> dict[str, tuple[Path, Path]]:
    """cpu-onnxruntime graphs (custom-op library): vanilla_vmamba_tiny fp32, vmamba_tiny_s1l8 fp32 and int8 (QDQ U8S8,
    calibrated on the built-in photos), cached in `workdir`."""
    from vmamba_export.data.sources import load_batch
    from vmamba_export.kernels_paths import ort_library_path
    from vmamba_export.lowering.onnx_export import export_onnx
    from vmamba_export.model_source import resolve_model
    from vmamba_export.quantize.onnxruntime_int8 import calibrate, prepare_model, quantize_with_cache

    library = ort_library_path()
    if library is None:
        raise SystemExit("the custom-op library is not built: python -m vmamba_export.build_kernels")
    models, inputs = {}, {}
    for name in FLOOR_MODELS:
        source = resolve_model(name, random_weights=True)
        inputs[name] = source.model.config.input
        fp32 = workdir / f"{name}_fp32.onnx"
        if not fp32.exists():
            print(f"exporting {name}", file=sys.stderr)
            export_onnx(source.model.eval(), fp32, scan="custom-op", max_size=1024)
        models[f"{name} fp32"] = (fp32, library)
    int8 = workdir / "vmamba_tiny_s1l8_int8.onnx"
    if not int8.exists():
        print("quantizing vmamba_tiny_s1l8", file=sys.stderr)
        calib, _, _ = load_batch("builtin:16", inputs["vmamba_tiny_s1l8"], None)
        prepared = prepare_model(workdir / "vmamba_tiny_s1l8_fp32.onnx", workdir / "vmamba_tiny_s1l8_prepared.onnx")
        cache = workdir / "vmamba_tiny_s1l8_ranges.json"
        calibrate(prepared, calib, "minmax", cache, library, show_progress=False)
        quantize_with_cache(prepared, int8, cache, "minmax", "qdq-u8s8", prepared.scan_feeders)
    models["vmamba_tiny_s1l8 int8"] = (int8, library)
    return models


def main() -> int:
    from vmamba_export.bench import add_round_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_round_arguments(parser, runs=15, rounds=3)
    args = parser.parse_args()

    from cpu_onnxruntime import ort_version, scan_share, time_in_subprocess

    from vmamba_export.bench import machine_description, merge_rounds, write_results

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vmamba-portable-floor-"))
    workdir.mkdir(parents=True, exist_ok=True)
    models = build_models(workdir)
    # Each round times the elementwise ops and then every model, so one round's floor and artifacts share the
    # machine's state (its speed drifts by tens of percent over minutes); ratios are per round.
    print("building the lean sequential form's graphs (~22,000 nodes at stage 1)", file=sys.stderr)
    sequential_stages = sequential_form_sessions("vanilla_vmamba_tiny", args.threads)
    print("choosing the lean chunked form's chunk and channel groups per stage", file=sys.stderr)
    chunked_stages, chunked_choices = chunked_form_sessions("vanilla_vmamba_tiny", args.threads)
    ops_rounds: list[dict] = []
    samples: dict[str, list[dict]] = {label: [] for label in models}
    for r in range(args.rounds):
        ops_rounds.append(elementwise_ns(args.threads))
        ops_rounds[-1]["node_us"] = node_us("vanilla_vmamba_tiny", args.threads)
        ops_rounds[-1]["sequential_form_ms"] = lean_form_ms(sequential_stages)
        ops_rounds[-1]["chunked_form_ms"] = lean_form_ms(chunked_stages)
        print(
            f"round {r}: Mul {ops_rounds[-1]['best_mul']:.3f} ns, Exp {ops_rounds[-1]['best_exp']:.3f} ns",
            file=sys.stderr,
        )
        for label, (path, lib) in models.items():
            samples[label].append(time_in_subprocess(path, lib, args))
            print(f"round {r}: {label} {samples[label][-1]['median_ms']:.1f} ms", file=sys.stderr)
    timing = {label: merge_rounds(results) for label, results in samples.items()}
    share = {label: scan_share(path, lib, args.threads) for label, (path, lib) in models.items()}

    # The portable scan's time budget per goal, from the custom-op artifacts' non-scan time N:
    # issue 4: N + S <= 3 x custom;  issue 6: (N_int8 + S) / (N_fp32 + S) <= 0.6, i.e. S <= (0.6 N_fp32 - N_int8) / 0.4.
    # Each round's fastest run on the artifacts' side, as the floor's op timings are fastest runs too.
    vanilla = "vanilla_vmamba_tiny fp32"
    per_round = []
    for r, ops in enumerate(ops_rounds):
        ms = {label: samples[label][r]["min_ms"] for label in models}
        non_scan = {label: ms[label] * (1 - share[label]) for label in models}
        floors = {name: scan_floor_ms(name, ops["best_mul"], ops["best_exp"]) for name in FLOOR_MODELS}
        budgets = {
            "vanilla_vmamba_tiny": PORTABLE_MAX_RATIO * ms[vanilla] - non_scan[vanilla],
            "vmamba_tiny_s1l8": (INT8_MAX_RATIO * non_scan["vmamba_tiny_s1l8 fp32"] - non_scan["vmamba_tiny_s1l8 int8"])
            / (1 - INT8_MAX_RATIO),
        }
        bounds = {
            "chunked": chunked_bound_ms("vanilla_vmamba_tiny", ops["best_mul"], ops["best_exp"]),
            "sequential": sequential_bound_ms("vanilla_vmamba_tiny", ops["best_mul"], ops["best_exp"], ops["node_us"]),
            "sequential form": ops["sequential_form_ms"],
            "chunked form": ops["chunked_form_ms"],
        }
        per_round.append(
            {"ms": ms, "non_scan_ms": non_scan, "floor_ms": floors, "budget_ms": budgets, "vanilla_bounds_ms": bounds}
        )
    fractions = {name: [r["budget_ms"][name] / r["floor_ms"][name] for r in per_round] for name in FLOOR_MODELS}
    order = sorted(range(len(per_round)), key=lambda i: fractions["vanilla_vmamba_tiny"][i])
    mid = per_round[order[len(order) // 2]]

    def sizes(d: dict) -> str:
        return ", ".join(f"{s // 1024} K: {v:.3f}" for s, v in d.items())

    lines = [
        f"# Floor of any onnx-portable scan: ONNX Runtime {ort_version()} CPU, {machine_description()}, "
        f"{args.threads} threads, batch 1, 224x224",
        "",
        f"{args.rounds} rounds; each times ONNX Runtime's Mul and Exp (fastest of 9 runs of {CHAIN}-node chains, by "
        f"tensor size), then each cpu-onnxruntime artifact in its own process (fastest of {args.runs} runs after "
        f"{args.warmup} warm-up). Scan share from ONNX Runtime's profiler. Budget: the time a portable scan may "
        f"take for the goal (vanilla: onnx-portable <= {PORTABLE_MAX_RATIO:.0f}x custom-op; s1l8: int8 <= "
        f"{INT8_MAX_RATIO} x fp32, with the same non-scan graphs as the custom-op artifacts).",
        "",
        "| round | Mul ns/el | Exp ns/el | "
        + " | ".join(f"{label} ms" for label in models)
        + " | vanilla floor ms | vanilla budget ms | s1l8 floor ms | s1l8 int8 budget ms"
        + " | vanilla chunked bound ms | vanilla sequential bound ms | vanilla lean sequential form ms"
        + " | vanilla lean chunked form ms |",
        "|---:|---:|---:|" + "---:|" * len(models) + "---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r, (ops, row) in enumerate(zip(ops_rounds, per_round, strict=True)):
        lines.append(
            f"| {r} | {ops['best_mul']:.3f} | {ops['best_exp']:.3f} | "
            + " | ".join(f"{row['ms'][label]:.1f}" for label in models)
            + "".join(f" | {row['floor_ms'][n]:.1f} | {row['budget_ms'][n]:.1f}" for n in FLOOR_MODELS)
            + "".join(f" | {v:.1f}" for v in row["vanilla_bounds_ms"].values())
            + " |"
        )
    ops = ops_rounds[per_round.index(mid)]
    lines += [
        "",
        f"Median round: Mul by size {sizes(ops['Mul'])}; Exp {sizes(ops['Exp'])} (ns per element). One Mul node on "
        "a vanilla position's (4, 16, Di) slice: "
        + ", ".join(f"{el // 1024} K elements {us:.1f} us" for el, us in ops["node_us"].items())
        + ". Lean chunked form's (chunk, channel groups) per stage: "
        + ", ".join(f"({chunk}, {groups})" for chunk, groups in chunked_choices)
        + ".",
        "",
        "| model | scan elements | unavoidable ops per element (binary + Exp) | scan share of the custom-op artifact |",
        "|---|---:|---|---:|",
    ]
    for name in FLOOR_MODELS:
        binary, exps = unavoidable_ops(name)
        lines.append(
            f"| {name} | {model_elements(name) / 1e6:.1f} M | {binary} + {exps} | {100 * share[name + ' fp32']:.1f}% |"
        )
    lines.append(f"| vmamba_tiny_s1l8 int8 (QDQ U8S8) | | | {100 * share['vmamba_tiny_s1l8 int8']:.1f}% |")
    lines.append("")
    for name, goal in (
        ("vanilla_vmamba_tiny", f"onnx-portable <= {PORTABLE_MAX_RATIO:.0f}x custom-op"),
        ("vmamba_tiny_s1l8", f"onnx-portable int8 <= {INT8_MAX_RATIO} x fp32"),
    ):
        f = fractions[name]
        lines.append(
            f"{name} ({goal}): budget / floor median **{statistics.median(f):.2f}**, range {min(f):.2f}..{max(f):.2f} "
            "(below 1: unreachable even by a portable scan doing nothing but its unavoidable elementwise passes)"
        )
    for key, what in (
        ("chunked", "the chunked bound"),
        ("sequential", "the sequential bound"),
        ("sequential form", "the measured lean sequential form"),
        ("chunked form", "the measured lean chunked form"),
    ):
        over = [r["vanilla_bounds_ms"][key] / r["budget_ms"]["vanilla_vmamba_tiny"] for r in per_round]
        lines.append(
            f"vanilla_vmamba_tiny: {what} / budget median {statistics.median(over):.2f}, range "
            f"{min(over):.2f}..{max(over):.2f} (above 1: no form of that class meets the goal)"
        )
    rows = {
        "chunked_form_choices": chunked_choices,
        "ops_rounds": ops_rounds,
        "rounds": per_round,
        "budget_over_floor": fractions,
        "timing": timing,
        "scan_share": share,
    }
    write_results(args.out, "\n".join(lines), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
