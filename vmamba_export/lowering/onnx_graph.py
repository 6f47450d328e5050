"""Small pieces the graph rewrites share: a node's attribute, the node order of an edited graph."""

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


def node_attribute(node: onnx.NodeProto, name: str, default):
    """The value of `node`'s attribute `name`, or `default` when it has none."""
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default
