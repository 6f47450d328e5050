"""int8 post-training quantization (ONNX Runtime) on the bundled trained digits models.

Calibration uses digits:calib; accuracy is measured on digits:holdout, which calibration must refuse. The issue's bar:
held-out top-1 drop <= 1.0 point vs fp32, with the selective scan left in float.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from vmamba_export import load
from vmamba_export.errors import ImageSourceError
from vmamba_export.exporter import export_artifact
from vmamba_export.kernels_paths import ort_library_path
from vmamba_export.lowering import ExportOptions
from vmamba_export.lowering.onnx_export import export_onnx
from vmamba_export.model_source import bundled_names, resolve_model
from vmamba_export.quantize import onnxruntime_int8 as q8
from vmamba_export.targets import get_target

MODELS = ("vmamba_digits_v2", "vmamba_digits_v0")
LOWERINGS = {"cpu-onnxruntime": "custom-op", "onnx-portable": "portable"}
MAX_SIZE = 64  # digits are 32 px: a small bound keeps the portable prefix scan shallow and the export quick

pytestmark = pytest.mark.skipif(
    not set(MODELS) <= set(bundled_names()), reason="bundled digits weights not trained yet"
)


def int8_options(**kw) -> ExportOptions:
    base = dict(
        precision="int8",
        calib="digits:calib",
        calib_samples=128,
        calib_method="minmax",
        accuracy_source="digits:holdout",
        extra={"show_progress": False},
    )
    base.update(kw)
    return ExportOptions(**base)


def library_for(target: str) -> Path | None:
    return ort_library_path() if target == "cpu-onnxruntime" else None


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory) -> dict:
    """fp32 ONNX exports per (model, target), made once for the module."""
    root = tmp_path_factory.mktemp("fp32")
    out = {}
    for name in MODELS:
        model = resolve_model(name).model.eval()
        for target, scan in LOWERINGS.items():
            if target == "cpu-onnxruntime" and ort_library_path() is None:
                continue
            path = root / f"{name}-{target}.onnx"
            export_onnx(model, path, scan=scan, max_size=MAX_SIZE)
            out[(name, target)] = path
    return out


@pytest.fixture(scope="module")
def int8_models(fp32_onnx, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("int8")
    out = {}
    for (name, target), path in fp32_onnx.items():
        dst = root / f"{name}-{target}-int8.onnx"
        info = q8.quantize_onnx_int8(
            path, dst, resolve_model(name).model.config.input, int8_options(), library_for(target)
        )
        out[(name, target)] = (dst, info)
    return out


@pytest.mark.parametrize("target", list(LOWERINGS))
@pytest.mark.parametrize("name", MODELS)
def test_int8_heldout_top1_within_one_point(int8_models, name, target, heldout_int8_accuracy):
    if (name, target) not in int8_models:
        pytest.skip("custom-op library not built")
    _, info = int8_models[(name, target)]
    heldout_int8_accuracy(f"{name} {target}", info)
    assert info["calibration"] == {"source": "digits:calib", "samples": 128, "first": info["calibration"]["first"]}


@pytest.mark.parametrize("target", list(LOWERINGS))
@pytest.mark.parametrize("name", MODELS)
def test_scan_stays_float(int8_models, name, target):
    if (name, target) not in int8_models:
        pytest.skip("custom-op library not built")
    path, info = int8_models[(name, target)]
    proto = onnx.load(str(path))
    producer = {o: n for n in proto.graph.node for o in n.output}
    ops = {n.op_type for n in proto.graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops  # it is quantized...
    assert q8.scan_inputs_quantized(path) == []  # ...but no scan input comes out of a Q/DQ pair
    scans = [n for n in proto.graph.node if n.op_type == "SelectiveScan2D"]
    if target == "cpu-onnxruntime":
        assert len(scans) == sum(resolve_model(name).model.config.depths)
        for scan in scans:
            for tensor in scan.input:
                src = producer.get(tensor)
                assert src is None or src.op_type not in ("QuantizeLinear", "DequantizeLinear"), tensor
    else:  # standard ONNX only, still no control flow
        assert not scans and {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
        assert not {"Loop", "Scan", "If"} & ops
    # The projections producing delta, B and C are float, and their weights are float initializers.
    feeders = [n for n, why in info["float_layers"].items() if why == "feeds the selective scan"]
    assert {f.rsplit(".", 1)[-1] for f in feeders} >= {"B", "C", "dt_projs"}
    assert not set(feeders) & set(info["quantized_layers"])


def test_exclude_keeps_named_layer_float(fp32_onnx, tmp_path):
    key = ("vmamba_digits_v2", "cpu-onnxruntime")
    if key not in fp32_onnx:
        key = ("vmamba_digits_v2", "onnx-portable")
    layer = "layers.0.blocks.0.mlp.fc1"
    dst = tmp_path / "excl.onnx"
    spec = resolve_model(key[0]).model.config.input
    opts = int8_options(exclude=(layer, "layers.2.*.out_proj"), accuracy_source=None, calib_samples=16)
    info = q8.quantize_onnx_int8(fp32_onnx[key], dst, spec, opts, library_for(key[1]))
    assert info["float_layers"][layer] == "--exclude"
    assert layer not in info["quantized_layers"] and "layers.0.blocks.0.mlp.fc2" in info["quantized_layers"]
    assert "layers.2.blocks.0.op.out_proj" in info["float_layers"]
    proto = onnx.load(str(dst))
    node = next(n for n in proto.graph.node if n.name == layer)
    assert node.op_type == "Conv" and node.input[1] in {i.name for i in proto.graph.initializer}
    with pytest.raises(q8.QuantizationError, match="names no quantizable layer"):
        q8.quantize_onnx_int8(fp32_onnx[key], tmp_path / "x.onnx", spec, int8_options(exclude=("nope",)), None)


def test_accuracy_budget_keeps_most_sensitive_layers_float(fp32_onnx, tmp_path, monkeypatch):
    """The budget loop: while int8 accuracy is too low, keep the most sensitive layers float (1, 2, 4, ...)."""
    key = next(iter(fp32_onnx))
    real_top1 = q8._top1
    total: list[list[str]] = []
    baseline: list[int] = []

    def fake_top1(path, library, batch, labels, chunk=64):
        value = real_top1(path, library, batch, labels, chunk)
        if Path(path).name != "out.onnx":
            return value
        # Pretend int8 loses 3 points until at least 3 more layers than at first are back in float.
        float_now = len(total[0]) - len(q8.quantized_layers(Path(path), total[0]))
        baseline.append(float_now)
        return value - (0.03 if float_now - baseline[0] < 3 else 0.0)

    real_prepare = q8.prepare_model

    def prepare(src, dst):
        prepared = real_prepare(src, dst)
        total.append([n for n in prepared.layers if n not in prepared.scan_feeders])
        return prepared

    monkeypatch.setattr(q8, "_top1", fake_top1)
    monkeypatch.setattr(q8, "prepare_model", prepare)
    spec = resolve_model(key[0]).model.config.input
    info = q8.quantize_onnx_int8(
        fp32_onnx[key], tmp_path / "out.onnx", spec, int8_options(max_drop=1.0, calib_samples=16), library_for(key[1])
    )
    acc = info["accuracy"]
    kept = acc["kept_float_for_accuracy"]
    assert [t["kept_float"] for t in acc["trials"]] == [0, 1, 2, 4]
    assert len(kept) == 4 and acc["drop_points"] <= 1.0
    assert all(info["float_layers"][n] == "accuracy budget" for n in kept)
    assert not set(kept) & set(info["quantized_layers"])


@pytest.mark.skipif(ort_library_path() is None, reason="custom-op library not built")
def test_int8_artifact_manifest_report_and_loader(tmp_path):
    source = resolve_model("vmamba_digits_v2")
    folder = tmp_path / "art"
    m = export_artifact(
        source, get_target("cpu-onnxruntime"), folder, "int8", MAX_SIZE, options=int8_options(calib_samples=32)
    )
    quant = m["lowering"]["quantization"]
    assert m["precision"] == "int8" and m["thresholds"] == {"min_cosine": 0.99}
    # int8 keeps its norms over the last axis, which ORT runs channels-last beside its NHWC int8 convolutions, as the
    # library's LastAxisLayerNorm (the channel-first ChannelLayerNorm is an fp32 rewrite: lowering/__init__.py).
    ops = {n.op_type for n in onnx.load(str(folder / "model.onnx")).graph.node}
    assert "LastAxisLayerNorm" in ops and "LayerNormalization" not in ops and "ChannelLayerNorm" not in ops
    assert "layer_norms" not in m["lowering"] and m["lowering"]["rewrites"]["last_axis_layer_norms"] > 0
    assert quant["method"] == "minmax" and quant["calibration"]["source"] == "digits:calib"
    assert quant["calibration"]["samples"] == 32 and quant["format"] in q8.FORMATS
    assert quant["accuracy"]["source"] == "digits:holdout" and 0 <= quant["accuracy"]["int8_top1"] <= 1
    on_disk = json.loads((folder / "manifest.json").read_text())
    assert on_disk["lowering"]["quantization"]["quantized_layers"] == quant["quantized_layers"]
    report = (folder / "report.md").read_text()
    assert "## int8 quantization" in report and quant["quantized_layers"][0] in report
    from vmamba_export.data.sources import load_batch
    from vmamba_export.validate import validate_artifact

    x, labels, _ = load_batch("digits:holdout", source.model.config.input, 64)
    logits = load(folder)(x)
    assert logits.shape == (64, 10) and (logits.argmax(1) == np.asarray(labels)).mean() >= 0.9
    result = validate_artifact(folder, images="digits:calib", limit=32, show_progress=False)
    assert result["status"] == "pass", result  # cosine vs PyTorch fp32 >= 0.99


@pytest.mark.parametrize(
    ("calib", "samples", "match"),
    [
        ("digits:calib", 4, "too few"),
        ("builtin:9", 12, "only 9 usable"),
        ("digits:holdout", 16, "holdout"),
        ("digits", 16, "holdout"),
    ],
)
def test_bad_calibration_fails_fast_and_leaves_nothing(tmp_path, calib, samples, match):
    folder = tmp_path / "art"
    source = resolve_model("vmamba_digits_v2")
    with pytest.raises(ImageSourceError, match=match):
        export_artifact(
            source,
            get_target("onnx-portable"),
            folder,
            "int8",
            MAX_SIZE,
            options=int8_options(calib=calib, calib_samples=samples),
        )
    assert not folder.exists() and not list(tmp_path.iterdir())


def test_cli_rejects_max_drop_without_accuracy(tmp_path, capsys):
    from vmamba_export.cli import main

    code = main(
        ["export", "--model", "vmamba_digits_v2", "--target", "onnx-portable", "--precision", "int8"]
        + ["--out", str(tmp_path / "a"), "--calib", "digits:calib", "--max-drop", "1"]
    )
    assert code == 2 and "--max-drop needs --accuracy" in capsys.readouterr().err
