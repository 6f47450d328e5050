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
    assert [n.op_type for n in model.graph.node].count("QuickGelu") == 1
    after = _run(model, feeds)
    for name in before:
        np.testing.assert_allclose(after[name], before[name], rtol=1e-6, atol=1e-6)
    x = feeds["x"].astype(np.float64)
    np.testing.assert_allclose(after["silu"], x / (1 + np.exp(-x)), rtol=1e-5, atol=1e-6)


def _scan_graph(rng: np.random.Generator) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Three scans of one map u (1, 16, 6, 5), d_state 1, each with its delta from a grouped (4 groups) 1x1
    convolution of its own projection input, reshaped to (1, 4, 16, 6, 5), as the exporter leaves an SS2D block:
    rank 6 (fused), rank 12 (above MAX_FUSED_RANK: kept), and rank 6 whose convolution output has a second reader
    (kept)."""
    d_inner, shape = 16, [1, 16, 6, 5]
    weights = {
        "A_logs": (0.5 * rng.standard_normal((64, 1))).astype(np.float32),
        "D": rng.standard_normal(64).astype(np.float32),
        "delta_bias": (0.3 * rng.standard_normal(64) - 1).astype(np.float32),
        "delta_shape": np.array([1, 4, d_inner, 6, 5], dtype=np.int64),
    }
    nodes, inputs = [], [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in (("u", shape),)]
    outputs = []
    for index, rank in enumerate((6, 12, 6)):
        low, w, conv, delta, y = (f"{n}{index}" for n in ("low", "w", "conv", "delta", "y"))
        weights[w] = (rng.standard_normal((4 * d_inner, rank, 1, 1)) / rank**0.5).astype(np.float32)
        inputs.append(helper.make_tensor_value_info(low, TensorProto.FLOAT, [1, 4 * rank, 6, 5]))
        for name in (f"B{index}", f"C{index}"):
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4, 1, 6, 5]))
        nodes += [
            helper.make_node("Conv", [low, w], [conv], group=4, kernel_shape=[1, 1]),
            helper.make_node("Reshape", [conv, "delta_shape"], [delta]),
            helper.make_node(
                "SelectiveScan2D",
                ["u", delta, "A_logs", f"B{index}", f"C{index}", "D", "delta_bias"],
                [y],
                domain="ai.vmamba",
            ),
        ]
        outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, shape))
    outputs.append(helper.make_tensor_value_info("conv2", TensorProto.FLOAT, [1, 64, 6, 5]))  # the second reader
    graph = helper.make_graph(
        nodes, "scans", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in weights.items()]
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("ai.vmamba", 1)],
        ir_version=IR_VERSION,
    )
    feeds = {
        i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
        for i in inputs
    }
    return model, feeds


def test_small_rank_dt_projections_fuse_into_the_scan():
    """Reshape(Conv(low, w, group=4)) -> scan becomes scan(low, ..., dt_weight = w as (4, Di, R)) for ranks up to
    MAX_FUSED_RANK whose convolution has no other reader; outputs agree to float32 rounding."""
    import pytest

    from vmamba_export.kernels_paths import ort_library_path
    from vmamba_export.lowering.dt_projection import MAX_FUSED_RANK, fuse_dt_projections
    from vmamba_export.lowering.onnx_export import _register_scan_schema

    if ort_library_path() is None:
        pytest.skip("libvmamba_ort.so not built: run `python -m vmamba_export.build_kernels`")
    _register_scan_schema()
    assert MAX_FUSED_RANK >= 6 > 12 - MAX_FUSED_RANK
    model, feeds = _scan_graph(np.random.default_rng(3))
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(ort_library_path()))

    def run(m: onnx.ModelProto) -> dict[str, np.ndarray]:
        session = ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))

    before = run(model)
    assert fuse_dt_projections(model) == 1
    scans = {n.output[0]: n for n in model.graph.node if n.op_type == "SelectiveScan2D"}
    assert len(scans["y0"].input) == 8 and scans["y0"].input[1] == "low0"
    assert len(scans["y1"].input) == 7 and len(scans["y2"].input) == 7
    assert [n.op_type for n in model.graph.node].count("Conv") == 2  # ranks 12 and the shared one
    after = run(model)
    for name in before:
        rel = np.linalg.norm(after[name] - before[name]) / np.linalg.norm(before[name])
        assert rel < 1e-6, (name, rel)
    assert not np.array_equal(after["y0"], np.zeros_like(after["y0"]))


def test_convolution_of_a_concat_becomes_a_sum_of_convolutions():
    """Conv(Concat(a, b, c), W, bias) -> Conv(a, W_a, bias) + Conv(b, W_b) + Conv(c, W_c): the same outputs, no
    Concat left, the whole weight dropped. A Concat read by something else, or one on another axis, stays."""
    from vmamba_export.lowering.concat_convs import split_concat_convs
    from vmamba_export.lowering.onnx_graph import static_shapes

    rng = np.random.default_rng(0)
    parts = {"a": 2, "b": 3, "c": 4}
    weights = {
        "w": rng.standard_normal((5, 9, 3, 3)).astype(np.float32),
        "bias": rng.standard_normal(5).astype(np.float32),
        "w2": rng.standard_normal((2, 5, 1, 1)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Concat", list(parts), ["cat"], axis=1),
        helper.make_node("Conv", ["cat", "w", "bias"], ["conv"], pads=[1, 1, 1, 1], strides=[2, 1]),
        helper.make_node("Relu", ["conv"], ["y"]),
        helper.make_node("Concat", ["a", "b"], ["shared"], axis=1),  # also a graph output: stays
        helper.make_node("Conv", ["shared", "w2"], ["y2"]),
    ]
    graph = helper.make_graph(
        nodes,
        "concat_conv",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", c, 6, 7]) for n, c in parts.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "shared", "y2")],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    feeds = {n: rng.standard_normal((2, c, 6, 7)).astype(np.float32) for n, c in parts.items()}
    want = _run(model, feeds)

    assert split_concat_convs(model, static_shapes(model)) == 1
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Concat") == 1 and ops.count("Conv") == 4 and ops.count("Add") == 2
    assert "w" not in {init.name for init in model.graph.initializer}
    got = _run(model, feeds)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)
