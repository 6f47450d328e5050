"""cpu-openvino end to end on the small configs: extension op, IR artifacts in fp32 and bf16, loader, parity, errors.

The reference is the PyTorch model with the scan in plain torch (scan/op.py torch_scan), which shares no code with
the C++ kernel the extension runs.
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch

ov = pytest.importorskip("openvino")

from vmamba_export import load  # noqa: E402
from vmamba_export.artifact import read_manifest  # noqa: E402
from vmamba_export.errors import ArtifactError, TargetUnavailableError  # noqa: E402
from vmamba_export.exporter import export_artifact  # noqa: E402
from vmamba_export.kernels_paths import openvino_extension_path  # noqa: E402
from vmamba_export.model_source import resolve_model  # noqa: E402
from vmamba_export.scan.op import torch_scan  # noqa: E402
from vmamba_export.targets import get_target  # noqa: E402
from vmamba_export.validate import validate_artifact  # noqa: E402

pytestmark = [
    pytest.mark.skipif(
        openvino_extension_path() is None, reason="OpenVINO extension not built (python -m vmamba_export.build_kernels)"
    ),
    # On CPUs without AVX512-BF16/AMX the bf16 artifacts still run (emulated, slowly) and the backend warns so.
    pytest.mark.filterwarnings("ignore:this CPU has no native bf16:RuntimeWarning"),
]

MODELS = ("vmamba_test_v2", "vmamba_test_v0")  # d_state 1 and 16
PRECISIONS = ("fp32", "bf16")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict:
    """One artifact per (small config, precision), exported once for the module."""
    root = tmp_path_factory.mktemp("ov-artifacts")
    built = {}
    for name in MODELS:
        source = resolve_model(name, random_weights=True, seed=1)
        for precision in PRECISIONS:
            folder = root / f"{name}-{precision}"
            export_artifact(source, get_target("cpu-openvino"), folder, precision=precision, max_size=256)
            built[(name, precision)] = folder
    return built


def torch_logits(name: str, x: np.ndarray) -> np.ndarray:
    model = resolve_model(name, random_weights=True, seed=1).model.set_scan(torch_scan)
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def num_blocks(name: str) -> int:
    return sum(resolve_model(name, random_weights=True).model.config.depths)


@pytest.mark.parametrize("name", MODELS)
def test_ir_has_one_scan_op_per_block(artifacts, name):
    layers = ET.parse(artifacts[(name, "fp32")] / "model.xml").getroot().iter("layer")
    types = [(layer.get("type"), layer.get("version")) for layer in layers]
    assert types.count(("SelectiveScan2D", "vmamba")) == num_blocks(name)
    assert not {"Loop", "TensorIterator", "Scan"} & {t for t, _ in types}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_channel_first_layer_norms_run_without_transposes(artifacts, precision):
    """v2 models export LayerNorm2d in its in-place form for OpenVINO: the compiled graph has no Transpose pair per
    LayerNorm2d (the permuted form gave two each), and each norm's variance, normalisation and affine run as one
    NormalizeL2 node (LayerNorm2d.channel_axis_norm; the mean/variance form gave two Reduces and two Subgraphs)."""
    from vmamba_export.lowering.openvino_ir import PRECISION_HINTS
    from vmamba_export.models.vmamba import LayerNorm2d
    from vmamba_export.runtime.openvino_backend import compile_ir

    model = resolve_model("vmamba_test_v2", random_weights=True).model
    norms = sum(isinstance(m, LayerNorm2d) for m in model.modules())
    folder = artifacts[("vmamba_test_v2", precision)]
    compiled = compile_ir(folder / "model.xml", openvino_extension_path(), PRECISION_HINTS[precision], 1)
    types = [op.get_rt_info()["layerType"].astype(str) for op in compiled.get_runtime_model().get_ops()]
    assert norms > 0 and types.count("Transpose") < norms / 2
    assert types.count("NormalizeL2") == norms


def test_layer_norm_2d_forms_agree():
    from vmamba_export.models.vmamba import LayerNorm2d, channel_axis_layer_norms

    norm = LayerNorm2d(12).double()
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 12, 5, 7, dtype=torch.float64) * 3 + 1
    permuted = norm(x)
    with channel_axis_layer_norms(norm):
        in_place = norm(x)
    assert not norm.channel_axis_stats  # restored
    torch.testing.assert_close(in_place, permuted, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("shape", [(1, 3, 224, 224), (3, 3, 45, 37), (2, 3, 64, 100)])
def test_fp32_matches_pytorch_at_dynamic_batch_and_size(artifacts, name, shape):
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    out = load(artifacts[(name, "fp32")], threads=2)(x)
    assert out.shape == (shape[0], 10) and out.dtype == np.float32
    assert rel_l2(out, torch_logits(name, x)) <= 1e-5


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("shape", [(2, 3, 224, 224), (3, 3, 45, 37)])
def test_bf16_is_close_and_really_bf16(artifacts, name, shape):
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    ref = torch_logits(name, x)
    predictor = load(artifacts[(name, "bf16")], threads=2)
    out = predictor(x)
    assert min_cosine(out, ref) >= 0.999
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.99
    if predictor.backend.runs_in == "bf16":
        # bf16 arithmetic must show (8-bit mantissa): identical-to-fp32 output would mean the hint was ignored.
        assert rel_l2(out, ref) > 1e-4
    else:  # a CPU without AVX-512 or AMX: the plugin has no bf16 kernels and runs the artifact in f32, as it says
        assert predictor.backend.runs_in == "f32" and rel_l2(out, ref) <= 1e-5


def test_scan_op_runs_on_bf16_data_under_bf16_inference(artifacts):
    """In a bf16 artifact the CPU plugin runs the extension op (a generic 'Reference' node) on bf16 data, so no f32
    conversion surrounds it, while convolutions and matmuls run in bf16; in an fp32 artifact everything stays f32.
    Either way B and C reach the op flattened over the directions (no Reshape to 5-D before it), and the dt
    projection is fused into it: input 1 is the projection's (B, 4 * dt_rank, H, W) input, input 8 its weights."""
    config = resolve_model("vmamba_test_v2", random_weights=True).model.config
    for precision in ("bf16", "fp32"):
        folder = artifacts[("vmamba_test_v2", precision)]
        predictor = load(folder)
        scan_precision = predictor.backend.runs_in  # f32 for bf16 too on a CPU without bf16 kernels (no AVX-512/AMX)
        layers = list(ET.parse(folder / "model.xml").getroot().iter("layer"))
        scans = [layer for layer in layers if layer.get("type") == "SelectiveScan2D"]
        runtime: dict[str, tuple[str, str]] = {}
        for op in predictor.backend.compiled.get_runtime_model().get_ops():
            info = op.get_rt_info()
            runtime[op.get_friendly_name()] = (info["layerType"].astype(str), info["runtimePrecision"].astype(str))
        assert len(scans) == num_blocks("vmamba_test_v2")
        assert {runtime[layer.get("name")] for layer in scans} == {("Reference", scan_precision)}
        for layer in scans:
            ports = layer.find("input").findall("port")
            assert [len(port.findall("dim")) for port in ports] == [4, 4, 2, 4, 4, 1, 1, 3]
            precisions = [port.get("precision") for port in ports]
            assert [precisions[i] for i in (2, 5, 6, 7)] == ["FP32"] * 4  # parameters stay f32
            assert {precisions[i] for i in (0, 1, 3, 4)} == {"BF16" if precision == "bf16" else "FP32"}
            d_inner, rank = (int(dim.text) for dim in ports[7].findall("dim")[1:])
            assert (d_inner, rank) in set(zip(config.d_inner, config.dt_rank, strict=True))
            assert int(ports[1].findall("dim")[1].text) == 4 * rank
        if scan_precision == "bf16":
            kinds = set(runtime.values())
            assert ("Convolution", "bf16") in kinds or ("FullyConnected", "bf16") in kinds


def _one_scan_node_ir(shapes: list[list[int]], bf16: bool, folder: Path):
    """One SelectiveScan2D node converted from ONNX with the extension and rewired by the lowering's own
    `connect_scan_ops`: f32 model inputs and output, and with `bf16` the Converts that make the op itself run on
    bf16 data (u, delta, B, C and y)."""
    from vmamba_export.lowering.onnx_export import one_node_scan_model
    from vmamba_export.lowering.openvino_ir import connect_scan_ops

    path = folder / "scan.onnx"
    path.write_bytes(one_node_scan_model(shapes=shapes).SerializeToString())
    converted = ov.convert_model(str(path), extension=str(openvino_extension_path()))
    connect_scan_ops(converted, bf16=bf16)
    core = ov.Core()
    core.add_extension(str(openvino_extension_path()))
    return core.compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 2})


@pytest.mark.parametrize(
    "case",
    [
        (1, 16, 1, 1, 1, 0.0),
        (2, 17, 1, 5, 7, 0.0),
        (1, 3, 1, 56, 56, 0.0),
        (2, 31, 16, 7, 4, 2.0),
        (1, 20, 16, 6, 9, -3.0),
    ],
    ids=lambda c: "b{}_di{}_n{}_{}x{}_dt{:+g}".format(*c),
)
@pytest.mark.parametrize("flat", [False, True], ids=["5d", "flattened"])
def test_extension_bf16_data_matches_f32_kernel_rounded(case, flat, tmp_path):
    """The bf16 path reads bf16 inputs exactly (widened) and rounds y to nearest even: on bf16-representable inputs
    its y is bit for bit the f32 kernel's y rounded to bf16, and within bf16 rounding of the float64 reference."""
    from vmamba_export.scan import selective_scan_reference

    b, di, n, h, w, shift = case
    g = torch.Generator().manual_seed(3)
    args = [
        torch.randn(b, di, h, w, generator=g),
        torch.randn(b, 4, di, h, w, generator=g) + shift,
        torch.randn(4 * di, n, generator=g) * 0.5,
        torch.randn(b, 4, n, h, w, generator=g),
        torch.randn(b, 4, n, h, w, generator=g),
        torch.randn(4 * di, generator=g),
        torch.randn(4 * di, generator=g) * 0.1,
    ]
    for i in (0, 1, 3, 4):  # make the data bf16-representable, so both paths see the same numbers
        args[i] = args[i].to(torch.bfloat16).float()
    feeds = [a.numpy() for a in args]
    if flat:
        for i in (1, 3, 4):
            feeds[i] = feeds[i].reshape(b, -1, h, w)
    shapes = [list(f.shape) for f in feeds]
    compiled16 = _one_scan_node_ir(shapes, True, tmp_path)
    scan_runs_in = {
        op.get_rt_info()["runtimePrecision"].astype(str)
        for op in compiled16.get_runtime_model().get_ops()
        if op.get_rt_info()["layerType"].astype(str) == "Reference"
    }
    if scan_runs_in != {"bf16"}:
        pytest.skip(f"this CPU's OpenVINO plugin has no bf16 kernels (no AVX-512/AMX): the op runs in {scan_runs_in}")
    y16 = compiled16(feeds)[0]
    y32 = _one_scan_node_ir(shapes, False, tmp_path)(feeds)[0]
    rounded = torch.from_numpy(y32).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(y16, rounded)
    ref = selective_scan_reference(*args).numpy()
    assert rel_l2(y16, ref) <= 4e-3  # bf16 keeps 8 mantissa bits: rounding is at most 2^-9 relative
    assert rel_l2(y32, ref) <= 1e-5


def test_torch_export_program_converts_with_the_extension():
    """The extension also maps the torch op (ExportedProgram name vmamba.selective_scan_2d.default)."""
    from vmamba_export.lowering.onnx_export import dynamic_input_spec

    model = resolve_model("vmamba_test_v2", random_weights=True, seed=1).model.eval()
    dims = dynamic_input_spec(model, 256)
    shapes = {"x": {0: torch.export.Dim("b", **dims["batch"]), 2: torch.export.Dim("h", **dims["height"])}}
    shapes["x"][3] = torch.export.Dim("w", **dims["width"])
    program = torch.export.export(model, (torch.randn(2, 3, 64, 64),), dynamic_shapes=shapes)
    converted = ov.convert_model(program, extension=str(openvino_extension_path()))
    assert sum(op.get_type_name() == "SelectiveScan2D" for op in converted.get_ops()) == num_blocks("vmamba_test_v2")
    core = ov.Core()
    core.add_extension(str(openvino_extension_path()))
    compiled = core.compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    x = np.random.default_rng(2).standard_normal((2, 3, 45, 37), dtype=np.float32)
    assert rel_l2(compiled(x)[0], torch_logits("vmamba_test_v2", x)) <= 1e-5


@pytest.mark.parametrize("precision", PRECISIONS)
def test_validate_passes_and_is_recorded(artifacts, precision, tmp_path):
    folder = tmp_path / "a"
    shutil.copytree(artifacts[("vmamba_test_v2", precision)], folder)
    result = validate_artifact(folder, images="builtin", sizes=[224, 160], threads=2, show_progress=False, record=True)
    assert result["status"] == "pass", result
    for run in result["runs"]:
        if precision == "fp32":
            assert run["rel_l2"] <= 1e-5 and run["top1_agreement"] == 1.0
        else:
            assert run["cosine_min"] >= 0.999
    assert read_manifest(folder)["validation"]["status"] == "pass"
    load(folder)  # the rewritten manifest leaves the payload hashes valid


def test_manifest_records_ir_extension_version_and_hint(artifacts):
    for precision, hint in (("fp32", "f32"), ("bf16", "bf16")):
        folder = artifacts[("vmamba_test_v0", precision)]
        m = json.loads((folder / "manifest.json").read_text())
        entry = m["entry"]
        assert entry["model"] == "model.xml" and entry["weights"] == "model.bin"
        assert entry["inference_precision"] == hint
        assert entry["openvino_version"] == m["runtime"]["version"] == m["toolchain"]["openvino"]
        assert {entry["model"], entry["weights"], entry["extension_library"]} <= set(m["files"])
        assert m["thresholds"] == get_target("cpu-openvino").thresholds_for(precision)
        assert m["lowering"]["scan_ops"] == num_blocks("vmamba_test_v0")
        # The IR carries the hint too, for a plain core.compile_model(xml).
        assert f'<INFERENCE_PRECISION_HINT value="{hint}"' in (folder / "model.xml").read_text()


def test_concurrent_calls_on_one_predictor(artifacts):
    predictor = load(artifacts[("vmamba_test_v2", "fp32")], threads=1)
    rng = np.random.default_rng(3)
    inputs = [rng.standard_normal((1 + i % 2, 3, 40 + 8 * i, 48), dtype=np.float32) for i in range(6)]
    expected = [predictor(x) for x in inputs]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(3):
                results[i] = predictor(inputs[i])
                np.testing.assert_array_equal(results[i], expected[i])
        except BaseException as exc:  # surfaced below: an assert in a thread would otherwise vanish
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert len(results) == len(inputs)


def test_version_mismatch_is_refused_naming_both(artifacts, tmp_path):
    folder = tmp_path / "a"
    shutil.copytree(artifacts[("vmamba_test_v2", "fp32")], folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["entry"]["openvino_version"] = "2025.0.0"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    installed = read_manifest(artifacts[("vmamba_test_v2", "fp32")])["entry"]["openvino_version"]
    with pytest.raises(ArtifactError, match=rf"built for OpenVINO 2025\.0\.0, but OpenVINO {installed} is installed"):
        load(folder)


def test_missing_or_broken_extension_is_refused(artifacts, tmp_path):
    folder = tmp_path / "a"
    shutil.copytree(artifacts[("vmamba_test_v2", "fp32")], folder)
    library = folder / read_manifest(folder)["entry"]["extension_library"]
    library.unlink()
    with pytest.raises(ArtifactError, match="libvmamba_openvino.so: missing"):
        load(folder)
    with pytest.raises(ArtifactError, match="cannot load the OpenVINO extension"):
        load(folder, verify=False)
    library.write_bytes(b"not a shared library")
    with pytest.raises(ArtifactError, match="cannot load the OpenVINO extension"):
        load(folder, verify=False)


def test_missing_openvino_gives_install_hint(artifacts, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(TargetUnavailableError, match="pip install openvino"):
        load(artifacts[("vmamba_test_v2", "fp32")])


def test_extension_reports_the_release_it_was_built_for():
    from importlib import metadata

    from vmamba_export.runtime.openvino_backend import extension_built_for

    assert extension_built_for(openvino_extension_path()) == metadata.version("openvino")


def test_bench_and_predict_run_on_the_artifact(artifacts, tmp_path):
    from PIL import Image

    from vmamba_export.bench import bench_artifact

    folder = tmp_path / "a"
    shutil.copytree(artifacts[("vmamba_test_v0", "bf16")], folder)
    bench = bench_artifact(folder, sizes=[64], warmup=1, runs=3, show_progress=False)
    (point,) = bench["results"]
    assert point["size"] == 64 and point["median_ms"] > 0
    image = Path(tmp_path / "img.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 90, 3), dtype=np.uint8)).save(image)
    (top,) = load(folder).predict([image], top_k=3)
    assert len(top) == 3 and top[0]["score"] >= top[1]["score"]


def test_build_skips_the_extension_without_openvino(monkeypatch):
    import importlib.util

    from vmamba_export import build_kernels

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else find_spec(name, *a)
    )
    result = build_kernels.build_openvino(
        build_kernels._scan_units(build_kernels.target_platform(None)), [], kernels_built=False, force=False
    )
    assert result == "skipped: the openvino package is not installed (pip install openvino)"


def test_extension_build_flags_come_from_the_wheels_cmake_config(tmp_path):
    """The build reads openvino::runtime's definitions, include directory and libraries from the wheel's CMake export
    files (no CMake run): checked on the installed wheel, then on a hand-written export file, then a missing one."""
    from vmamba_export import build_kernels

    toolchain = build_kernels.openvino_toolchain()
    assert "OV_THREAD=OV_THREAD_TBB_ADAPTIVE" in toolchain.definitions
    assert (toolchain.include / "openvino" / "core" / "version.hpp").is_file()
    assert [lib.name.split(".so")[0] for lib in toolchain.libraries] == ["libopenvino", "libtbb"]
    assert all(lib.is_file() for lib in toolchain.libraries)

    export = tmp_path / "Targets.cmake"
    export.write_text(
        'set_target_properties(other PROPERTIES\n  X "1"\n)\n'
        "set_target_properties(ns::lib PROPERTIES\n"
        '  INTERFACE_COMPILE_DEFINITIONS "A=1;B"\n'
        '  INTERFACE_INCLUDE_DIRECTORIES "${_IMPORT_PREFIX}/inc"\n'
        ")\n"
    )
    props = build_kernels._cmake_target_properties(export, "ns::lib", Path("/prefix"))
    assert props == {"INTERFACE_COMPILE_DEFINITIONS": "A=1;B", "INTERFACE_INCLUDE_DIRECTORIES": "/prefix/inc"}
    with pytest.raises(build_kernels.BuildError, match="defines no target ns::missing"):
        build_kernels._cmake_target_properties(export, "ns::missing", Path("/prefix"))
    with pytest.raises(build_kernels.BuildError, match="Nope.cmake"):
        build_kernels._cmake_target_properties(tmp_path / "Nope.cmake", "ns::lib", Path("/prefix"))


def test_connect_scan_ops_leaves_other_producers_alone(tmp_path):
    """The rewiring only touches what it recognises: a scan whose inputs are plain model inputs (no Reshape, no
    grouped convolution) keeps its 7 inputs and 5-D shapes; with bf16 it only gains the Converts."""
    from vmamba_export.lowering.onnx_export import one_node_scan_model
    from vmamba_export.lowering.openvino_ir import connect_scan_ops

    path = tmp_path / "scan.onnx"
    path.write_bytes(one_node_scan_model(1).SerializeToString())
    for bf16 in (False, True):
        model = ov.convert_model(str(path), extension=str(openvino_extension_path()))
        connect_scan_ops(model, bf16=bf16)
        (scan,) = [op for op in model.get_ops() if op.get_type_name() == "SelectiveScan2D"]
        assert scan.get_input_size() == 7
        assert scan.get_input_partial_shape(1).rank.get_length() == 5
        converts = [op for op in model.get_ops() if op.get_type_name() == "Convert"]
        assert len(converts) == (5 if bf16 else 0)  # u, delta, B, C to bf16 and y back
        assert scan.get_input_element_type(0) == (ov.Type.bf16 if bf16 else ov.Type.f32)
        assert scan.get_input_element_type(2) == ov.Type.f32


def test_each_input_shape_gets_a_static_compile_with_the_dynamic_ir_results(artifacts):
    """The backend compiles the IR once per input shape (static shapes) and keeps the last MAX_SHAPES: outputs equal
    the IR's dynamic-shape compile's, also when a shape comes back after being dropped."""
    folder = artifacts[("vmamba_test_v2", "fp32")]
    predictor = load(folder)
    backend = predictor.backend
    rng = np.random.default_rng(3)
    shapes = [(1, 3, 64, 64), (2, 3, 48, 80), (1, 3, 96, 96), (3, 3, 64, 64), (1, 3, 40, 40), (1, 3, 64, 64)]
    for shape in shapes:
        x = rng.standard_normal(shape, dtype=np.float32)
        dynamic = backend.compiled.create_infer_request().infer({0: x})[0]
        np.testing.assert_allclose(predictor(x), dynamic, rtol=1e-5, atol=1e-5)
        assert len(backend._shapes.cached_shapes) <= backend.MAX_SHAPES
        compiled = backend._shapes.get(shape)[0]
        assert [d.get_length() for d in compiled.inputs[0].get_partial_shape()] == list(shape)  # static
    # (1, 3, 64, 64) was dropped after four others, then came back
    assert backend._shapes.cached_shapes[0] == (1, 3, 96, 96)
