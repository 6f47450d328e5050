"""The cuda-onnxruntime graph's two GPU-specific choices, checked on CPU against independent references: the
channels-last evaluation of v2 models (models/channels_last.py) against the model's own forward and, exported, through
ONNX Runtime CPU with the scan library; the LayerNormalization -> LastAxisLayerNorm rewrite (lowering/cuda_graph.py)
on real exported graphs. The CUDA kernels themselves: tests/test_cuda.py on a GPU."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch

from vmamba_export.errors import VMambaExportError
from vmamba_export.kernels_paths import ort_library_path
from vmamba_export.lowering import residual_layout
from vmamba_export.lowering.cuda_graph import LAYER_NORM_OP, use_last_axis_layer_norms
from vmamba_export.lowering.onnx_export import ONNX_DOMAIN, export_onnx
from vmamba_export.model_source import resolve_model
from vmamba_export.models.channels_last import ChannelsLastVMamba
from vmamba_export.scan.op import torch_scan


def _model(name: str):
    return resolve_model(name, random_weights=True, seed=0).model.eval().set_scan(torch_scan)


@pytest.mark.parametrize("name, size", [("vmamba_test_v2", (64, 64)), ("vmamba_test_v2", (45, 37))])
def test_channels_last_forward_equals_the_model(name, size):
    model = _model(name).double()
    x = torch.randn(2, 3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = model(x), ChannelsLastVMamba(model)(x)
    # float64: only the order of the sums differs (1x1 convolution against matmul)
    assert torch.allclose(out, ref, rtol=1e-10, atol=1e-12)


def test_channels_last_is_for_v2_models():
    with pytest.raises(ValueError, match="v2 models"):
        ChannelsLastVMamba(_model("vmamba_test_v0"))
    v0, v2 = _model("vmamba_test_v0"), _model("vmamba_test_v2")
    assert residual_layout(v2, None) == residual_layout(v0, None) == "channels-last"
    assert residual_layout(v2, "channels-first") == "channels-first"
    with pytest.raises(VMambaExportError, match="channels-last by definition"):
        residual_layout(v0, "channels-first")
    with pytest.raises(VMambaExportError, match="expected one of"):
        residual_layout(v2, "nhwc")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """vmamba_test_v2 exported with the custom-op scan both ways: {layout: (path, model)}."""
    folder = tmp_path_factory.mktemp("layouts")
    model = resolve_model("vmamba_test_v2", random_weights=True, seed=0).model.eval()  # the scan as one op
    first, last = folder / "first.onnx", folder / "last.onnx"
    export_onnx(model, first, scan="custom-op", max_size=128)
    export_onnx(ChannelsLastVMamba(model), last, scan="custom-op", max_size=128)
    return {"channels-first": first, "channels-last": last, "model": _model("vmamba_test_v2")}


def _op_counts(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_channels_last_graph_has_matmuls_and_fewer_transposes(exported):
    first, last = _op_counts(exported["channels-first"]), _op_counts(exported["channels-last"])
    assert last["SelectiveScan2D"] == first["SelectiveScan2D"] == 5
    assert last["LayerNormalization"] == first["LayerNormalization"]
    # per block: in/out projections and both MLP layers become MatMuls (5 blocks x 4)
    assert last["MatMul"] >= 20 and first["Conv"] - last["Conv"] >= 20
    assert last["Transpose"] < first["Transpose"] / 2, (last["Transpose"], first["Transpose"])


@pytest.mark.skipif(ort_library_path() is None, reason="custom-op library not built")
@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (3, 3, 45, 37)])
def test_channels_last_graph_runs_in_onnxruntime_like_pytorch(exported, shape):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.register_custom_ops_library(str(ort_library_path()))
    session = ort.InferenceSession(str(exported["channels-last"]), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
    out = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        ref = exported["model"](torch.from_numpy(x)).numpy()
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-5


def test_layer_norms_become_our_op_with_their_epsilon(exported):
    proto = onnx.load(str(exported["channels-last"]))
    before = [n for n in proto.graph.node if n.op_type == "LayerNormalization"]
    info = use_last_axis_layer_norms(proto)
    assert info == {"op": f"{ONNX_DOMAIN}::{LAYER_NORM_OP}", "replaced": len(before), "kept": 0} and before
    ours = [n for n in proto.graph.node if n.op_type == LAYER_NORM_OP]
    assert len(ours) == len(before)
    for node in ours:
        assert node.domain == ONNX_DOMAIN and len(node.input) == 3 and len(node.output) == 1
        assert [(a.name, round(a.f, 9)) for a in node.attribute] == [("epsilon", 1e-5)]
    onnx.checker.check_model(proto)


def test_layer_norms_the_kernel_does_not_cover_stay():
    from onnx import TensorProto, helper, numpy_helper

    def layer_norm_model(width: int, axis: int = -1, outputs: int = 1):
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, width])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, width])
        extra = [helper.make_tensor_value_info("mean", TensorProto.FLOAT, None)] if outputs == 2 else []
        inits = [numpy_helper.from_array(np.ones(width, np.float32), n) for n in ("s", "b")]
        node = helper.make_node("LayerNormalization", ["x", "s", "b"], ["y", "mean"][:outputs], axis=axis, epsilon=1e-6)
        return helper.make_model(helper.make_graph([node], "ln", [x], [y, *extra], inits))

    assert use_last_axis_layer_norms(layer_norm_model(96))["replaced"] == 1
    for model in (
        layer_norm_model(7),
        layer_norm_model(4096),
        layer_norm_model(96, axis=1),
        layer_norm_model(96, -1, 2),
    ):
        assert use_last_axis_layer_norms(model) == {"op": f"{ONNX_DOMAIN}::{LAYER_NORM_OP}", "replaced": 0, "kept": 1}
        assert model.graph.node[0].op_type == "LayerNormalization"
