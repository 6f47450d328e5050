"""cpu-onnxruntime graph edit: LayerNorm2d as one `ai.vmamba::ChannelLayerNorm` node.

LayerNorm2d (models/vmamba.py) exports as Transpose(0, 2, 3, 1) -> LayerNormalization(last axis) -> Transpose(0, 3,
1, 2): ONNX Runtime's CPU provider runs the two Transposes as copies and its LayerNormalization over rows of C values.
The project's CPU kernel (kernels/cpu/channel_layer_norm.cpp, in libvmamba_ort.so) normalises over the channel axis
of the NCHW map in place, vectorised over pixels: the same function in one node, with no transposes.

Only the triplet is replaced, and only where nothing else reads its intermediate tensors (the first Transpose's
output and the LayerNormalization's), the norm is over the last axis with scale and bias given as (C,)
initializers, and no Mean/InvStdDev output is asked for. Every other LayerNormalization stays one here (in VMamba:
the classifier's final norm, read by a ReduceMean in channel-last layout; v0's channel-last norms); the lowering then
runs those over the last axis as LastAxisLayerNorm (onnxruntime_cpu.py). The manifest records how many were replaced
and kept (`lowering.layer_norms`), as the cuda-onnxruntime rewrite does (cuda_graph.py).

The lowering applies it to fp32 graphs only (lowering/__init__.py): in int8 graphs ONNX Runtime runs the quantized
convolutions channels-last and the LayerNormalizations between them without Transposes, which a channel-first norm
would bring back. Folding the residual Add before a norm into the op (a second input and output) was measured
slower and is not done (docs/cpu-latency.md).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from .onnx_export import ONNX_DOMAIN
from .onnx_graph import node_attribute, replace_nodes

if TYPE_CHECKING:  # onnx is imported where it is used: this module loads with the lowering registry
    import onnx

CHANNEL_NORM_OP = "ChannelLayerNorm"
DEFAULT_EPSILON = 1e-5  # LayerNormalization's default
TO_CHANNELS_LAST = [0, 2, 3, 1]
TO_CHANNELS_FIRST = [0, 3, 1, 2]


@functools.cache
def register_channel_norm_schema() -> None:
    """The op's ONNX schema, so that onnx.checker (and shape inference) accept graphs holding it."""
    from onnx import defs

    from .onnx_export import register_vmamba_schema

    register_vmamba_schema(
        CHANNEL_NORM_OP,
        "LayerNorm over axis 1 of X (N, C, ...): per position, (X - mean) / sqrt(var + epsilon) * weight + bias, "
        "statistics over the C channels (docs/scan-op.md).",
        ["X", "weight", "bias"],
        "Y",
        ["tensor(float)"],
        (defs.OpSchema.Attribute("epsilon", defs.OpSchema.AttrType.FLOAT, "added to the variance", required=False),),
    )


def _is_transpose(node: onnx.NodeProto | None, perm: list[int]) -> bool:
    return (
        node is not None
        and node.op_type == "Transpose"
        and node.domain in ("", "ai.onnx")
        and list(node_attribute(node, "perm", [])) == perm
    )


def _channel_vector(name: str, initializers: dict) -> int | None:
    """The length of a 1-D float initializer `name`, else None."""
    from onnx import TensorProto

    tensor = initializers.get(name)
    if tensor is None or len(tensor.dims) != 1 or tensor.data_type != TensorProto.FLOAT:
        return None
    return int(tensor.dims[0])


def _triplet(
    node: onnx.NodeProto, producer: dict, readers: dict, outputs: set[str], initializers: dict
) -> tuple[onnx.NodeProto, onnx.NodeProto] | None:
    """(first Transpose, second Transpose) when LayerNormalization `node` is the middle of a replaceable triplet,
    else None."""
    if node.op_type != "LayerNormalization" or node.domain not in ("", "ai.onnx") or len(node.input) != 3:
        return None
    if node_attribute(node, "axis", -1) not in (-1, 3) or node_attribute(node, "stash_type", 1) != 1:
        return None
    if any(o and (readers.get(o) or o in outputs) for o in node.output[1:]):  # Mean / InvStdDev used
        return None
    width = _channel_vector(node.input[1], initializers)
    if width is None or _channel_vector(node.input[2], initializers) != width:
        return None
    first = producer.get(node.input[0])
    if not _is_transpose(first, TO_CHANNELS_LAST) or first.output[0] in outputs:
        return None
    if [id(r) for r in readers.get(first.output[0], [])] != [id(node)]:
        return None
    after = readers.get(node.output[0], [])
    if len(after) != 1 or node.output[0] in outputs or not _is_transpose(after[0], TO_CHANNELS_FIRST):
        return None
    return first, after[0]


def use_channel_layer_norms(proto: onnx.ModelProto) -> dict:
    """Replace, in place, every Transpose -> LayerNormalization -> Transpose triplet of ModelProto `proto` that
    ChannelLayerNorm covers (module docstring). Returns what the manifest records: how many norms were replaced and
    how many LayerNormalizations kept."""
    import onnx

    graph = proto.graph
    initializers = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list] = {}
    for n in graph.node:
        for name in n.input:
            readers.setdefault(name, []).append(n)
    outputs = {o.name for o in graph.output}

    replacements: dict[int, onnx.NodeProto] = {}  # id(second Transpose) -> the new node, placed where it was
    removed: set[int] = set()
    dropped_tensors: set[str] = set()
    kept = 0
    for node in graph.node:
        if node.op_type != "LayerNormalization":
            continue
        found = _triplet(node, producer, readers, outputs, initializers)
        if found is None:
            kept += 1
            continue
        first, second = found
        norm = onnx.helper.make_node(
            CHANNEL_NORM_OP,
            [first.input[0], node.input[1], node.input[2]],
            [second.output[0]],
            name=node.name or f"{CHANNEL_NORM_OP}_{len(replacements)}",
            domain=ONNX_DOMAIN,
            epsilon=float(node_attribute(node, "epsilon", DEFAULT_EPSILON)),
        )
        norm.metadata_props.extend(node.metadata_props)  # the exporter's module scope, for tools that read it
        replacements[id(second)] = norm
        removed.update((id(first), id(node)))
        dropped_tensors.update((first.output[0], *[o for o in node.output if o]))
    if replacements:
        # Second Transposes become the new nodes in place: their readers come after them, and the first Transposes'
        # inputs before them.
        replace_nodes(graph, replacements, removed, dropped_tensors)
        if not any(o.domain == ONNX_DOMAIN for o in proto.opset_import):
            proto.opset_import.append(onnx.helper.make_opsetid(ONNX_DOMAIN, 1))
    return {"op": f"{ONNX_DOMAIN}::{CHANNEL_NORM_OP}", "replaced": len(replacements), "kept": kept}


def one_node_channel_norm_model(channels: int | str = "C", epsilon: float = DEFAULT_EPSILON) -> onnx.ModelProto:
    """An ONNX ModelProto holding one ChannelLayerNorm node, for kernel tests and benchmarks: inputs X (N, C, H, W),
    symbolic but C when an int), weight and bias (C); output Y."""
    from onnx import TensorProto, helper

    from .onnx_export import IR_VERSION, OPSET

    register_channel_norm_schema()
    shape = ["N", channels, "H", "W"]
    inputs = [
        helper.make_tensor_value_info("X", TensorProto.FLOAT, shape),
        helper.make_tensor_value_info("weight", TensorProto.FLOAT, [channels]),
        helper.make_tensor_value_info("bias", TensorProto.FLOAT, [channels]),
    ]
    outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, shape)]
    node = helper.make_node(CHANNEL_NORM_OP, ["X", "weight", "bias"], ["Y"], domain=ONNX_DOMAIN, epsilon=float(epsilon))
    return helper.make_model(
        helper.make_graph([node], "channel_norm", inputs, outputs),
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(ONNX_DOMAIN, 1)],
        ir_version=IR_VERSION,
    )
