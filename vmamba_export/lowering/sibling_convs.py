"""Merge the 1x1 convolutions that read one tensor into one convolution and a Split (cpu-onnxruntime graphs).

Each SS2D block projects its scan input three times, into the dt rank (4 R channels), B and C (4 N channels each):
three 1x1 convolutions of one map, kept apart in the model so that each output is contiguous for torch.export
(models/vmamba.py, `SS2D.scan_core`). ONNX Runtime's CPU provider runs each as its own blocked (NCHWc) convolution
and converts each output back to NCHW; a 4-channel output costs nearly what the 24-channel one does. One
convolution over the concatenated weights, then a Split on the channel axis, computes the same sums with one
kernel and one layout conversion. The weights stay whatever subgraph produced them (a Reshape of a Split of
`x_proj_weight`): the new Concat of them is constant, and ONNX Runtime folds it when the session is made.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .onnx_graph import pointwise_conv, sort_topologically, static_shapes


def merge_sibling_pointwise_convs(model: onnx.ModelProto, shapes: dict[str, list[int | None]] | None = None) -> int:
    """Rewrite `model` in place: every set of two or more bias-free 1x1 convolutions that read the same tensor becomes
    Concat(weights) -> one Conv -> Split(axis 1) with the original output names. Returns how many Conv nodes were
    removed. Convolutions whose weight shape is not known statically are left alone. `shapes`: static_shapes(model),
    when the caller has them."""
    graph = model.graph
    shapes = static_shapes(model) if shapes is None else shapes
    groups: dict[str, list[int]] = {}
    for index, node in enumerate(graph.node):
        weight = shapes.get(node.input[1]) if len(node.input) > 1 else None
        if pointwise_conv(node) and weight is not None and len(weight) == 4 and weight[0] and weight[2:] == [1, 1]:
            groups.setdefault(node.input[0], []).append(index)

    added: list[onnx.NodeProto] = []
    dropped: set[int] = set()
    for source, indices in groups.items():
        if len(indices) < 2:
            continue
        convs = [graph.node[i] for i in indices]
        sizes = [shapes[conv.input[1]][0] for conv in convs]
        stem = convs[0].output[0]
        weight = f"{stem}_merged_weight"
        merged = f"{stem}_merged"
        split_sizes = f"{stem}_merged_split"
        graph.initializer.append(numpy_helper.from_array(np.asarray(sizes, dtype=np.int64), split_sizes))
        added += [
            helper.make_node("Concat", [conv.input[1] for conv in convs], [weight], axis=0, name=f"{weight}_concat"),
            helper.make_node("Conv", [source, weight], [merged], kernel_shape=[1, 1], name=f"{merged}_conv"),
            helper.make_node(
                "Split", [merged, split_sizes], [conv.output[0] for conv in convs], axis=1, name=f"{merged}_split"
            ),
        ]
        dropped.update(indices)

    if not dropped:
        return 0
    kept = [node for index, node in enumerate(graph.node) if index not in dropped]
    del graph.node[:]
    graph.node.extend(kept + added)
    sort_topologically(graph)  # a set's weights may be computed after its first convolution
    return len(dropped) - len(added) // 3
