"""The cpu-onnxruntime graph rewrites (lowering/onnxruntime_cpu.py) on small graphs built here, checked against the
unrewritten graph run by ONNX Runtime and against numpy."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from vmamba_export.lowering.onnx_export import IR_VERSION, OPSET
from vmamba_export.lowering.sibling_convs import merge_sibling_pointwise_convs


def _conv(name: str, source: str, weight: str, **attrs) -> onnx.NodeProto:
    return helper.make_node("Conv", [source, weight], [name], name=name, **attrs)


def _sibling_graph(rng: np.random.Generator) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x (1, 8, 5, 7) read by three bias-free 1x1 convolutions (3, 1 and 2 outputs; the 1-output weight computed by a
    Reshape, as the exporter leaves VMamba's x_proj parts), a 3x3 one and a 1x1 one with a bias; y read by one 1x1."""
    weights = {
        "w_a": rng.standard_normal((3, 8, 1, 1)).astype(np.float32),
        "w_b_flat": rng.standard_normal((1, 8)).astype(np.float32),
        "w_c": rng.standard_normal((2, 8, 1, 1)).astype(np.float32),
        "w_k3": rng.standard_normal((4, 8, 3, 3)).astype(np.float32),
        "w_bias": rng.standard_normal((2, 8, 1, 1)).astype(np.float32),
        "bias": rng.standard_normal(2).astype(np.float32),
        "w_y": rng.standard_normal((5, 6, 1, 1)).astype(np.float32),
        "b_shape": np.array([1, 8, 1, 1], dtype=np.int64),
    }
    nodes = [
        _conv("a", "x", "w_a", kernel_shape=[1, 1]),
        helper.make_node("Reshape", ["w_b_flat", "b_shape"], ["w_b"]),
        _conv("b", "x", "w_b"),
        _conv("k3", "x", "w_k3", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "w_bias", "bias"], ["biased"], kernel_shape=[1, 1]),
        _conv("c", "x", "w_c", kernel_shape=[1, 1]),
        _conv("single", "y", "w_y", kernel_shape=[1, 1]),
    ]
    outputs = {"a": 3, "b": 1, "c": 2, "k3": 4, "biased": 2, "single": 5}
    graph = helper.make_graph(
        nodes,
        "siblings",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 5, 7]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 5, 7]),
        ],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, c, 5, 7]) for name, c in outputs.items()],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    return model, weights


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def test_sibling_pointwise_convs_become_one_conv_and_a_split():
    rng = np.random.default_rng(0)
    model, weights = _sibling_graph(rng)
    feeds = {"x": rng.standard_normal((1, 8, 5, 7)).astype(np.float32), "y": rng.standard_normal((1, 6, 5, 7))}
    feeds["y"] = feeds["y"].astype(np.float32)
    before = _run(model, feeds)

    assert merge_sibling_pointwise_convs(model) == 2  # a, b, c -> one; k3, biased and single left alone
    onnx.checker.check_model(model, full_check=True)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 4
    (split,) = [n for n in model.graph.node if n.op_type == "Split"]
    assert list(split.output) == ["a", "b", "c"]

    after = _run(model, feeds)
    assert before.keys() == after.keys()
    for name in before:
        np.testing.assert_allclose(after[name], before[name], rtol=1e-6, atol=1e-6)
    # and against numpy: 1x1 convolutions are per-pixel matrix products
    w_b = weights["w_b_flat"].reshape(1, 8, 1, 1)
    for name, w in (("a", weights["w_a"]), ("b", w_b), ("c", weights["w_c"])):
        expected = np.einsum("oc,bchw->bohw", w[:, :, 0, 0], feeds["x"])
        np.testing.assert_allclose(after[name], expected, rtol=1e-5, atol=1e-5)


def test_graph_without_siblings_is_unchanged():
    rng = np.random.default_rng(1)
    model, _ = _sibling_graph(rng)
    keep = {"k3", "biased", "single"}
    kept = [n for n in model.graph.node if n.output[0] in keep]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    outputs = [o for o in model.graph.output if o.name in keep]
    del model.graph.output[:]
    model.graph.output.extend(outputs)
    text = model.SerializeToString()
    assert merge_sibling_pointwise_convs(model) == 0
    assert model.SerializeToString() == text


def test_silu_pairs_become_quick_gelu():
    """Mul(x, Sigmoid(x)) -> QuickGelu(x); a Sigmoid read twice, or a Mul of another tensor, stays as it is."""
    from vmamba_export.lowering.silu_fusion import fuse_silu

    nodes = [
        helper.make_node("Sigmoid", ["x"], ["sx"]),
        helper.make_node("Mul", ["sx", "x"], ["silu"]),  # operands in either order
        helper.make_node("Sigmoid", ["y"], ["sy"]),
        helper.make_node("Mul", ["y", "sy"], ["silu_y"]),
        helper.make_node("Add", ["sy", "y"], ["also_reads_sy"]),  # a second reader: not fused
        helper.make_node("Sigmoid", ["x"], ["sx2"]),
        helper.make_node("Mul", ["y", "sx2"], ["gate"]),  # y * sigmoid(x): not a SiLU
    ]
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [2, 3, 4])  # noqa: E731
    graph = helper.make_graph(
        nodes, "silu", [value("x"), value("y")], [value(n) for n in ("silu", "silu_y", "also_reads_sy", "gate")]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    rng = np.random.default_rng(2)
    feeds = {k: (4 * rng.standard_normal((2, 3, 4))).astype(np.float32) for k in ("x", "y")}
    before = _run(model, feeds)

    assert fuse_silu(model) == 1
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node].count("QuickGelu") == 1
    after = _run(model, feeds)
    for name in before:
        np.testing.assert_allclose(after[name], before[name], rtol=1e-6, atol=1e-6)
    x = feeds["x"].astype(np.float64)
    np.testing.assert_allclose(after["silu"], x / (1 + np.exp(-x)), rtol=1e-5, atol=1e-6)
