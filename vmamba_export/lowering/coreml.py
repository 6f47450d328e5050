"""torch -> Core ML ML Program (`.mlpackage`, iOS 17 / macOS 14) for the `apple-coreml` target.

ML Programs take no custom layers, so the scan op cannot survive as one node: before tracing, every block's scan is
replaced by the chunked composite of `scan/chunked.py` (segsum + matmul inside chunks, a fixed-depth prefix over
chunks), which coremltools translates op by op into MIL (cumsum, exp, matmul, mul, add, pad, reverse, ...). No
`while_loop` appears: a per-step loop would be 3136 dependent steps per stage-1 block at 224x224 and serialise the
device (the reasons and the chunk sizes are in scan/chunked.py).

Precisions:
- fp32: compute_precision FLOAT32.
- fp16: compute_precision FLOAT16 (weights and activations fp16; inputs and outputs stay fp32).
- w8: the fp16 program with int8 weights (`linear_quantize_weights`, per-channel symmetric): a size cut; activations
  stay fp16.
- w8a8: int8 activations (per-tensor, calibrated in torch on `--calib` images) in front of every Linear/Conv, and
  int8 per-channel weights of those layers; the rest of the program fp16. The calibrated quantize/dequantize ops
  are written into the torch module before tracing (vmamba_export/quantize/coreml_int8.py says why and how) and come
  out as MIL quantize / dequantize / constexpr_affine_dequantize. The scan and the projections feeding it stay float.

The program has a fixed input shape (1, C, S, S), S the model's input size: coremltools' torch.export frontend
specialises the chunk padding and the shape arithmetic at trace time. The runtime backend runs batches image by image.

Two toolchain fixes (FIELD-NOTES.md) live here rather than in the installed package: torch 2.13's export leaves
`aten.alias` nodes that coremltools 9 has no converter for (registered below as an identity, through coremltools'
public registration API), and conversion starts from `ep.run_decompositions({})`, an inference-dialect program.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..errors import TargetUnavailableError
from ..models import SS2D, VMamba
from ..scan.chunked import chunk_levels_for, default_chunk, default_intra, selective_scan_chunked
from .onnx_export import scan_replaced
from .quiet import quiet_toolchain

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
MODEL_FILE = "model.mlpackage"
PRECISIONS = ("fp32", "fp16", "w8", "w8a8")


def import_coremltools():
    try:
        with quiet_toolchain("coremltools"):
            import coremltools
    except ImportError:
        raise TargetUnavailableError(
            "the apple-coreml target needs coremltools: pip install coremltools==9.0"
        ) from None
    return coremltools


@functools.cache
def _register_torch_fixes() -> None:
    """An identity converter for `alias` (torch 2.13 export emits it; coremltools 9 knows only `alias_copy`)."""
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY, register_torch_op

    if "alias" in _TORCH_OPS_REGISTRY:  # a later coremltools may ship its own
        return

    def alias(context, node):
        context.add(_get_inputs(context, node)[0], torch_name=node.name)

    register_torch_op(alias)


def chunked_scan_for(model: VMamba, size: int):
    """The chunked scan with its chunk and prefix depth fixed for `model` at input side `size`."""
    from ..models.shapes import stage_sizes

    chunk, intra = default_chunk(model.config.d_state), default_intra(model.config.d_state)
    h, w = stage_sizes(model.config, size, size)[0]
    levels = chunk_levels_for(h * w, chunk)
    return functools.partial(selective_scan_chunked, chunk=chunk, levels=levels, intra=intra), chunk, intra, levels


def _exported_program(model: torch.nn.Module, example: torch.Tensor):
    with quiet_toolchain("coremltools"):
        ep = torch.export.export(model, (example,))
        return ep.run_decompositions({})


def convert_program(model: torch.nn.Module, example: torch.Tensor, compute_precision: str):
    """torch module (scan already replaced) -> coremltools MLModel (ML Program), not saved."""
    ct = import_coremltools()
    _register_torch_fixes()
    ep = _exported_program(model, example)
    precision = ct.precision.FLOAT16 if compute_precision == "fp16" else ct.precision.FLOAT32
    with (
        quiet_toolchain("coremltools"),
        contextlib.redirect_stderr(io.StringIO()),
    ):  # tqdm progress bars of every MIL pass
        return ct.convert(
            ep,
            inputs=[ct.TensorType(name=INPUT_NAME, shape=tuple(example.shape), dtype=np.float32)],
            outputs=[ct.TensorType(name=OUTPUT_NAME, dtype=np.float32)],
            minimum_deployment_target=ct.target.iOS17,
            compute_precision=precision,
            convert_to="mlprogram",
            skip_model_load=True,  # nothing can load it off macOS; on a Mac the runtime backend loads it
        )


def quantize_weights_int8(mlmodel):
    """Per-channel symmetric int8 weights on an existing program (activations untouched)."""
    import coremltools.optimize.coreml as cto

    config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8"))
    with quiet_toolchain("coremltools"):
        return cto.linear_quantize_weights(mlmodel, config=config)


def mil_op_counts(program) -> Counter:
    """Op types of the main function, recursing into nested blocks (a `while_loop` would show up here)."""
    counts: Counter = Counter()

    def visit(block):
        for op in block.operations:
            counts[op.op_type] += 1
            for inner in op.blocks:
                visit(inner)

    visit(program.functions["main"])
    return counts


@dataclasses.dataclass
class Calibration:
    """Calibration images for w8a8, preprocessed as the artifact sees them, and where they came from."""

    batch: np.ndarray  # (N, C, S, S) float32
    names: list[str]
    source: str
    method: str = "minmax"
    exclude: tuple[str, ...] = ()


def quantized_weight_names(program) -> list[str]:
    """Names of the weights stored int8 in `program` (outputs of its constexpr dequantize ops)."""
    kinds = ("constexpr_affine_dequantize", "constexpr_blockwise_shift_scale")
    return [op.outputs[0].name for op in program.functions["main"].operations if op.op_type in kinds]


def export_coreml(
    model: VMamba,
    folder: Path,
    precision: str,
    calibration: Calibration | None = None,
    size: int | None = None,
    compute_precision: str | None = None,
) -> dict:
    """Write `folder/model.mlpackage` for (1, C, size, size) inputs (None: the model's input size); return what the
    manifest records about the lowering. `compute_precision` ("fp32"/"fp16") overrides the precision's default
    (fp32 for fp32, fp16 otherwise): tests build an fp32 w8a8 program to compare with torch's own int8 ops."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown Core ML precision {precision!r}; expected one of {PRECISIONS}")
    compute = compute_precision or ("fp32" if precision == "fp32" else "fp16")
    if compute not in ("fp32", "fp16"):
        raise ValueError(f"unknown compute precision {compute!r}; expected fp32 or fp16")
    cfg = model.config
    size = size or cfg.input.image_size
    example = torch.zeros(1, cfg.in_chans, size, size)
    scan, chunk, intra, levels = chunked_scan_for(model, size)
    info: dict = {
        "scan_lowering": "mil-composite",
        "scan_form": f"chunked: {intra} inside chunks, log-depth prefix over chunks (vmamba_export/scan/chunked.py)",
        "scan_chunk": chunk,
        "scan_intra_chunk": intra,
        "scan_chunk_levels": levels,
        "input_shape": list(example.shape),
        "minimum_deployment_target": "iOS17",
    }
    with scan_replaced(model, scan):
        if precision == "w8a8":
            from ..quantize import coreml_int8 as q

            if calibration is None or len(calibration.batch) == 0:
                raise ValueError("w8a8 needs calibration images")
            layers, floats = q.select_layers(model, calibration.exclude)
            # Calibrated through the chunked scan the program holds: the ranges are those of this very function.
            ranges = q.calibrate_ranges(model, layers, calibration.batch, calibration.method)
            scales = {name: q.activation_scale(ranges[name]) for name in layers}
            with q.qdq_inserted(model, scales):
                mlmodel = convert_program(model, example, compute)
            info["quantization"] = q.quantization_record(
                layers, floats, ranges, calibration.method, calibration.source, calibration.names
            )
        else:
            mlmodel = convert_program(model, example, compute)
    if precision == "w8":
        mlmodel = quantize_weights_int8(mlmodel)
        info["quantization"] = {
            "tool": "coremltools.optimize.coreml.linear_quantize_weights",
            "format": "constexpr_affine_dequantize (weights dequantized at load)",
            "quant_format": "weight-only",
            "activation_type": "float16 (not quantized)",
            "weight_type": "int8 symmetric",
            "per_channel": True,
            "method": "weights only: no calibration (weight_threshold 2048: smaller tensors stay fp16)",
            "calibration": {"source": "none (weight-only)", "samples": 0},
            "quantized_layers": quantized_weight_names(mlmodel._mil_program),
            "float_layers": {},
            "scan": "float (program fp16)",
        }
    info["compute_precision"] = {"fp32": "float32", "fp16": "float16"}[compute]
    info["weights"] = {"fp32": "float32", "fp16": "float16", "w8": "int8", "w8a8": "int8"}[precision]
    info["activations"] = {"fp32": "float32", "fp16": "float16", "w8": "float16", "w8a8": "int8 (quantize/dequantize)"}[
        precision
    ]
    counts = mil_op_counts(mlmodel._mil_program)
    info["mil_ops"] = dict(sorted(counts.items()))
    info["mil_ops_total"] = sum(counts.values())
    info["scan_blocks"] = sum(1 for m in model.modules() if isinstance(m, SS2D))
    if counts.get("while_loop"):
        raise RuntimeError("the Core ML program holds a while_loop: the scan was not lowered to the chunked form")
    if precision == "w8a8" and not (counts.get("quantize") and counts.get("dequantize")):
        # The guard that a w8a8 program cannot pass for float: a converter change dropping the ops fails here.
        raise RuntimeError("the w8a8 Core ML program holds no quantize/dequantize ops")
    with quiet_toolchain("coremltools"):
        mlmodel.save(str(folder / MODEL_FILE))
    # A fixed-shape program: the manifest's size range is the one size it takes.
    info["dynamic_axes"] = None
    info["min_size"] = size
    return info


def lower_coreml(model: VMamba, target, folder: Path, options) -> tuple[dict, dict]:
    """The `mil-composite` lowering (registered in lowering/__init__.py)."""
    import_coremltools()
    # options.extra["input_size"] picks another fixed input side (tests use small ones to keep conversion short).
    size = int(options.extra.get("input_size") or model.config.input.image_size)
    calibration = None
    if options.precision == "w8a8":
        from ..quantize.calibration import load_calibration_batch

        spec = model.config.input
        if size != spec.image_size:
            spec = dataclasses.replace(
                spec, image_size=size, resize=max(size, round(size * spec.resize / spec.image_size))
            )
        # Read the images first: a bad source fails in a second, not after the calibration passes.
        batch, names = load_calibration_batch(
            options.calib, spec, options.calib_samples, options.extra.get("show_progress", True)
        )
        calibration = Calibration(batch, names, options.calib, options.calib_method, tuple(options.exclude))
    info = export_coreml(model, folder, options.precision, calibration, size)
    options.max_size = size
    return {"model": MODEL_FILE}, info
