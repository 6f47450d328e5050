"""SiLU as one ONNX Runtime QuickGelu node (cpu-onnxruntime graphs).

The exporter writes SiLU as Sigmoid(x) and Mul(x, sigmoid). ONNX Runtime's own fusion turns that pair into its
contrib op `com.microsoft::QuickGelu` (x * sigmoid(alpha * x), alpha 1) in a float graph, but not in the int8 one:
there x comes from a DequantizeLinear, which ORT's QDQ handling duplicates for each of its two readers, after which
the pair no longer reads one tensor. Written as QuickGelu before ORT sees it, the SiLU after each block's depthwise
convolution is one kernel in int8 as it already is in float.
"""

from __future__ import annotations

import onnx
from onnx import helper

CONTRIB_DOMAIN = "com.microsoft"


def fuse_silu(model: onnx.ModelProto) -> int:
    """Rewrite `model` in place: every Mul(x, Sigmoid(x)) whose Sigmoid has no other reader becomes one
    QuickGelu(x, alpha=1). Returns how many were fused."""
    graph = model.graph
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}

    fused: dict[int, onnx.NodeProto] = {}  # id(Mul) -> its QuickGelu
    dropped: set[int] = set()  # id(Sigmoid)
    for node in graph.node:
        if node.op_type != "Sigmoid" or node.domain not in ("", "ai.onnx"):
            continue
        x, sig = node.input[0], node.output[0]
        users = readers.get(sig, [])
        if sig in outputs or len(users) != 1:
            continue
        mul = users[0]
        if mul.op_type != "Mul" or mul.domain not in ("", "ai.onnx") or sorted(mul.input) != sorted([x, sig]):
            continue
        fused[id(mul)] = helper.make_node(
            "QuickGelu", [x], [mul.output[0]], domain=CONTRIB_DOMAIN, alpha=1.0, name=f"{mul.name or sig}_silu"
        )
        dropped.add(id(node))
    if not fused:
        return 0
    nodes = [fused.get(id(n), n) for n in graph.node if id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(op.domain == CONTRIB_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
    return len(fused)
