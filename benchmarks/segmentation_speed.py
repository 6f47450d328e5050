"""Segmentation speed: the vmamba_tiny_s1l8 UperNet against a ConvNeXt-T UperNet of the same head, same runtime, same
resolution, timed in the same rounds.

    python benchmarks/segmentation_speed.py [--rows ort-fp32 ov-fp32] [--size 512] [--threads 2]
                                            [--rounds 3] [--runs 5] [--warmup 1] [--workdir D] [--out F.md]

Ours: `build_model("vmamba_tiny_s1l8", task="segmentation", num_classes=150)` (UPerHead 512 channels, the backbone
of upernet_vssm_tiny), random weights (speed does not depend on them), exported as the cpu-onnxruntime and
cpu-openvino artifacts export it: `lowering.onnx_export.export_onnx(..., scan="custom-op")` with dynamic batch,
height and width (for ONNX Runtime with LayerNorm2d as ChannelLayerNorm nodes, lowering/channel_norm.py), run by ONNX
Runtime with the custom-op library registered and the runtime loader's session
settings (intra-op threads T, inter-op 1); and `lowering.openvino_ir.lower_openvino` (the custom-op ONNX converted
with the extension), compiled as the loader compiles it (`runtime.openvino_backend.compile_ir`, the IR reshaped to
the fixed input shape, LATENCY hint, f32, T threads).
`--ours artifact` (the default) times what a user runs instead: the artifact built by `export_artifact` and
`vmamba_export.load(folder, threads=T)`, `predictor(batch)` (see `time_ours_artifact`); `--ours lowering` the bare
lowering path above; the results file says which path ran.

The peer: a ConvNeXt-T backbone (benchmarks/convnext.py blocks, widths 96-768 = VMamba-T's) with a LayerNorm per
output stage as mmseg's ConvNeXt backbone, the same UPerHead class (models/dense.py), the same bilinear upsampling
to the input size; exported by the same dynamo exporter at the same opset with the same dynamic axes, and once more
at the fixed shape (1, 3, S, S); run by the runtime directly with its documented latency settings (ONNX Runtime
`intra_op_num_threads`; OpenVINO `PERFORMANCE_HINT: LATENCY`, `INFERENCE_PRECISION_HINT: f32`,
`INFERENCE_NUM_THREADS`), the OpenVINO peer at the fixed shape as cpu_user.py does for classifiers. A third peer
row is the fixed-shape peer with the head rewrites our artifacts of that runtime apply (both: the bottleneck
convolutions of a Concat as sums of convolutions, lowering/concat_convs.py; ONNX Runtime also: the final bilinear
upsampling as the library's planar kernel, lowering/output_resize.py), which a user exporting ConvNeXt-T would not
have: against it the ratio compares the backbones alone.

Each (row, model) is timed in its own process once per round, in turn with the peers; the ratio is the median over
rounds of ours / the peer's median in the same round. At 512 x 512 on 2 cores one run takes seconds: the defaults
are few rounds and runs.
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

ROWS = {"ort-fp32": "onnxruntime", "ov-fp32": "openvino"}
OURS = "vmamba_tiny_s1l8 UperNet"
PEERS = (
    "convnext_tiny UperNet (same export)",
    "convnext_tiny UperNet (fixed shape)",
    "convnext_tiny UperNet (fixed shape, head rewritten as ours)",
)
HEAD_CHANNELS = 512
NUM_CLASSES = 150


# ---- the peer model ----


def convnext_upernet():
    """ConvNeXt-T + UPerHead(96..768 -> 512, 150 classes), logits at the input size. Random weights, seeded."""
    import torch
    import torch.nn.functional as F
    from convnext import ConvNeXtBlock, LayerNormChannelsFirst
    from torch import nn

    from vmamba_export.models.dense import UPerHead

    class ConvNeXtBackbone(nn.Module):
        """mmseg's ConvNeXt at out_indices (0, 1, 2, 3): stem, then per stage (downsampling from stage 1) its
        blocks; a channels-first LayerNorm on each stage's output."""

        def __init__(self, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)):
            super().__init__()
            self.downsample = nn.ModuleList(
                [nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), LayerNormChannelsFirst(dims[0]))]
                + [
                    nn.Sequential(LayerNormChannelsFirst(dims[i - 1]), nn.Conv2d(dims[i - 1], dims[i], 2, stride=2))
                    for i in range(1, 4)
                ]
            )
            self.stages = nn.ModuleList(
                nn.Sequential(*[ConvNeXtBlock(d) for _ in range(n)]) for n, d in zip(depths, dims)
            )
            self.norms = nn.ModuleList(LayerNormChannelsFirst(d) for d in dims)

        def forward(self, x):
            outs = []
            for down, stage, norm in zip(self.downsample, self.stages, self.norms):
                x = stage(down(x))
                outs.append(norm(x))
            return tuple(outs)

    class ConvNeXtUperNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = ConvNeXtBackbone()
            self.decode_head = UPerHead((96, 192, 384, 768), HEAD_CHANNELS, NUM_CLASSES, (1, 2, 3, 6))

        def forward(self, x):
            logits = self.decode_head(self.backbone(x))
            return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=False)

    torch.manual_seed(0)
    return ConvNeXtUperNet().eval()


def export_peer_onnx(path: Path, size: int, fixed: bool) -> Path:
    """The peer through the exporter ours goes through (torch.onnx.export, dynamo, same opset, optimize, IR version),
    with our dynamic axes (batch, height, width) or at the fixed shape (1, 3, size, size)."""
    if path.exists():
        return path
    import torch
    from convnext import export_peer_module

    model = convnext_upernet()
    if fixed:
        example, dynamic = torch.randn(1, 3, size, size), None
    else:
        example = torch.randn(2, 3, size, size)
        dynamic = {
            "x": {
                0: torch.export.Dim("batch", min=1, max=4096),
                2: torch.export.Dim("height", min=32, max=1024),
                3: torch.export.Dim("width", min=32, max=1024),
            }
        }
    export_peer_module(model, example, dynamic, path)
    return path


def head_as_ours_copy(onnx_path: Path, runtime: str) -> Path:
    """The peer with the head rewrites our artifacts of `runtime` get, so the backbones compare on the same head:
    both runtimes, each bottleneck convolution of a Concat as a sum of convolutions of its parts
    (lowering/concat_convs.py); ONNX Runtime also, the final bilinear upsampling as the library's planar kernel
    (lowering/output_resize.py), so that copy needs the custom-op library."""
    out = onnx_path.with_name(f"{onnx_path.stem}_head_as_ours_{runtime}.onnx")
    if not out.exists():
        import onnx

        from vmamba_export.lowering.concat_convs import split_concat_convs
        from vmamba_export.lowering.onnx_graph import static_shapes
        from vmamba_export.lowering.output_resize import use_bilinear_resize_for_outputs

        proto = onnx.load(str(onnx_path))
        shapes = static_shapes(proto)
        split = split_concat_convs(proto, shapes)
        resized = use_bilinear_resize_for_outputs(proto, shapes) if runtime == "onnxruntime" else 1
        if (split, resized) != (2, 1):
            raise RuntimeError(
                f"expected the peer's two bottlenecks split and its output resize replaced, got "
                f"{split} split, {resized} replaced"
            )
        onnx.save_model(proto, str(out))
    return out


def peer_ir(onnx_path: Path) -> Path:
    import openvino as ov

    xml = onnx_path.with_suffix(".xml")
    if not xml.exists():
        ov.save_model(ov.convert_model(str(onnx_path)), str(xml), compress_to_fp16=False)
    return xml


# ---- our model ----


def our_model():
    from vmamba_export.models import build_model
    from vmamba_export.models.configs import SEGMENTATION_INPUT

    return build_model(
        "vmamba_tiny_s1l8",
        task="segmentation",
        num_classes=NUM_CLASSES,
        head_channels=HEAD_CHANNELS,
        input=SEGMENTATION_INPUT,
    )


def build_ours_artifact(workdir: Path, target: str, size: int) -> Path:
    """The artifact path: export_artifact + (at timing) vmamba_export.load. Raises where segmenters cannot be exported
    as artifacts yet."""
    from vmamba_export.exporter import export_artifact
    from vmamba_export.model_source import ModelSource
    from vmamba_export.targets import get_target

    folder = workdir / f"ours-{target}-artifact"
    if not (folder / "manifest.json").exists():
        source = ModelSource(our_model(), {"kind": "random", "seed": 0})
        export_artifact(source, get_target(target), folder, max_size=max(size, 512), overwrite=True)
    return folder


def build_ours_lowered(workdir: Path, row: str, size: int) -> dict:
    """The lowering path: the custom-op ONNX file (+ library) or the OpenVINO IR (+ extension), as the targets
    write them."""
    from vmamba_export.kernels_paths import openvino_extension_path, ort_library_path

    if ROWS[row] == "onnxruntime":
        import onnx

        from vmamba_export.lowering.channel_norm import use_channel_layer_norms
        from vmamba_export.lowering.onnx_export import export_onnx

        path = workdir / "ours_custom-op_channel-norm.onnx"
        if not path.exists():
            export_onnx(our_model(), path, scan="custom-op", max_size=max(size, 512))
            proto = onnx.load(str(path))
            use_channel_layer_norms(proto)  # LayerNorm2d as one node, as cpu-onnxruntime writes it
            onnx.save_model(proto, str(path))
        return {"kind": "ours-ort", "path": str(path), "library": str(ort_library_path())}
    from vmamba_export.lowering import ExportOptions
    from vmamba_export.lowering.openvino_ir import lower_openvino
    from vmamba_export.targets import get_target

    folder = workdir / "ours-openvino"
    if not (folder / "model.xml").exists():
        folder.mkdir(parents=True, exist_ok=True)
        options = ExportOptions(precision="fp32", max_size=max(size, 512), extra={"show_progress": False})
        lower_openvino(our_model(), get_target("cpu-openvino"), folder, options)
    return {"kind": "ours-ov", "path": str(folder / "model.xml"), "library": str(openvino_extension_path())}


# ---- worker side: one measurement in this process ----


def _input(size: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)


def time_ours_artifact(spec: dict) -> dict:
    from vmamba_export import load
    from vmamba_export.bench import peak_rss_mb, time_calls

    predictor = load(spec["path"], threads=spec["threads"])
    x = _input(spec["size"])
    return {**time_calls(lambda: predictor(x), spec["warmup"], spec["runs"]), "peak_rss_mb": peak_rss_mb()}


def time_onnxruntime(spec: dict) -> dict:
    from vmamba_export.bench import peak_rss_mb, time_calls
    from vmamba_export.runtime.onnxruntime_backend import make_session

    library = Path(spec["library"]) if spec.get("library") else None
    session = make_session(Path(spec["path"]), library, spec["threads"])  # the loader's session settings
    name, x = session.get_inputs()[0].name, _input(spec["size"])
    stats = time_calls(lambda: session.run(None, {name: x}), spec["warmup"], spec["runs"])
    return {**stats, "peak_rss_mb": peak_rss_mb()}


def time_openvino(spec: dict) -> dict:
    from vmamba_export.bench import peak_rss_mb, time_calls
    from vmamba_export.runtime.openvino_backend import compile_ir

    x = _input(spec["size"])
    library = Path(spec["library"]) if spec.get("library") else None
    # LATENCY hint, f32, T threads, the input shape fixed: what the loader does for ours, what a user would do.
    request = compile_ir(Path(spec["path"]), library, "f32", spec["threads"], shape=x.shape).create_infer_request()
    stats = time_calls(lambda: request.infer({0: x}), spec["warmup"], spec["runs"])
    return {**stats, "peak_rss_mb": peak_rss_mb()}


def run_worker(spec: dict) -> dict:
    kind = spec["kind"]
    if kind == "ours-artifact":
        return time_ours_artifact(spec)
    if kind in ("ours-ort", "peer-ort"):
        return time_onnxruntime(spec)
    return time_openvino(spec)


def measure(spec: dict, args) -> dict:
    """One timing in its own process (runtimes' thread pools never share a process: an idle pool spins)."""
    from worker import run_in_worker

    payload = {**spec, "threads": args.threads, "size": args.size, "warmup": args.warmup, "runs": args.runs}
    return run_in_worker(__file__, payload)


# ---- main ----


def build(args, workdir: Path) -> tuple[dict, dict]:
    """({(row, model label): worker spec}, {row: how ours was exported and run})."""
    specs: dict = {}
    paths: dict = {}
    for row in args.rows:
        t0 = time.perf_counter()
        ours = None
        if args.ours in ("auto", "artifact"):
            target = "cpu-onnxruntime" if ROWS[row] == "onnxruntime" else "cpu-openvino"
            try:
                ours = {"kind": "ours-artifact", "path": str(build_ours_artifact(workdir, target, args.size))}
                paths[row] = f"export_artifact({target}) + vmamba_export.load"
            except Exception as exc:  # noqa: BLE001 - any failure of the artifact path falls back (auto) or stops
                if args.ours == "artifact":
                    raise
                note = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
                print(
                    f"{row}: export_artifact cannot export the segmenter here ({note}); lowering path", file=sys.stderr
                )
        if ours is None:
            ours = build_ours_lowered(workdir, row, args.size)
            paths[row] = (
                "export_onnx(scan=custom-op) + ONNX Runtime with the custom-op library"
                if ROWS[row] == "onnxruntime"
                else "lower_openvino (custom-op ONNX + extension) + compile_ir at the fixed shape"
            )
        print(f"{row}: ours ready in {time.perf_counter() - t0:.0f} s ({paths[row]})", file=sys.stderr)
        specs[(row, OURS)] = ours
        for label, fixed, split in zip(PEERS, (False, True, True), (False, False, True)):
            name = f"convnext_upernet_fixed{args.size}.onnx" if fixed else "convnext_upernet_dynamic.onnx"
            onnx_path = export_peer_onnx(workdir / name, args.size, fixed)
            if split:
                onnx_path = head_as_ours_copy(onnx_path, ROWS[row])
            if ROWS[row] == "onnxruntime":
                from vmamba_export.kernels_paths import ort_library_path

                library = str(ort_library_path()) if split else None
                specs[(row, label)] = {"kind": "peer-ort", "path": str(onnx_path), "library": library}
            else:
                specs[(row, label)] = {"kind": "peer-ov", "path": str(peer_ir(onnx_path))}
    return specs, paths


def main() -> int:
    from vmamba_export.bench import add_round_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--size", type=int, default=512, help="input side (square)")
    parser.add_argument(
        "--ours",
        choices=("auto", "artifact", "lowering"),
        default="artifact",
        help="how ours is exported and run: the artifact + load() path, the lowering path, or the first that works",
    )
    add_round_arguments(parser, runs=5, rounds=3, warmup=1)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0

    from vmamba_export.bench import interleaved, machine_description, merge_rounds, paired_ratio, write_results

    load_before = os.getloadavg()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vmamba-seg-speed-"))
    workdir.mkdir(parents=True, exist_ok=True)
    specs, paths = build(args, workdir)
    load_start = os.getloadavg()
    samples = interleaved(list(specs), lambda k: measure(specs[k], args), args.rounds, lambda k: " / ".join(k))
    load_end = os.getloadavg()
    rows = []
    for row in args.rows:
        ours = samples[(row, OURS)]
        entry = {"row": row, "ours_path": paths[row], OURS: merge_rounds(ours)}
        for label in PEERS:
            entry[label] = merge_rounds(samples[(row, label)])
            entry[f"ratio vs {label}"] = paired_ratio(ours, samples[(row, label)])
        rows.append(entry)
    lines = [
        f"{machine_description()}, {os.cpu_count()} CPUs; {args.size}x{args.size}, batch 1, {args.threads} threads; "
        f"{args.rounds} interleaved rounds of {args.runs} runs after {args.warmup} warm-up, each in its own process; "
        "ratio: median over rounds of ours / the peer's median in the same round (goal <= 1.00). Random weights. "
        f"Load average (1, 5, 15 min): {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f} before "
        f"exporting, {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} at the first timing, "
        f"{load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f} at the end.",
        "",
        "| runtime precision | model | median ms | p90 ms | per-round medians ms | ours / this |",
        "|---|---|---:|---:|---|---:|",
    ]
    for r in rows:
        for label in (OURS, *PEERS):
            m = r[label]
            ratio = "" if label == OURS else f"{r[f'ratio vs {label}']:.2f}"
            rounds = ", ".join(f"{v:.0f}" for v in m["round_medians_ms"])
            lines.append(f"| {r['row']} | {label} | {m['median_ms']:.0f} | {m['p90_ms']:.0f} | {rounds} | {ratio} |")
    lines += ["", "How ours ran:"] + [f"- {r['row']}: {r['ours_path']}" for r in rows]
    write_results(args.out, "\n".join(lines), rows)  # prints the table too
    return 0


if __name__ == "__main__":
    sys.exit(main())
