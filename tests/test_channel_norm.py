"""ai.vmamba::ChannelLayerNorm: the CPU kernel in the ONNX Runtime library against float64, and the cpu-onnxruntime
rewrite of LayerNorm2d's Transpose -> LayerNormalization -> Transpose into it (lowering/channel_norm.py).

Needs libvmamba_ort.so (`python -m vmamba_export.build_kernels`); skips with that hint when it is not built.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from vmamba_export.kernels_paths import ort_library_path
from vmamba_export.lowering.channel_norm import (
    CHANNEL_NORM_OP,
    one_node_channel_norm_model,
    register_channel_norm_schema,
    use_channel_layer_norms,
)
from vmamba_export.lowering.onnx_export import IR_VERSION, ONNX_DOMAIN, OPSET

needs_ort = pytest.mark.skipif(
    ort_library_path() is None, reason="libvmamba_ort.so not built: run `python -m vmamba_export.build_kernels`"
)
ROOT = Path(__file__).resolve().parent.parent


def reference(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, epsilon: float = 1e-5) -> np.ndarray:
    """LayerNorm over axis 1 in float64, from the float32 inputs."""
    x = x.astype(np.float64)
    mean = x.mean(1, keepdims=True)
    var = ((x - mean) ** 2).mean(1, keepdims=True)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return (x - mean) / np.sqrt(var + epsilon) * weight.reshape(shape) + bias.reshape(shape)


def session(model, threads: int = 2):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.register_custom_ops_library(str(ort_library_path()))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def inputs(batch: int, channels: int, h: int, w: int, offset: float = 0.0, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "X": (rng.standard_normal((batch, channels, h, w)) * 2.0 + offset).astype(np.float32),
        "weight": rng.standard_normal(channels).astype(np.float32),
        "bias": rng.standard_normal(channels).astype(np.float32),
    }


# (batch, C, H, W): C from 1 up to a stage-4 width and past it; H * W below, at and around multiples of the vector
# width (16 lanes on AVX-512), narrower than a vector, and the real stage sizes.
CASES = [
    (1, 1, 3, 5),
    (2, 3, 7, 7),
    (1, 3, 1, 1),
    (3, 5, 4, 4),
    (2, 96, 56, 56),
    (1, 96, 9, 13),
    (2, 100, 13, 11),
    (1, 100, 1, 15),
    (1, 192, 28, 28),
    (1, 384, 14, 14),
    (2, 768, 7, 7),
    (1, 1000, 5, 9),
    # one pixel per image: each image is one row of C contiguous values, the kernel's row form (LastAxisLayerNorm)
    (5, 96, 1, 1),
    (3, 17, 1, 1),
    (2, 100, 1, 1),
    (1, 768, 1, 1),
]


@needs_ort
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}_c{}_{}x{}".format(*c))
def test_op_matches_float64(case, threads):
    feeds = inputs(*case)
    (y,) = session(one_node_channel_norm_model(), threads).run(None, feeds)
    assert y.shape == case and y.dtype == np.float32 and np.isfinite(y).all()
    ref = reference(feeds["X"], feeds["weight"], feeds["bias"])
    assert np.abs(y - ref).max() <= 2e-5 * max(1.0, np.abs(ref).max())
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) <= 1e-6


@needs_ort
@pytest.mark.parametrize("offset", [1e3, -3e4])
def test_large_mean_keeps_its_digits(offset):
    """Channels sharing a large offset: two passes over values taken relative to one channel keep the output at
    float32 precision, where a plain float32 sum of 768 values near 1000 loses about 1e-3 (torch's CPU layer_norm:
    9e-5 at 1000, 1.3e-3 at 1e4)."""
    feeds = inputs(2, 768, 7, 9, offset=offset, seed=3)
    feeds["weight"] = np.ones(768, np.float32)
    feeds["bias"] = np.zeros(768, np.float32)
    (y,) = session(one_node_channel_norm_model()).run(None, feeds)
    assert np.abs(y - reference(feeds["X"], feeds["weight"], feeds["bias"])).max() <= 2e-6


@needs_ort
def test_epsilon_attribute_and_constant_channels():
    feeds = inputs(1, 24, 5, 6)
    feeds["X"][:, :, 0, 0] = 7.0  # one pixel equal in every channel: variance 0, output = bias
    (y,) = session(one_node_channel_norm_model(epsilon=0.5)).run(None, feeds)
    ref = reference(feeds["X"], feeds["weight"], feeds["bias"], epsilon=0.5)
    assert np.abs(y - ref).max() <= 1e-5
    assert np.allclose(y[0, :, 0, 0], feeds["bias"], atol=1e-6)


@needs_ort
def test_threads_agree_bit_for_bit():
    # Work items never share outputs: any thread count gives the same bits.
    feeds = inputs(3, 64, 40, 41, seed=4)
    one = session(one_node_channel_norm_model(), 1).run(None, feeds)[0]
    for threads in (2, 3):
        assert np.array_equal(session(one_node_channel_norm_model(), threads).run(None, feeds)[0], one)


@needs_ort
def test_bad_shapes_are_errors():
    sess = session(one_node_channel_norm_model())
    feeds = inputs(1, 8, 4, 4)
    feeds["weight"] = np.ones(7, np.float32)
    with pytest.raises(Exception, match="input 'weight' must have shape"):
        sess.run(None, feeds)
    (y,) = sess.run(None, inputs(1, 8, 4, 4))  # the session still works
    assert y.shape == (1, 8, 4, 4)


@needs_ort
@pytest.mark.parametrize("isa", ["generic", "x86-64-v3"])
def test_instruction_set_variants(isa):
    """The variant is picked once per process (kernels/cpu/isa_dispatch.h): each forced one runs in a child."""
    lib = ctypes.CDLL(str(ort_library_path()))
    lib.vmamba_ort_cpu_isa.restype = ctypes.c_char_p
    if lib.vmamba_ort_cpu_isa().decode() in ("armv8-a", "armv8.2-a+fp16+dotprod"):
        pytest.skip("x86-64 variants")
    code = (
        "import ctypes, numpy as np\n"
        "from tests.test_channel_norm import CASES, inputs, reference, session\n"
        "from vmamba_export.kernels_paths import ort_library_path\n"
        "from vmamba_export.lowering.channel_norm import one_node_channel_norm_model\n"
        "lib = ctypes.CDLL(str(ort_library_path()))\n"
        "lib.vmamba_ort_cpu_isa.restype = ctypes.c_char_p\n"
        "print(lib.vmamba_ort_cpu_isa().decode())\n"
        "for case in CASES + [(1, 1000, 1, 3)]:\n"
        "    feeds = inputs(*case)\n"
        "    (y,) = session(one_node_channel_norm_model()).run(None, feeds)\n"
        "    err = np.abs(y - reference(feeds['X'], feeds['weight'], feeds['bias'])).max()\n"
        "    assert err <= 1e-4, (case, err)\n"
    )
    env = {**os.environ, "VMAMBA_SCAN_ISA": isa}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[0] == isa


def test_schema_lets_the_checker_pass():
    register_channel_norm_schema()
    onnx.checker.check_model(one_node_channel_norm_model(96), full_check=True)


# ---- the rewrite ----


def layer_norm2d_graph(channels: int = 8, extra_reader: str | None = None, mean_output: bool = False):
    """x -> Conv(1x1) -> Transpose -> LayerNormalization -> Transpose -> Relu -> y: LayerNorm2d as exported, with
    optionally another reader of the first Transpose's output ("transposed") or of the norm's ("normed"), or the
    norm's Mean output read."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((channels, channels, 1, 1)).astype(np.float32), "conv_w"),
        numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "ln_w"),
        numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "ln_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv_w"], ["c"]),
        helper.make_node("Transpose", ["c"], ["transposed"], perm=[0, 2, 3, 1]),
        helper.make_node(
            "LayerNormalization",
            ["transposed", "ln_w", "ln_b"],
            ["normed", "mean"] if mean_output else ["normed"],
            axis=-1,
            epsilon=1e-6,
        ),
        helper.make_node("Transpose", ["normed"], ["back"], perm=[0, 3, 1, 2]),
        helper.make_node("Relu", ["back"], ["y"]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", channels, "h", "w"])]
    if extra_reader:
        nodes.append(helper.make_node("Sigmoid", [extra_reader], ["other"]))
        outputs.append(helper.make_tensor_value_info("other", TensorProto.FLOAT, None))
    if mean_output:
        outputs.append(helper.make_tensor_value_info("mean", TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes,
        "ln2d",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", channels, "h", "w"])],
        outputs,
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


@needs_ort
def test_rewrite_replaces_the_triplet_and_keeps_the_function():
    original = layer_norm2d_graph()
    proto = onnx.ModelProto()
    proto.CopyFrom(original)
    assert use_channel_layer_norms(proto) == {"op": f"{ONNX_DOMAIN}::{CHANNEL_NORM_OP}", "replaced": 1, "kept": 0}
    assert [n.op_type for n in proto.graph.node] == ["Conv", CHANNEL_NORM_OP, "Relu"]
    norm = proto.graph.node[1]
    assert list(norm.input) == ["c", "ln_w", "ln_b"] and list(norm.output) == ["back"]
    assert norm.attribute[0].name == "epsilon" and abs(norm.attribute[0].f - 1e-6) < 1e-12
    register_channel_norm_schema()
    onnx.checker.check_model(proto, full_check=True)
    x = np.random.default_rng(1).standard_normal((2, 8, 5, 7)).astype(np.float32)
    want = session(original).run(None, {"x": x})[0]
    got = session(proto).run(None, {"x": x})[0]
    assert np.abs(got - want).max() <= 1e-5


@pytest.mark.parametrize(
    "kw", [{"extra_reader": "transposed"}, {"extra_reader": "normed"}, {"mean_output": True}], ids=str
)
def test_rewrite_leaves_norms_whose_intermediates_are_read(kw):
    proto = layer_norm2d_graph(**kw)
    before = [n.op_type for n in proto.graph.node]
    assert use_channel_layer_norms(proto)["replaced"] == 0
    assert [n.op_type for n in proto.graph.node] == before


def triplets(proto) -> int:
    """Transpose(0, 2, 3, 1) -> LayerNormalization -> Transpose(0, 3, 1, 2) chains left in the graph."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    found = 0
    for node in proto.graph.node:
        if node.op_type != "Transpose" or list(node.attribute[0].ints) != [0, 3, 1, 2]:
            continue
        norm = producer.get(node.input[0])
        first = producer.get(norm.input[0]) if norm is not None and norm.op_type == "LayerNormalization" else None
        found += first is not None and first.op_type == "Transpose"
    return found


@pytest.fixture(scope="module")
def exported_classifier(tmp_path_factory):
    """vmamba_test_v2 exported as the custom-op graph, not rewritten (one export, ~10 s)."""
    from vmamba_export.lowering.onnx_export import export_onnx
    from vmamba_export.models import build_model

    model = build_model("vmamba_test_v2").eval()
    path = tmp_path_factory.mktemp("ln2d") / "model.onnx"
    export_onnx(model, path, scan="custom-op", max_size=256)
    return model, path


@needs_ort
def test_rewrite_of_an_exported_model(exported_classifier):
    from vmamba_export.models.vmamba import LayerNorm2d

    model, path = exported_classifier
    original = onnx.load(str(path))
    proto = onnx.load(str(path))
    info = use_channel_layer_norms(proto)
    norms2d = sum(isinstance(m, LayerNorm2d) for m in model.modules())
    # Every LayerNorm2d (stem, blocks, downsampling); the classifier's final norm (channel-last, then a mean) stays.
    assert info["replaced"] == norms2d and info["kept"] == 1
    assert triplets(original) == norms2d and triplets(proto) == 0
    assert sum(n.op_type == CHANNEL_NORM_OP for n in proto.graph.node) == norms2d
    assert len(proto.graph.node) == len(original.graph.node) - 2 * norms2d
    register_channel_norm_schema()
    onnx.checker.check_model(proto, full_check=True)
    for shape in [(1, 3, 224, 224), (2, 3, 77, 45)]:
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        want = session(original).run(None, {"pixel_values": x})[0]
        got = session(proto).run(None, {"pixel_values": x})[0]
        assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-5


@pytest.mark.parametrize("layer_norm", [None, "custom-op", "onnxruntime"])
def test_cpu_onnxruntime_lowering_applies_it_unless_asked_not_to(layer_norm, tmp_path, monkeypatch):
    """The cpu-onnxruntime lowering rewrites the exported graph (the export itself stubbed with a LayerNorm2d graph:
    the real exports are checked in test_onnx_targets and test_dense_artifacts); ExportOptions.extra["layer_norm"] =
    "onnxruntime" keeps ONNX Runtime's LayerNormalization (for A/B timing)."""
    from vmamba_export import lowering
    from vmamba_export.lowering import ExportOptions, onnx_export
    from vmamba_export.models import build_model
    from vmamba_export.targets import get_target

    if ort_library_path() is None:
        pytest.skip("libvmamba_ort.so not built")

    def fake_export(model, path, scan, max_size=1024):
        onnx.save_model(layer_norm2d_graph(), str(path))
        return {"scan_lowering": scan, "nodes": 5}

    monkeypatch.setattr(onnx_export, "export_onnx", fake_export)
    extra = {} if layer_norm is None else {"layer_norm": layer_norm}
    entry, info = lowering.get_lowering(get_target("cpu-onnxruntime"))(
        build_model("vmamba_test_v2"), get_target("cpu-onnxruntime"), tmp_path, ExportOptions(extra=extra)
    )
    ops = [n.op_type for n in onnx.load(str(tmp_path / entry["model"])).graph.node]
    if layer_norm == "onnxruntime":
        assert "layer_norms" not in info and "LayerNormalization" in ops
    else:
        assert info["layer_norms"]["replaced"] == 1 and ops == ["Conv", CHANNEL_NORM_OP, "Relu"]
        assert info["nodes"] == 3
    with pytest.raises(Exception, match="layer_norm 'fast'"):
        lowering.get_lowering(get_target("cpu-onnxruntime"))(
            build_model("vmamba_test_v2"),
            get_target("cpu-onnxruntime"),
            tmp_path,
            ExportOptions(extra={"layer_norm": "fast"}),
        )


def last_axis_model(shape: list, epsilon: float = 1e-5):
    """One ai.vmamba::LastAxisLayerNorm node: X `shape` normalised over its last axis."""
    from onnx import TensorProto, helper

    from vmamba_export.lowering.onnx_export import IR_VERSION, OPSET

    c = shape[-1]
    value = lambda name, dims: helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)  # noqa: E731
    node = helper.make_node("LastAxisLayerNorm", ["X", "weight", "bias"], ["Y"], domain="ai.vmamba", epsilon=epsilon)
    graph = helper.make_graph(
        [node], "last_axis_norm", [value("X", shape), value("weight", [c]), value("bias", [c])], [value("Y", shape)]
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("ai.vmamba", 1)],
        ir_version=IR_VERSION,
    )


@needs_ort
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "shape", [[1, 56, 56, 96], [2, 7, 5, 33], [3, 4], [1, 14, 14, 384], [1, 112, 112, 48], [4, 17], [2, 3, 768]]
)
def test_last_axis_op_matches_float64(shape, threads):
    """LastAxisLayerNorm (the int8 graphs' channels-last norm): rows of C contiguous values, widths around and below
    multiples of the vector width, against LayerNorm over the last axis in float64; a large offset keeps its digits."""
    rng = np.random.default_rng(3)
    for offset in (0.0, 1e3):
        x = (rng.standard_normal(shape) * 2.0 + offset).astype(np.float32)
        weight, bias = (rng.standard_normal(shape[-1]).astype(np.float32) for _ in range(2))
        (y,) = session(last_axis_model(shape), threads).run(None, {"X": x, "weight": weight, "bias": bias})
        xd = x.astype(np.float64)
        mean = xd.mean(-1, keepdims=True)
        want = (xd - mean) / np.sqrt(((xd - mean) ** 2).mean(-1, keepdims=True) + 1e-5) * weight + bias
        assert np.abs(y - want).max() <= 1e-4, (shape, offset, np.abs(y - want).max())
