"""cpu-openvino: the model as OpenVINO IR (model.xml + model.bin) holding one `SelectiveScan2D` extension op per
block, plus the extension library (kernels/openvino) the runtime loads to run it.

Path: the same ONNX graph as cpu-onnxruntime (onnx_export.export_onnx with scan="custom-op": one ai.vmamba node per
block), converted by OpenVINO's ONNX frontend with the extension mapping that node to the op. The other path the
extension supports, `ov.convert_model(torch.export program)`, was measured against it on vmamba_tiny_s1l8: it gave
a graph with more nodes (867 against 839) that ran slower (median 803 against 642 ms in fp32, 1740 against 1470 ms
in bf16, both on a heavily loaded machine, 2 threads), and its conversion took longer; the ONNX graph is also the one
the ONNX Runtime target already proves right. One difference: LayerNorm2d is exported in its in-place channel-axis
form (models/vmamba.py), which OpenVINO runs without Transposes (s1l8 fp32 36.0 -> 32.5 ms; ONNX Runtime prefers
the permuted form), its variance, normalisation and affine as one NormalizeL2 node (LayerNorm2d.channel_axis_norm).

bf16 is an inference precision, not a storage one: the IR keeps fp32 weights (compress_to_fp16=False) and the
manifest entry says which INFERENCE_PRECISION_HINT to compile with ("f32" or "bf16"). The hint is also written into
the IR's rt_info (runtime_options), so a plain `core.compile_model(xml)` picks the same precision.

Three rewrites of the scan ops after conversion (`connect_scan_ops`), all for the CPU plugin's layouts. The plugin
keeps convolution outputs in channel-blocked layouts and hands an extension op planar f32 tensors, converting in
between. (1) B and C are taken straight from the convolutions that make them, flattened over the directions,
instead of through a Reshape to 5-D (a Reshape needs a planar input, so each was reordered once for the Reshape and
once more for the op). (2) The dt projection (the grouped 1x1 convolution making delta) is fused into the op
(`fuse_dt_projection`): the op takes its (B, 4 * dt_rank, H, W) input, 1/16 the size of delta, and computes delta
tile by tile, so the largest scan input is neither reordered nor stored. (3) In bf16 the op takes and gives bf16
data (the kernel widens it exactly and keeps f32 state), where every input used to be converted to f32 and y back.
Measured on vmamba_tiny_s1l8 in bf16 by benchmarks/cpu_openvino.py's per-node counters (results/cpu_openvino.json,
before and after): all Reorders 3.9 -> 0.7 ms per image, grouped convolutions 1.4 -> 0.4 ms, the scan ops 3.4 ->
4.5 ms (they now do the projection), node total 27.8 -> 21.6 ms; latency 1.38x -> 1.21x ConvNeXt-T bf16.

A convolution of a channel Concat (UperNet's bottleneck) is split into convolutions of the parts before conversion
(concat_convs.py); the plugin folds the sums into the convolutions (its "sum" post-op) and drops the Concat and the
reorder of the concatenated map (docs/dense-artifacts.md).

int8: NNCF quantizes the converted model (quantize/openvino_int8.py); the IR then holds FakeQuantize ops and int8
weights, the scan ops stay float, and everything NNCF left float runs with the f32 hint.

Another platform (options.platform, e.g. "linux-aarch64" on this x86-64 machine): the IR is platform-neutral,
so conversion and NNCF run here with this machine's extension as always; only the extension library put into the
artifact is the platform's, cross-compiled against its openvino wheel of the same release
(build_kernels.build_openvino_for_platform, cached under kernels/build/<platform>/).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ..errors import TargetUnavailableError
from ..models import VMamba
from ..models.vmamba import channel_axis_layer_norms
from ..targets import Target
from . import ExportOptions

# precision -> OpenVINO CPU INFERENCE_PRECISION_HINT. int8 comes from NNCF's FakeQuantize ops in the IR; the layers it
# leaves float (the scan among them) run in f32.
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
SCAN_OP_TYPE = "SelectiveScan2D"
MODEL_XML = "model.xml"
MODEL_BIN = "model.bin"


def lower_openvino(model: VMamba, target: Target, folder: Path, options: ExportOptions) -> tuple[dict, dict]:
    from ..kernels_paths import openvino_extension_path
    from ..runtime.openvino_backend import check_version, extension_built_for, import_openvino
    from .onnx_export import export_onnx

    ov = import_openvino()
    library = openvino_extension_path()
    if library is None:
        raise TargetUnavailableError(
            f"target {target.name} needs the OpenVINO extension: run python -m vmamba_export.build_kernels"
        )
    hint = PRECISION_HINTS.get(options.precision)
    if hint is None:
        raise TargetUnavailableError(f"target {target.name}: precision {options.precision!r} is not implemented")
    # A library built against another OpenVINO release would not even load; say so before exporting for minutes.
    try:
        version = check_version(extension_built_for(library), f"the extension library {library}")
    except Exception as exc:
        raise TargetUnavailableError(f"{exc}; rebuild it: python -m vmamba_export.build_kernels") from None

    show = options.extra.get("show_progress", True)
    platform_name, shipped = platform_extension(target, options.platform, version, show, options.precision)
    calib = None
    if options.precision == "int8":
        from ..quantize.calibration import load_calibration_batch
        from ..quantize.openvino_int8 import import_nncf, nncf_settings

        import_nncf()
        nncf_settings(options)  # a method NNCF lacks fails now, not after the export
        # Read the calibration images first: a bad source fails in a second, not after a minute of export.
        calib = load_calibration_batch(options.calib, model.config.input, options.calib_samples, show)

    with tempfile.TemporaryDirectory(prefix="vmamba-ov-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        # OpenVINO runs channel-first LayerNorm fastest in the in-place form (no Transposes): see LayerNorm2d.
        with channel_axis_layer_norms(model):
            info = export_onnx(model, onnx_path, scan="custom-op", max_size=options.max_size)
        split = split_concat_convs_in_file(onnx_path)
        if split:
            info["split_concat_convs"] = split
        if calib is None:
            ov_model = ov.convert_model(str(onnx_path), extension=str(library))
        else:
            from ..quantize.openvino_int8 import quantize_openvino_int8

            ov_model, info["quantization"] = quantize_openvino_int8(
                onnx_path,
                library,
                model.config.input,
                options,
                show_progress=show,
                calib_batch=calib,
                task=getattr(model.config, "task", "classification"),
            )

    connect_scan_ops(ov_model, bf16=hint == "bf16")
    scans = sum(1 for op in ov_model.get_ops() if op.get_type_name() == SCAN_OP_TYPE)
    expected = sum(model.config.depths)
    if scans != expected:  # the scan must stay one op per block: never decomposed, never duplicated
        raise TargetUnavailableError(f"OpenVINO conversion gave {scans} {SCAN_OP_TYPE} ops for {expected} blocks")
    ov_model.set_rt_info(hint, ["runtime_options", "INFERENCE_PRECISION_HINT"])
    ov.save_model(ov_model, str(folder / MODEL_XML), compress_to_fp16=False)
    shutil.copy2(shipped, folder / library.name)

    entry = {
        "model": MODEL_XML,
        "weights": MODEL_BIN,
        "extension_library": library.name,
        "inference_precision": hint,
        "device": "CPU",
        "openvino_version": version,
    }
    info.update(
        {
            "via": "onnx (custom-op node) -> ov.convert_model with the extension",
            "openvino_version": version,
            "ov_ops": len(ov_model.get_ops()),
            "scan_ops": scans,
            "inference_precision": hint,
        }
    )
    if platform_name is not None:
        info["platform"] = platform_name
    return entry, info


# Precisions the platform's OpenVINO CPU plugin cannot run with the extension. Seen under qemu with the aarch64
# 2026.4.1 wheel: the ARM plugin has no bf16 (capabilities FP32, FP16, INT8) and runs a bf16 (or f16) hint as f16,
# converting the scan op's f32 parameters to f16, which the extension refuses at compile time.
UNSUPPORTED_PRECISIONS = {
    "linux-aarch64": {
        "bf16": "OpenVINO's ARM CPU plugin has no bf16; it runs the hint as f16 and converts the scan op's f32 "
        "parameters to f16 (\"input 'A_logs' must be f32, got f16\" at compile time); use fp32 or int8",
    },
}


def split_concat_convs_in_file(onnx_path: Path) -> int:
    """concat_convs.split_concat_convs on the ONNX file at `onnx_path`, rewritten in place when anything changed."""
    import onnx

    from .concat_convs import split_concat_convs
    from .onnx_graph import static_shapes

    proto = onnx.load(str(onnx_path))
    if not any(n.op_type == "Concat" for n in proto.graph.node):
        return 0
    split = split_concat_convs(proto, static_shapes(proto))
    if split:
        onnx.save_model(proto, str(onnx_path))
    return split


def platform_extension(
    target: Target, platform_name: str | None, version: str, show: bool, precision: str = "fp32"
) -> tuple[str | None, Path]:
    """(platform, extension library to ship) for an artifact built for `platform_name` (None or this machine's
    platform: (None, this machine's library)). Another platform's library is cross-built, or found up to date, for
    the installed OpenVINO `version`; TargetUnavailableError says why it cannot be."""
    from ..kernels_paths import openvino_extension_path
    from ..platforms import host_platform

    if platform_name is None or platform_name == host_platform():
        return None, openvino_extension_path()
    if precision in UNSUPPORTED_PRECISIONS.get(platform_name, {}):
        why = UNSUPPORTED_PRECISIONS[platform_name][precision]
        raise TargetUnavailableError(f"target {target.name} {precision} cannot be built for {platform_name}: {why}")
    from ..build_kernels import BuildError, build_openvino_for_platform

    try:
        library, built_for, _ = build_openvino_for_platform(platform_name, quiet=not show)
    except BuildError as exc:
        raise TargetUnavailableError(
            f"target {target.name} for {platform_name}: the OpenVINO extension cannot be cross-built: "
            f"{str(exc).splitlines()[0]}"
        ) from None
    if built_for != version:
        raise TargetUnavailableError(
            f"target {target.name} for {platform_name}: its extension was built for OpenVINO {built_for}, "
            f"this machine converts with {version}"
        )
    return platform_name, library


# Inputs of SelectiveScan2D that carry data (the rest, A_logs, D and delta_bias, are f32 parameters), and those of
# them made by a Reshape of a (B, K*C, H, W) convolution output.
SCAN_DATA_INPUTS = (0, 1, 3, 4)
SCAN_FLATTENED_INPUTS = (1, 3, 4)


def connect_scan_ops(ov_model, bf16: bool) -> None:
    """Rewire every scan op for the CPU plugin (module docstring): delta, B and C from the Reshapes' inputs when
    all three are 4-D (the extension takes them flattened over the directions, the same memory); with `bf16`, Converts
    to bf16 on the data inputs and back to f32 on y, so the plugin runs the op on bf16 data."""
    import openvino as ov
    from openvino import opset13

    for op in ov_model.get_ops():
        if op.get_type_name() != SCAN_OP_TYPE:
            continue
        producers = [op.input(i).get_source_output().get_node() for i in SCAN_FLATTENED_INPUTS]
        # All three or none: the extension takes delta, B and C either all 5-D or all flattened.
        if all(
            p.get_type_name() == "Reshape" and p.get_input_partial_shape(0).rank.get_length() == 4 for p in producers
        ):
            for i, producer in zip(SCAN_FLATTENED_INPUTS, producers, strict=True):
                op.input(i).replace_source_output(producer.input(0).get_source_output())
            fuse_dt_projection(op)
        if bf16:
            for i in SCAN_DATA_INPUTS:  # dt_weight, when fused, stays f32 like the other parameters
                source = op.input(i).get_source_output()
                op.input(i).replace_source_output(opset13.convert(source, ov.Type.bf16).output(0))
        op.validate_and_infer_types()
        if bf16:
            consumers = list(op.output(0).get_target_inputs())
            back = opset13.convert(op.output(0), ov.Type.f32)
            for consumer in consumers:
                consumer.replace_source_output(back.output(0))
    ov_model.validate_nodes_and_infer_types()


def fuse_dt_projection(op) -> bool:
    """Move the dt projection into the scan op when delta comes straight from it: a GroupConvolution of K groups
    with constant (K, Di, R, 1, 1) weights. The op then takes the projection's input (B, K*R, H, W) and the weights
    (K, Di, R) as an 8th input (kernels/openvino/extension.cpp). False, and nothing changed, for any other producer
    (an int8 model whose projection NNCF quantized, say)."""
    import numpy as np
    from openvino import opset13

    conv = op.input(1).get_source_output().get_node()
    if conv.get_type_name() != "GroupConvolution":
        return False
    weights = conv.input(1).get_source_output().get_node()
    if weights.get_type_name() != "Constant" or conv.get_input_partial_shape(0).rank.get_length() != 4:
        return False
    w = weights.get_data()
    k, di = 4, op.get_input_partial_shape(0)[1].get_length()
    if w.ndim != 5 or w.shape[:2] != (k, di) or w.shape[3:] != (1, 1) or w.dtype != np.float32:
        return False
    expected = {"strides": [1, 1], "dilations": [1, 1], "pads_begin": [0, 0], "pads_end": [0, 0]}
    attributes = conv.get_attributes()
    if any(attributes.get(name) != value for name, value in expected.items()):
        return False
    args = [op.input(i).get_source_output() for i in range(op.get_input_size())]
    args[1] = conv.input(0).get_source_output()
    args.append(opset13.constant(np.ascontiguousarray(w.reshape(k, di, w.shape[2]))).output(0))
    op.set_arguments(args)
    return True
