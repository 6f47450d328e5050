"""cpu-openvino: the model as OpenVINO IR (model.xml + model.bin) holding one `SelectiveScan2D` extension op per
block, plus the extension library (kernels/openvino) the runtime loads to run it.

Path: the same ONNX graph as cpu-onnxruntime (onnx_export.export_onnx with scan="custom-op": one ai.vmamba node per
block), converted by OpenVINO's ONNX frontend with the extension mapping that node to the op. The other path the
extension supports, `ov.convert_model(torch.export program)`, was measured against it on vmamba_tiny_s1l8: it gave
a graph with more nodes (867 against 839) that ran slower (median 803 against 642 ms in fp32, 1740 against 1470 ms
in bf16, both on a heavily loaded machine, 2 threads), and its conversion took longer; the ONNX graph is also the one
the ONNX Runtime target already proves right. One difference: LayerNorm2d is exported in its in-place channel-axis
form (models/vmamba.py), which OpenVINO runs without Transposes (s1l8 fp32 36.0 -> 32.5 ms; ONNX Runtime prefers
the permuted form).

bf16 is an inference precision, not a storage one: the IR keeps fp32 weights (compress_to_fp16=False) and the
manifest entry says which INFERENCE_PRECISION_HINT to compile with ("f32" or "bf16"). The hint is also written into
the IR's rt_info (runtime_options), so a plain `core.compile_model(xml)` picks the same precision.

int8: NNCF quantizes the converted model (quantize/openvino_int8.py); the IR then holds FakeQuantize ops and int8
weights, the scan ops stay float, and everything NNCF left float runs with the f32 hint.
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
        if calib is None:
            ov_model = ov.convert_model(str(onnx_path), extension=str(library))
        else:
            from ..quantize.openvino_int8 import quantize_openvino_int8

            ov_model, info["quantization"] = quantize_openvino_int8(
                onnx_path, library, model.config.input, options, show_progress=show, calib_batch=calib
            )

    scans = sum(1 for op in ov_model.get_ops() if op.get_type_name() == SCAN_OP_TYPE)
    expected = sum(model.config.depths)
    if scans != expected:  # the scan must stay one op per block: never decomposed, never duplicated
        raise TargetUnavailableError(f"OpenVINO conversion gave {scans} {SCAN_OP_TYPE} ops for {expected} blocks")
    ov_model.set_rt_info(hint, ["runtime_options", "INFERENCE_PRECISION_HINT"])
    ov.save_model(ov_model, str(folder / MODEL_XML), compress_to_fp16=False)
    shutil.copy2(library, folder / library.name)

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
    return entry, info
