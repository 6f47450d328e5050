"""Lowering by registry: a target's `scan_lowering` names the function that writes its model files.

Each function takes (model, target, folder, options) and returns (entry, info): `entry` tells the runtime loader which
files to open (model, custom-op library), `info` what the manifest records about the lowering (and, for int8, about
the calibration). `options` carries the precision and everything a precision needs (ExportOptions).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import TargetUnavailableError, VMambaExportError
from ..models import VMamba
from ..models.channels_last import ChannelsLastVMamba
from ..targets import CUDA_FUSIONS, Target


@dataclass
class ExportOptions:
    precision: str = "fp32"
    max_size: int = 1024  # largest input side the artifact must take
    calib: str = "builtin"  # image source for int8 calibration (data/sources.py spec)
    calib_samples: int = 64
    calib_method: str = "minmax"
    exclude: tuple[str, ...] = ()  # layer names kept in float
    accuracy_source: str | None = None  # labelled source for accuracy-aware int8
    max_drop: float | None = None  # accuracy-aware int8: largest top-1 drop allowed, in points
    platform: str | None = None  # platform the artifact is built for (platforms.py); None: this machine's
    # A precision judged by its accuracy drop: the labelled source on which PyTorch's score is recorded in the
    # manifest for a device without torch (accuracy.py); None: the model's own held-out set, if it has one.
    reference_accuracy_source: str | None = None
    extra: dict = field(default_factory=dict)  # target-specific settings


Lowering = Callable[[VMamba, Target, Path, ExportOptions], tuple[dict, dict]]


def _onnx_custom_op(model: VMamba, target: Target, folder: Path, options: ExportOptions) -> tuple[dict, dict]:
    from ..kernels_paths import ort_library_path
    from ..platforms import host_platform
    from .onnxruntime_cpu import onnxruntime_cpu_rewrites

    # The artifact ships the library of its platform; export checks and int8 calibration run here, with this
    # machine's build of the same sources.
    host_library = ort_library_path()
    library = ort_library_path(options.platform)
    for lib, name in ((host_library, None), (library, options.platform)):
        if lib is None:
            flag = f" --platform {name}" if name and name != host_platform() else ""
            raise TargetUnavailableError(
                f"target {target.name} needs the ONNX Runtime custom-op library for {name or host_platform()}: "
                f"run python -m vmamba_export.build_kernels{flag}"
            )
    layer_norm = options.extra.get("layer_norm", "custom-op")  # "onnxruntime": keep its LayerNormalization (A/B)
    if layer_norm not in ("custom-op", "onnxruntime"):
        raise VMambaExportError(f"layer_norm {layer_norm!r}: expected custom-op or onnxruntime")
    # fp32 only: in an int8 graph ONNX Runtime runs the quantized convolutions channels-last (NHWC QLinearConv) and
    # the LayerNormalizations between them with no Transpose left; a channel-first norm there would bring the
    # Transposes back (measured, vmamba_tiny_s1l8 224: 29 -> 95 Transposes, 39.4 -> 41.3 ms; docs/cpu-latency.md).
    channel_norms = layer_norm == "custom-op" and options.precision == "fp32"

    def edit(proto) -> dict:
        record = _channel_norm_edit(proto) if channel_norms else {}
        # ONNX Runtime CPU rewrites for every precision (onnxruntime_cpu.py), after the channel norms: the norms those
        # leave over the last axis become LastAxisLayerNorm.
        return {**record, "rewrites": onnxruntime_cpu_rewrites(proto, layer_norms=layer_norm == "custom-op")}

    info = _export_onnx_at(model, folder / "model.onnx", "custom-op", options, host_library, edit)
    shutil.copy2(library, folder / library.name)
    return {"model": "model.onnx", "custom_op_library": library.name}, info


def _channel_norm_edit(proto) -> dict:
    """cpu-onnxruntime: LayerNorm2d's Transpose -> LayerNormalization -> Transpose as one ChannelLayerNorm node."""
    from .channel_norm import use_channel_layer_norms

    return {"layer_norms": use_channel_layer_norms(proto)}


def _onnx_portable(model: VMamba, target: Target, folder: Path, options: ExportOptions) -> tuple[dict, dict]:
    info = _export_onnx_at(model, folder / "model.onnx", "portable", options, None)
    return {"model": "model.onnx"}, info


GraphEdit = Callable[..., dict]  # (onnx.ModelProto, edited in place) -> what the manifest's lowering records


def _export_onnx_at(
    model: VMamba, path: Path, scan: str, options: ExportOptions, library: Path | None, edit: GraphEdit | None = None
) -> dict:
    """fp32 export to `path`; for int8, export fp32 to a temporary file and quantize it into `path`. `edit`: the
    target's graph edits, applied once to the artifact's graph in `path` (for int8 the quantized one, whose layer
    names, for --exclude and the report, are then the model's own)."""
    from .onnx_export import export_onnx

    if options.precision != "int8":
        info = export_onnx(model, path, scan=scan, max_size=options.max_size)
        return info | _edit_onnx(path, edit) if edit is not None else info
    import tempfile

    from ..quantize.calibration import load_calibration_batch
    from ..quantize.onnxruntime_int8 import quantize_onnx_int8

    show = options.extra.get("show_progress", True)
    # Read the calibration images first: a bad source fails in a second, not after a minute of export.
    calib = load_calibration_batch(options.calib, model.config.input, options.calib_samples, show)
    with tempfile.TemporaryDirectory(prefix="vmamba-fp32-") as tmp:
        fp32 = Path(tmp) / "model_fp32.onnx"
        info = export_onnx(model, fp32, scan=scan, max_size=options.max_size)
        info["quantization"] = quantize_onnx_int8(
            fp32, path, model.config.input, options, library, show_progress=show, calib_batch=calib
        )
    return info | _edit_onnx(path, edit) if edit is not None else info


def _edit_onnx(path: Path, edit: GraphEdit) -> dict:
    """Apply `edit` to the ONNX file at `path` in place; returns its record."""
    import onnx

    proto = onnx.load(str(path))
    record = edit(proto)
    onnx.save_model(proto, str(path))
    return {**record, "nodes": len(proto.graph.node)}


def _coreml(model: VMamba, target: Target, folder: Path, options: ExportOptions) -> tuple[dict, dict]:
    from .coreml import lower_coreml  # coremltools is imported only when an apple-coreml artifact is built

    return lower_coreml(model, target, folder, options)


def _onnx_custom_op_cuda(model: VMamba, target: Target, folder: Path, options: ExportOptions) -> tuple[dict, dict]:
    """cuda-onnxruntime: the custom-op graph (fp32, or converted to fp16 with float32 I/O) and the CUDA library."""
    from ..kernels_paths import ort_cuda_library_path
    from .onnx_export import IR_VERSION, export_onnx

    library = ort_cuda_library_path()
    if library is None:
        raise TargetUnavailableError(
            f"target {target.name} needs the CUDA custom-op library: run python -m vmamba_export.build_kernels --cuda "
            "(needs nvcc)"
        )
    if options.precision not in ("fp32", "fp16"):
        raise TargetUnavailableError(f"target {target.name}: precision {options.precision!r} is not implemented")
    layer_norm = options.extra.get("layer_norm", "custom-op")  # "onnxruntime": keep its LayerNormalization (A/B)
    if layer_norm not in ("custom-op", "onnxruntime"):
        raise VMambaExportError(f"layer_norm {layer_norm!r}: expected custom-op or onnxruntime")
    # "off": the graph unfused (A/B timing); "on": the fused ops; "projected", "conv-projected", "merged", "folded",
    # "packed", "narrow": also the scan's input projections rewritten that way (lowering/cuda_fusions.py,
    # docs/cuda-onnxruntime.md)
    fusions = options.extra.get("cuda_fusions", "on")
    if fusions not in CUDA_FUSIONS:
        raise VMambaExportError(f"cuda_fusions {fusions!r}: expected one of {', '.join(CUDA_FUSIONS)}")
    task = getattr(model.config, "task", "classification")
    # A second graph for batch 1 with its own fusions (entry.batch1_model; the runtime replays it for batch-1 inputs
    # and the main graph for every other shape), or "none". Default: a classifier's default graph gets a "projected"
    # one (H100, run 35: batch 1 through graphs fp32 1.97 -> 1.52 ms, fp16 1.00 -> 0.97 ms; at batch 128 its kernels
    # are slower than cuDNN's and cuBLAS's, so the main graph keeps the exporter's projections).
    defaults = task == "classification" and fusions == "on" and layer_norm == "custom-op"
    default_batch1 = "projected" if defaults else "none"
    batch1_fusions = options.extra.get("cuda_batch1_fusions", default_batch1)
    if batch1_fusions not in BATCH1_FUSIONS:
        raise VMambaExportError(f"cuda_batch1_fusions {batch1_fusions!r}: expected one of {', '.join(BATCH1_FUSIONS)}")
    if batch1_fusions != "none" and layer_norm != "custom-op":
        raise VMambaExportError("cuda_batch1_fusions needs the custom LayerNorm (layer_norm custom-op)")
    if task == "classification":
        graph_model, layout = layout_graph(model, options.extra.get("layout"))
    else:
        # ChannelsLastVMamba wraps the classifier only: dense models are exported as they are (v2 channel-first, v0
        # channels-last by definition); an explicit --layout channels-last is refused rather than ignored.
        if options.extra.get("layout") == "channels-last" and model.config.version == "v2":
            raise VMambaExportError(
                f"layout channels-last is for classifiers; a {task} model is exported channel-first"
            )
        graph_model, layout = model, ("channels-last" if model.config.version == "v0" else "channels-first")
    path = folder / "model.onnx"
    info = export_onnx(graph_model, path, scan="custom-op", max_size=options.max_size)
    info["residual_layout"] = layout
    entry = {"model": "model.onnx", "custom_op_library": library.name, "providers": ["CUDAExecutionProvider"]}
    if layer_norm == "custom-op" or options.precision == "fp16":
        import onnx

        proto = onnx.load(str(path))  # once for both graph edits
        graphs = {path: proto}
        if layer_norm == "custom-op":
            from .cuda_fusions import fuse_cuda_graph
            from .cuda_graph import use_last_axis_layer_norms

            info["layer_norms"] = use_last_axis_layer_norms(proto)
            not_written = {"scan_projections": batch1_fusions, "written": False}
            batch1 = None
            if batch1_fusions == fusions:  # the main graph itself: a copy would only cost space
                info["batch1_fusions"] = not_written
            elif batch1_fusions != "none":
                batch1 = onnx.ModelProto()
                batch1.CopyFrom(proto)
                info["batch1_fusions"] = fuse_cuda_graph(batch1, scan_projections=_scan_projections(batch1_fusions))
            if fusions != "off":  # the fused ops replace LastAxisLayerNorm patterns: only with the custom norms
                info["fusions"] = fuse_cuda_graph(proto, scan_projections=_scan_projections(fusions))
            if batch1 is not None:
                if fusions != "off" and _scan_rewrites(info["batch1_fusions"]) == _scan_rewrites(info["fusions"]) == 0:
                    info["batch1_fusions"] = not_written  # the same graph again (d_state 16: no scan to rewrite)
                else:
                    graphs[folder / BATCH1_MODEL] = batch1
                    entry["batch1_model"] = BATCH1_MODEL
        for graph_path, graph in graphs.items():
            if options.precision == "fp16":
                from .fp16 import convert_model_to_fp16, fp16_info

                graph = convert_model_to_fp16(graph, IR_VERSION)
                if graph_path == path:
                    info["fp16"] = fp16_info(graph)
            onnx.save_model(graph, str(graph_path))
    shutil.copy2(library, folder / library.name)
    return entry, info


BATCH1_MODEL = "model.batch1.onnx"
BATCH1_FUSIONS = ("none", *(f for f in CUDA_FUSIONS if f != "off"))


def _scan_rewrites(record: dict) -> int:
    """How many scans a fuse_cuda_graph record says had their input projections rewritten."""
    from .cuda_fusions import CONV_PROJECTIONS_OP, MERGED_SCAN_OP, PACKED_SCAN_OP, PROJECTIONS_OP

    ops = (PROJECTIONS_OP, CONV_PROJECTIONS_OP, PACKED_SCAN_OP, MERGED_SCAN_OP)
    return sum(record["fused"][op] for op in ops)


def _scan_projections(fusions: str) -> str:
    """fuse_cuda_graph's scan_projections for a cuda_fusions setting other than "off"."""
    return "none" if fusions == "on" else fusions


LAYOUTS = ("channels-last", "channels-first")


def residual_layout(model: VMamba, requested: str | None) -> str:
    """The layout of the residual stream in a cuda-onnxruntime or cpu-tvm graph: channels-last unless channels-first
    is asked for (v2 models only; v0 models are channels-last by definition). See models/channels_last.py for why."""
    if requested is None:
        return "channels-last"
    if requested not in LAYOUTS:
        raise VMambaExportError(f"layout {requested!r}: expected one of {', '.join(LAYOUTS)}")
    if requested == "channels-first" and model.config.version != "v2":
        raise VMambaExportError(
            f"layout channels-first: {model.config.name} is a {model.config.version} model, channels-last by definition"
        )
    return requested


def layout_graph(model: VMamba, requested: str | None) -> tuple[torch.nn.Module, str]:
    """(module to export, its residual layout): a v2 model wrapped in ChannelsLastVMamba for channels-last, else
    `model` itself (channel-first v2, or v0, channels-last by definition)."""
    layout = residual_layout(model, requested)
    wrap = layout == "channels-last" and model.config.version == "v2"
    return (ChannelsLastVMamba(model) if wrap else model), layout


def _openvino_ir(model: VMamba, target: Target, folder: Path, options: ExportOptions) -> tuple[dict, dict]:
    from .openvino_ir import lower_openvino  # openvino is imported only when a cpu-openvino artifact is built

    return lower_openvino(model, target, folder, options)


def _tvm_tir(model: VMamba, target: Target, folder: Path, options: ExportOptions) -> tuple[dict, dict]:
    from .tvm_relax import lower_tvm  # tvm is imported only when a TVM artifact is built

    return lower_tvm(model, target, folder, options)


LOWERINGS: dict[str, Lowering] = {
    "custom-op": _onnx_custom_op,
    "custom-op-cuda": _onnx_custom_op_cuda,
    "portable": _onnx_portable,
    "mil-composite": _coreml,
    "openvino-extension": _openvino_ir,
    "tvm-tir": _tvm_tir,
}


def get_lowering(target: Target) -> Lowering:
    try:
        return LOWERINGS[target.scan_lowering]
    except KeyError:
        raise TargetUnavailableError(
            f"target {target.name}: scan lowering {target.scan_lowering!r} is not implemented in this version"
        ) from None
