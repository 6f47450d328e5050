"""A convolution of a channel Concat as a sum of convolutions of its parts (cpu-onnxruntime graphs).

UperNet's fused bottleneck (models/dense.py, `fpn_bottleneck`) is a 3 x 3 convolution of the four FPN levels
concatenated on the channel axis: 4 x 512 channels at 1/4 resolution, a 134 MB tensor at 512 x 512 that ONNX
Runtime writes once (Concat) and the convolution reads back. A convolution is linear in its input channels, so
Conv(Concat(x_1, ..., x_k), W, b) = Conv(x_1, W_1, b) + Conv(x_2, W_2) + ... + Conv(x_k, W_k), W_i the columns of W
for x_i's channels. ONNX Runtime's NCHWc layout pass folds each Add into the next convolution (its "Sum" input, the
accumulation the kernel does anyway) and the ReLU after it into the last one, so the rewritten head has no Concat and
no Add nodes: same arithmetic, one pass over 134 MB less. Measured on the bottleneck alone (2 threads, 4 x 512 ->
512 channels, 3 x 3, 128 x 128): 919 -> 908 ms; on the whole UperNet see docs/dense-artifacts.md.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .onnx_graph import node_attribute, replace_nodes


def split_concat_convs(model: onnx.ModelProto, shapes: dict[str, list[int | None]]) -> int:
    """Rewrite `model` in place: every ungrouped Conv whose input is a channel Concat (axis 1) read by nothing else,
    whose weight is an initializer and whose parts' channel counts are static in `shapes`
    (onnx_graph.static_shapes), becomes one Conv per part (the bias on the first) summed by a chain of Adds, under
    the Conv's output name. Returns how many convolutions were split."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    initializers = {init.name: init for init in graph.initializer}

    placed: dict[int, list[onnx.NodeProto]] = {}
    removed: set[int] = set()
    gone: set[str] = set()
    replaced_weights: set[str] = set()
    for conv in graph.node:
        if conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx") or node_attribute(conv, "group", 1) != 1:
            continue
        concat = producer.get(conv.input[0])
        if concat is None or concat.op_type != "Concat" or concat.domain not in ("", "ai.onnx"):
            continue
        if node_attribute(concat, "axis", None) != 1 or readers.get(concat.output[0]) != 1:
            continue
        if concat.output[0] in outputs or len(conv.input) < 2 or conv.input[1] not in initializers:
            continue
        channels = [(shapes.get(name) or [None, None])[1] for name in concat.input]
        weight = numpy_helper.to_array(initializers[conv.input[1]])
        if None in channels or weight.ndim < 3 or sum(channels) != weight.shape[1]:
            continue
        bias = conv.input[2] if len(conv.input) > 2 and conv.input[2] else None
        attributes = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        stem = conv.output[0]
        new_nodes: list[onnx.NodeProto] = []
        total = None
        offset = 0
        for index, (part, count) in enumerate(zip(concat.input, channels, strict=True)):
            piece = f"{stem}_part{index}_weight"
            graph.initializer.append(
                numpy_helper.from_array(np.ascontiguousarray(weight[:, offset : offset + count]), piece)
            )
            offset += count
            inputs = [part, piece] + ([bias] if bias and index == 0 else [])
            term = f"{stem}_part{index}"
            new_nodes.append(helper.make_node("Conv", inputs, [term], name=f"{term}_conv", **attributes))
            if total is not None:
                summed = f"{stem}_sum{index}"
                new_nodes.append(helper.make_node("Add", [total, term], [summed], name=f"{summed}_add"))
                term = summed
            total = term
        new_nodes[-1].output[0] = stem  # the last node (an Add, or the one Conv) keeps the convolution's name
        placed[id(conv)] = new_nodes
        replaced_weights.add(conv.input[1])
        removed.add(id(concat))
        gone.add(concat.output[0])
    replace_nodes(graph, placed, removed, gone)
    # the whole weights, unless something else still reads them (their parts are new initializers)
    still_read = {name for node in graph.node for name in node.input} | outputs
    kept = [init for init in graph.initializer if init.name not in replaced_weights or init.name in still_read]
    if len(kept) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return len(placed)
