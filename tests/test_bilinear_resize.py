"""ai.vmamba::BilinearResize: the CPU kernel in the ONNX Runtime library against a float64 reference (torch's
bilinear interpolation, align_corners=False) and against ONNX Runtime's own Resize, and the cpu-onnxruntime rewrite
of a graph output's Resize into it (lowering/output_resize.py).

Needs libvmamba_ort.so (`python -m vmamba_export.build_kernels`); skips with that hint when it is not built.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from vmamba_export.kernels_paths import ort_library_path
from vmamba_export.lowering.onnx_export import IR_VERSION, ONNX_DOMAIN, OPSET
from vmamba_export.lowering.onnx_graph import static_shapes
from vmamba_export.lowering.output_resize import RESIZE_OP, use_bilinear_resize_for_outputs

needs_ort = pytest.mark.skipif(
    ort_library_path() is None, reason="libvmamba_ort.so not built: run `python -m vmamba_export.build_kernels`"
)


def session(model: onnx.ModelProto, threads: int = 2):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.register_custom_ops_library(str(ort_library_path()))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def resize_model(custom: bool, out: tuple[int, int], **attributes) -> onnx.ModelProto:
    """One node: X (symbolic N, C, h, w) -> Y at `out`, sizes computed from X's shape as the exporter writes them."""
    nodes = [
        helper.make_node("Shape", ["X"], ["nc"], start=0, end=2),
        helper.make_node("Concat", ["nc", "hw"], ["sizes"], axis=0),
    ]
    if custom:
        nodes.append(helper.make_node(RESIZE_OP, ["X", "sizes"], ["Y"], domain=ONNX_DOMAIN))
    else:
        attributes = {"mode": "linear", **attributes}
        nodes.append(helper.make_node("Resize", ["X", "", "", "sizes"], ["Y"], **attributes))
    graph = helper.make_graph(
        nodes,
        "resize",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["n", "c", "h", "w"])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array(out, np.int64), "hw")],
    )
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(ONNX_DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION)


def reference(x: np.ndarray, out: tuple[int, int]) -> np.ndarray:
    """torch's bilinear interpolation (align_corners=False, no antialias) in float64: mmseg's resize at inference."""
    y = torch.nn.functional.interpolate(torch.from_numpy(x).double(), size=out, mode="bilinear", align_corners=False)
    return y.numpy()


# (N, C, h, w) -> (H, W): a segmenter's 4x logits upsampling, odd and non-integer ratios, downscaling, one input row
# or column, an output narrower than a vector, few planes (output rows split over the pool) and many.
CASES = [
    ((1, 150, 32, 32), (128, 128)),
    ((2, 3, 5, 7), (11, 3)),
    ((1, 4, 17, 9), (8, 23)),
    ((1, 2, 1, 6), (5, 13)),
    ((1, 1, 6, 1), (7, 2)),
    ((3, 2, 8, 8), (8, 8)),
    ((1, 1, 40, 33), (121, 97)),
    ((2, 5, 12, 10), (3, 1)),
]


@needs_ort
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "{}x{}x{}x{}_to_{}x{}".format(*c[0], *c[1]))
def test_op_matches_float64_and_onnxruntime_resize(case, threads):
    shape, out = case
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    (y,) = session(resize_model(True, out), threads).run(None, {"X": x})
    assert y.shape == (*shape[:2], *out) and y.dtype == np.float32
    ref = reference(x, out)
    assert np.abs(y - ref).max() <= 2e-6 * max(1.0, np.abs(ref).max())
    # ORT computes the source coordinate in float (off by up to 4e-6 pixels at 40 -> 121), ours in double
    (ort_y,) = session(resize_model(False, out), threads).run(None, {"X": x})
    assert np.abs(y - ort_y).max() <= 2e-5 * max(1.0, np.abs(ref).max())


@needs_ort
def test_threads_agree_bit_for_bit():
    x = np.random.default_rng(1).standard_normal((1, 3, 30, 41)).astype(np.float32)
    one = session(resize_model(True, (97, 130)), 1).run(None, {"X": x})[0]
    for threads in (2, 3):
        assert np.array_equal(session(resize_model(True, (97, 130)), threads).run(None, {"X": x})[0], one)


@needs_ort
def test_sizes_that_change_batch_or_channels_are_errors():
    x = np.zeros((1, 2, 4, 4), np.float32)
    model = resize_model(True, (8, 8))
    model.graph.node[1].input[:] = ["bad_nc", "hw"]
    model.graph.initializer.append(numpy_helper.from_array(np.array([1, 3], np.int64), "bad_nc"))
    model.graph.node.remove(model.graph.node[0])
    with pytest.raises(Exception, match=r"'sizes' \[1, 3, 8, 8\] must keep N and C of X \[1, 2, 4, 4\]"):
        session(model).run(None, {"X": x})


def _graph_with_two_resizes(**output_attributes) -> onnx.ModelProto:
    """X -> Resize (inner, read by a Relu) -> Conv -> Resize (a graph output), sizes as initializers."""
    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node("Resize", ["X", "", "", "inner_sizes"], ["up"], mode="linear"),
        helper.make_node("Relu", ["up"], ["act"]),
        helper.make_node("Conv", ["act", "w"], ["logits_small"]),
        helper.make_node("Resize", ["logits_small", "", "", "out_sizes"], ["logits"], **output_attributes),
    ]
    initializers = [
        numpy_helper.from_array(np.array([1, 4, 12, 12], np.int64), "inner_sizes"),
        numpy_helper.from_array(np.array([1, 3, 45, 47], np.int64), "out_sizes"),
        numpy_helper.from_array(rng.standard_normal((3, 4, 1, 1)).astype(np.float32), "w"),
    ]
    graph = helper.make_graph(
        nodes,
        "two_resizes",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4, 6, 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


@needs_ort
def test_rewrite_replaces_only_the_output_resize_and_keeps_the_function():
    model = _graph_with_two_resizes(mode="linear", coordinate_transformation_mode="half_pixel", cubic_coeff_a=-0.75)
    x = np.random.default_rng(3).standard_normal((1, 4, 6, 6)).astype(np.float32)
    (want,) = session(model).run(None, {"X": x})

    assert use_bilinear_resize_for_outputs(model, static_shapes(model)) == 1
    ops = [(n.domain, n.op_type) for n in model.graph.node]
    assert ops == [("", "Resize"), ("", "Relu"), ("", "Conv"), (ONNX_DOMAIN, RESIZE_OP)]
    assert list(model.graph.node[-1].input) == ["logits_small", "out_sizes"] and not model.graph.node[-1].attribute
    assert any(o.domain == ONNX_DOMAIN for o in model.opset_import)
    (got,) = session(model).run(None, {"X": x})
    assert np.abs(got - want).max() <= 2e-6 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize(
    "attributes",
    [
        {"mode": "nearest"},
        {},  # Resize's default mode is nearest
        {"mode": "linear", "coordinate_transformation_mode": "align_corners"},
        {"mode": "linear", "antialias": 1},
        {"mode": "linear", "axes": [2, 3]},
    ],
    ids=["nearest", "default-mode", "align-corners", "antialias", "axes"],
)
def test_rewrite_leaves_resizes_the_kernel_does_not_compute(attributes):
    model = _graph_with_two_resizes(**attributes)
    if "axes" in attributes:  # sizes then name the resized axes only
        model.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.array([45, 47], np.int64), "out_sizes"))
    before = model.SerializeToString()
    assert use_bilinear_resize_for_outputs(model, static_shapes(model)) == 0
    assert model.SerializeToString() == before
