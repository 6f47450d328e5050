"""Small pieces the graph rewrites share: a node's attribute, the node order of an edited graph, replacing nodes in
place, static tensor shapes, the pointwise convolutions they look for."""

from __future__ import annotations

import onnx


def sort_topologically(graph: onnx.GraphProto) -> None:
    """Reorder `graph`'s nodes so that every producer comes before its readers (ONNX requires it), in rounds: each
    round takes, in their present order, the nodes whose inputs are all available."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        ready = [n for n in pending if all(name in available for name in n.input)]
        if not ready:  # inputs from an outer scope or a cycle: keep the rest as it was
            ordered.extend(pending)
            break
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
        for node in ready:
            ordered.append(node)
            available.update(node.output)
    nodes = [type(n)() for n in ordered]
    for copy, node in zip(nodes, ordered):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(nodes)


def replace_nodes(
    graph: onnx.GraphProto,
    placed: dict[int, onnx.NodeProto | list[onnx.NodeProto]],
    removed: set[int],
    gone: set[str],
) -> None:
    """Put each new node (or list of nodes, in order) of `placed` where the node of that id is, drop the nodes whose
    ids are in `removed`, and the value_info of the tensors in `gone`. The caller places each new node where all its
    inputs exist and before all its readers, so the node list stays topologically sorted."""
    nodes = []
    for n in graph.node:
        if id(n) in removed:
            continue
        new = placed.get(id(n), n)
        nodes.extend(new if isinstance(new, list) else [new])
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [v for v in graph.value_info if v.name not in gone]
    del graph.value_info[:]
    graph.value_info.extend(kept)


def node_attribute(node: onnx.NodeProto, name: str, default):
    """The value of `node`'s attribute `name`, or `default` when it has none."""
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def static_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Tensor name -> dimensions (None where symbolic), of the graph's inputs, outputs and intermediate tensors (shape
    inference) and initializers: the weights are often computed tensors, not initializers."""
    shapes: dict[str, list[int | None]] = {i.name: list(i.dims) for i in model.graph.initializer}
    inferred = onnx.shape_inference.infer_shapes(model).graph
    for info in inferred.value_info:
        shapes[info.name] = _dims(info)
    for info in (*inferred.input, *inferred.output):
        if info.type.tensor_type.HasField("shape"):
            shapes.setdefault(info.name, _dims(info))  # an initializer listed as an input keeps its own dims
    return shapes


def _dims(info: onnx.ValueInfoProto) -> list[int | None]:
    return [int(d.dim_value) if d.HasField("dim_value") else None for d in info.type.tensor_type.shape.dim]


def pointwise_conv(node: onnx.NodeProto, group: int = 1) -> bool:
    """A bias-free convolution with `group` groups, unit strides and dilations and no padding, whose kernel is 1 x 1
    when it says so (a missing kernel_shape comes from the weight: the caller checks the weight's shape)."""
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return False
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if list(attrs.get("kernel_shape", [1, 1])) != [1, 1]:
        return False
    if attrs.get("group", 1) != group or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return False
    if any(v != 0 for v in attrs.get("pads", [])):
        return False
    return all(v == 1 for v in attrs.get("strides", [1, 1])) and all(v == 1 for v in attrs.get("dilations", [1, 1]))


def drop_dead_nodes(graph: onnx.GraphProto) -> int:
    """Remove standard-domain nodes none of whose outputs is read or is a graph output (left behind by a rewrite,
    such as the shape arithmetic of Reshapes it removed), repeatedly. Returns how many went."""
    outputs = {o.name for o in graph.output}
    dropped = 0
    while True:
        read = {name for n in graph.node for name in n.input} | outputs
        dead = [n for n in graph.node if n.domain in ("", "ai.onnx") and not any(o in read for o in n.output if o)]
        if not dead:
            return dropped
        ids = {id(n) for n in dead}
        kept = [n for n in graph.node if id(n) not in ids]
        del graph.node[:]
        graph.node.extend(kept)
        dropped += len(dead)
