"""A bilinear Resize that produces a graph output as `ai.vmamba::BilinearResize` (cpu-onnxruntime graphs).

A segmenter's last node upsamples the class logits from 1/4 resolution to the input size (models/dense.py, as
mmseg's `resize` at inference): at 512 x 512 with 150 classes, a 157 MB output. ONNX Runtime's CPU provider runs that
Resize in its blocked NCHWc layout, after the convolution that feeds it, and then converts the whole result back to
NCHW for the caller: two passes over the model's largest tensor, about 43 ms of a 1.5 s UperNet on 2 cores. The
library's kernel (kernels/cpu/bilinear_resize.h) writes the output once, in NCHW, with streaming stores; ORT then
converts only the small 1/4-resolution input. Same function (ONNX Resize, mode "linear", half_pixel coordinates, no
antialias); outputs agree to float32 rounding. Resizes inside the graph stay: ORT keeps those in its blocked layout
between convolutions, which is faster than any planar kernel there.
"""

from __future__ import annotations

import onnx

from .onnx_export import ONNX_DOMAIN
from .onnx_graph import node_attribute

RESIZE_OP = "BilinearResize"

# Resize's attributes (opset 18-19) and the values the kernel computes with; any other value keeps the node as is.
_COVERED_ATTRIBUTES = {
    "mode": b"linear",
    "coordinate_transformation_mode": b"half_pixel",
    "antialias": 0,
    "exclude_outside": 0,
    "keep_aspect_ratio_policy": b"stretch",
}
# Read by other modes or coordinate transformations only: any value.
_IGNORED_ATTRIBUTES = {"cubic_coeff_a", "extrapolation_value", "nearest_mode"}


def _covered(node: onnx.NodeProto, shapes: dict[str, list[int | None]]) -> bool:
    """Whether `node` is a Resize the kernel computes: the covered attributes (defaults included), no `axes`, no roi
    or scales, a `sizes` input of 4 values, a 4-D input."""
    if node.op_type != "Resize" or node.domain not in ("", "ai.onnx"):
        return False
    names = {a.name for a in node.attribute}
    if names - set(_COVERED_ATTRIBUTES) - _IGNORED_ATTRIBUTES:
        return False
    defaults = {"mode": b"nearest", "coordinate_transformation_mode": b"half_pixel"}
    for name, value in _COVERED_ATTRIBUTES.items():
        if node_attribute(node, name, defaults.get(name, value)) != value:
            return False
    inputs = list(node.input) + [""] * (4 - len(node.input))
    if len(inputs) != 4 or inputs[1] or inputs[2] or not inputs[3]:
        return False
    return len(shapes.get(inputs[0]) or []) == 4 and shapes.get(inputs[3]) == [4]


def use_bilinear_resize_for_outputs(model: onnx.ModelProto, shapes: dict[str, list[int | None]]) -> int:
    """Rewrite `model` in place: every Resize the kernel computes (`_covered`) whose output is a graph output becomes
    BilinearResize(X, sizes) under the same output name. `shapes`: onnx_graph.static_shapes of the model. Returns how
    many were replaced."""
    outputs = {o.name for o in model.graph.output}
    replaced = 0
    for node in model.graph.node:
        if node.output[0] not in outputs or not _covered(node, shapes):
            continue
        x, sizes = node.input[0], node.input[3]
        del node.input[:]
        node.input.extend([x, sizes])
        del node.attribute[:]
        node.op_type, node.domain = RESIZE_OP, ONNX_DOMAIN
        replaced += 1
    if replaced and not any(o.domain == ONNX_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(ONNX_DOMAIN, 1))
    return replaced
