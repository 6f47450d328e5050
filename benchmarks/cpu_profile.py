"""Where a CPU inference spends its time, per ONNX Runtime op type: our vmamba_tiny_s1l8 graphs against ConvNeXt-T,
same runtime, same threads, from ONNX Runtime's own profiler (`SessionOptions.enable_profiling`, node kernel times
after graph optimisation, so fused and layout nodes such as ReorderInput/ReorderOutput appear as ORT runs them).

    python benchmarks/cpu_profile.py [--sizes 224 512] [--threads 2] [--runs 20] [--int8] [--openvino]
                                     [--upernet SIZE] [--workdir D] [--out F.md]

ONNX Runtime sessions have their input's symbolic dimensions fixed to the profiled shape, as the loader's per-shape
sessions do (runtime/onnxruntime_backend.py); before session 17 ours ran with symbolic shapes here, which left a
segmentation head's bilinear Resize outside ORT's blocked layout (about 54 ms more at 512 than the fixed-shape peer).

Graphs: ours as the cpu-onnxruntime target exports it (channel-first residual stream, projections as 1x1
convolutions that ORT runs in its blocked NCHWc layout, one custom scan node per block, each LayerNorm2d one
ChannelLayerNorm node: lowering/channel_norm.py), and for comparison the same graph with ONNX Runtime's Transpose ->
LayerNormalization -> Transpose instead (as the target exported it before that rewrite) and the channels-last form
the cuda-onnxruntime target uses (models/channels_last.py: projections as MatMuls, no NCHWc around them);
ConvNeXt-T exported by the same exporter at the fixed input shape (benchmarks/convnext.py). With --int8
(224 only), also the cpu-onnxruntime int8 artifact and the QOperator int8 ConvNeXt-T of cpu_user.py. Random weights.
With --openvino (224 only), the same for OpenVINO from its per-node counters (PERF_COUNT, summed by node type):
our cpu-openvino artifacts in fp32, bf16 and int8, compiled as the loader compiles them (fixed input shape, LATENCY
hint), against ConvNeXt-T IR converted from the fixed-shape ONNX file (int8 through NNCF's default quantize, as
cpu_user.py does) with the same hints. With --upernet SIZE, the vmamba_tiny_s1l8 UperNet of
benchmarks/segmentation_speed.py against its ConvNeXt-T UperNet (same head) at SIZE x SIZE, fp32, on both runtimes
(ours as the custom-op ONNX and the OpenVINO IR the targets write; the peer as ONNX at the fixed shape and its IR).
Each graph is profiled in its own process, batch 1; the tables give ms per
inference by op (node) type, summed over nodes, and the wall-clock median of the profiled runs.

"Floor" rows: the kernels that do the model's own arithmetic (convolutions and matrix products in any precision,
the scan, the normalisations, the activations and the residual additions: `ARITHMETIC_OPS`), summed as the runtime
runs them; everything else (layout conversions, quantize/dequantize, shape arithmetic, per-node overhead) left out.
Ours over the peer's whole wall time is then a lower bound on the ratio with these kernels: layout and fusion
work can remove the rest but not this. The scan is our own kernel, so a second bound replaces its measured time
by its arithmetic floor (`scan_floor_ms`: the per-step arithmetic of every scan row of the model, on registers only,
no memory traffic, on the same threads; the fused dt projection OpenVINO runs inside the op is left out too, so
this bound is low): "floor, ideal scan". Where even that exceeds 1.0, no change to the scan kernel can reach the
peer on that runtime with its kernels for everything else.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

MODEL = "vmamba_tiny_s1l8"
# Op (node) types that do a model's own arithmetic, in ONNX Runtime's and OpenVINO's names.
ARITHMETIC_OPS = {
    # ONNX Runtime
    "Conv", "Gemm", "MatMul", "QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger",
    "SelectiveScan2D", "ChannelLayerNorm", "LastAxisLayerNorm", "LayerNormalization", "SkipLayerNormalization", "Gelu",
    "BiasGelu", "FastGelu", "QuickGelu", "Sigmoid", "Mul", "Add",
    # OpenVINO CPU plugin ("Reference": an extension op, our scan; ReduceMean, RMS, NormalizeL2, Subtract: LayerNorm
    # pieces)
    "Convolution", "GroupConvolution", "FullyConnected", "FullyConnectedQuantizedLegacy", "MVN", "RMS", "ReduceMean",
    "NormalizeL2", "Eltwise", "Subgraph", "Reference", "Subtract", "Multiply", "Power", "Sqrt", "Divide",
    # both: the segmentation head's bilinear upsampling
    "Resize", "Interpolate",
}  # fmt: skip


def profile_worker(path: str, library: str | None, size: int, threads: int, runs: int) -> dict:
    """Op type -> (ms per run, nodes) and the wall-clock median of the profiled runs."""
    import time

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.gettempdir()) / f"cpu_profile_{os.getpid()}")
    if library:
        options.register_custom_ops_library(library)
    # The input's symbolic dimensions fixed to the profiled shape, as the loader's per-shape sessions fix them
    # (runtime/onnxruntime_backend.py): ORT then folds the shape arithmetic, e.g. a segmentation head's Resize sizes.
    import onnx

    shape = (1, 3, size, size)
    graph_input = onnx.load(path, load_external_data=False).graph.input[0]
    for dim, value in zip(graph_input.type.tensor_type.shape.dim, shape, strict=True):
        if dim.dim_param:
            options.add_free_dimension_override_by_name(dim.dim_param, value)
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal(shape, np.float32)}
    warmup = 5
    for _ in range(warmup):
        session.run(None, feed)
    walls = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        walls.append((time.perf_counter() - start) * 1e3)
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    per_op: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"]["op_name"]
            per_op[op][0] += event["dur"] / 1e3 / (warmup + runs)
            per_op[op][1] += 1
    return {
        "wall_median_ms": float(np.median(walls)),
        "ops": {op: (ms, count // (warmup + runs)) for op, (ms, count) in per_op.items()},
    }


PRECISIONS = ("fp32", "bf16", "int8")
SCAN_OPS = ("SelectiveScan2D", "Reference")  # ONNX Runtime, OpenVINO (an extension op runs as "Reference")


def scan_rows(size: int) -> int:
    """16-channel rows the model's scans step through at size x size: directions x channel blocks x positions."""
    from vmamba_export.models import build_model

    config = build_model(MODEL).config
    rows, side = 0, size // 4
    for depth, d_inner in zip(config.depths, config.d_inner, strict=True):
        rows += depth * 4 * -(-d_inner // 16) * side * side
        side = -(-side // 2)
    return rows


def scan_floor_ms(size: int, threads: int, runs: int = 30) -> float:
    """Median time of the scan kernel's arithmetic floor (kernels/cpu: scan_arithmetic_floor) for the model's rows."""
    import ctypes
    import time

    from vmamba_export.kernels_paths import scan_library_path

    lib = ctypes.CDLL(str(scan_library_path()))
    lib.vmamba_scan_arithmetic_floor.argtypes = [ctypes.c_int64, ctypes.c_int]
    lib.vmamba_scan_arithmetic_floor.restype = ctypes.c_float
    rows = scan_rows(size)
    times = []
    for _ in range(runs + 3):
        start = time.perf_counter()
        lib.vmamba_scan_arithmetic_floor(rows, threads)
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times[3:]))


def profile_openvino_worker(xml: str, library: str | None, hint: str, size: int, threads: int, runs: int) -> dict:
    """Node type -> (ms per run, nodes executed) from OpenVINO's per-node counters, and the wall-clock median."""
    import time

    from vmamba_export.runtime.openvino_backend import compile_ir

    compiled = compile_ir(Path(xml), Path(library) if library else None, hint, threads, True, (1, 3, size, size))
    request = compiled.create_infer_request()
    x = np.random.default_rng(0).standard_normal((1, 3, size, size), np.float32)
    for _ in range(5):
        request.infer({0: x})
    walls = []
    per_type: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for _ in range(runs):
        start = time.perf_counter()
        request.infer({0: x})
        walls.append((time.perf_counter() - start) * 1e3)
        for info in request.get_profiling_info():
            if str(info.status).endswith("EXECUTED") and "NOT_RUN" not in str(info.status):
                per_type[info.node_type][0] += info.real_time.total_seconds() * 1e3 / runs
                per_type[info.node_type][1] += 1
    return {
        "wall_median_ms": float(np.median(walls)),
        "ops": {op: (ms, count // runs) for op, (ms, count) in per_type.items()},
    }


def export_openvino_graphs(workdir: Path) -> dict[str, dict]:
    """name -> worker spec (xml, library, hint) for our cpu-openvino artifacts and the ConvNeXt-T IRs, at 224."""
    from cpu_user import calibration_images, export_peer_onnx, peer_ir

    from vmamba_export.artifact import read_manifest
    from vmamba_export.exporter import export_artifact
    from vmamba_export.lowering import ExportOptions
    from vmamba_export.model_source import resolve_model
    from vmamba_export.targets import get_target

    graphs = {}
    source = None
    for precision in ("fp32", "bf16", "int8"):
        folder = workdir / f"{MODEL}-cpu-openvino-{precision}"
        if not (folder / "manifest.json").exists():
            source = source or resolve_model(MODEL, random_weights=True)
            options = ExportOptions(calib="builtin", calib_samples=16, extra={"show_progress": False})
            export_artifact(
                source, get_target("cpu-openvino"), folder, precision=precision, overwrite=True, options=options
            )
        entry = read_manifest(folder)["entry"]
        graphs[f"{MODEL} {precision} (cpu-openvino)"] = {
            "xml": str(folder / entry["model"]),
            "library": str(folder / entry["extension_library"]),
            "hint": entry["inference_precision"],
        }
    onnx_fixed = export_peer_onnx(workdir / "convnext_tiny_224.onnx", 1)
    calib = calibration_images()
    for precision, hint in (("fp32", "f32"), ("bf16", "bf16"), ("int8", "f32")):
        xml = peer_ir(onnx_fixed, precision == "int8", calib)
        graphs[f"convnext_tiny {precision}, fixed 224"] = {"xml": str(xml), "library": None, "hint": hint}
    return graphs


def upernet_graphs(workdir: Path, size: int) -> dict[str, dict]:
    """name -> worker spec for the UperNet pair on both runtimes (benchmarks/segmentation_speed.py's models)."""
    import segmentation_speed as seg

    ours_ort = seg.build_ours_lowered(workdir, "ort-fp32", size)
    ours_ov = seg.build_ours_lowered(workdir, "ov-fp32", size)
    peer_onnx = seg.export_peer_onnx(workdir / f"convnext_upernet_{size}.onnx", size, fixed=True)
    common = {"size": size}
    return {
        "onnxruntime": {
            f"{MODEL} UperNet fp32": {"path": ours_ort["path"], "library": ours_ort["library"], **common},
            f"convnext_tiny UperNet fp32, fixed {size}": {"path": str(peer_onnx), "library": None, **common},
        },
        "openvino": {
            f"{MODEL} UperNet fp32": {"xml": ours_ov["path"], "library": ours_ov["library"], "hint": "f32", **common},
            f"convnext_tiny UperNet fp32, fixed {size}": {
                "xml": str(seg.peer_ir(peer_onnx)),
                "library": None,
                "hint": "f32",
                **common,
            },
        },
    }


def channel_norm_graph(path: Path) -> Path:
    """The custom-op graph at `path` as the cpu-onnxruntime target writes it: LayerNorm2d's Transpose ->
    LayerNormalization -> Transpose as one ChannelLayerNorm node (lowering/channel_norm.py). Written beside it."""
    import onnx

    from vmamba_export.lowering.channel_norm import use_channel_layer_norms

    out = path.with_name(f"{path.stem}_channel-norm.onnx")
    if not out.exists():
        proto = onnx.load(str(path))
        use_channel_layer_norms(proto)
        onnx.save_model(proto, str(out))
    return out


def export_graphs(workdir: Path, sizes: list[int], int8: bool) -> dict[str, tuple[Path, str | None, list[int]]]:
    """name -> (ONNX file, custom-op library or None, sizes it is profiled at)."""
    import torch
    from convnext import ConvNeXtTiny, export_peer_module

    from vmamba_export.kernels_paths import ort_library_path
    from vmamba_export.lowering import layout_graph
    from vmamba_export.lowering.onnx_export import export_onnx
    from vmamba_export.models import build_model

    library = str(ort_library_path())
    torch.manual_seed(0)
    model = build_model(MODEL).eval()
    graphs = {}
    for layout in ("channels-first", "channels-last"):
        path = workdir / f"{MODEL}_{layout}.onnx"
        if not path.exists():
            export_onnx(layout_graph(model, layout)[0], path, scan="custom-op", max_size=max(sizes))
        if layout == "channels-first":
            graphs[f"{MODEL} fp32 (cpu-onnxruntime)"] = (channel_norm_graph(path), library, sizes)
            graphs[f"{MODEL} fp32, ONNX Runtime LayerNorm"] = (path, library, sizes)
        else:
            graphs[f"{MODEL} fp32, channels-last"] = (path, library, sizes)
    for size in sizes:
        path = workdir / f"convnext_tiny_{size}.onnx"
        if not path.exists():
            torch.manual_seed(0)
            export_peer_module(ConvNeXtTiny().eval(), torch.randn(1, 3, size, size), None, str(path))
        graphs[f"convnext_tiny fp32, fixed {size}"] = (path, None, [size])
    if int8:
        from cpu_user import calibration_images, peer_int8_onnx

        from vmamba_export.exporter import export_artifact
        from vmamba_export.lowering import ExportOptions
        from vmamba_export.model_source import resolve_model
        from vmamba_export.targets import get_target

        folder = workdir / f"{MODEL}-cpu-onnxruntime-int8"
        if not folder.exists():
            options = ExportOptions(calib="builtin", calib_samples=16, extra={"show_progress": False})
            source = resolve_model(MODEL, random_weights=True)
            export_artifact(source, get_target("cpu-onnxruntime"), folder, precision="int8", options=options)
        graphs[f"{MODEL} int8 (cpu-onnxruntime)"] = (folder / "model.onnx", library, [224])
        peer = peer_int8_onnx(workdir / "convnext_tiny_224.onnx", workdir, calibration_images(), 1)
        graphs["convnext_tiny int8 (QOperator U8S8), fixed 224"] = (peer, None, [224])
    return graphs


def table(title: str, results: dict[str, dict], peer_prefix: str = "convnext") -> list[str]:
    """A Markdown table: op types by the largest time, the wall medians, and the floor row (module docstring)."""
    names = list(results)
    ops = sorted(
        {op for r in results.values() for op in r["ops"]},
        key=lambda op: -max(r["ops"].get(op, (0.0, 0))[0] for r in results.values()),
    )
    floors = {n: sum(ms for op, (ms, _) in results[n]["ops"].items() if op in ARITHMETIC_OPS) for n in names}
    lines = ["", f"### {title}", "", "| op type | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines.append("| **wall median** | " + " | ".join(f"**{results[n]['wall_median_ms']:.1f}**" for n in names) + " |")
    lines.append("| **floor (arithmetic ops)** | " + " | ".join(f"**{floors[n]:.1f}**" for n in names) + " |")
    for op in ops:
        cells = []
        for n in names:
            ms, count = results[n]["ops"].get(op, (0.0, 0))
            cells.append(f"{ms:.2f} ({count})" if count else "")
        lines.append(f"| {op}{'' if op in ARITHMETIC_OPS else ' (not arithmetic)'} | " + " | ".join(cells) + " |")
    return lines


def floor_ratios(results: dict[str, dict], scan_floor: float) -> list[dict]:
    """Per model of ours: its floor over the wall time of the peer of the same precision (matched by the name's
    precision word), the same with the scan at its arithmetic floor, and its measured wall ratio."""
    rows = []
    for name, r in results.items():
        if name.startswith("convnext"):
            continue
        precision = next(w for w in name.replace(",", " ").split() if w in PRECISIONS)
        peer = next(p for p in results if p.startswith("convnext") and precision in p.replace(",", " ").split())
        floor = sum(ms for op, (ms, _) in r["ops"].items() if op in ARITHMETIC_OPS)
        scan = sum(ms for op, (ms, _) in r["ops"].items() if op in SCAN_OPS)
        peer_wall = results[peer]["wall_median_ms"]
        rows.append(
            {
                "model": name,
                "peer": peer,
                "wall_ratio": r["wall_median_ms"] / peer_wall,
                "floor_ms": floor,
                "floor_ratio": floor / peer_wall,
                "scan_ms": scan,
                "scan_floor_ms": scan_floor,
                "ideal_scan_floor_ratio": (floor - scan + scan_floor) / peer_wall,
            }
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 512])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--int8", action="store_true", help="also the ONNX Runtime int8 graphs (224)")
    parser.add_argument("--openvino", action="store_true", help="also OpenVINO fp32, bf16 and int8 (224)")
    parser.add_argument("--upernet", type=int, metavar="SIZE", help="also the UperNet pair at SIZE, both runtimes")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        worker = profile_openvino_worker if "xml" in spec else profile_worker
        print(json.dumps(worker(**spec)))
        return 0

    from worker import run_in_worker

    from vmamba_export.bench import machine_description, write_results

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vmamba-cpu-profile-"))
    workdir.mkdir(parents=True, exist_ok=True)
    graphs = export_graphs(workdir, args.sizes, args.int8)
    lines = [
        f"{machine_description()}; batch 1, {args.threads} threads, {args.runs} profiled runs after 5 warm-up; "
        "ms per inference by op type (ONNX Runtime: node kernel times; OpenVINO: per-node counters), the wall-clock "
        "median of the same runs, and the floor (the arithmetic op types only: benchmarks/cpu_profile.py).",
    ]
    rows = []
    common = {"threads": args.threads, "runs": args.runs}
    for size in sorted({s for _, _, sizes in graphs.values() for s in sizes}):
        results = {}
        for name, (path, library, sizes) in graphs.items():
            if size in sizes:
                results[name] = run_in_worker(__file__, {"path": str(path), "library": library, "size": size, **common})
                print(f"{size}: {name}: {results[name]['wall_median_ms']:.1f} ms", file=sys.stderr)
        lines += table(f"ONNX Runtime, {size} x {size}", results)
        floors = floor_ratios(results, scan_floor_ms(size, args.threads))
        rows.append({"runtime": "onnxruntime", "size": size, "results": results, "floors": floors})
    if args.openvino:
        results = {}
        for name, spec in export_openvino_graphs(workdir).items():
            results[name] = run_in_worker(__file__, {**spec, "size": 224, **common})
            print(f"224: {name}: {results[name]['wall_median_ms']:.1f} ms", file=sys.stderr)
        lines += table("OpenVINO, 224 x 224", results)
        floors = floor_ratios(results, scan_floor_ms(224, args.threads))
        rows.append({"runtime": "openvino", "size": 224, "results": results, "floors": floors})
    if args.upernet:
        for runtime, specs in upernet_graphs(workdir, args.upernet).items():
            results = {}
            for name, spec in specs.items():
                results[name] = run_in_worker(__file__, {**spec, **common})
                print(f"{args.upernet}: {runtime} {name}: {results[name]['wall_median_ms']:.1f} ms", file=sys.stderr)
            title = f"{'ONNX Runtime' if runtime == 'onnxruntime' else 'OpenVINO'}, UperNet, {args.upernet}"
            lines += table(f"{title} x {args.upernet}", results)
            floors = floor_ratios(results, scan_floor_ms(args.upernet, args.threads))
            rows.append({"runtime": runtime, "size": args.upernet, "results": results, "floors": floors})
    lines += ["", "### Floors: ours / the peer of the same runtime, precision and size", ""]
    lines += [
        "| runtime | size | ours | wall ratio | floor ms | floor / peer wall | scan ms | scan floor ms | "
        "floor with ideal scan / peer wall |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        for f in row["floors"]:
            lines.append(
                f"| {row['runtime']} | {row['size']} | {f['model']} | {f['wall_ratio']:.2f} | {f['floor_ms']:.1f} | "
                f"{f['floor_ratio']:.2f} | {f['scan_ms']:.2f} | {f['scan_floor_ms']:.2f} | "
                f"**{f['ideal_scan_floor_ratio']:.2f}** |"
            )
    write_results(args.out, "\n".join(lines), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
