"""cuda-onnxruntime graph fusions: fewer kernels around the scan (docs/cuda-onnxruntime.md, "Fused ops").

At batch 1 a VMamba graph is a chain of ~370 small kernels, and each costs about as much to run as its bytes (launch,
ramp-up, a pass over memory): what decides the time is how many there are. ONNX Runtime's CUDA provider fuses some
chains itself (bias + GELU, SiLU as QuickGelu) but not these three, which the library's CUDA kernels
(libvmamba_ort_cuda.so) compute in one pass each:

- `ResidualLayerNorm(X, R, scale, bias[, X_bias]) -> (Y, S)`: the residual Add before a block's LastAxisLayerNorm,
  with the Add of a bias before it when the bias Add has no other reader (the MLP's fc2 bias); S, the new residual
  stream, is the second output. Two or three kernels -> one.
- `TransposeLayerNorm(X, scale, bias) -> Y`: Transpose(0, 2, 3, 1) then LastAxisLayerNorm, where the scan's (or a
  convolution's) channel-first map enters the channels-last residual stream. Two kernels -> one.
- `DepthwiseConvSiLU(X, W[, bias]) -> Y`: Transpose(0, 3, 1, 2), the block's depthwise 3 x 3 convolution (pads 1,
  stride 1) and SiLU (Mul(x, Sigmoid(x))), from the input projection's channels-last output to the scan's
  channel-first input. Three or more kernels (cuDNN) -> one.
- `SelectiveScan2DPacked(u, X, dt_weight, A_logs, D, delta_bias) -> y`: the scan of a d_state-1 block with its three
  input projections (dt rank, B, C: 1 x 1 convolutions of u) merged into one convolution X, and the dt projection
  (a batched MatMul of dt_weight) computed by the scan kernel from X's dt-rank channels. Four kernels -> one
  (opt-in, "packed": measured slower, the dt projection sits on the recurrence's critical path). With "narrow" the
  convolution X is `NarrowPointwiseConv(u, W)`, the same 1 x 1 convolution on the CUDA cores in one kernel of ours
  (cuDNN runs it on tensor-core tiles made for many output channels, after a layout conversion).
- `com.microsoft BiasGelu(X, bias)`: the MLP's bias Add and exact GELU, ONNX Runtime's own contrib op (its CUDA
  kernel is the one ONNX Runtime fuses the pair into by itself). Written into the graph because a session with fixed
  input dimensions (every CUDA-graph session) first fuses the MatMul and the Add into a Gemm, whose CUDA kernel
  writes the broadcast bias with a kernel of its own before the GEMM, and then leaves the GELU alone: three kernels
  per MLP where two do.
- `ScanProjections(u, W_x, dt_weight) -> (delta, B, C)`: the same three projections and the dt projection computed by
  one kernel (float32 sums on the CUDA cores, the dt-rank values kept in shared memory), feeding the unchanged
  SelectiveScan2D. Four kernels -> one ("projected").
- `DepthwiseConvProjections(X, W, W_x, dt_weight[, bias]) -> (u, delta, B, C)`: a DepthwiseConvSiLU whose output u
  feeds a ScanProjections, both in one kernel that projects u while it is still in shared memory ("conv-projected":
  DepthwiseConvSiLU and ScanProjections' two kernels -> one).
- `SelectiveScan2DMerged(u, delta, X, A_logs, D, delta_bias) -> y`: the same three projections as one aligned GEMM
  X, the dt projection as a second GEMM of X (or folded into the first), and the scan reading B and C from X in
  place. Four kernels (three of them cuDNN 1 x 1 convolutions of 4 to 24 output channels) -> two or one cuBLAS GEMMs
  ("merged", "folded").

Applied to the float32 graph after the LastAxisLayerNorm rewrite (cuda_graph.py) and before the fp16 conversion; a
pattern is fused only where every tensor it removes has no other reader and is no graph output, weights and biases
are initializers of the expected shapes, and (for the residual) both Add inputs have the same shape in the
exporter's value_info, so no broadcasting Add is ever taken for a residual. Everything else stays as it was.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .cuda_graph import LAYER_NORM_OP
from .onnx_export import ONNX_DOMAIN
from .onnx_graph import drop_dead_nodes, node_attribute, pointwise_conv, replace_nodes, static_shapes

if TYPE_CHECKING:  # onnx is imported where it is used: this module loads with the lowering registry
    import onnx

RESIDUAL_NORM_OP = "ResidualLayerNorm"
TRANSPOSE_NORM_OP = "TransposeLayerNorm"
DEPTHWISE_SILU_OP = "DepthwiseConvSiLU"
PACKED_SCAN_OP = "SelectiveScan2DPacked"
MERGED_SCAN_OP = "SelectiveScan2DMerged"
PROJECTIONS_OP = "ScanProjections"
NARROW_CONV_OP = "NarrowPointwiseConv"
CONV_PROJECTIONS_OP = "DepthwiseConvProjections"
BIAS_GELU_OP = "BiasGelu"
MS_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib ops
SCAN_OP = "SelectiveScan2D"
# How the scan's input projections are rewritten (ExportOptions.extra["cuda_fusions"]): not at all, computed by one
# kernel of ours ("projected"; "conv-projected": in the depthwise convolution's kernel), merged into GEMMs ("merged":
# two, "folded": one) or packed into the scan kernel ("packed": X by cuDNN's convolution; "narrow": X by
# NarrowPointwiseConv)
SCAN_PROJECTIONS = ("none", "projected", "conv-projected", "merged", "folded", "packed", "narrow")
# Standard ops whose outputs _constant evaluates when their inputs are constant
_FOLDABLE = ("Reshape", "Split", "Transpose", "Squeeze", "Unsqueeze", "Concat", "Slice", "Identity", "Constant")
TO_CHANNELS_LAST = [0, 2, 3, 1]
TO_CHANNELS_FIRST = [0, 3, 1, 2]


class _Index:
    """Who produces and who reads each tensor of a graph, its initializers, outputs and value_info shapes."""

    def __init__(self, graph: onnx.GraphProto):
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for n in graph.node:
            for name in n.input:
                self.readers.setdefault(name, []).append(n)
        self.initializers = {i.name: i for i in graph.initializer}
        self.outputs = {o.name for o in graph.output}
        self.shapes = {v.name: _dims(v) for v in (*graph.input, *graph.value_info, *graph.output)}

    def only_reader(self, tensor: str, node: onnx.NodeProto) -> bool:
        """Whether `node` is the one reader of `tensor` and `tensor` is no graph output (so it can disappear)."""
        return tensor not in self.outputs and [id(r) for r in self.readers.get(tensor, [])] == [id(node)]

    def vector(self, name: str) -> int | None:
        """The length of 1-D initializer `name`, else None."""
        tensor = self.initializers.get(name)
        return int(tensor.dims[0]) if tensor is not None and len(tensor.dims) == 1 else None

    def produced_by(self, tensor: str, op_type: str) -> onnx.NodeProto | None:
        node = self.producer.get(tensor)
        return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None


def _dims(info) -> list[str] | None:
    """A value_info's dimensions as comparable strings (a value or a symbol), None where any is unknown."""
    dims = []
    for d in info.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(str(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(d.dim_param)
        else:
            return None
    return dims if info.type.tensor_type.HasField("shape") else None


def _is_transpose(node: onnx.NodeProto | None, perm: list[int]) -> bool:
    return node is not None and list(node_attribute(node, "perm", [])) == perm


def _layer_norms(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    return [n for n in graph.node if n.op_type == LAYER_NORM_OP and n.domain == ONNX_DOMAIN]


def _fused_node(op: str, inputs: list[str], outputs: list[str], like: onnx.NodeProto, **attrs) -> onnx.NodeProto:
    import onnx

    node = onnx.helper.make_node(op, inputs, outputs, name=f"{like.name or op}_fused", domain=ONNX_DOMAIN, **attrs)
    node.metadata_props.extend(like.metadata_props)  # the exporter's module scope, for tools that read it
    return node


class _Edit:
    """One fusion pass over a graph: its index, and the fused nodes placed, nodes removed and tensors gone so far,
    applied together by `commit` (the index stays valid while the pass looks for patterns)."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.index = _Index(graph)
        self.placed: dict[int, onnx.NodeProto] = {}
        self.removed: set[int] = set()
        self.gone: set[str] = set()

    def commit(self) -> int:
        """Apply the pass; returns how many fused nodes it placed."""
        replace_nodes(self.graph, self.placed, self.removed, self.gone)
        return len(self.placed)


def fuse_residual_layer_norms(proto: onnx.ModelProto) -> int:
    """Add(X (+ bias), R) -> LastAxisLayerNorm becomes ResidualLayerNorm, in place. Returns how many."""
    edit = _Edit(proto.graph)
    index, placed = edit.index, edit.placed
    for norm in _layer_norms(proto.graph):
        add = index.produced_by(norm.input[0], "Add")
        if add is None or id(add) in placed or len(add.input) != 2:
            continue
        width = index.vector(norm.input[1])
        shapes = [index.shapes.get(name) for name in add.input]
        if any(name in index.initializers for name in add.input) or shapes[0] is None or shapes[0] != shapes[1]:
            continue  # not a residual: a bias or broadcast Add, or shapes the exporter did not record
        if width is None or shapes[0][-1] != str(width):
            continue
        x, residual = add.input
        x_bias: list[str] = []
        for first, second in ((x, residual), (residual, x)):
            bias_add = index.produced_by(first, "Add")
            if bias_add is None or not index.only_reader(first, add):
                continue
            named = [n for n in bias_add.input if index.vector(n) == width]
            others = [n for n in bias_add.input if n not in named]
            if len(named) == 1 and len(others) == 1 and others[0] not in index.initializers:
                x, residual, x_bias = others[0], second, named
                edit.removed.add(id(bias_add))
                edit.gone.add(first)
                break
        epsilon = float(node_attribute(norm, "epsilon", 1e-5))
        fused = _fused_node(
            RESIDUAL_NORM_OP,
            [x, residual, norm.input[1], norm.input[2], *x_bias],
            [norm.output[0], add.output[0]],
            norm,
            epsilon=epsilon,
        )
        placed[id(add)] = fused  # at the Add: its inputs exist there, and every reader of S comes after it
        edit.removed.add(id(norm))
    return edit.commit()


def fuse_transpose_layer_norms(proto: onnx.ModelProto) -> int:
    """Transpose(0, 2, 3, 1) -> LastAxisLayerNorm becomes TransposeLayerNorm, in place. Returns how many."""
    edit = _Edit(proto.graph)
    index = edit.index
    for norm in _layer_norms(proto.graph):
        transpose = index.produced_by(norm.input[0], "Transpose")
        if not _is_transpose(transpose, TO_CHANNELS_LAST) or not index.only_reader(norm.input[0], norm):
            continue
        epsilon = float(node_attribute(norm, "epsilon", 1e-5))
        edit.placed[id(norm)] = _fused_node(
            TRANSPOSE_NORM_OP, [transpose.input[0], *norm.input[1:3]], [norm.output[0]], norm, epsilon=epsilon
        )
        edit.removed.add(id(transpose))
        edit.gone.add(norm.input[0])
    return edit.commit()


def fuse_bias_gelu(proto: onnx.ModelProto) -> int:
    """Add(X, bias) -> Gelu (exact) becomes com.microsoft BiasGelu(X, bias), in place, where bias is a 1-D
    initializer as long as X's last dimension and the Add is read by the Gelu alone. Returns how many."""
    import onnx

    edit = _Edit(proto.graph)
    index = edit.index
    for gelu in proto.graph.node:
        if gelu.op_type != "Gelu" or gelu.domain not in ("", "ai.onnx"):
            continue
        if node_attribute(gelu, "approximate", b"none") not in (b"none", "none"):
            continue  # BiasGelu is the erf form
        add = index.produced_by(gelu.input[0], "Add")
        if add is None or not index.only_reader(gelu.input[0], gelu) or len(add.input) != 2:
            continue
        x, bias = add.input if index.vector(add.input[1]) is not None else reversed(add.input)
        shape = index.shapes.get(x)
        if x in index.initializers or shape is None or shape[-1] != str(index.vector(bias)):
            continue
        node = onnx.helper.make_node(
            BIAS_GELU_OP, [x, bias], [gelu.output[0]], name=f"{gelu.name}_bias", domain=MS_DOMAIN
        )
        node.metadata_props.extend(gelu.metadata_props)
        edit.placed[id(gelu)] = node
        edit.removed.add(id(add))
        edit.gone.add(gelu.input[0])
    if edit.placed and not any(o.domain == MS_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    return edit.commit()


def _depthwise_3x3(conv: onnx.NodeProto, index: _Index) -> bool:
    """A depthwise 3 x 3 convolution with zero padding 1, stride 1, an even number C of channels, its weight
    (C, 1, 3, 3) and any bias (C,) initializers."""
    weight = index.initializers.get(conv.input[1]) if len(conv.input) > 1 else None
    if weight is None or len(weight.dims) != 4 or list(weight.dims[1:]) != [1, 3, 3]:
        return False
    channels = int(weight.dims[0])
    if channels % 2:  # the kernel reads channel pairs
        return False
    if len(conv.input) > 2 and conv.input[2] and index.vector(conv.input[2]) != channels:
        return False
    return (
        node_attribute(conv, "group", 1) == channels
        and list(node_attribute(conv, "kernel_shape", [3, 3])) == [3, 3]
        and list(node_attribute(conv, "pads", [0, 0, 0, 0])) == [1, 1, 1, 1]
        and list(node_attribute(conv, "strides", [1, 1])) == [1, 1]
        and list(node_attribute(conv, "dilations", [1, 1])) == [1, 1]
        and node_attribute(conv, "auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
    )


def fuse_depthwise_conv_silu(proto: onnx.ModelProto) -> int:
    """Transpose(0, 3, 1, 2) -> depthwise 3 x 3 Conv -> Mul(x, Sigmoid(x)) becomes DepthwiseConvSiLU, in place.
    Returns how many."""
    edit = _Edit(proto.graph)
    index = edit.index
    for mul in proto.graph.node:
        if mul.op_type != "Mul" or mul.domain not in ("", "ai.onnx") or len(mul.input) != 2:
            continue
        found = None
        for a, s in (mul.input, reversed(mul.input)):
            sigmoid = index.produced_by(s, "Sigmoid")
            if sigmoid is not None and sigmoid.input[0] == a:
                found = a, sigmoid
                break
        if found is None:
            continue
        activated, sigmoid = found
        conv = index.produced_by(activated, "Conv")
        if conv is None or not _depthwise_3x3(conv, index) or not index.only_reader(sigmoid.output[0], mul):
            continue
        if activated in index.outputs or {id(r) for r in index.readers.get(activated, [])} != {id(sigmoid), id(mul)}:
            continue
        transpose = index.produced_by(conv.input[0], "Transpose")
        if not _is_transpose(transpose, TO_CHANNELS_FIRST) or not index.only_reader(conv.input[0], conv):
            continue
        weights = [name for name in conv.input[1:] if name]
        edit.placed[id(mul)] = _fused_node(DEPTHWISE_SILU_OP, [transpose.input[0], *weights], [mul.output[0]], conv)
        edit.removed.update((id(transpose), id(conv), id(sigmoid)))
        edit.gone.update((conv.input[0], activated, sigmoid.output[0]))
    return edit.commit()


def _projection_conv(
    tensor: str, u: str, index: _Index, reader: onnx.NodeProto, removed: set[int], gone: set[str]
) -> onnx.NodeProto | None:
    """The bias-free 1 x 1 convolution of `u` whose output, through one Reshape read only by `reader`, is `tensor`;
    the ids of the Reshape and the convolution go into `removed`, their outputs into `gone`."""
    reshape = index.produced_by(tensor, "Reshape")
    if reshape is None or not index.only_reader(tensor, reader):
        return None
    conv = index.produced_by(reshape.input[0], "Conv")
    if conv is None or not pointwise_conv(conv) or conv.input[0] != u or not index.only_reader(conv.output[0], reshape):
        return None
    removed.update((id(reshape), id(conv)))
    gone.update((tensor, conv.output[0]))
    return conv


class _ScanProjections:
    """A d_state-1 SelectiveScan2D whose delta is Reshape(MatMul(dt_weight, Reshape(Conv(u, W_dt)))) and whose B and C
    are Reshape(Conv(u, W_B)) and Reshape(Conv(u, W_C)) (the exporter's form of x_proj and dt_projs), every
    intermediate read only on that path: the three convolutions, the MatMul and the nodes and tensors the rewrites
    remove."""

    def __init__(self, scan, convs, matmul, d_inner: int, rank: int, removed: set[int], gone: set[str]):
        self.scan, self.convs, self.matmul = scan, convs, matmul
        self.d_inner, self.rank = d_inner, rank
        self.removed, self.gone = removed, gone


def _scan_projections(proto: onnx.ModelProto, index: _Index) -> list[_ScanProjections]:
    found = []
    shapes: dict[str, list[int | None]] | None = None
    for scan in proto.graph.node:
        if scan.op_type != SCAN_OP or scan.domain != ONNX_DOMAIN or len(scan.input) != 7:
            continue
        u, delta, a_logs, b, c, _, _ = scan.input
        a_init = index.initializers.get(a_logs)
        if a_init is None or len(a_init.dims) != 2 or a_init.dims[1] != 1:
            continue  # d_state 1 only: the line kernel reads the projections in place; other shapes copy them first
        removed: set[int] = set()  # this scan's nodes and tensors, committed only if the whole pattern matches
        gone: set[str] = set()
        reshape = index.produced_by(delta, "Reshape")
        matmul = index.produced_by(reshape.input[0], "MatMul") if reshape is not None else None
        if matmul is None or not index.only_reader(delta, scan) or not index.only_reader(matmul.output[0], reshape):
            continue
        dt_init = index.initializers.get(matmul.input[0])
        if dt_init is None or len(dt_init.dims) != 3 or dt_init.dims[0] != 4 or 4 * dt_init.dims[1] != a_init.dims[0]:
            continue
        d_inner, rank = int(dt_init.dims[1]), int(dt_init.dims[2])
        convs = [
            _projection_conv(matmul.input[1], u, index, matmul, removed, gone),
            _projection_conv(b, u, index, scan, removed, gone),
            _projection_conv(c, u, index, scan, removed, gone),
        ]
        if any(conv is None for conv in convs):
            continue
        if shapes is None:
            shapes = static_shapes(proto)
        want = [[4 * rank, d_inner, 1, 1], [4, d_inner, 1, 1], [4, d_inner, 1, 1]]
        if [shapes.get(conv.input[1]) for conv in convs] != want:
            continue
        removed.update((id(reshape), id(matmul)))  # the scan itself is replaced in place (placed), not removed
        gone.update((delta, matmul.output[0]))
        found.append(_ScanProjections(scan, convs, matmul, d_inner, rank, removed, gone))
    return found


def pack_scan_projections(proto: onnx.ModelProto, narrow: bool = False) -> int:
    """Each d_state-1 scan of the exporter's projection pattern (_ScanProjections) becomes
    SelectiveScan2DPacked(u, Conv(u, Concat(W_dt, W_B, W_C)), dt_weight, A_logs, D, delta_bias), in place, with
    NarrowPointwiseConv for the Conv when `narrow`. The weight Concat is constant (ONNX Runtime folds it). Returns how
    many scans. The shape arithmetic of the removed Reshapes is left unread (drop_dead_nodes removes it)."""
    import onnx

    edit = _Edit(proto.graph)
    for match in _scan_projections(proto, edit.index):
        u, _, a_logs, _, _, d, delta_bias = match.scan.input
        stem = match.scan.output[0]
        weight, packed = f"{stem}_packed_weight", f"{stem}_packed_projections"
        if narrow:
            x_node = _fused_node(NARROW_CONV_OP, [u, weight], [packed], match.convs[0])
            x_node.name = packed
        else:
            x_node = onnx.helper.make_node("Conv", [u, weight], [packed], kernel_shape=[1, 1], name=packed)
        edit.placed[id(match.scan)] = [
            onnx.helper.make_node("Concat", [conv.input[1] for conv in match.convs], [weight], axis=0, name=weight),
            x_node,
            _fused_node(PACKED_SCAN_OP, [u, packed, match.matmul.input[0], a_logs, d, delta_bias], [stem], match.scan),
        ]
        edit.removed.update(match.removed)
        edit.gone.update(match.gone)
    return edit.commit()


def _constant(name: str, index: _Index, depth: int = 0):
    """The value of a tensor computed from initializers alone (an initializer, or standard ops of constants, such as
    the exporter's Split and Reshape of x_proj_weight), as a numpy array; None where anything is not constant."""
    from onnx import numpy_helper

    if name in index.initializers:
        return numpy_helper.to_array(index.initializers[name])
    node = index.producer.get(name)
    if node is None or depth > 8 or node.domain not in ("", "ai.onnx") or node.op_type not in _FOLDABLE:
        return None
    values = [_constant(i, index, depth + 1) if i else None for i in node.input]
    if any(v is None for i, v in zip(node.input, values) if i):
        return None
    from onnx.reference import ReferenceEvaluator

    outputs = ReferenceEvaluator(node).run(None, {i: v for i, v in zip(node.input, values) if i})
    return outputs[list(node.output).index(name)]


def _projection_weights(match: _ScanProjections, index: _Index):
    """(W_x, dt_weight) of a matched scan as float64 arrays: W_x = [W_dt; W_B; W_C] (4 R + 8 N, Di) from the three
    convolutions' weights, dt_weight (4, Di, R); None where any is not constant."""
    import numpy as np

    parts = [_constant(conv.input[1], index) for conv in match.convs]
    dt_weight = _constant(match.matmul.input[0], index)
    if any(p is None for p in parts) or dt_weight is None:
        return None
    w_x = np.concatenate([p.reshape(p.shape[0], match.d_inner) for p in parts]).astype(np.float64)
    return w_x, np.asarray(dt_weight, dtype=np.float64)


def project_scan_inputs(proto: onnx.ModelProto) -> int:
    """Each d_state-1 scan of the exporter's projection pattern (_ScanProjections) gets its delta, B and C from one
    ScanProjections(u, W_x, dt_weight) node (W_x = [W_dt; W_B; W_C], (4 R + 8 N, Di)) in place of three 1 x 1
    convolutions and a batched MatMul; the scan itself is unchanged. Returns how many scans."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    edit = _Edit(proto.graph)
    for match in _scan_projections(proto, edit.index):
        weights = _projection_weights(match, edit.index)
        if weights is None:
            continue
        stem = match.scan.output[0]
        names = {key: f"{stem}_projections_{key}" for key in ("w_x", "dt_weight", "delta", "B", "C")}
        for key, weight in zip(("w_x", "dt_weight"), weights, strict=True):
            proto.graph.initializer.append(numpy_helper.from_array(weight.astype(np.float32), names[key]))
        u = match.scan.input[0]
        outputs = [names["delta"], names["B"], names["C"]]
        scan = onnx.NodeProto()
        scan.CopyFrom(match.scan)
        scan.input[1], scan.input[3], scan.input[4] = outputs
        edit.placed[id(match.scan)] = [
            _fused_node(PROJECTIONS_OP, [u, names["w_x"], names["dt_weight"]], outputs, match.matmul),
            scan,
        ]
        edit.removed.update(match.removed)
        edit.gone.update(match.gone)
    return edit.commit()


def fuse_conv_projections(proto: onnx.ModelProto) -> int:
    """Each ScanProjections(u, W_x, dt_weight) whose u is DepthwiseConvSiLU(X, W[, bias]) becomes, with that node,
    DepthwiseConvProjections(X, W, W_x, dt_weight[, bias]) -> (u, delta, B, C), in place (u stays an output: the scan
    reads it). Returns how many."""
    edit = _Edit(proto.graph)
    index = edit.index
    for projections in proto.graph.node:
        if projections.op_type != PROJECTIONS_OP or projections.domain != ONNX_DOMAIN:
            continue
        conv = index.producer.get(projections.input[0])
        if conv is None or conv.op_type != DEPTHWISE_SILU_OP or conv.domain != ONNX_DOMAIN or id(conv) in edit.placed:
            continue
        x, weight, *bias = conv.input
        _, w_x, dt_weight = projections.input
        if w_x not in index.initializers or dt_weight not in index.initializers:
            continue
        # at the convolution: X and W exist there, W_x and dt_weight are initializers, every reader of the four
        # outputs comes after it
        edit.placed[id(conv)] = _fused_node(
            CONV_PROJECTIONS_OP,
            [x, weight, w_x, dt_weight, *[b for b in bias if b]],
            [conv.output[0], *projections.output],
            projections,
        )
        edit.removed.add(id(projections))
    return edit.commit()


def merge_scan_projections(proto: onnx.ModelProto, fold_dt: bool = False) -> int:
    """Each d_state-1 scan of the exporter's projection pattern (_ScanProjections) reads its inputs from GEMMs:

        U = Reshape(u, (0, Di, -1))
        X = MatMul(W_x, U)          W_x = [W_dt; W_B; W_C]  (4 R + 8 N, Di)
        delta = MatMul(W_bd, X)     W_bd (4 Di, 4 R + 8 N): dt_weight block-diagonal, zero on the B and C channels
        y = SelectiveScan2DMerged(u, delta, X, A_logs, D, delta_bias)

    two cuBLAS GEMMs, aligned (K = 4 R + 8 N), where the exporter's graph runs three cuDNN 1 x 1 convolutions (B and
    C have 4 output channels each) and a batched MatMul of inner dimension R. With `fold_dt` the dt projection is
    folded into the first GEMM, Z = MatMul([W_bd W_dt; W_B; W_C], U), (4 Di + 8 N, Di), and the scan reads delta and
    B, C from Z: one GEMM, at the price of Di / R times the dt FLOPs (trivial at batch 1; at batch 128 the model ran
    6% (fp16) and 14% (fp32) slower on an H100, docs/cuda-onnxruntime.md). The weights are computed in float64 from
    the graph's constants and stored float32. Returns how many scans."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    edit = _Edit(proto.graph)
    index = edit.index
    for match in _scan_projections(proto, index):
        u, _, a_logs, _, _, d, delta_bias = match.scan.input
        weights = _projection_weights(match, index)
        if weights is None:
            continue
        di, rank = match.d_inner, match.rank
        w_x, dt_weight = weights
        w_dt, w_b, w_c = w_x[: 4 * rank], w_x[4 * rank : 4 * rank + 4], w_x[4 * rank + 4 :]
        w_bd = np.zeros((4 * di, len(w_x)), dtype=np.float64)
        for k in range(4):
            w_bd[k * di : (k + 1) * di, k * rank : (k + 1) * rank] = dt_weight[k]
        stem = match.scan.output[0]
        names = {key: f"{stem}_merged_{key}" for key in ("shape", "rows", "w1", "x", "w2", "delta")}
        if fold_dt:
            weights = [np.concatenate([w_bd[:, : 4 * rank] @ w_dt, w_b, w_c])]
        else:
            weights = [np.concatenate([w_dt, w_b, w_c]), w_bd]
        proto.graph.initializer.append(numpy_helper.from_array(np.array([0, di, -1], dtype=np.int64), names["shape"]))
        for key, weight in zip(("w1", "w2"), weights):
            proto.graph.initializer.append(numpy_helper.from_array(weight.astype(np.float32), names[key]))
        nodes = [
            onnx.helper.make_node("Reshape", [u, names["shape"]], [names["rows"]], name=names["rows"]),
            onnx.helper.make_node("MatMul", [names["w1"], names["rows"]], [names["x"]], name=names["x"]),
        ]
        delta = names["x"]
        if not fold_dt:
            nodes.append(onnx.helper.make_node("MatMul", [names["w2"], delta], [names["delta"]], name=names["delta"]))
            delta = names["delta"]
        scan_inputs = [u, delta, names["x"], a_logs, d, delta_bias]
        edit.placed[id(match.scan)] = [*nodes, _fused_node(MERGED_SCAN_OP, scan_inputs, [stem], match.scan)]
        edit.removed.update(match.removed)
        edit.gone.update(match.gone)
    return edit.commit()


def fuse_cuda_graph(proto: onnx.ModelProto, scan_projections: str = "none") -> dict:
    """The three fused ops, and the scan projections rewritten as `scan_projections` says (SCAN_PROJECTIONS), in
    place, on a float32 cuda-onnxruntime graph whose LayerNorms are LastAxisLayerNorm. Returns what the manifest
    records: the fused op and how many nodes of each, and the node count before and after."""
    if scan_projections not in SCAN_PROJECTIONS:
        raise ValueError(f"scan_projections {scan_projections!r}: expected one of {SCAN_PROJECTIONS}")
    before = len(proto.graph.node)
    counts = {
        RESIDUAL_NORM_OP: fuse_residual_layer_norms(proto),
        TRANSPOSE_NORM_OP: fuse_transpose_layer_norms(proto),
        DEPTHWISE_SILU_OP: fuse_depthwise_conv_silu(proto),
        BIAS_GELU_OP: fuse_bias_gelu(proto),
        PROJECTIONS_OP: project_scan_inputs(proto) if scan_projections in ("projected", "conv-projected") else 0,
        PACKED_SCAN_OP: (
            pack_scan_projections(proto, narrow=scan_projections == "narrow")
            if scan_projections in ("packed", "narrow")
            else 0
        ),
        MERGED_SCAN_OP: (
            merge_scan_projections(proto, fold_dt=scan_projections == "folded")
            if scan_projections in ("merged", "folded")
            else 0
        ),
    }
    counts[NARROW_CONV_OP] = counts[PACKED_SCAN_OP] if scan_projections == "narrow" else 0
    # each takes one DepthwiseConvSiLU and one ScanProjections: the counts stay those of the ops in the graph
    counts[CONV_PROJECTIONS_OP] = fuse_conv_projections(proto) if scan_projections == "conv-projected" else 0
    counts[DEPTHWISE_SILU_OP] -= counts[CONV_PROJECTIONS_OP]
    counts[PROJECTIONS_OP] -= counts[CONV_PROJECTIONS_OP]
    dead = drop_dead_nodes(proto.graph)
    record = {
        "domain": ONNX_DOMAIN,
        "onnxruntime_contrib_ops": [BIAS_GELU_OP],  # in MS_DOMAIN, ONNX Runtime's own
        "fused": counts,
        "dead_nodes_dropped": dead,
        "nodes_before": before,
        "nodes_after": len(proto.graph.node),
    }
    if scan_projections != "none":
        record["scan_projections"] = scan_projections
    return record
