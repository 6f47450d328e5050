"""cuda-onnxruntime: the CPU-side parts everywhere (target, fp16 graph, clear errors without a GPU), the CUDA kernel and
the artifacts on a GPU (`pytest -m gpu tests/test_cuda.py`; skipped without a GPU or onnxruntime-gpu)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from vmamba_export.cuda_kernel import KERNEL_VARIANTS
from vmamba_export.errors import TargetUnavailableError
from vmamba_export.kernels_paths import ort_cuda_library_path
from vmamba_export.lowering import LOWERINGS
from vmamba_export.lowering.fp16 import convert_model_to_fp16
from vmamba_export.lowering.onnx_export import IR_VERSION, export_onnx
from vmamba_export.model_source import resolve_model
from vmamba_export.scan import selective_scan_reference
from vmamba_export.targets import get_target

needs_cuda_library = pytest.mark.skipif(ort_cuda_library_path() is None, reason="libvmamba_ort_cuda.so not built")


def _cuda_ready() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    if ort_cuda_library_path() is None:
        return "libvmamba_ort_cuda.so not built (python -m vmamba_export.build_kernels --cuda)"
    try:
        from vmamba_export.runtime.onnxruntime_backend import cuda_unavailable_reason

        return cuda_unavailable_reason()
    except TargetUnavailableError as exc:
        return str(exc)


def gpu_ready():
    why = _cuda_ready()
    if why:
        pytest.skip(why)


# ---- everywhere ----


def test_target_file():
    target = get_target("cuda-onnxruntime")
    assert target.device == "cuda" and target.runtime == "onnxruntime"
    assert target.precisions == ("fp32", "fp16")
    assert target.scan_lowering in LOWERINGS
    assert target.thresholds_for("fp32") == {"max_rel_l2": 1e-4, "min_top1_agreement": 1.0}
    assert target.thresholds_for("fp16") == {"min_cosine": 0.999}


def test_int8_is_refused():
    from vmamba_export.exporter import export_artifact

    source = resolve_model("vmamba_test_v2", random_weights=True, seed=0)
    with pytest.raises(TargetUnavailableError, match="does not offer precision 'int8'"):
        export_artifact(source, get_target("cuda-onnxruntime"), "/nonexistent/never-written", precision="int8")


@pytest.fixture(scope="module")
def fp32_graph(tmp_path_factory):
    model = resolve_model("vmamba_test_v2", random_weights=True, seed=0).model.eval()
    path = tmp_path_factory.mktemp("cuda") / "model.onnx"
    export_onnx(model, path, scan="custom-op", max_size=256)
    return onnx.load(str(path))


def _elem_types(proto) -> dict[str, int]:
    types = {}
    for vi in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        types[vi.name] = vi.type.tensor_type.elem_type
    for init in proto.graph.initializer:
        types[init.name] = init.data_type
    for node in proto.graph.node:
        if node.op_type == "Cast":
            to = next(a.i for a in node.attribute if a.name == "to")
            types[node.output[0]] = to
    return types


def test_fp16_graph_structure(fp32_graph):
    f16, f32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    converted = convert_model_to_fp16(fp32_graph, IR_VERSION)
    assert converted.ir_version == IR_VERSION
    # float32 at the boundary (keep_io_types)
    assert [i.type.tensor_type.elem_type for i in converted.graph.input] == [f32]
    assert [o.type.tensor_type.elem_type for o in converted.graph.output] == [f32]
    # no float32 weights left; the scan nodes are float16 nodes (their weight inputs are float16 initializers)
    assert not [i.name for i in converted.graph.initializer if i.data_type == f32]
    types = _elem_types(converted)
    scans = [n for n in converted.graph.node if n.op_type == "SelectiveScan2D"]
    assert len(scans) == len([n for n in fp32_graph.graph.node if n.op_type == "SelectiveScan2D"]) > 0
    for node in scans:
        assert node.domain == "ai.vmamba"
        known = [types[name] for name in node.input if name in types]
        assert known and all(t == f16 for t in known), (node.name, known)
    layer_norms = [n for n in converted.graph.node if n.op_type == "LayerNormalization"]
    assert layer_norms, "expected LayerNormalization nodes (kept in the float16 region)"
    # exactly one Cast in and one Cast out at the boundary
    first = [n for n in converted.graph.node if converted.graph.input[0].name in n.input]
    assert [n.op_type for n in first] == ["Cast"]


def test_fp16_graph_runs_on_cpu_with_float32_io(fp32_graph, tmp_path):
    """The converted graph is valid: ONNX Runtime (CPU) opens it when the scan op has a float16 kernel... which only the
    CUDA library has; so check it with onnx's checker and shape inference instead."""
    converted = convert_model_to_fp16(fp32_graph, IR_VERSION)
    onnx.checker.check_model(converted)


def test_runtime_refuses_without_cuda_provider(monkeypatch, tmp_path):
    import onnxruntime as ort

    from vmamba_export.runtime import onnxruntime_backend

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    why = onnxruntime_backend.cuda_unavailable_reason()
    assert why and "onnxruntime-gpu" in why
    manifest = {"entry": {"model": "model.onnx", "providers": ["CUDAExecutionProvider"]}}
    with pytest.raises(TargetUnavailableError, match="runs on a CUDA GPU"):
        onnxruntime_backend.OnnxRuntimeBackend(tmp_path, manifest)
    ok, reason = get_target("cuda-onnxruntime").can_run()
    assert not ok and "onnxruntime-gpu" in reason


def test_runtime_refuses_without_gpu(monkeypatch):
    import onnxruntime as ort

    from vmamba_export.runtime import onnxruntime_backend

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime_backend, "_cuda_device_count", lambda: 0)
    assert "no CUDA GPU" in onnxruntime_backend.cuda_unavailable_reason()


def test_graph_runner_takes_a_shape_into_a_graph_from_its_second_call():
    """The runner's shape policy only (no GPU, no graph): a shape's first call stays on the plain session, so one-off
    sizes (photos of all sizes through a segmenter) never pay for a graph's own session; the remembered shapes are
    bounded. Capture and replay are tested on a GPU below."""
    from vmamba_export.runtime.cuda_graphs import CudaGraphRunner
    from vmamba_export.runtime.shape_cache import REMEMBERED_SHAPES

    runner = CudaGraphRunner(lambda shape: pytest.fail("wants() must not make a session"), probe_session=None)
    assert not runner.wants((1, 3, 64, 64)) and runner.wants((1, 3, 64, 64)) and runner.wants((1, 3, 64, 64))
    assert not runner.wants((1, 3, 193, 161)) and runner.wants((1, 3, 193, 161))
    for side in range(REMEMBERED_SHAPES):
        runner.wants((1, 3, 100, 100 + side))
    assert not runner.wants((1, 3, 64, 64))  # forgotten: the least recently seen go first
    assert runner.cached_shapes == []


@needs_cuda_library
def test_cuda_artifact_export_and_clear_load_error(tmp_path):
    from vmamba_export import load
    from vmamba_export.artifact import read_manifest
    from vmamba_export.exporter import export_artifact

    source = resolve_model("vmamba_test_v0", random_weights=True, seed=0)
    folder = tmp_path / "fp16"
    export_artifact(source, get_target("cuda-onnxruntime"), folder, precision="fp16", max_size=256)
    manifest = read_manifest(folder)
    assert manifest["entry"]["providers"] == ["CUDAExecutionProvider"]
    assert manifest["entry"]["custom_op_library"] == "libvmamba_ort_cuda.so"
    assert (folder / "libvmamba_ort_cuda.so").is_file()
    assert manifest["lowering"]["fp16"]["keep_io_types"] is True
    if _cuda_ready():
        with pytest.raises(TargetUnavailableError):
            load(folder)


def test_cuda_fusions_flag_is_refused_for_other_targets(capsys, tmp_path):
    from vmamba_export.cli import main

    out_dir = tmp_path / "a"
    argv = ["export", "--model", "vmamba_test_v2", "--random-weights", "--target", "cpu-onnxruntime"]
    rc = main([*argv, "--cuda-fusions", "folded", "--out", str(out_dir)])
    err = capsys.readouterr().err
    assert rc == 2 and "--cuda-fusions is for cuda-onnxruntime, not target cpu-onnxruntime" in err, err
    assert not out_dir.exists()


@needs_cuda_library
def test_cuda_fusions_flag_reaches_the_graph(capsys, tmp_path):
    """`export --cuda-fusions folded`: every d_state-1 scan reads its projections from one GEMM, and the manifest says
    so (the GPU tests check such artifacts' parity)."""
    from vmamba_export.cli import main

    out_dir = tmp_path / "folded"
    argv = ["export", "--model", "vmamba_test_v2", "--random-weights", "--target", "cuda-onnxruntime"]
    assert main([*argv, "--cuda-fusions", "folded", "--out", str(out_dir), "--json"]) == 0, capsys.readouterr().err
    fusions = json.loads((out_dir / "manifest.json").read_text())["lowering"]["fusions"]
    assert fusions["scan_projections"] == "folded" and fusions["fused"]["SelectiveScan2DMerged"] == 5
    ops = [n.op_type for n in onnx.load(str(out_dir / "model.onnx")).graph.node]
    assert ops.count("SelectiveScan2DMerged") == 5 and "SelectiveScan2D" not in ops


@needs_cuda_library
def test_cuda_batch1_graph_is_written_beside_the_main_graph(capsys, tmp_path):
    """`export --cuda-batch1-fusions narrow`: model.batch1.onnx holds the narrow form of every d_state-1 scan, listed
    in the manifest (hashed) as entry.batch1_model; model.onnx keeps the default fusions. By default a classifier
    gets a projected one; a d_state-16 model none (nothing to rewrite); conv-projected in fp16 takes each block's
    convolution with its projections. The GPU tests check that batch-1 graphs replay it and its parity."""
    from vmamba_export.cli import main

    argv = ["export", "--model", "vmamba_test_v2", "--random-weights", "--target", "cuda-onnxruntime", "--json"]
    assert main([*argv, "--out", str(tmp_path / "default")]) == 0
    default = json.loads((tmp_path / "default" / "manifest.json").read_text())
    assert default["entry"]["batch1_model"] == "model.batch1.onnx"
    assert default["lowering"]["batch1_fusions"]["fused"]["ScanProjections"] == 5
    v0 = ["--model", "vmamba_test_v0", *argv[3:]]
    assert main([argv[0], *v0, "--out", str(tmp_path / "v0")]) == 0
    v0_manifest = json.loads((tmp_path / "v0" / "manifest.json").read_text())
    assert "batch1_model" not in v0_manifest["entry"] and not (tmp_path / "v0" / "model.batch1.onnx").exists()
    assert v0_manifest["lowering"]["batch1_fusions"] == {"scan_projections": "projected", "written": False}
    out_dir = tmp_path / "b1"
    assert main([*argv, "--cuda-batch1-fusions", "narrow", "--out", str(out_dir)]) == 0
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["entry"]["batch1_model"] == "model.batch1.onnx" and "model.batch1.onnx" in manifest["files"]
    lowering = manifest["lowering"]
    assert lowering["batch1_fusions"]["scan_projections"] == "narrow"
    assert lowering["batch1_fusions"]["fused"]["NarrowPointwiseConv"] == 5
    assert "scan_projections" not in lowering["fusions"]
    main_ops = [n.op_type for n in onnx.load(str(out_dir / "model.onnx")).graph.node]
    batch1_ops = [n.op_type for n in onnx.load(str(out_dir / "model.batch1.onnx")).graph.node]
    assert main_ops.count("SelectiveScan2D") == 5 and "NarrowPointwiseConv" not in main_ops
    assert batch1_ops.count("NarrowPointwiseConv") == batch1_ops.count("SelectiveScan2DPacked") == 5
    assert main([*argv, "--cuda-batch1-fusions", "none", "--out", str(tmp_path / "none")]) == 0
    assert not (tmp_path / "none" / "model.batch1.onnx").exists()
    # conv-projected, fp16: each block's DepthwiseConvSiLU and ScanProjections are one DepthwiseConvProjections node,
    # its four outputs float16 like the scan's inputs
    conv_dir = tmp_path / "conv"
    conv_argv = [*argv, "--precision", "fp16", "--cuda-batch1-fusions", "conv-projected", "--out", str(conv_dir)]
    assert main(conv_argv) == 0
    fused = json.loads((conv_dir / "manifest.json").read_text())["lowering"]["batch1_fusions"]["fused"]
    assert (fused["DepthwiseConvProjections"], fused["DepthwiseConvSiLU"], fused["ScanProjections"]) == (5, 0, 0)
    batch1 = onnx.load(str(conv_dir / "model.batch1.onnx"))
    ops = [n.op_type for n in batch1.graph.node]
    assert ops.count("DepthwiseConvProjections") == ops.count("SelectiveScan2D") == 5
    assert "DepthwiseConvSiLU" not in ops and "ScanProjections" not in ops
    types = {i.name: i.data_type for i in batch1.graph.initializer}
    node = next(n for n in batch1.graph.node if n.op_type == "DepthwiseConvProjections")
    assert {types[name] for name in node.input[1:]} == {onnx.TensorProto.FLOAT16}
    assert main([*argv, "--cuda-batch1-fusions", "on", "--out", str(tmp_path / "same")]) == 0  # the main graph's own
    same = json.loads((tmp_path / "same" / "manifest.json").read_text())
    assert same["lowering"]["batch1_fusions"] == {"scan_projections": "on", "written": False}
    assert "batch1_model" not in same["entry"] and not (tmp_path / "same" / "model.batch1.onnx").exists()
    cpu = [*argv[:5], "cpu-onnxruntime", "--cuda-batch1-fusions", "narrow", "--out", str(tmp_path / "cpu")]
    rc = main(cpu)
    assert rc == 2 and "--cuda-batch1-fusions is for cuda-onnxruntime" in capsys.readouterr().err


@needs_cuda_library
def test_cuda_library_loads_without_gpu_and_runs_its_cpu_kernel():
    """libvmamba_ort_cuda.so also carries the CPU kernel: it must load (static cudart, no GPU needed) and run."""
    import onnxruntime as ort

    from vmamba_export.lowering.onnx_export import SCAN_INPUTS, one_node_scan_model

    shapes = [(1, 3, 5, 6), (1, 4, 3, 5, 6), (12, 1), (1, 4, 1, 5, 6), (1, 4, 1, 5, 6), (12,), (12,)]
    names = list(SCAN_INPUTS)
    model = one_node_scan_model(shapes=shapes)
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(ort_cuda_library_path()))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in zip(names, shapes)}
    y = session.run(None, feeds)[0]
    ref = selective_scan_reference(*[torch.from_numpy(feeds[n]) for n in names]).numpy()
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 1e-5


# ---- on a GPU ----


def _inputs(batch, di, n, h, w, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = 4
    ts = (
        torch.randn(batch, di, h, w, generator=g),
        torch.randn(batch, k, di, h, w, generator=g) * 0.5 - 1.0,
        torch.randn(k * di, n, generator=g) * 0.5 + (torch.log(torch.arange(1.0, n + 1)) if n > 1 else 0.0),
        torch.randn(batch, k, n, h, w, generator=g),
        torch.randn(batch, k, n, h, w, generator=g),
        torch.randn(k * di, generator=g),
        torch.randn(k * di, generator=g) * 0.5,
    )
    return tuple(t.to(dtype) for t in ts)


@pytest.mark.gpu
# (2, 4, 1, 80, 70): two segments of the block kernel; (2, 4, 1, 28, 56): its quad-vectorised staging;
# (1, 2, 16, 40, 40): d_state 16 (chunked kernel); line kernel: (1, 3, 1, 56, 56) whole 8-step vector chunks,
# (1, 2, 1, 16, 20) 8-step chunks with partial ones at the row ends, (2, 5, 1, 7, 9) and (2, 4, 1, 28, 56) 7 steps;
# warp kernel (maps up to 256 positions): (2, 5, 1, 7, 9) 2 steps a lane, (2, 3, 1, 10, 12) 4, (1, 3, 1, 14, 14) 8
# with idle lanes
@pytest.mark.parametrize(
    "shape",
    [
        (2, 5, 1, 7, 9),
        (2, 3, 1, 10, 12),
        (1, 3, 1, 14, 14),
        (1, 4, 1, 70, 66),
        (2, 4, 1, 80, 70),
        (2, 4, 1, 28, 56),
        (1, 3, 1, 56, 56),
        (1, 2, 1, 16, 20),
        (2, 5, 16, 9, 7),
        (1, 2, 16, 40, 40),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("variant", KERNEL_VARIANTS)
def test_cuda_kernel_matches_reference(shape, dtype, variant):
    gpu_ready()
    from vmamba_export import cuda_kernel

    if variant.startswith(("block", "lines", "warps")) and shape[2] != 1:
        pytest.skip("the block, line and warp kernels are d_state-1 paths")
    ins = _inputs(*shape, dtype)
    ref = selective_scan_reference(*[t.double() for t in ins]).numpy()
    cuda_kernel.apply_variant(variant)
    try:
        y = torch.full_like(ins[0], float("nan")).cuda()
        try:
            cuda_kernel.selective_scan_2d_cuda(*[t.cuda() for t in ins], out=y)
        except RuntimeError as exc:
            if variant.startswith(("lines", "warps")) and "kernel takes maps" in str(exc):
                pytest.skip(f"the map is too large for the {variant} kernel: {exc}")
            raise
        out = y.double().cpu().numpy()
    finally:
        cuda_kernel.apply_variant("auto")
    assert np.isfinite(out).all()
    limit = 2e-5 if dtype == torch.float32 else 3e-3
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < limit


def _torch_cuda_and_library():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    if ort_cuda_library_path() is None:
        pytest.skip("libvmamba_ort_cuda.so not built (python -m vmamba_export.build_kernels --cuda)")


@pytest.mark.gpu
def test_floor_kernel_exp2_polynomial_is_as_accurate_as_ex2_approx():
    """The FMA-pipe exp2 of the floor kernel (scan_floor.cu) against float64, so that the floor's best mix is one a
    real kernel could use: within 2.5e-7 relative (ex2.approx: 2^-22) on [-126, 0], clamped to 2^-126 below."""
    _torch_cuda_and_library()
    from vmamba_export import cuda_kernel

    x = torch.cat([torch.linspace(-126.0, 0.0, 1 << 20), torch.rand(1 << 16) * -126.0]).cuda()
    ref = torch.exp2(x.double())
    rel = ((cuda_kernel.exp2_poly(x).double() - ref) / ref).abs().max().item()
    assert rel < 2.5e-7
    low = cuda_kernel.exp2_poly(torch.tensor([-130.0, -200.0], device="cuda")).cpu()
    assert torch.allclose(low.double(), torch.full((2,), 2.0**-126, dtype=torch.float64), rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("poly_states", [0, 4, 16])
def test_floor_kernel_does_the_scan_step_work(poly_states):
    """Every thread's sum from the floor kernel against the same recurrence in float64 (numpy): the benchmark times
    the work it claims (16 decays, drives, updates and output terms a step), not code the compiler dropped."""
    _torch_cuda_and_library()
    from vmamba_export import cuda_kernel

    lib = cuda_kernel.load_library()
    threads, steps = lib.vmamba_scan_floor_threads(), 40
    out = torch.empty(2 * threads, device="cuda")
    err = lib.vmamba_scan_floor(poly_states, 2, steps, out.data_ptr(), torch.cuda.current_stream().cuda_stream)
    assert err is None
    torch.cuda.synchronize()
    tid = np.arange(2 * threads)[:, None]
    n = np.arange(16)[None, :]
    a2 = -0.1 * (n + 1) - 1e-7 * (tid & 1023)
    b, c = 0.5 + 0.01 * n, 1.0 - 0.02 * n
    h = np.zeros((2 * threads, 16))
    dt, x, y = 0.5 + 1e-6 * (tid[:, 0] & 255), 0.25 + 0.01 * (tid & 7), np.zeros(2 * threads)
    for _ in range(steps):
        h = np.exp2(dt[:, None] * a2) * h + x * b
        y += (c * h).sum(axis=1)
        dt, x = dt * 0.999 + 1e-3, x * -0.5 + 1.5
    np.testing.assert_allclose(out.cpu().numpy(), y, rtol=2e-5)


@pytest.mark.gpu
def test_cuda_kernel_refuses_unsupported_d_state():
    gpu_ready()
    from vmamba_export import cuda_kernel

    with pytest.raises(RuntimeError, match="d_state 1 and 16"):
        cuda_kernel.selective_scan_2d_cuda(*[t.cuda() for t in _inputs(1, 2, 3, 4, 4, torch.float32)])


def _one_node_cuda_run(op: str, inputs: dict, outputs: list[str], float16: bool, **attrs) -> list[np.ndarray]:
    """Runs one ai.vmamba node on the CUDA provider; `inputs`: name -> float64 array (cast to the op's type).
    Returns the outputs as float64."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from vmamba_export.lowering.onnx_export import IR_VERSION, ONNX_DOMAIN, OPSET

    elem, np_type = (TensorProto.FLOAT16, np.float16) if float16 else (TensorProto.FLOAT, np.float32)
    node = helper.make_node(op, list(inputs), outputs, domain=ONNX_DOMAIN, **attrs)
    graph = helper.make_graph(
        [node],
        op,
        [helper.make_tensor_value_info(n, elem, a.shape) for n, a in inputs.items()],
        [helper.make_tensor_value_info(n, elem, None) for n in outputs],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(ONNX_DOMAIN, 1)],
        ir_version=IR_VERSION,
    )
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(ort_cuda_library_path()))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CUDAExecutionProvider"])
    return [y.astype(np.float64) for y in session.run(None, {n: a.astype(np_type) for n, a in inputs.items()})]


def _random_inputs(shapes: dict, float16: bool, seed: int) -> dict:
    """name -> float64 array of that shape, already rounded to the op's type (so the reference sees what the kernel
    reads)."""
    rng = np.random.default_rng(seed)
    np_type = np.float16 if float16 else np.float32
    return {n: (rng.standard_normal(s) * 2 + 1).astype(np_type).astype(np.float64) for n, s in shapes.items()}


def _rel_l2(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.gpu
# (batch, Di, N, H, W, R). Line kernel reading X in place: the stage-1 and stage-2 shapes at batch 1 (8-step chunks,
# L2 prefetch in float16). Warp kernel computing delta in its loads: the stage-3 and stage-4 shapes at batch 1 (8 and
# 2 steps a lane), a rank-48 stage-4 shape, a map of 63 positions (partial lanes). Unpacked into scratch first: a map
# too large for the line kernel (block kernel), and d_state 16 (chunked kernel).
@pytest.mark.parametrize(
    "shape",
    [
        (1, 96, 1, 56, 56, 6),
        (1, 192, 1, 28, 28, 12),
        (1, 384, 1, 14, 14, 24),
        (1, 768, 1, 7, 7, 48),
        (2, 24, 1, 7, 7, 48),
        (2, 5, 1, 7, 9, 3),
        (1, 8, 1, 80, 70, 6),
        (1, 4, 16, 9, 7, 2),
    ],
)
@pytest.mark.parametrize("float16", [False, True])
def test_cuda_packed_scan_op_matches_reference(shape, float16):
    """SelectiveScan2DPacked against the float64 scan of the unpacked inputs: delta = dt_weight . X's dt-rank
    channels, B and C the next channels (docs/scan-op.md)."""
    gpu_ready()
    batch, di, n, h, w, rank = shape
    ins = _random_inputs({"u": (batch, di, h, w), "D": (4 * di,)}, float16, seed=1)
    rng = np.random.default_rng(2)
    np_type = np.float16 if float16 else np.float32

    def rounded(a):
        return a.astype(np_type).astype(np.float64)

    ins["X"] = rounded(rng.standard_normal((batch, 4 * rank + 8 * n, h, w)))
    ins["dt_weight"] = rounded(rng.standard_normal((4, di, rank)) * 0.5 / np.sqrt(rank))
    ins["A_logs"] = rounded(rng.standard_normal((4 * di, n)) * 0.5 + (np.log(np.arange(1.0, n + 1)) if n > 1 else 0))
    ins["delta_bias"] = rounded(rng.standard_normal(4 * di) * 0.5 - 1.0)
    order = ["u", "X", "dt_weight", "A_logs", "D", "delta_bias"]
    (got,) = _one_node_cuda_run("SelectiveScan2DPacked", {k: ins[k] for k in order}, ["y"], float16)

    x = ins["X"].reshape(batch, 4 * rank + 8 * n, h, w)
    dt_in = x[:, : 4 * rank].reshape(batch, 4, rank, h, w)
    delta = np.einsum("kcr,bkrhw->bkchw", ins["dt_weight"], dt_in)
    b_mat = x[:, 4 * rank : 4 * rank + 4 * n].reshape(batch, 4, n, h, w)
    c_mat = x[:, 4 * rank + 4 * n :].reshape(batch, 4, n, h, w)
    args = [ins["u"], delta, ins["A_logs"], b_mat, c_mat, ins["D"], ins["delta_bias"]]
    want = selective_scan_reference(*[torch.from_numpy(np.ascontiguousarray(a)) for a in args]).numpy()
    assert np.isfinite(got).all()
    # float16: the unpacked path rounds delta to float16 before the scan, as the unfused graph's MatMul did
    assert _rel_l2(got, want) < (3e-3 if float16 else 2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["auto", "lines", "nowarps", "packed-unpack", "block1", "smem"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_packed_scan_paths_agree_with_the_unpacked_scan(variant, dtype):
    """One map small enough for the warp kernel, scanned packed by each path (auto and packed-unpack: the warp kernel
    computing delta from x in its loads; lines, nowarps: the line kernel reading x in place; forced block or
    shared-memory kernel: x unpacked into scratch first) and unpacked with torch's projection: all match the float64
    reference."""
    gpu_ready()
    from vmamba_export import cuda_kernel

    batch, di, rank, h, w = 2, 8, 12, 14, 14
    u, _, a_logs, _, _, d, bias = _inputs(batch, di, 1, h, w, dtype)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 4 * rank + 8, h, w, generator=g).to(dtype)
    wt = (torch.randn(4, di, rank, generator=g) * 0.3).to(dtype)
    delta = torch.einsum("kcr,bkrhw->bkchw", wt.double(), x[:, : 4 * rank].double().reshape(batch, 4, rank, h, w))
    b_mat = x[:, 4 * rank : 4 * rank + 4].reshape(batch, 4, 1, h, w)
    c_mat = x[:, 4 * rank + 4 :].reshape(batch, 4, 1, h, w)
    ref = selective_scan_reference(u.double(), delta, a_logs.double(), b_mat.double(), c_mat.double(), d.double(),
                                   bias.double()).numpy()  # fmt: skip
    cuda_kernel.apply_variant(variant)
    try:
        y = cuda_kernel.selective_scan_2d_packed_cuda(*[t.cuda() for t in (u, x, wt, a_logs, d, bias)])
        config = cuda_kernel.last_config()
    finally:
        cuda_kernel.apply_variant("auto")
    paths = {"auto": "warps", "lines": "lines", "nowarps": "lines", "packed-unpack": "warps"}
    assert config.startswith(paths.get(variant, variant.rstrip("1"))), config
    # in place: the warp kernel (bit 512 keeps only the line kernel from reading x in place) and the line kernel
    assert ("rank=12" in config) == (variant in ("auto", "lines", "nowarps", "packed-unpack")), config
    out = y.double().cpu().numpy()
    assert np.isfinite(out).all()
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < (2e-5 if dtype == torch.float32 else 3e-3)


@pytest.mark.gpu
# (batch, Di, N, H, W, extra delta channels, extra X channels). Line kernel reading delta and X in place: the stage-1
# shape at batch 1 and 2, delta and X one tensor (folded: X = delta's 4 Di channels then B, C), 7-step chunks with
# partial ones. Copied out first (batch 2): a map too large for the line kernel (block kernel), d_state 16 (chunked
# kernel); batch 1 of that map reads in place on the block kernel too.
@pytest.mark.parametrize(
    "shape",
    [
        (1, 96, 1, 56, 56, 0, 24),
        (2, 96, 1, 56, 56, 0, 24),
        (2, 24, 1, 7, 7, "same", 0),
        (2, 5, 1, 7, 9, 3, 12),
        (2, 8, 1, 80, 70, 0, 24),
        (1, 8, 1, 80, 70, 0, 24),
        (2, 4, 16, 9, 7, 4, 8),
    ],
)
@pytest.mark.parametrize("float16", [False, True])
def test_cuda_merged_scan_op_matches_reference(shape, float16):
    """SelectiveScan2DMerged against the float64 scan of the same values: delta the first 4 Di channels of its delta
    input, B and C the last 8 N channels of X (docs/scan-op.md)."""
    gpu_ready()
    batch, di, n, h, w, extra_delta, extra_x = shape
    ins = _random_inputs({"u": (batch, di, h, w), "D": (4 * di,)}, float16, seed=1)
    rng = np.random.default_rng(2)
    np_type = np.float16 if float16 else np.float32

    def rounded(a):
        return a.astype(np_type).astype(np.float64)

    same = extra_delta == "same"
    delta_channels = 4 * di + (8 * n + extra_x if same else extra_delta)
    ins["delta"] = rounded(rng.standard_normal((batch, delta_channels, h * w)) * 0.5)
    ins["X"] = ins["delta"] if same else rounded(rng.standard_normal((batch, extra_x + 8 * n, h * w)))
    ins["A_logs"] = rounded(rng.standard_normal((4 * di, n)) * 0.5 + (np.log(np.arange(1.0, n + 1)) if n > 1 else 0))
    ins["delta_bias"] = rounded(rng.standard_normal(4 * di) * 0.5 - 1.0)
    order = ["u", "delta", "X", "A_logs", "D", "delta_bias"]
    (got,) = _one_node_cuda_run("SelectiveScan2DMerged", {k: ins[k] for k in order}, ["y"], float16)

    x = ins["X"]
    delta = ins["delta"][:, : 4 * di].reshape(batch, 4, di, h, w)
    b_mat = x[:, x.shape[1] - 8 * n : x.shape[1] - 4 * n].reshape(batch, 4, n, h, w)
    c_mat = x[:, x.shape[1] - 4 * n :].reshape(batch, 4, n, h, w)
    args = [ins["u"], delta, ins["A_logs"], b_mat, c_mat, ins["D"], ins["delta_bias"]]
    want = selective_scan_reference(*[torch.from_numpy(np.ascontiguousarray(a)) for a in args]).numpy()
    assert np.isfinite(got).all()
    assert _rel_l2(got, want) < (2e-3 if float16 else 2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["auto", "lines", "block1", "smem", "global"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_merged_scan_paths_agree(variant, dtype):
    """One map small enough for the warp and line kernels, delta and B, C inside wider tensors, at batch 3: read in
    place by the warp kernel (auto) and the line kernel, copied out first for the block, shared-memory and global
    kernels; all match the float64 reference of the same values."""
    gpu_ready()
    from vmamba_export import cuda_kernel

    batch, di, h, w = 3, 8, 14, 14
    u, delta, a_logs, b_mat, c_mat, d, bias = _inputs(batch, di, 1, h, w, dtype)
    g = torch.Generator().manual_seed(4)
    wide_delta = torch.cat(
        [delta.reshape(batch, 4 * di, h * w), torch.randn(batch, 5, h * w, generator=g).to(dtype)], 1
    )
    x = torch.cat([torch.randn(batch, 24, h * w, generator=g).to(dtype), b_mat.reshape(batch, 4, h * w)], 1)
    x = torch.cat([x, c_mat.reshape(batch, 4, h * w)], 1)
    ref = selective_scan_reference(*[t.double() for t in (u, delta, a_logs, b_mat, c_mat, d, bias)]).numpy()
    cuda_kernel.apply_variant(variant)
    try:
        tensors = [t.contiguous().cuda() for t in (u, wide_delta, x, a_logs, d, bias)]
        y = cuda_kernel.selective_scan_2d_merged_cuda(*tensors)
        config = cuda_kernel.last_config()
    finally:
        cuda_kernel.apply_variant("auto")
    want = {"auto": "warps", "lines": "lines", "block1": "block", "smem": "smem", "global": "global"}[variant]
    assert config.startswith(want), config
    out = y.double().cpu().numpy()
    assert np.isfinite(out).all()
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < (2e-5 if dtype == torch.float32 else 3e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("width", [2, 48, 96, 130, 192, 384, 768, 1000, 1536, 2048])
@pytest.mark.parametrize("float16", [False, True])
def test_cuda_layer_norm_op_matches_torch(width, float16):
    """ai.vmamba::LastAxisLayerNorm on the CUDA provider against float64 layer_norm: every register budget of the
    kernel (widths up to 2048), rows that do not fill the last block (3 x 37)."""
    gpu_ready()
    from vmamba_export.lowering.cuda_graph import LAYER_NORM_OP

    feeds = _random_inputs({"x": [3, 37, width], "scale": [width], "bias": [width]}, float16, width)
    (y,) = _one_node_cuda_run(LAYER_NORM_OP, feeds, ["y"], float16, epsilon=1e-6)
    x, scale, bias = (torch.from_numpy(feeds[n]) for n in ("x", "scale", "bias"))
    ref = torch.nn.functional.layer_norm(x, (width,), scale, bias, 1e-6).numpy()
    assert _rel_l2(y, ref) < (2e-3 if float16 else 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("width", [2, 96, 130, 384, 768, 2048])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("float16", [False, True])
def test_cuda_residual_layer_norm_op_matches_torch(width, with_bias, float16):
    """ai.vmamba::ResidualLayerNorm: S = X (+ X_bias) + R and Y = LayerNorm(S), both outputs, against float64 (the
    sums rounded to the op's type as the kernel rounds them, i.e. as the unfused graph's Adds would)."""
    gpu_ready()
    from vmamba_export.lowering.cuda_fusions import RESIDUAL_NORM_OP

    shapes = {"x": [2, 29, width], "r": [2, 29, width], "scale": [width], "bias": [width]}
    if with_bias:
        shapes["x_bias"] = [width]
    feeds = _random_inputs(shapes, float16, width + 7 * with_bias)
    y, s = _one_node_cuda_run(RESIDUAL_NORM_OP, feeds, ["y", "s"], float16, epsilon=1e-5)
    round_to = np.float16 if float16 else np.float32
    x = (feeds["x"] + feeds["x_bias"]).astype(round_to).astype(np.float64) if with_bias else feeds["x"]
    ref_s = (x + feeds["r"]).astype(round_to).astype(np.float64)
    scale, bias = torch.from_numpy(feeds["scale"]), torch.from_numpy(feeds["bias"])
    ref_y = torch.nn.functional.layer_norm(torch.from_numpy(ref_s), (width,), scale, bias, 1e-5).numpy()
    np.testing.assert_array_equal(s, ref_s)
    assert _rel_l2(y, ref_y) < (2e-3 if float16 else 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape",
    [
        *[(2, 96, 7, 9), (1, 6, 56, 56), (3, 384, 14, 14), (1, 768, 7, 7), (2, 2048, 3, 5)],  # rows kernel
        *[(2, 48, 96, 97), (1, 384, 130, 128), (1, 768, 128, 130), (1, 2048, 128, 130)],  # staged, 32 to 4 a block
    ],
)
@pytest.mark.parametrize("float16", [False, True])
def test_cuda_transpose_layer_norm_op_matches_torch(shape, float16):
    """ai.vmamba::TransposeLayerNorm: (N, C, H, W) in, LayerNorm over C of each position out as (N, H, W, C); both
    kernels (small maps: a row group per position; larger ones: staged tiles of 32, 16, 8 or 4 positions by C) and
    position counts that leave the last tile partial."""
    gpu_ready()
    from vmamba_export.lowering.cuda_fusions import TRANSPOSE_NORM_OP

    channels = shape[1]
    feeds = _random_inputs({"x": list(shape), "scale": [channels], "bias": [channels]}, float16, channels)
    (y,) = _one_node_cuda_run(TRANSPOSE_NORM_OP, feeds, ["y"], float16, epsilon=1e-6)
    x = torch.from_numpy(feeds["x"]).permute(0, 2, 3, 1)
    ref = torch.nn.functional.layer_norm(
        x, (channels,), torch.from_numpy(feeds["scale"]), torch.from_numpy(feeds["bias"]), 1e-6
    ).numpy()
    assert y.shape == ref.shape
    assert _rel_l2(y, ref) < (2e-3 if float16 else 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape",
    [
        *[(1, 56, 56, 96), (2, 7, 9, 34), (3, 5, 40, 8), (1, 1, 1, 64), (2, 14, 14, 384), (1, 6, 3, 2)],  # 1-row tiles
        (16, 61, 64, 64),  # enough blocks for 4-row tiles, the last one partial
    ],
)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("float16", [False, True])
def test_cuda_depthwise_conv_silu_op_matches_torch(shape, with_bias, float16):
    """ai.vmamba::DepthwiseConvSiLU: channels-last (N, H, W, C) in, SiLU(depthwise 3 x 3 convolution, padding 1) out
    channel-first, against float64 torch; tiles of one and of four rows, partial channel, column and row tiles, a 1 x 1
    map (padding only)."""
    gpu_ready()
    from vmamba_export.lowering.cuda_fusions import DEPTHWISE_SILU_OP

    channels = shape[3]
    shapes = {"x": list(shape), "w": [channels, 1, 3, 3]}
    if with_bias:
        shapes["b"] = [channels]
    feeds = _random_inputs(shapes, float16, channels + with_bias)
    feeds["w"] = (feeds["w"] / 3).astype(np.float16 if float16 else np.float32).astype(np.float64)  # SiLU range
    (y,) = _one_node_cuda_run(DEPTHWISE_SILU_OP, feeds, ["y"], float16)
    x = torch.from_numpy(feeds["x"]).permute(0, 3, 1, 2)
    bias = torch.from_numpy(feeds["b"]) if with_bias else None
    conv = torch.nn.functional.conv2d(x, torch.from_numpy(feeds["w"]), bias, padding=1, groups=channels)
    ref = torch.nn.functional.silu(conv).numpy()
    assert y.shape == ref.shape
    assert _rel_l2(y, ref) < (2e-3 if float16 else 1e-6)


@pytest.mark.gpu
# (batch, Di, R, N, H, W): vmamba_tiny_s1l8's four stages at 224, batch 1 (row groups of 4 at the small maps, partial
# last tiles, up to 16 warps sharing a channel sum) and stage 1 at batch 2 and 6 (two positions a lane from 16 K
# positions on); d_state 16 rows; a map smaller than one tile; Di not a multiple of 4.
@pytest.mark.parametrize(
    "shape",
    [
        (1, 96, 6, 1, 56, 56),
        (1, 192, 12, 1, 28, 28),
        (1, 384, 24, 1, 14, 14),
        (1, 768, 48, 1, 7, 7),
        (2, 96, 6, 1, 56, 56),
        (6, 96, 6, 1, 56, 56),
        (2, 64, 4, 16, 9, 11),
        (3, 40, 3, 1, 1, 2),
        (2, 38, 5, 1, 6, 10),
    ],
)
@pytest.mark.parametrize("float16", [False, True])
def test_cuda_scan_projections_op_matches_reference(shape, float16):
    """ai.vmamba::ScanProjections: delta, B and C of the scan from u, W_x and dt_weight, against float64 numpy (x =
    W_x u, delta = dt_weight x_dt per direction), through ONNX Runtime (shape inference and the op's checks too)."""
    gpu_ready()
    from vmamba_export.lowering.cuda_fusions import PROJECTIONS_OP

    batch, di, rank, n, h, w = shape
    feeds = _random_inputs({"u": [batch, di, h, w], "w_x": [4 * rank + 8 * n, di], "dt": [4, di, rank]}, float16, 7)
    np_type = np.float16 if float16 else np.float32
    feeds["w_x"] = (feeds["w_x"] / di**0.5).astype(np_type).astype(np.float64)
    feeds["dt"] = (feeds["dt"] / rank**0.5).astype(np_type).astype(np.float64)
    delta, b, c = _one_node_cuda_run(PROJECTIONS_OP, feeds, ["delta", "B", "C"], float16)
    x = np.einsum("jc,bcp->bjp", feeds["w_x"], feeds["u"].reshape(batch, di, h * w))
    x_dt = x[:, : 4 * rank].reshape(batch, 4, rank, h * w)
    want = {
        "delta": np.einsum("kcr,bkrp->bkcp", feeds["dt"], x_dt).reshape(batch, 4, di, h, w),
        "B": x[:, 4 * rank : 4 * rank + 4 * n].reshape(batch, 4, n, h, w),
        "C": x[:, 4 * rank + 4 * n :].reshape(batch, 4, n, h, w),
    }
    for name, got in zip(want, (delta, b, c), strict=True):
        assert got.shape == want[name].shape, name
        assert _rel_l2(got, want[name]) < (1e-3 if float16 else 1e-6), name


@pytest.mark.gpu
# (batch, H, W, Di, R, N, tile): vmamba_tiny_s1l8's four stages at 224 and batch 1 with the automatic tile (32, 32, 8,
# 2), stage 1 at batch 2, every forced tile on a map whose tiles cross rows and end partial, d_state 2 with a bias,
# a 1 x 1 map
@pytest.mark.parametrize(
    "shape",
    [(1, 56, 56, 96, 6, 1, 0), (1, 28, 28, 192, 12, 1, 0), (1, 14, 14, 384, 24, 1, 0), (1, 7, 7, 768, 48, 1, 0),
     (2, 56, 56, 96, 6, 1, 0), *[(1, 9, 13, 64, 4, 1, t) for t in (1, 2, 4, 8, 16, 32)], (2, 5, 6, 38, 3, 2, 0),
     (1, 1, 1, 64, 4, 1, 0)],
)  # fmt: skip
@pytest.mark.parametrize("float16", [False, True])
def test_cuda_depthwise_conv_projections_op_matches_reference(shape, float16):
    """ai.vmamba::DepthwiseConvProjections: u, delta, B and C against float64 numpy (tests/test_cuda_emulated.py's
    reference: the depthwise convolution, SiLU, u rounded to the op's type, x = W_x u, delta = dt_weight x_dt per
    direction), through ONNX Runtime, with the tile forced through the launcher where the shape names one."""
    gpu_ready()
    from test_cuda_emulated import conv_projections_reference

    from vmamba_export import cuda_kernel
    from vmamba_export.lowering.cuda_fusions import CONV_PROJECTIONS_OP

    batch, h, w, di, rank, n, tile = shape
    shapes = {"x": [batch, h, w, di], "w": [di, 1, 3, 3], "w_x": [4 * rank + 8 * n, di], "dt": [4, di, rank]}
    if n == 2:
        shapes["bias"] = [di]
    feeds = _random_inputs(shapes, float16, 13)
    np_type = np.float16 if float16 else np.float32
    for key, scale in (("w", 3), ("w_x", di**0.5), ("dt", rank**0.5), ("bias", 3)):
        if key in feeds:
            feeds[key] = (feeds[key] / scale).astype(np_type).astype(np.float64)
    assert cuda_kernel.set_conv_projections_tile(tile) == tile  # ORT loads the same library: the setting holds there
    try:
        got = _one_node_cuda_run(CONV_PROJECTIONS_OP, feeds, ["u", "delta", "B", "C"], float16)
    finally:
        cuda_kernel.set_conv_projections_tile(0)
    want = conv_projections_reference(
        feeds["x"], feeds["w"], feeds.get("bias"), feeds["w_x"], feeds["dt"], np_type=np_type
    )
    for (name, ref), out in zip(want.items(), got, strict=True):
        assert out.shape == ref.shape, name
        assert _rel_l2(out, ref) < (1e-3 if float16 else 1e-6), name


@pytest.mark.gpu
# (batch, C, M, H, W): a packed scan's X at each stage of vmamba_tiny at batch 1 (M = 4 R + 8, R = C / 16), batch 4
# with two positions a lane, odd channel and row counts with a partial tile
@pytest.mark.parametrize(
    "shape",
    [(1, 96, 32, 56, 56), (1, 192, 56, 28, 28), (1, 384, 104, 14, 14), (1, 768, 200, 7, 7), (4, 96, 32, 56, 56),
     (2, 37, 9, 5, 7)],
)  # fmt: skip
@pytest.mark.parametrize("float16", [False, True])
def test_cuda_narrow_pointwise_conv_op_matches_reference(shape, float16):
    """ai.vmamba::NarrowPointwiseConv: the bias-free 1 x 1 convolution against float64 numpy, through ONNX Runtime."""
    gpu_ready()
    from vmamba_export.lowering.cuda_fusions import NARROW_CONV_OP

    batch, channels, rows, h, w = shape
    feeds = _random_inputs({"X": [batch, channels, h, w], "W": [rows, channels, 1, 1]}, float16, 11)
    feeds["W"] = (feeds["W"] / channels**0.5).astype(np.float16 if float16 else np.float32).astype(np.float64)
    (got,) = _one_node_cuda_run(NARROW_CONV_OP, feeds, ["Y"], float16)
    want = np.einsum("jc,bchw->bjhw", feeds["W"][:, :, 0, 0], feeds["X"])
    assert got.shape == want.shape
    assert _rel_l2(got, want) < (1e-3 if float16 else 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize(
    "name",
    [
        "vmamba_test_v0",
        "vmamba_test_v2",
        "vmamba_test_v2-projected",
        "vmamba_test_v2-conv-projected",
        "vmamba_test_v2-packed",
        "vmamba_test_v2-narrow",
        "vmamba_test_v2-merged",
        "vmamba_test_v2-folded",
    ],
)
def test_cuda_artifact_parity(tmp_path, precision, name):
    """The artifact against the PyTorch model; "-projected", "-conv-projected", "-packed", "-merged", "-folded":
    exported with that cuda_fusions setting (ScanProjections, DepthwiseConvProjections, SelectiveScan2DPacked,
    SelectiveScan2DMerged)."""
    gpu_ready()
    from vmamba_export import load
    from vmamba_export.exporter import export_artifact
    from vmamba_export.lowering import ExportOptions
    from vmamba_export.scan.op import torch_scan
    from vmamba_export.validate import parity_metrics, threshold_failures

    name, _, fusions = name.partition("-")
    source = resolve_model(name, random_weights=True, seed=0)
    folder = tmp_path / precision
    options = ExportOptions(extra={"cuda_fusions": fusions} if fusions else {})
    export_artifact(source, get_target("cuda-onnxruntime"), folder, precision=precision, max_size=256, options=options)
    predictor = load(folder)
    if fusions:
        ops = {"projected": "ScanProjections", "packed": "SelectiveScan2DPacked", "narrow": "NarrowPointwiseConv"}
        op = {**ops, "conv-projected": "DepthwiseConvProjections"}.get(fusions, "SelectiveScan2DMerged")
        assert predictor.manifest["lowering"]["fusions"]["fused"][op] > 0
    assert predictor.backend.session.get_providers()[0] == "CUDAExecutionProvider"
    lowering = predictor.manifest["lowering"]
    assert lowering["residual_layout"] == "channels-last" and lowering["layer_norms"]["replaced"] > 0
    x = np.random.default_rng(0).standard_normal((4, 3, 64, 64), dtype=np.float32)
    model = resolve_model(name, random_weights=True, seed=0).model.eval().set_scan(torch_scan)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    metrics = parity_metrics(predictor(x), ref)
    assert not threshold_failures(metrics, predictor.manifest["thresholds"]), metrics


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("fusions", ["projected", "conv-projected", "narrow"])
def test_cuda_batch1_graph_replays_for_batch_1_only(tmp_path, precision, fusions):
    """An artifact with a batch-1 graph (projected: the default; narrow): batch-1 inputs replay model.batch1.onnx,
    batch 2 the main graph, and both keep parity with the PyTorch model through graphs, also when the shape changes
    back and forth."""
    gpu_ready()
    from vmamba_export import load
    from vmamba_export.exporter import export_artifact
    from vmamba_export.lowering import ExportOptions
    from vmamba_export.scan.op import torch_scan
    from vmamba_export.validate import parity_metrics, threshold_failures

    source = resolve_model("vmamba_test_v2", random_weights=True, seed=0)
    folder = tmp_path / precision
    options = ExportOptions(extra={} if fusions == "projected" else {"cuda_batch1_fusions": fusions})
    export_artifact(source, get_target("cuda-onnxruntime"), folder, precision=precision, max_size=256, options=options)
    predictor = load(folder)
    assert predictor.manifest["lowering"]["batch1_fusions"]["scan_projections"] == fusions
    backend = predictor.backend
    assert backend.graph_model_path((1, 3, 64, 64)) == folder / "model.batch1.onnx"
    assert backend.graph_model_path((2, 3, 64, 64)) == folder / "model.onnx"
    model = resolve_model("vmamba_test_v2", random_weights=True, seed=0).model.eval().set_scan(torch_scan)
    rng = np.random.default_rng(0)
    for batch in (1, 1, 2, 2, 1):  # second call of a shape on: through its graph
        x = rng.standard_normal((batch, 3, 64, 64), dtype=np.float32)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        metrics = parity_metrics(predictor(x), ref)
        assert not threshold_failures(metrics, predictor.manifest["thresholds"]), (batch, metrics)
    assert sorted(backend.graphs.cached_shapes) == [(1, 3, 64, 64), (2, 3, 64, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("name", ["vmamba_test_v0", "vmamba_test_v2"])
def test_cuda_graph_path_matches_plain_runs_across_shape_changes(tmp_path, precision, name):
    """The CUDA-graph path (one captured graph per shape) gives what plain ONNX Runtime runs give (fp16: to fp16
    rounding, as the graph's session is specialised to its shape), also when the input shape changes and comes back
    (a stale graph would replay the old shape's buffers), and the d_state-16 scan (cudaMallocAsync scratch) captures
    too (vmamba_test_v0)."""
    gpu_ready()
    from vmamba_export import load
    from vmamba_export.exporter import export_artifact
    from vmamba_export.lowering import ExportOptions

    source = resolve_model(name, random_weights=True, seed=0)
    folder = tmp_path / precision
    # one graph for every shape, so graphed and plain runs compute the same graph (the batch-1 graph's parity:
    # test_cuda_batch1_graph_replays_for_batch_1_only)
    options = ExportOptions(extra={"cuda_batch1_fusions": "none"})
    export_artifact(source, get_target("cuda-onnxruntime"), folder, precision=precision, max_size=256, options=options)
    plain, graphed = load(folder, cuda_graph=False), load(folder)
    assert plain.backend.graphs is None and graphed.backend.graphs is not None
    rng = np.random.default_rng(0)
    for shape in [(1, 3, 64, 64), (4, 3, 64, 64), (1, 3, 48, 80), (1, 3, 64, 64), (2, 3, 96, 96), (1, 3, 48, 80)]:
        for _ in range(3):  # ORT captures after its warm-up runs: compare the capture and the replays
            x = rng.standard_normal(shape, dtype=np.float32)
            want, got = plain(x), graphed(x)
            assert got.shape == want.shape
            if precision == "fp32":
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
            else:  # two fp16 graphs: the graph's session is specialised to its shape, so ORT may fuse differently
                assert np.abs(got - want).max() <= 5e-3 * np.abs(want).max(), shape
    assert len(graphed.backend.graphs.cached_shapes) == 4  # LRU: the four most recent shapes


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [True, False])
def test_device_resident_batches_stay_on_the_gpu(tmp_path, cuda_graph):
    gpu_ready()
    from vmamba_export import load
    from vmamba_export.exporter import export_artifact

    source = resolve_model("vmamba_test_v2", random_weights=True, seed=0)
    folder = tmp_path / "fp16"
    export_artifact(source, get_target("cuda-onnxruntime"), folder, precision="fp16", max_size=256)
    predictor = load(folder, cuda_graph=cuda_graph)
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64), dtype=np.float32)
    # The second call at a shape is the first through its graph (the first runs the plain session): the reference
    # comes from the same path as the device calls below, so they must agree to float32 rounding.
    host = [predictor(x) for _ in range(2)][-1]
    for _ in range(3):
        out = predictor(torch.from_numpy(x).cuda())
        logits = torch.from_dlpack(out)
        assert logits.is_cuda and tuple(logits.shape) == host.shape
        np.testing.assert_allclose(logits.cpu().numpy(), host, rtol=1e-5, atol=1e-5)
    kept = predictor(torch.from_numpy(x).cuda())
    predictor(torch.zeros((2, 3, 64, 64), device="cuda"))
    # A result is not overwritten by the next call (the graph's own output buffer is).
    np.testing.assert_allclose(torch.from_dlpack(kept).cpu().numpy(), host, rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="float32"):
        predictor(torch.zeros((2, 3, 64, 64), device="cuda", dtype=torch.float16))


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def _as_list(out) -> list:
    return list(out.values()) if isinstance(out, dict) else [out]


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("task", ["segmentation", "backbone"])
def test_cuda_graph_path_on_dense_artifacts(tmp_path, task, precision):
    """Dense artifacts through CUDA graphs: the bundled segmenter (per-pixel logits at the input size) and its
    backbone (`--task backbone`: four maps at strides 4..32). A dense artifact replays graphs for device-resident
    calls only (its numpy calls run the plain session: copying a large output out of a graph's buffer costs more than
    the graph saves). Each output buffer takes its shape from the probe run, also at an odd size (193 x 161, v2's
    ceil(side / stride) maps); device calls through graphs, numpy calls and the artifact without graphs agree, fp32
    within rel L2 1e-5 of PyTorch, across shape changes and back; a result is not overwritten by the next call."""
    gpu_ready()
    from vmamba_export import load
    from vmamba_export.exporter import export_artifact
    from vmamba_export.references import torch_reference

    def on_host(out) -> list[np.ndarray]:  # a device call's output(s), copied to the host
        values = _as_list(out) if not isinstance(out, list) else out
        return [torch.from_dlpack(v).cpu().numpy() for v in values]

    source = resolve_model("vmamba_shapes_seg", task=task)
    folder = tmp_path / precision
    export_artifact(source, get_target("cuda-onnxruntime"), folder, precision=precision, max_size=256)
    plain, graphed = load(folder, cuda_graph=False), load(folder)
    assert plain.backend.graphs is None and graphed.backend.graphs is not None
    assert "cuda_graphs" not in graphed.manifest["lowering"]
    rng = np.random.default_rng(0)
    shapes = [(1, 3, 64, 64), (1, 3, 193, 161), (2, 3, 64, 96), (1, 3, 64, 64), (1, 3, 193, 161)]
    for shape in shapes:
        for _ in range(3):  # plain first call, then the probe and ORT's warm-up, capture, replays
            x = rng.standard_normal(shape, dtype=np.float32)
            want, numpy_out = _as_list(plain(x)), _as_list(graphed(x))
            got = on_host(graphed(torch.from_numpy(x).cuda()))
            refs = torch_reference(source.model, x, len(x))
            assert len(got) == len(want) == len(numpy_out) == len(refs) == (4 if task == "backbone" else 1)
            for g, n, w, r in zip(got, numpy_out, want, refs, strict=True):
                assert g.shape == n.shape == w.shape == r.shape, (shape, g.shape, r.shape)
                for out in (g, n):  # device calls (graphs from a shape's second call) and numpy calls (plain)
                    if precision == "fp32":
                        assert _rel_l2(out, r) <= 1e-5 and _rel_l2(w, r) <= 1e-5, (shape, _rel_l2(out, r))
                    else:
                        assert _rel_l2(out, w) <= 5e-3 and _rel_l2(out, r) <= 1e-2, (shape, _rel_l2(out, w))
    backend = graphed.backend
    assert backend.graphs is not None, backend.cuda_graph_note  # captured (run 19: also the UperNet head)
    assert sorted(backend.graphs.cached_shapes) == sorted(set(shapes))
    assert "device-resident calls only" in backend.cuda_graph_note
    x = rng.standard_normal((1, 3, 193, 161), dtype=np.float32)
    x_device = torch.from_numpy(x).cuda()
    host = on_host(graphed(x_device))
    kept = graphed(x_device)
    graphed(torch.zeros((1, 3, 193, 161), device="cuda"))  # rewrites the graph's own buffers, not `kept`
    for got, want in zip(on_host(kept), host, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
