"""Graph edits of the cuda-onnxruntime lowering, applied to the exported float32 ONNX graph before fp16 conversion.

LayerNormalization -> ai.vmamba::LastAxisLayerNorm (kernels/cuda/layer_norm.cuh): the same function, computed by the
project's CUDA library, whose kernel suits VMamba's many narrow rows (ONNX Runtime's CUDA LayerNorm took about ten times
the memory traffic's time on them). Only nodes the kernel covers are replaced: normalisation over the last axis, scale
and bias given as initializers of an even width up to 2048, no Mean/InvStdDev outputs asked for; others stay.
"""

from __future__ import annotations

from .onnx_export import ONNX_DOMAIN
from .onnx_graph import node_attribute

LAYER_NORM_OP = "LastAxisLayerNorm"
MAX_LAYER_NORM_WIDTH = 2048  # VMAMBA_LAYER_NORM_MAX_WIDTH of kernels/cuda/layer_norm.cuh
DEFAULT_EPSILON = 1e-5  # LayerNormalization's default


def _replaceable_width(node, initializers: dict) -> int | None:
    """The normalised width when `node` is a LayerNormalization the CUDA kernel covers, else None."""
    if node.op_type != "LayerNormalization" or node.domain not in ("", "ai.onnx"):
        return None
    if node_attribute(node, "axis", -1) != -1 or len(node.input) != 3 or any(node.output[1:]):
        return None
    scale, bias = initializers.get(node.input[1]), initializers.get(node.input[2])
    if scale is None or bias is None or len(scale.dims) != 1 or list(bias.dims) != list(scale.dims):
        return None
    width = int(scale.dims[0])
    return width if width % 2 == 0 and 2 <= width <= MAX_LAYER_NORM_WIDTH else None


def use_last_axis_layer_norms(proto) -> dict:
    """Replace, in place, every LayerNormalization of ModelProto `proto` that LastAxisLayerNorm covers. Returns what
    the manifest records: how many were replaced and how many kept."""
    import onnx

    initializers = {i.name: i for i in proto.graph.initializer}
    replaced = kept = 0
    for node in proto.graph.node:
        if node.op_type != "LayerNormalization":
            continue
        if _replaceable_width(node, initializers) is None:
            kept += 1
            continue
        epsilon = float(node_attribute(node, "epsilon", DEFAULT_EPSILON))
        node.op_type, node.domain = LAYER_NORM_OP, ONNX_DOMAIN
        del node.output[1:]
        del node.attribute[:]
        node.attribute.append(onnx.helper.make_attribute("epsilon", epsilon))
        replaced += 1
    if replaced and not any(o.domain == ONNX_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid(ONNX_DOMAIN, 1))
    return {"op": f"{ONNX_DOMAIN}::{LAYER_NORM_OP}", "replaced": replaced, "kept": kept}
