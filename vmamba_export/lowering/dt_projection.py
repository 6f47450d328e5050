"""Fuse the dt projection into the scan node (cpu-onnxruntime graphs).

Each SS2D block projects the dt rank inputs (B, 4 R, H, W) to delta (B, 4, Di, H, W) with a grouped 1x1
convolution (4 groups of R -> Di), reshaped for the scan. ONNX Runtime's CPU provider runs that convolution in plain
NCHW, writes the largest tensor of the block, and the scan then reads it back and transposes it into its channel
lanes. The scan op takes the projection instead (docs/scan-op.md, "dt_weight"): its 8th input holds the weights
(4, Di, R) and its delta input the projection's input, and the kernel computes each step's delta from that
position's R values (kernels/cpu/selective_scan_2d.cpp, `delta_at`). Same sums, in another order: outputs agree to
float32 rounding.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .onnx_graph import pointwise_conv, sort_topologically, static_shapes

SCAN_OP = "SelectiveScan2D"
DIRECTIONS = 4
# Ranks fused: the kernel projects these inside its scan loop (kMaxLoopRank in kernels/cpu/selective_scan_2d.cpp).
# Measured on vmamba_tiny_s1l8 (224, 2 threads, the same graph with and without, 7 interleaved rounds): the two
# rank-6 stage-1 projections fused, 52.3 -> 51.2 ms; fusing the ranks 12 to 48 of stages 2 to 4 as well (projected
# into the delta tile), 51.0 -> 51.6 ms: ONNX Runtime's grouped convolution does those faster.
MAX_FUSED_RANK = 8


def fuse_dt_projections(
    model: onnx.ModelProto, shapes: dict[str, list[int | None]] | None = None, max_rank: int = MAX_FUSED_RANK
) -> int:
    """Rewrite `model` in place: every scan node whose delta is Reshape(Conv(x, w, group=4)) (1x1, no bias, w of
    static shape (4 Di, R, 1, 1) with R <= `max_rank`, each output read by nothing else) takes x as its delta input
    and w reshaped to (4, Di, R) as its dt_weight; the Conv and the Reshape go. Returns how many scans were changed.
    `shapes`: static_shapes(model), when the caller has them."""
    graph = model.graph
    shapes = static_shapes(model) if shapes is None else shapes
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    for out in graph.output:
        readers[out.name] = readers.get(out.name, 0) + 1

    dropped: set[int] = set()
    added: list[onnx.NodeProto] = []
    for scan in graph.node:
        if scan.op_type != SCAN_OP or len(scan.input) != 7:
            continue
        reshape = producer.get(scan.input[1])
        conv = producer.get(reshape.input[0]) if reshape is not None and reshape.op_type == "Reshape" else None
        if conv is None or not pointwise_conv(conv, group=DIRECTIONS):
            continue
        weight = shapes.get(conv.input[1])
        if weight is None or len(weight) != 4 or weight[2:] != [1, 1] or not weight[0] or not weight[1]:
            continue
        if weight[0] % DIRECTIONS or readers.get(conv.output[0]) != 1 or readers.get(reshape.output[0]) != 1:
            continue
        d_inner, rank = weight[0] // DIRECTIONS, weight[1]
        if rank > max_rank:
            continue
        stem = scan.output[0]
        shape_name, dt_weight = f"{stem}_dt_weight_shape", f"{stem}_dt_weight"
        graph.initializer.append(
            numpy_helper.from_array(np.asarray([DIRECTIONS, d_inner, rank], dtype=np.int64), shape_name)
        )
        # Constant: ONNX Runtime folds it when the session is made.
        added.append(helper.make_node("Reshape", [conv.input[1], shape_name], [dt_weight], name=f"{dt_weight}_reshape"))
        scan.input[1] = conv.input[0]
        scan.input.append(dt_weight)
        dropped.update(id(node) for node in (conv, reshape))

    if not added:
        return 0
    kept = [node for node in graph.node if id(node) not in dropped]
    del graph.node[:]
    graph.node.extend(kept + added)
    sort_topologically(graph)  # a scan now reads its weights' Reshape
    return len(added)
