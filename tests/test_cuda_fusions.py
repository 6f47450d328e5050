"""cuda-onnxruntime graph fusions (lowering/cuda_fusions.py) on the CPU: which patterns are fused, and that the fused
graph computes what the exported graph computes. The fused ops have CUDA kernels only; here each is expanded back into
the standard ops it stands for (the reference definition below) and both graphs run on ONNX Runtime's CPU provider
with the project's CPU library (SelectiveScan2D, LastAxisLayerNorm). The CUDA kernels themselves are checked against
float64 torch in tests/test_cuda.py (GPU)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from vmamba_export.kernels_paths import ort_library_path
from vmamba_export.lowering import layout_graph
from vmamba_export.lowering.cuda_fusions import (
    BIAS_GELU_OP,
    CONV_PROJECTIONS_OP,
    DEPTHWISE_SILU_OP,
    MERGED_SCAN_OP,
    NARROW_CONV_OP,
    PACKED_SCAN_OP,
    PROJECTIONS_OP,
    RESIDUAL_NORM_OP,
    TRANSPOSE_NORM_OP,
    fuse_bias_gelu,
    fuse_conv_projections,
    fuse_cuda_graph,
    fuse_depthwise_conv_silu,
    fuse_residual_layer_norms,
    fuse_transpose_layer_norms,
    merge_scan_projections,
    pack_scan_projections,
    project_scan_inputs,
)
from vmamba_export.lowering.cuda_graph import LAYER_NORM_OP, use_last_axis_layer_norms
from vmamba_export.lowering.onnx_export import IR_VERSION, ONNX_DOMAIN, OPSET, export_onnx
from vmamba_export.model_source import resolve_model

needs_cpu_library = pytest.mark.skipif(ort_library_path() is None, reason="libvmamba_ort.so not built")


def _split_projections(t: str, u: str, x: str, dt_weight: str, d_inner: int, rank: int, d_state: int, outputs):
    """Standard ops that cut X (B, 4 R + 8 N, H, W) into its dt-rank, B and C channels and make `outputs` (delta, B,
    C) of them, 5-D: delta = MatMul(dt_weight, dt-rank channels)."""
    delta, b, c = outputs
    return [
        helper.make_node("Constant", [], [t + "_sizes"], value_ints=[4 * rank, 4 * d_state, 4 * d_state]),
        helper.make_node("Constant", [], [t + "_dt_shape"], value_ints=[0, 4, rank, -1]),
        helper.make_node("Constant", [], [t + "_delta_head"], value_ints=[0, 4, d_inner]),
        helper.make_node("Constant", [], [t + "_bc_head"], value_ints=[0, 4, d_state]),
        helper.make_node("Split", [x, t + "_sizes"], [t + "_dt", t + "_b", t + "_c"], axis=1),
        helper.make_node("Shape", [u], [t + "_hw"], start=2),
        helper.make_node("Concat", [t + "_delta_head", t + "_hw"], [t + "_delta_shape"], axis=0),
        helper.make_node("Concat", [t + "_bc_head", t + "_hw"], [t + "_bc_shape"], axis=0),
        helper.make_node("Reshape", [t + "_dt", t + "_dt_shape"], [t + "_dt4"]),
        helper.make_node("MatMul", [dt_weight, t + "_dt4"], [t + "_delta4"]),
        helper.make_node("Reshape", [t + "_delta4", t + "_delta_shape"], [delta]),
        helper.make_node("Reshape", [t + "_b", t + "_bc_shape"], [b]),
        helper.make_node("Reshape", [t + "_c", t + "_bc_shape"], [c]),
    ]


def _unpacked_scan(n: onnx.NodeProto, proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    """SelectiveScan2DPacked(u, X, dt_weight, A_logs, D, delta_bias) as standard ops and the 7-input scan: X split
    into its dt-rank, B and C channels, delta = MatMul(dt_weight, dt-rank channels), each made 5-D."""
    u, packed, dt_weight, a_logs, d, delta_bias = n.input
    inits = {i.name: i for i in proto.graph.initializer}
    _, d_inner, rank = inits[dt_weight].dims
    d_state = inits[a_logs].dims[1]
    t = f"{n.name}_ref"
    outputs = (t + "_delta", t + "_b5", t + "_c5")
    return [
        *_split_projections(t, u, packed, dt_weight, d_inner, rank, d_state, outputs),
        helper.make_node(
            "SelectiveScan2D",
            [u, outputs[0], a_logs, outputs[1], outputs[2], d, delta_bias],
            list(n.output),
            domain=ONNX_DOMAIN,
        ),
    ]


def _scan_projections_reference(n: onnx.NodeProto, proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    """ScanProjections(u, W_x, dt_weight) -> (delta, B, C) as standard ops: X = 1 x 1 Conv(u, W_x), then split."""
    u, w_x, dt_weight = n.input
    inits = {i.name: i for i in proto.graph.initializer}
    rows, d_inner = inits[w_x].dims
    rank = inits[dt_weight].dims[2]
    t = f"{n.name}_ref"
    return [
        helper.make_node("Constant", [], [t + "_w_shape"], value_ints=[rows, d_inner, 1, 1]),
        helper.make_node("Reshape", [w_x, t + "_w_shape"], [t + "_w"]),
        helper.make_node("Conv", [u, t + "_w"], [t + "_x"], kernel_shape=[1, 1]),
        *_split_projections(t, u, t + "_x", dt_weight, d_inner, rank, (rows - 4 * rank) // 8, n.output),
    ]


def _depthwise_silu_reference(tmp: str, inputs: list[str], output: str, proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    """DepthwiseConvSiLU(X, W[, bias]) -> output as standard ops: Transpose to channel-first, grouped Conv, x
    Sigmoid(x)."""
    channels = next(i.dims[0] for i in proto.graph.initializer if i.name == inputs[1])
    return [
        helper.make_node("Transpose", [inputs[0]], [tmp + "_t"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", [tmp + "_t", *inputs[1:]], [tmp + "_c"], group=channels, pads=[1] * 4),
        helper.make_node("Sigmoid", [tmp + "_c"], [tmp + "_s"]),
        helper.make_node("Mul", [tmp + "_c", tmp + "_s"], [output]),
    ]


def _conv_projections_reference(n: onnx.NodeProto, proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    """DepthwiseConvProjections(X, W, W_x, dt_weight[, bias]) -> (u, delta, B, C) as DepthwiseConvSiLU(X, W[, bias])
    -> u, then ScanProjections(u, W_x, dt_weight), each expanded."""
    x, weight, w_x, dt_weight, *bias = n.input
    u = n.output[0]
    projections = helper.make_node(PROJECTIONS_OP, [u, w_x, dt_weight], list(n.output[1:]), name=f"{n.name}_proj")
    return [
        *_depthwise_silu_reference(f"{n.name}_ref", [x, weight, *bias], u, proto),
        *_scan_projections_reference(projections, proto),
    ]


def _unmerged_scan(n: onnx.NodeProto, proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    """SelectiveScan2DMerged(u, delta, X, A_logs, D, delta_bias) as standard ops and the 7-input scan: delta's first
    4 Di channels, and X's last 8 N channels as B then C, each made 5-D."""
    u, delta, x, a_logs, d, delta_bias = n.input
    inits = {i.name: i for i in proto.graph.initializer}
    four_di, d_state = inits[a_logs].dims
    t = f"{n.name}_ref"
    nodes = [
        helper.make_node("Constant", [], [t + "_axis"], value_ints=[1]),
        helper.make_node("Shape", [u], [t + "_hw"], start=2),
    ]
    parts = (("_delta", delta, 0, four_di, four_di // 4), ("_b", x, -8 * d_state, -4 * d_state, d_state))
    for part, source, start, end, rows in (*parts, ("_c", x, -4 * d_state, 2**62, d_state)):
        p = t + part
        nodes += [
            helper.make_node("Constant", [], [p + "_start"], value_ints=[start]),
            helper.make_node("Constant", [], [p + "_end"], value_ints=[end]),
            helper.make_node("Slice", [source, p + "_start", p + "_end", t + "_axis"], [p + "_flat"]),
            helper.make_node("Constant", [], [p + "_head"], value_ints=[0, 4, rows]),
            helper.make_node("Concat", [p + "_head", t + "_hw"], [p + "_shape"], axis=0),
            helper.make_node("Reshape", [p + "_flat", p + "_shape"], [p]),
        ]
    scan_inputs = [u, t + "_delta", a_logs, t + "_b", t + "_c", d, delta_bias]
    return [*nodes, helper.make_node("SelectiveScan2D", scan_inputs, list(n.output), domain=ONNX_DOMAIN)]


def _unfused(proto: onnx.ModelProto) -> onnx.ModelProto:
    """`proto` with every fused node replaced by the standard ops it is defined as (the reference semantics)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    nodes = []
    for n in proto.graph.node:
        if n.domain == ONNX_DOMAIN and n.op_type == PACKED_SCAN_OP:
            nodes += _unpacked_scan(n, proto)
            continue
        if n.domain == ONNX_DOMAIN and n.op_type == MERGED_SCAN_OP:
            nodes += _unmerged_scan(n, proto)
            continue
        if n.domain == ONNX_DOMAIN and n.op_type == PROJECTIONS_OP:
            nodes += _scan_projections_reference(n, proto)
            continue
        if n.domain == ONNX_DOMAIN and n.op_type == CONV_PROJECTIONS_OP:
            nodes += _conv_projections_reference(n, proto)
            continue
        if n.domain == ONNX_DOMAIN and n.op_type == NARROW_CONV_OP:  # a bias-free 1 x 1 convolution
            nodes.append(helper.make_node("Conv", list(n.input), list(n.output), kernel_shape=[1, 1]))
            continue
        eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5)
        tmp = f"{n.name}_ref"
        if n.domain == ONNX_DOMAIN and n.op_type == RESIDUAL_NORM_OP:
            x, residual, scale, bias = n.input[:4]
            if len(n.input) > 4 and n.input[4]:
                nodes.append(helper.make_node("Add", [x, n.input[4]], [tmp + "_xb"]))
                x = tmp + "_xb"
            nodes.append(helper.make_node("Add", [x, residual], [n.output[1]]))
            norm_in = n.output[1]
        elif n.domain == ONNX_DOMAIN and n.op_type == TRANSPOSE_NORM_OP:
            nodes.append(helper.make_node("Transpose", [n.input[0]], [tmp], perm=[0, 2, 3, 1]))
            scale, bias, norm_in = n.input[1], n.input[2], tmp
        elif n.domain == ONNX_DOMAIN and n.op_type == DEPTHWISE_SILU_OP:
            nodes += _depthwise_silu_reference(tmp, list(n.input), n.output[0], proto)
            continue
        else:
            nodes.append(n)
            continue
        nodes.append(
            helper.make_node(LAYER_NORM_OP, [norm_in, scale, bias], [n.output[0]], domain=ONNX_DOMAIN, epsilon=eps)
        )
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def _cpu_session(proto: onnx.ModelProto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.register_custom_ops_library(str(ort_library_path()))
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _lowered_graph(name: str, task: str, folder) -> onnx.ModelProto:
    """The float32 cuda-onnxruntime graph as the lowering builds it before fusing: a classifier in the target's default
    residual layout, a dense model as it is (channel-first), LayerNorms as LastAxisLayerNorm."""
    source = resolve_model(name, random_weights=True, seed=0, **({} if task == "classification" else {"task": task}))
    model = source.model.eval()
    graph_model = layout_graph(model, None)[0] if task == "classification" else model
    export_onnx(graph_model, folder / "model.onnx", scan="custom-op", max_size=256)
    proto = onnx.load(str(folder / "model.onnx"))
    use_last_axis_layer_norms(proto)
    return proto


@pytest.fixture(scope="module", params=["vmamba_test_v2", "vmamba_test_v0"])
def cuda_graph(request, tmp_path_factory) -> tuple[str, onnx.ModelProto]:
    return request.param, _lowered_graph(request.param, "classification", tmp_path_factory.mktemp("fusions"))


@pytest.fixture(scope="module")
def dense_cuda_graph(tmp_path_factory) -> onnx.ModelProto:
    """A v2 backbone (four feature maps), channel-first: only its LayerNorm2d's first Transpose is fused."""
    return _lowered_graph("vmamba_test_v2", "backbone", tmp_path_factory.mktemp("fusions-dense"))


def _fused_copy(proto: onnx.ModelProto, projections: str = "packed") -> tuple[onnx.ModelProto, dict]:
    fused = onnx.ModelProto()
    fused.CopyFrom(proto)
    return fused, fuse_cuda_graph(fused, scan_projections=projections)


# Per rewritten scan: the op that stands for it, and how many nodes the rewrite removes from the 9 of the exporter's
# pattern (3 Convs, 4 Reshapes, the MatMul, the scan): projected keeps ScanProjections and the scan (conv-projected:
# the ScanProjections also takes the DepthwiseConvSiLU before it); packed Concat, Conv and the scan (narrow:
# NarrowPointwiseConv for the Conv); merged Reshape, two MatMuls and the scan; folded Reshape, one MatMul and the scan
PROJECTIONS = {
    "projected": (PROJECTIONS_OP, 7),
    "conv-projected": (CONV_PROJECTIONS_OP, 8),
    "packed": (PACKED_SCAN_OP, 6),
    "narrow": (PACKED_SCAN_OP, 6),
    "merged": (MERGED_SCAN_OP, 5),
    "folded": (MERGED_SCAN_OP, 6),
}


@pytest.mark.parametrize("projections", list(PROJECTIONS))
def test_every_block_pattern_is_fused(cuda_graph, projections):
    """Per block: the norm after the scan takes its Transpose, the depthwise convolution its Transpose and SiLU, and
    each residual Add (one per block, two with an MLP) is folded into the norm that follows it, the MLP's fc2 bias
    Add with it, except where a stage ends and a downsampling layer follows instead of a norm."""
    name, proto = cuda_graph
    config = resolve_model(name, random_weights=True, seed=0).model.config
    fused, record = _fused_copy(proto, projections)
    scan_op, nodes_removed = PROJECTIONS[projections]
    blocks, stage_ends = sum(config.depths), len(config.depths) - 1
    residuals_per_block = 2 if config.mlp_ratio > 0 else 1
    counts = record["fused"]
    # d_state 1 (v2): every scan takes its projections rewritten; d_state 16 (v0) keeps the 7-input scan
    rewritten = blocks if config.d_state == 1 else 0
    depthwise = counts[DEPTHWISE_SILU_OP] + counts[CONV_PROJECTIONS_OP]  # the convolutions, fused either way
    assert depthwise == blocks
    assert counts[CONV_PROJECTIONS_OP] == (rewritten if projections == "conv-projected" else 0)
    assert counts[TRANSPOSE_NORM_OP] >= blocks
    assert counts[RESIDUAL_NORM_OP] == residuals_per_block * blocks - stage_ends
    biased = sum(1 for n in fused.graph.node if n.op_type == RESIDUAL_NORM_OP and len(n.input) == 5)
    assert biased == (blocks - stage_ends if config.mlp_ratio > 0 else 0)
    ops = [n.op_type for n in fused.graph.node]
    assert counts[scan_op] == ops.count(scan_op) == rewritten
    assert ops.count(DEPTHWISE_SILU_OP) == counts[DEPTHWISE_SILU_OP]
    scan_ops = (PROJECTIONS_OP, CONV_PROJECTIONS_OP, PACKED_SCAN_OP, MERGED_SCAN_OP)
    assert sum(counts[op] for op in scan_ops) == rewritten
    keeps_scan = projections in ("projected", "conv-projected")
    assert ops.count("SelectiveScan2D") == blocks - (0 if keeps_scan else rewritten)
    assert counts[NARROW_CONV_OP] == ops.count(NARROW_CONV_OP) == (rewritten if projections == "narrow" else 0)
    convs_removed = depthwise + (2 if projections == "packed" else 3) * rewritten
    assert ops.count("Conv") == len([n for n in proto.graph.node if n.op_type == "Conv"]) - convs_removed
    assert ops.count("Sigmoid") == (blocks if config.version == "v0" else 0)  # v0 keeps its gate's SiLU(z)
    # each MLP's fc1 bias Add and GELU are one BiasGelu (the stem's GELU follows a norm: kept)
    assert counts[BIAS_GELU_OP] == ops.count(BIAS_GELU_OP) == (blocks if config.mlp_ratio > 0 else 0)
    # every node a fusion removed is accounted for: 2 (or 3 with a bias) -> 1, 2 -> 1, 4 -> 1, 2 -> 1, and the scans' as
    # PROJECTIONS says; the removed Reshapes' shape arithmetic (and, merged, the convolutions' weight Splits) are left
    # unread (dropped: counted apart)
    removed = counts[RESIDUAL_NORM_OP] + biased + counts[TRANSPOSE_NORM_OP] + 3 * depthwise
    removed += counts[BIAS_GELU_OP]
    removed += nodes_removed * counts[scan_op] + record["dead_nodes_dropped"]
    assert record["nodes_before"] - record["nodes_after"] == removed == len(proto.graph.node) - len(fused.graph.node)
    # fused nodes stay in topological order (ONNX requires it; ORT refuses the graph otherwise)
    known = {i.name for i in fused.graph.input} | {i.name for i in fused.graph.initializer} | {""}
    for node in fused.graph.node:
        assert all(i in known for i in node.input), node.name
        known.update(node.output)


def _assert_same_outputs(proto: onnx.ModelProto, fused: onnx.ModelProto) -> None:
    """Fused, then expanded back by the reference definitions, the graph gives every output of the exported graph at
    two input sizes (one not a multiple of 32)."""
    plain, expanded = _cpu_session(proto), _cpu_session(_unfused(fused))
    rng = np.random.default_rng(0)
    for shape in [(2, 3, 64, 64), (1, 3, 48, 80)]:
        x = rng.standard_normal(shape, dtype=np.float32)
        for want, got in zip(plain.run(None, {"pixel_values": x}), expanded.run(None, {"pixel_values": x})):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@needs_cpu_library
@pytest.mark.parametrize("projections", list(PROJECTIONS))
def test_fused_graph_computes_the_exported_graph(cuda_graph, projections):
    _, proto = cuda_graph
    _assert_same_outputs(proto, _fused_copy(proto, projections)[0])


@needs_cpu_library
def test_fused_dense_graph_computes_the_exported_graph(dense_cuda_graph):
    fused, record = _fused_copy(dense_cuda_graph)
    assert record["fused"][TRANSPOSE_NORM_OP] > 0
    _assert_same_outputs(dense_cuda_graph, fused)


def test_conv_projections_feed_their_scan(cuda_graph):
    """conv-projected: each DepthwiseConvProjections node takes the block's channels-last map and convolution weight,
    and its four outputs are its scan's u, delta, B and C; a ScanProjections whose u is not a DepthwiseConvSiLU's
    output is left as it is."""
    name, proto = cuda_graph
    if resolve_model(name, random_weights=True, seed=0).model.config.d_state != 1:
        pytest.skip("d_state 16 scans keep the exporter's projections")
    fused, _ = _fused_copy(proto, "conv-projected")
    scans = {n.input[0]: n for n in fused.graph.node if n.op_type == "SelectiveScan2D"}
    nodes = [n for n in fused.graph.node if n.op_type == CONV_PROJECTIONS_OP]
    assert nodes and len(nodes) == len(scans)
    weights = {i.name: list(i.dims) for i in fused.graph.initializer}
    for node in nodes:
        u, delta, b, c = node.output
        assert [scans[u].input[i] for i in (1, 3, 4)] == [delta, b, c]
        di = weights[node.input[1]][0]
        assert weights[node.input[1]] == [di, 1, 3, 3] and weights[node.input[2]][1] == di
    projected, _ = _fused_copy(proto, "projected")
    first = next(n for n in projected.graph.node if n.op_type == DEPTHWISE_SILU_OP)
    first.op_type = "Identity"  # its output now comes from another op: that block's projections stay as they are
    del first.input[1:]
    assert fuse_conv_projections(projected) == len(nodes) - 1


def test_scan_projections_read_elsewhere_are_not_rewritten(cuda_graph):
    """A projection another node also reads must stay: the scan whose B convolution is also a graph output keeps its
    unpacked inputs, every other d_state-1 scan is packed or merged."""
    name, proto = cuda_graph
    if resolve_model(name, random_weights=True, seed=0).model.config.d_state != 1:
        pytest.skip("d_state 16 scans are never packed")
    graph = onnx.ModelProto()
    graph.CopyFrom(proto)
    scans = [n for n in graph.graph.node if n.op_type == "SelectiveScan2D"]
    b_conv_out = next(n.input[0] for n in graph.graph.node if n.output[0] == scans[0].input[3])
    graph.graph.output.append(helper.make_tensor_value_info(b_conv_out, TensorProto.FLOAT, None))
    for rewrite in (pack_scan_projections, merge_scan_projections, project_scan_inputs):
        edited = onnx.ModelProto()
        edited.CopyFrom(graph)
        assert rewrite(edited) == len(scans) - 1
        kept = [n for n in edited.graph.node if n.op_type == "SelectiveScan2D" and n.input[1] == scans[0].input[1]]
        assert [list(n.input) for n in kept] == [list(scans[0].input)]


def _model(nodes, inputs, outputs, initializers=(), value_info=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers), value_info=list(value_info))
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(ONNX_DOMAIN, 1)],
        ir_version=IR_VERSION,
    )


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _norm(x, y, c=8):
    return helper.make_node(LAYER_NORM_OP, [x, f"s{c}", f"b{c}"], [y], domain=ONNX_DOMAIN, epsilon=1e-6)


def _vec(name, n):
    return helper.make_tensor(name, TensorProto.FLOAT, [n], np.linspace(0.5, 1.5, n).astype(np.float32))


def test_broadcasting_and_shared_tensors_are_not_fused():
    """A bias Add before a norm is no residual; an Add whose inputs differ in shape broadcasts; a Transpose read twice
    must stay; a strided depthwise convolution is another function."""
    shape = ["n", 4, 4, 8]
    nodes = [
        helper.make_node("Add", ["x", "b8"], ["biased"]),  # bias only: stays
        _norm("biased", "y0"),
        helper.make_node("Add", ["x", "row"], ["bcast"]),  # (n, 4, 4, 8) + (1, 1, 1, 8): stays
        _norm("bcast", "y1"),
        helper.make_node("Transpose", ["m"], ["t"], perm=[0, 2, 3, 1]),  # read by the norm and by y3: stays
        _norm("t", "y2"),
        helper.make_node("Identity", ["t"], ["y3"]),
        helper.make_node("Transpose", ["x"], ["cf"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["cf", "w"], ["c"], group=8, pads=[1] * 4, strides=[2, 2]),  # stride 2: stays
        helper.make_node("Sigmoid", ["c"], ["sg"]),
        helper.make_node("Mul", ["c", "sg"], ["y4"]),
    ]
    weight = helper.make_tensor("w", TensorProto.FLOAT, [8, 1, 3, 3], np.ones(72, np.float32))
    model = _model(
        nodes,
        [_vi("x", shape), _vi("row", [1, 1, 1, 8]), _vi("m", ["n", 8, 4, 4])],
        [_vi(f"y{i}", None) for i in range(5)],
        [_vec("s8", 8), _vec("b8", 8), weight],
        [_vi("biased", shape), _vi("bcast", shape), _vi("t", shape)],
    )
    assert fuse_residual_layer_norms(model) == 0
    assert fuse_transpose_layer_norms(model) == 0
    assert fuse_depthwise_conv_silu(model) == 0
    assert len(model.graph.node) == len(nodes)


def test_residual_with_bias_is_one_node_with_both_outputs():
    """fc2 -> Add(bias) -> Add(residual) -> norm, the sum read again later: one ResidualLayerNorm with X_bias, whose
    second output keeps the sum's name for its other reader."""
    shape = ["n", 8]
    nodes = [
        helper.make_node("MatMul", ["h", "w"], ["mm"]),
        helper.make_node("Add", ["mm", "fb"], ["biased"]),
        helper.make_node("Add", ["res", "biased"], ["sum"]),
        _norm("sum", "normed"),
        helper.make_node("Add", ["sum", "normed"], ["out"]),
    ]
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 8], np.eye(8, dtype=np.float32).ravel())
    model = _model(
        nodes,
        [_vi("h", shape), _vi("res", shape)],
        [_vi("out", shape)],
        [w, _vec("fb", 8), _vec("s8", 8), _vec("b8", 8)],
        [_vi("mm", shape), _vi("biased", shape), _vi("sum", shape), _vi("normed", shape)],
    )
    assert fuse_residual_layer_norms(model) == 1
    fused = [n for n in model.graph.node if n.op_type == RESIDUAL_NORM_OP]
    assert [list(n.input) for n in fused] == [["mm", "res", "s8", "b8", "fb"]]
    assert list(fused[0].output) == ["normed", "sum"]
    assert [n.op_type for n in model.graph.node] == ["MatMul", RESIDUAL_NORM_OP, "Add"]
    assert "biased" not in {v.name for v in model.graph.value_info}


def test_bias_gelu_takes_only_a_bias_add_read_by_an_exact_gelu():
    """Add(X, bias) -> Gelu becomes BiasGelu when the bias is a vector as long as X's last axis, the Add has no other
    reader and the Gelu is the exact one; the fused graph computes the same on ONNX Runtime's CPU provider (its own
    BiasGelu kernel)."""
    shape = ["n", 3, 8]
    nodes = [
        helper.make_node("Add", ["b8", "x"], ["a0"]),  # bias first: fused
        helper.make_node("Gelu", ["a0"], ["y0"]),
        helper.make_node("Add", ["x", "b8"], ["a1"]),  # tanh GELU: stays
        helper.make_node("Gelu", ["a1"], ["y1"], approximate="tanh"),
        helper.make_node("Add", ["x", "b8"], ["a2"]),  # read again by y3: stays
        helper.make_node("Gelu", ["a2"], ["y2"]),
        helper.make_node("Identity", ["a2"], ["y3"]),
        helper.make_node("Add", ["x", "row"], ["a4"]),  # a (1, 1, 8) tensor input, no initializer: stays
        helper.make_node("Gelu", ["a4"], ["y4"]),
    ]
    model = _model(
        nodes,
        [_vi("x", shape), _vi("row", [1, 1, 8])],
        [_vi(f"y{i}", None) for i in range(5)],
        [_vec("b8", 8)],
        [_vi(name, shape) for name in ("a0", "a1", "a2", "a4")],
    )
    plain = onnx.ModelProto()
    plain.CopyFrom(model)
    assert fuse_bias_gelu(model) == 1
    fused = [n for n in model.graph.node if n.op_type == BIAS_GELU_OP]
    assert [(list(n.input), list(n.output), n.domain) for n in fused] == [(["x", "b8"], ["y0"], "com.microsoft")]
    assert len(model.graph.node) == len(nodes) - 1
    import onnxruntime as ort

    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 8), dtype=np.float32) * 3, "row": np.ones((1, 1, 8))}
    feeds["row"] = feeds["row"].astype(np.float32)
    want, got = (
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
        for m in (plain, model)
    )
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
