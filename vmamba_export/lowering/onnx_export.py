"""torch.export -> ONNX for the two ONNX lowerings of the scan op.

`custom-op`: every `vmamba::selective_scan_2d` becomes one `ai.vmamba::SelectiveScan2D` node, which the project's
custom-op library implements for ONNX Runtime (kernels/). `portable`: the scan is replaced before tracing by the
plain-tensor-op form (vmamba_export/scan/portable.py), so the graph holds standard ONNX ops only, with no Loop or Scan.
Both take a dynamic batch, height and width.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import warnings
from pathlib import Path

import torch

from ..models import SS2D, VMamba
from ..models.shapes import export_min_size
from ..scan import QUALIFIED_NAME
from ..scan.portable import levels_for, selective_scan_portable

ONNX_DOMAIN = "ai.vmamba"
ONNX_OP = "SelectiveScan2D"
OPSET = 18
IR_VERSION = 10  # onnxruntime-gpu 1.31 refuses the IR 14 that onnx 1.23 writes (FIELD-NOTES.md)
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
SCAN_INPUTS = ("u", "delta", "A_logs", "B", "C", "D", "delta_bias")


@functools.cache
def _register_scan_schema() -> None:
    from onnx import defs

    param = defs.OpSchema.FormalParameter
    schema = defs.OpSchema(
        ONNX_OP,
        ONNX_DOMAIN,
        1,
        doc="Fused 2-D selective scan of VMamba's SS2D (docs/scan-op.md).",
        inputs=[param(name, "T") for name in SCAN_INPUTS],
        outputs=[param("y", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float32, or float16 with float32 state")],
    )
    defs.register_schema(schema)


def _scan_translation_table() -> dict:
    import onnxscript

    _register_scan_schema()
    opset = onnxscript.values.Opset(ONNX_DOMAIN, 1)

    def selective_scan_2d(u, delta, A_logs, B, C, D, delta_bias):
        return opset.SelectiveScan2D(u, delta, A_logs, B, C, D, delta_bias)

    namespace, name = QUALIFIED_NAME.split("::")
    return {getattr(getattr(torch.ops, namespace), name).default: selective_scan_2d}


def dynamic_input_spec(model: VMamba, max_size: int) -> dict:
    min_size = export_min_size(model.config)
    return {
        "batch": {"min": 1, "max": 4096},
        "height": {"min": min_size, "max": max_size},
        "width": {"min": min_size, "max": max_size},
    }


def export_onnx(model: VMamba, path: Path, scan: str, max_size: int = 1024) -> dict:
    """Export `model` to `path` with the scan lowered as `scan` ("custom-op" or "portable"). Returns the input spec
    (dynamic axes with their ranges, scan levels for the portable form) to record in the manifest."""
    import onnx

    cfg = model.config
    dims = dynamic_input_spec(model, max_size)
    info: dict = {"dynamic_axes": dims, "opset": OPSET, "scan_lowering": scan}
    export_kwargs: dict = {}
    portable_scan = None
    if scan == "custom-op":
        export_kwargs["custom_translation_table"] = _scan_translation_table()
        traced = model
    elif scan == "portable":
        # The prefix scan has a fixed depth in the graph: enough levels for the longest stage-1 sequence allowed.
        stage1 = -(-max_size // 4)
        levels = levels_for(stage1 * stage1)
        info["scan_levels"] = levels
        traced = model
        portable_scan = functools.partial(selective_scan_portable, levels=levels)
    else:
        raise ValueError(f"unknown scan lowering {scan!r}")

    # Batch 2 and a side that keeps every stage >= 2 positions: torch.export specialises sizes 0 and 1.
    side = max(dims["height"]["min"], min(cfg.input.image_size, max_size))
    example = torch.randn(2, cfg.in_chans, side, side)
    dynamic_shapes = {
        "x": {
            0: torch.export.Dim("batch", **dims["batch"]),
            2: torch.export.Dim("height", **dims["height"]),
            3: torch.export.Dim("width", **dims["width"]),
        }
    }
    with _quiet_exporter(), scan_replaced(traced, portable_scan):
        program = torch.onnx.export(
            traced,
            (example,),
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=OPSET,
            optimize=True,
            verbose=False,
            **export_kwargs,
        )
    proto = program.model_proto
    proto.ir_version = IR_VERSION
    proto.producer_name = "vmamba-export"
    onnx.save_model(proto, str(path))
    info["nodes"] = len(proto.graph.node)
    info["scan_nodes"] = sum(1 for n in proto.graph.node if n.domain == ONNX_DOMAIN)
    return info


@contextlib.contextmanager
def scan_replaced(model: VMamba, fn):
    """Run with every block's scan replaced by `fn` (None: leave as is), restoring the original afterwards."""
    if fn is None:
        yield model
        return
    blocks = [m for m in model.modules() if isinstance(m, SS2D)]
    saved = [b.scan_fn for b in blocks]
    try:
        model.set_scan(fn)
        yield model
    finally:
        for block, original in zip(blocks, saved):
            block.scan_fn = original


class _quiet_exporter:
    """torch.onnx prints progress and torchvision warnings on every export; keep the CLI's output ours."""

    def __enter__(self):
        self._loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript")]
        self._levels = [lg.level for lg in self._loggers]
        for lg in self._loggers:
            lg.setLevel(logging.ERROR)
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")
        self._stdout = io.StringIO()
        self._redirect = contextlib.redirect_stdout(self._stdout)
        self._redirect.__enter__()
        return self

    def __exit__(self, *exc):
        self._redirect.__exit__(*exc)
        self._warnings.__exit__(*exc)
        for lg, level in zip(self._loggers, self._levels):
            lg.setLevel(level)
        return False
