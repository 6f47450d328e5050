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
- w8a8: int8 weights and activations, calibrated in torch with `coremltools.optimize.torch.quantization
  .LinearQuantizer` (Core ML itself cannot predict, hence cannot calibrate, off macOS), then converted; the fake
  quantisation becomes MIL quantize/dequantize pairs.

The program has a fixed input shape (1, C, S, S), S the model's input size: coremltools' torch.export frontend
specialises the chunk padding and the shape arithmetic at trace time. The runtime backend runs batches image by image.

Two toolchain fixes (FIELD-NOTES.md) live here rather than in the installed package: torch 2.13's export leaves
`aten.alias` nodes that coremltools 9 has no converter for (registered below as an identity, through coremltools'
public registration API), and conversion starts from `ep.run_decompositions({})`, an inference-dialect program.
"""

from __future__ import annotations

import contextlib
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


def w8a8_torch_model(model: VMamba, calib: np.ndarray) -> torch.nn.Module:
    """Fake-quantised (int8 weights and activations) copy of `model`, calibrated on `calib` (N, C, S, S)."""
    import copy

    from coremltools.optimize.torch.quantization import LinearQuantizer, LinearQuantizerConfig

    qmodel = copy.deepcopy(model).eval()
    config = LinearQuantizerConfig.from_dict(
        {
            "global_config": {
                "quantization_scheme": "symmetric",
                "weight_dtype": "qint8",
                "activation_dtype": "quint8",
                "weight_per_channel": True,
                "milestones": [0, 1000, 1000, 0],  # observers on from step 0; never freeze BN (there is none)
            }
        }
    )
    example = torch.from_numpy(calib[:1])
    with quiet_toolchain("coremltools"):
        quantizer = LinearQuantizer(qmodel, config)
        prepared = quantizer.prepare(example_inputs=(example,), inplace=True)
        quantizer.step()
        prepared.eval()
        # Observers record in eval mode too until they are disabled: calibration is forward passes only.
        with torch.no_grad():
            for start in range(0, len(calib), 8):
                prepared(torch.from_numpy(calib[start : start + 8]))
        return quantizer.finalize(inplace=True)


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


def export_coreml(
    model: VMamba, folder: Path, precision: str, calib: np.ndarray | None = None, size: int | None = None
) -> dict:
    """Write `folder/model.mlpackage` for (1, C, size, size) inputs (None: the model's input size); return what the
    manifest records about the lowering."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown Core ML precision {precision!r}; expected one of {PRECISIONS}")
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
            if calib is None or len(calib) == 0:
                raise ValueError("w8a8 needs calibration images")
            traced = w8a8_torch_model(model, calib)
            info["calibration_images"] = int(len(calib))
        else:
            traced = model
        mlmodel = convert_program(traced, example, "fp32" if precision == "fp32" else "fp16")
    if precision == "w8":
        mlmodel = quantize_weights_int8(mlmodel)
    info["compute_precision"] = "float32" if precision == "fp32" else "float16"
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
    with quiet_toolchain("coremltools"):
        mlmodel.save(str(folder / MODEL_FILE))
    # A fixed-shape program: the manifest's size range is the one size it takes.
    info["dynamic_axes"] = None
    info["min_size"] = size
    return info


def lower_coreml(model: VMamba, target, folder: Path, options) -> tuple[dict, dict]:
    """The `mil-composite` lowering (registered in lowering/__init__.py)."""
    import_coremltools()
    import dataclasses

    # options.extra["input_size"] picks another fixed input side (tests use small ones to keep conversion short).
    size = int(options.extra.get("input_size") or model.config.input.image_size)
    calib = None
    if options.precision == "w8a8":
        from ..data.sources import load_batch

        spec = model.config.input
        if size != spec.image_size:
            spec = dataclasses.replace(
                spec, image_size=size, resize=max(size, round(size * spec.resize / spec.image_size))
            )
        calib, _, _ = load_batch(options.calib, spec, options.calib_samples, purpose="calibration")
    info = export_coreml(model, folder, options.precision, calib, size)
    if calib is not None:
        info["calibration"] = {"source": options.calib, "num_images": int(len(calib))}
    options.max_size = size
    return {"model": MODEL_FILE}, info
