"""cpu-onnxruntime and onnx-portable end to end on the small configs: export, artifact, loader, parity, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from vmamba_export import load
from vmamba_export.artifact import read_manifest
from vmamba_export.errors import ArtifactError, InputError, TargetUnavailableError
from vmamba_export.exporter import export_artifact
from vmamba_export.kernels_paths import ort_library_path
from vmamba_export.lowering.dt_projection import MAX_FUSED_RANK
from vmamba_export.lowering.onnx_graph import node_attribute
from vmamba_export.model_source import resolve_model
from vmamba_export.scan.op import torch_scan
from vmamba_export.targets import get_target
from vmamba_export.validate import validate_artifact

needs_library = pytest.mark.skipif(ort_library_path() is None, reason="custom-op library not built")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict:
    """One artifact per (small config, ONNX target), exported once for the module."""
    root = tmp_path_factory.mktemp("artifacts")
    built = {}
    for name in ("vmamba_test_v2", "vmamba_test_v0"):
        source = resolve_model(name, random_weights=True, seed=1)
        for target in ("cpu-onnxruntime", "onnx-portable"):
            if target == "cpu-onnxruntime" and ort_library_path() is None:
                continue
            folder = root / f"{name}-{target}"
            export_artifact(source, get_target(target), folder, max_size=256)
            built[(name, target)] = folder
    return built


def torch_logits(name: str, x: np.ndarray) -> np.ndarray:
    model = resolve_model(name, random_weights=True, seed=1).model.set_scan(torch_scan)
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


@needs_library
@pytest.mark.parametrize("name", ["vmamba_test_v2", "vmamba_test_v0"])
def test_custom_op_graph_has_one_scan_node_per_block(artifacts, name):
    proto = onnx.load(str(artifacts[(name, "cpu-onnxruntime")] / "model.onnx"))
    scans = [n for n in proto.graph.node if n.op_type == "SelectiveScan2D"]
    assert len(scans) == sum(resolve_model(name, random_weights=True).model.config.depths)
    assert all(n.domain == "ai.vmamba" for n in scans)
    assert proto.ir_version == 10
    # The x_proj's dt, B and C projections run as one convolution and a Split (lowering/sibling_convs.py).
    pointwise_sources = [n.input[0] for n in proto.graph.node if n.op_type == "Conv" and len(n.input) == 2]
    assert len(pointwise_sources) == len(set(pointwise_sources))
    rewrites = read_manifest(artifacts[(name, "cpu-onnxruntime")])["lowering"]["rewrites"]
    assert rewrites["merged_pointwise_convs"] == 2 * len(scans)
    # Every SiLU (one a block after the depthwise convolution; v0 also gates with one) is one QuickGelu node.
    assert rewrites["fused_silu"] >= len(scans)
    # The dt projections of rank <= MAX_FUSED_RANK run inside the scan op (lowering/dt_projection.py); here all.
    ranks = [
        block.op.dt_rank for stage in resolve_model(name, random_weights=True).model.layers for block in stage.blocks
    ]
    fused = [n for n in scans if len(n.input) == 8]
    assert rewrites["fused_dt_projections"] == len(fused) == sum(r <= MAX_FUSED_RANK for r in ranks) == len(scans)
    assert not any(node_attribute(n, "group", 1) == 4 for n in proto.graph.node if n.op_type == "Conv")
    assert not any(n.op_type == "Sigmoid" for n in proto.graph.node)


@needs_library
@pytest.mark.parametrize("name", ["vmamba_test_v2", "vmamba_test_v0"])
def test_custom_op_graph_norms_channel_first_maps_in_place(artifacts, name):
    """cpu-onnxruntime: every LayerNorm2d (v2) is one ChannelLayerNorm node, no Transpose around it; v0's norms are
    channel-last LayerNormalizations and stay; the manifest says how many were replaced (lowering/channel_norm.py)."""
    from vmamba_export.models.vmamba import LayerNorm2d

    folder = artifacts[(name, "cpu-onnxruntime")]
    proto = onnx.load(str(folder / "model.onnx"))
    model = resolve_model(name, random_weights=True).model
    norms2d = sum(isinstance(m, LayerNorm2d) for m in model.modules())
    ops = [n.op_type for n in proto.graph.node]
    lowering = read_manifest(folder)["lowering"]
    record = lowering["layer_norms"]
    assert record["replaced"] == ops.count("ChannelLayerNorm") == norms2d
    # The norms left (over the last axis) run as the library's LastAxisLayerNorm (lowering/onnxruntime_cpu.py).
    assert record["kept"] == ops.count("LastAxisLayerNorm") == lowering["rewrites"]["last_axis_layer_norms"]
    assert ops.count("LayerNormalization") == 0
    if name == "vmamba_test_v2":
        assert norms2d > 0 and ops.count("LastAxisLayerNorm") == 1  # the classifier's final norm
        assert ops.count("Transpose") == 1
    assert "ChannelLayerNorm" not in {
        n.op_type for n in onnx.load(str(artifacts[(name, "onnx-portable")] / "model.onnx")).graph.node
    }


@pytest.mark.parametrize("name", ["vmamba_test_v2", "vmamba_test_v0"])
@pytest.mark.parametrize("target", ["cpu-onnxruntime", "onnx-portable"])
@pytest.mark.parametrize("shape", [(1, 3, 224, 224), (3, 3, 45, 37), (2, 3, 64, 100)])
def test_dynamic_batch_and_size_match_pytorch(artifacts, name, target, shape):
    if (name, target) not in artifacts:
        pytest.skip("custom-op library not built")
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    out = load(artifacts[(name, target)])(x)
    assert out.shape == (shape[0], 10)
    assert rel_l2(out, torch_logits(name, x)) <= 1e-5


@pytest.mark.parametrize("name", ["vmamba_test_v2", "vmamba_test_v0"])
def test_portable_graph_is_standard_onnx(artifacts, name):
    path = artifacts[(name, "onnx-portable")] / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    assert not {"Loop", "Scan", "If"} & {n.op_type for n in proto.graph.node}


def test_portable_agrees_with_onnx_reference_evaluator(artifacts):
    from onnx.reference import ReferenceEvaluator

    folder = artifacts[("vmamba_test_v2", "onnx-portable")]
    x = np.random.default_rng(1).standard_normal((1, 3, 40, 36), dtype=np.float32)
    expected = ReferenceEvaluator(str(folder / "model.onnx")).run(None, {"pixel_values": x})[0]
    assert rel_l2(load(folder)(x), expected) <= 1e-5


@pytest.mark.parametrize("target", ["cpu-onnxruntime", "onnx-portable"])
def test_validate_records_parity_on_builtin_photos(artifacts, target, tmp_path):
    if ("vmamba_test_v2", target) not in artifacts:
        pytest.skip("custom-op library not built")
    folder = tmp_path / "a"
    shutil.copytree(artifacts[("vmamba_test_v2", target)], folder)
    result = validate_artifact(folder, images="builtin", sizes=[224, 160], show_progress=False, record=True)
    assert result["status"] == "pass", result
    assert [r["size"] for r in result["runs"]] == [224, 160]
    for run in result["runs"]:
        assert run["rel_l2"] <= 1e-5 and run["top1_agreement"] == 1.0 and run["num_images"] >= 4
    manifest = read_manifest(folder)
    assert manifest["validation"]["status"] == "pass"
    assert "Parity against PyTorch fp32" in (folder / "report.md").read_text()
    load(folder)  # updating the manifest leaves the payload hashes valid


def test_manifest_records_what_the_issue_asks(artifacts):
    key = ("vmamba_test_v2", "cpu-onnxruntime") if ("vmamba_test_v2", "cpu-onnxruntime") in artifacts else None
    folder = artifacts[key or ("vmamba_test_v2", "onnx-portable")]
    m = json.loads((folder / "manifest.json").read_text())
    assert m["schema_version"] == 1
    assert m["model"]["config"]["name"] == "vmamba_test_v2"
    assert m["model"]["weights"]["kind"] == "random" and len(m["model"]["weights"]["state_digest"]) == 64
    assert m["input"]["dynamic_axes"]["height"]["min"] == m["input"]["min_size"]
    assert m["input"]["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    assert {"torch", "onnx", "onnxruntime", "python"} <= set(m["toolchain"])
    for name, entry in m["files"].items():
        assert (folder / name).is_file() and len(entry["sha256"]) == 64
    if key:
        assert m["entry"]["custom_op_library"] in m["files"]


def test_modified_file_is_refused(artifacts, tmp_path):
    folder = tmp_path / "a"
    shutil.copytree(artifacts[("vmamba_test_v2", "onnx-portable")], folder)
    with open(folder / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ArtifactError, match="model.onnx: sha256 does not match"):
        load(folder)
    (folder / "model.onnx").unlink()
    with pytest.raises(ArtifactError, match="model.onnx: missing"):
        load(folder)


def test_bad_inputs_get_clear_errors(artifacts):
    predictor = load(artifacts[("vmamba_test_v2", "onnx-portable")])
    good = np.zeros((1, 3, 64, 64), np.float32)
    cases = [
        (good.astype(np.int64), "raw pixels"),
        (good[0], "4-D"),
        (np.zeros((1, 4, 64, 64), np.float32), "3 channels"),
        (np.zeros((1, 3, 16, 64), np.float32), "height 16 is outside"),
        (np.zeros((1, 3, 64, 4096), np.float32), "width 4096 is outside"),
        ([[1.0]], "numpy.ndarray"),
    ]
    for array, message in cases:
        with pytest.raises(InputError, match=message):
            predictor(array)
    with pytest.raises(InputError, match="cannot read image"):
        predictor.predict([Path(__file__)])


def test_predict_returns_labels_for_images(artifacts):
    from PIL import Image

    predictor = load(artifacts[("vmamba_test_v0", "onnx-portable")])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 200, 3), dtype=np.uint8))
    (top,) = predictor.predict([image], top_k=3)
    assert [r["label"] for r in top] == [f"class_{r['index']}" for r in top]
    assert len(top) == 3 and top[0]["score"] >= top[1]["score"] >= top[2]["score"]
    expected = torch_logits("vmamba_test_v0", predictor.preprocess([image]))
    assert top[0]["index"] == int(expected.argmax())


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    from vmamba_export import lowering

    def broken(model, target, folder, options):
        (folder / "model.onnx").write_bytes(b"half written")
        raise RuntimeError("exporter crashed")

    monkeypatch.setitem(lowering.LOWERINGS, "portable", broken)
    out = tmp_path / "art"
    with pytest.raises(RuntimeError, match="exporter crashed"):
        export_artifact(resolve_model("vmamba_test_v2", random_weights=True), get_target("onnx-portable"), out)
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_needs_overwrite(artifacts):
    folder = artifacts[("vmamba_test_v2", "onnx-portable")]
    with pytest.raises(ArtifactError, match="already exists"):
        export_artifact(resolve_model("vmamba_test_v2", random_weights=True), get_target("onnx-portable"), folder)


def test_unknown_target_and_precision():
    with pytest.raises(TargetUnavailableError, match="known targets"):
        get_target("tpu-magic")
    with pytest.raises(TargetUnavailableError, match="does not offer precision"):
        export_artifact(
            resolve_model("vmamba_test_v2", random_weights=True), get_target("onnx-portable"), Path("x"), "fp64"
        )


def test_released_model_without_weights_is_an_error():
    from vmamba_export.errors import VMambaExportError

    with pytest.raises(VMambaExportError, match="--checkpoint PATH"):
        resolve_model("vmamba_tiny_s1l8")
