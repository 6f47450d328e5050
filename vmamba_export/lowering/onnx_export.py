"""torch.export -> ONNX for the two ONNX lowerings of the scan op.

`custom-op`: every `vmamba::selective_scan_2d` becomes one `ai.vmamba::SelectiveScan2D` node, which the project's
custom-op library implements for ONNX Runtime (kernels/). `portable`: the scan is replaced before tracing by the
plain-tensor-op form (vmamba_export/scan/portable.py: a blocked scan, O(L) work), so the graph holds standard ONNX ops
only, with no Loop or Scan. Both take a dynamic batch, height and width.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

from ..models import SS2D, VMamba
from ..models.shapes import export_min_size
from ..outputs import output_names
from ..scan import QUALIFIED_NAME
from ..scan.portable import DEFAULT_CHUNK, blocked_depth, levels_for, selective_scan_prefix
from .quiet import quiet_toolchain

ONNX_DOMAIN = "ai.vmamba"
ONNX_OP = "SelectiveScan2D"
# 20: GELU is one Gelu node (CPU and CUDA kernels in ONNX Runtime); at 18 it is five nodes that ONNX Runtime's
# fusion does not catch, ~12% of vmamba_tiny_s1l8's CPU time.
OPSET = 20
IR_VERSION = 10  # onnxruntime-gpu 1.31 refuses the IR 14 that onnx 1.23 writes (FIELD-NOTES.md)
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
SCAN_INPUTS = ("u", "delta", "A_logs", "B", "C", "D", "delta_bias")


def register_vmamba_schema(
    op: str,
    doc: str,
    inputs: list[str],
    output: str,
    types: list[str],
    attributes: tuple = (),
    optional_inputs: tuple[str, ...] = (),
) -> None:
    """Register an ai.vmamba op's ONNX schema (opset 1; every input and the output of one type T among `types`), so
    that onnx.checker and shape inference accept graphs holding it. `attributes`: onnx.defs.OpSchema.Attribute;
    `optional_inputs`: trailing inputs a node may leave out."""
    from onnx import defs

    param = defs.OpSchema.FormalParameter
    optional = defs.OpSchema.FormalParameterOption.Optional
    formal_inputs = [param(name, "T") for name in inputs]
    formal_inputs += [param(name, "T", param_option=optional) for name in optional_inputs]
    schema = defs.OpSchema(
        op,
        ONNX_DOMAIN,
        1,
        doc=doc,
        inputs=formal_inputs,
        outputs=[param(output, "T")],
        type_constraints=[("T", types, " or ".join(types))],
        attributes=list(attributes),
    )
    defs.register_schema(schema)


@functools.cache
def _register_scan_schema() -> None:
    register_vmamba_schema(
        ONNX_OP,
        "Fused 2-D selective scan of VMamba's SS2D (docs/scan-op.md); float16 tensors keep a float32 state. With the "
        "optional dt_weight (K, Di, R), delta is the dt projection's input (B, K*R, H, W) (CPU library only).",
        list(SCAN_INPUTS),
        "y",
        ["tensor(float)", "tensor(float16)"],
        optional_inputs=("dt_weight",),
    )


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
    (dynamic axes with their ranges, scan levels for the portable form) to record in the manifest. The outputs are
    named by the model's task (outputs.py): `logits`, or `features_0..3` for a backbone (VMambaBackbone,
    UperNetSegmenter and VMamba all export through here).

    Both lowerings trace the model once with the scan as one custom node per block. For "portable", the scan alone is
    then exported once as its own graph (plain tensor ops, every dimension dynamic) and inlined at every node: tracing
    the prefix scan inside the whole model repeats torch.export's symbolic-shape work per block and took minutes.
    """
    import onnx

    if scan not in ("custom-op", "portable"):
        raise ValueError(f"unknown scan lowering {scan!r}")
    cfg = model.config
    dims = dynamic_input_spec(model, max_size)
    info: dict = {"dynamic_axes": dims, "opset": OPSET, "scan_lowering": scan}
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
    with quiet_toolchain("onnxscript"):
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            input_names=[INPUT_NAME],
            output_names=output_names(getattr(cfg, "task", "classification"), len(cfg.depths)),
            opset_version=OPSET,
            optimize=True,
            verbose=False,
            custom_translation_table=_scan_translation_table(),
        )
    proto = program.model_proto
    if scan == "portable":
        # The scan's recursion depth is fixed in the graph: enough for the longest stage-1 sequence allowed.
        stage1 = -(-max_size // 4)
        form, chunk = portable_form(cfg.d_state)
        info["scan_max_length"] = stage1 * stage1
        info["scan_form"] = form
        info["scan_chunk"] = chunk
        info["scan_depth"] = blocked_depth(stage1 * stage1, chunk)
        proto = inline_portable_scan(proto, stage1 * stage1, cfg.d_state, form, chunk)
    proto.ir_version = IR_VERSION
    proto.producer_name = "vmamba-export"
    onnx.save_model(proto, str(path))
    info["nodes"] = len(proto.graph.node)
    info["scan_nodes"] = sum(1 for n in proto.graph.node if n.domain == ONNX_DOMAIN)
    return info


PORTABLE_FORMS = ("blocked", "cumsum", "prefix")
CUMSUM_CHUNK = 8


def portable_form(d_state: int) -> tuple[str, int]:
    """(form, chunk) the onnx-portable lowering exports for a model's d_state, the faster one measured
    (benchmarks/portable_model.py, docs/scan-op.md): d_state 1 the cumsum form, whose few whole-tensor ops beat the
    blocked form's ~900 per-step nodes a block; d_state 16 the blocked form, whose per-step slices stay in cache
    (the cumsum form would need ~15 passes over state-sized tensors a step against 9)."""
    return ("cumsum", CUMSUM_CHUNK) if d_state == 1 else ("blocked", DEFAULT_CHUNK)


class _PrefixScan(torch.nn.Module):
    def __init__(self, levels: int):
        super().__init__()
        self.levels = levels

    def forward(self, u, delta, A_logs, B, C, D, delta_bias):
        return selective_scan_prefix(u, delta, A_logs, B, C, D, delta_bias, levels=self.levels)


def one_node_scan_model(d_state: int | str = "N", shapes=None, float16: bool = False):
    """An ONNX ModelProto holding one SelectiveScan2D node (inputs SCAN_INPUTS, output y), for kernel tests and
    benchmarks: every dimension symbolic (d_state fixed when an int), or the static input `shapes` when given."""
    from onnx import TensorProto, helper

    elem = TensorProto.FLOAT16 if float16 else TensorProto.FLOAT
    if shapes is None:
        dims = {
            "u": ["b", "d", "h", "w"],
            "delta": ["b", 4, "d", "h", "w"],
            "A_logs": ["kd", d_state],
            "B": ["b", 4, d_state, "h", "w"],
            "C": ["b", 4, d_state, "h", "w"],
            "D": ["kd"],
            "delta_bias": ["kd"],
        }
        shapes = [dims[name] for name in SCAN_INPUTS]
    inputs = [helper.make_tensor_value_info(n, elem, list(shape)) for n, shape in zip(SCAN_INPUTS, shapes)]
    output = helper.make_tensor_value_info("y", elem, list(shapes[0]))
    node = helper.make_node(ONNX_OP, list(SCAN_INPUTS), ["y"], domain=ONNX_DOMAIN)
    return helper.make_model(
        helper.make_graph([node], "scan", inputs, [output]),
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(ONNX_DOMAIN, 1)],
        ir_version=IR_VERSION,
    )


def portable_scan_function(
    max_length: int, d_state: int, form: str = "blocked", chunk: int = DEFAULT_CHUNK, keep_decays: bool = True
):
    """The portable scan as an ONNX function `ai.vmamba::SelectiveScan2D`: batch, channels, height and width
    dynamic (sequences up to `max_length` positions); d_state fixed (a model has one).

    "blocked" (d_state 16) and "cumsum" (d_state 1 only), what the lowering exports (`portable_form`): built op by op
    (onnx_portable_scan.py). "prefix": the log-depth form this lowering exported before, traced from torch (kept so
    that benchmarks can compare)."""
    if form == "blocked":
        from .onnx_portable_scan import blocked_scan_function

        depth = blocked_depth(max_length, chunk)
        return blocked_scan_function(ONNX_DOMAIN, ONNX_OP, OPSET, d_state, chunk, depth, SCAN_INPUTS, keep_decays)
    if form == "cumsum":
        from .onnx_portable_scan import cumsum_scan_function

        if d_state != 1:
            raise ValueError(f"the cumsum scan form is for d_state 1, not {d_state}")
        return cumsum_scan_function(ONNX_DOMAIN, ONNX_OP, OPSET, chunk, blocked_depth(max_length, chunk), SCAN_INPUTS)
    if form != "prefix":
        raise ValueError(f"unknown portable scan form {form!r}: expected one of {', '.join(PORTABLE_FORMS)}")
    import onnx
    from onnx import helper

    b, di, h, w, k = 2, 3, 5, 6, 4
    args = (
        torch.randn(b, di, h, w),
        torch.randn(b, k, di, h, w),
        torch.randn(k * di, d_state),
        torch.randn(b, k, d_state, h, w),
        torch.randn(b, k, d_state, h, w),
        torch.randn(k * di),
        torch.randn(k * di),
    )
    batch = torch.export.Dim("scan_batch", min=1, max=4096)
    chans = torch.export.Dim("scan_channels", min=1, max=16384)
    height = torch.export.Dim("scan_height", min=2, max=8192)
    width = torch.export.Dim("scan_width", min=2, max=8192)
    per_direction = {0: batch, 3: height, 4: width}
    dynamic_shapes = {
        "u": {0: batch, 1: chans, 2: height, 3: width},
        "delta": {0: batch, 2: chans, 3: height, 4: width},
        "A_logs": {0: 4 * chans},
        "B": per_direction,
        "C": per_direction,
        "D": {0: 4 * chans},
        "delta_bias": {0: 4 * chans},
    }
    with quiet_toolchain("onnxscript"):
        program = torch.onnx.export(
            _PrefixScan(levels_for(max_length)),
            args,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            input_names=list(SCAN_INPUTS),
            output_names=["y"],
            opset_version=OPSET,
            optimize=True,
            verbose=False,
        )
    graph = program.model_proto.graph
    # A function has no initializers: the graph's constants become Constant nodes.
    constants = [helper.make_node("Constant", [], [t.name], value=t) for t in graph.initializer]
    return helper.make_function(
        ONNX_DOMAIN,
        ONNX_OP,
        [i.name for i in graph.input],
        [o.name for o in graph.output],
        constants + list(graph.node),
        [onnx.helper.make_opsetid("", OPSET)],
    )


def inline_portable_scan(
    proto,
    max_length: int,
    d_state: int,
    form: str = "blocked",
    chunk: int = DEFAULT_CHUNK,
    keep_decays: bool = True,
):
    """Replace every SelectiveScan2D node by the portable scan's ops: standard ONNX only afterwards."""
    import onnx.inliner

    proto.functions.append(portable_scan_function(max_length, d_state, form, chunk, keep_decays))
    proto = onnx.inliner.inline_local_functions(proto)
    del proto.functions[:]
    kept = [o for o in proto.opset_import if o.domain != ONNX_DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(kept)
    return proto


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
