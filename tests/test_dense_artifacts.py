"""Dense artifacts (backbone feature maps, UperNet segmentation): export per target and precision, the manifest and
references, the no-crop preprocessing, the predictor and `predict`'s mask PNGs. Every number is checked against the
PyTorch model the artifact was exported from (small test configs, random weights; the heavier exports are slow)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vmamba_export.artifact import manifest_problem, read_manifest
from vmamba_export.data.preprocess import preprocess
from vmamba_export.errors import InputError, TargetUnavailableError
from vmamba_export.exporter import export_artifact
from vmamba_export.lowering import ExportOptions
from vmamba_export.model_source import ModelSource
from vmamba_export.models import build_model
from vmamba_export.models.configs import SEGMENTATION_INPUT
from vmamba_export.references import read_references
from vmamba_export.runtime import load
from vmamba_export.targets import get_target

MAX_SIZE = 128
LABELS = ("background", "sky", "road", "tree", "car")
SIZES = ((64, 64), (77, 45))  # one side not a multiple of 32


def _seg_model():
    torch.manual_seed(0)
    spec = dataclasses.replace(SEGMENTATION_INPUT, image_size=64, labels=LABELS)
    model = build_model("vmamba_test_v2", task="segmentation", head_channels=32, num_classes=5, input=spec)
    with torch.no_grad():  # random init gives nearly constant logits: make the class map depend on the image
        model.decode_head.conv_seg.weight.mul_(30.0)
        model.decode_head.conv_seg.bias.zero_()
    return model.eval()


def _backbone_model():
    torch.manual_seed(1)
    spec = dataclasses.replace(SEGMENTATION_INPUT, image_size=64)
    return build_model("vmamba_test_v2", task="backbone", input=spec).eval()


def _source(model) -> ModelSource:
    return ModelSource(model=model, weights={"kind": "random", "name": "vmamba_test_v2", "seed": 0})


def _export(model, target: str, out, precision: str = "fp32", **extra):
    options = ExportOptions(calib_samples=8, extra={"show_progress": False, **extra})
    return export_artifact(_source(model), get_target(target), out, precision, max_size=MAX_SIZE, options=options)


def _torch_outputs(model, x: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(torch.from_numpy(x))
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def _artifact_outputs(predictor, x: np.ndarray) -> list[np.ndarray]:
    out = predictor(x)
    return list(out.values()) if isinstance(out, dict) else [out]


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


@pytest.fixture(scope="module")
def seg_model():
    return _seg_model()


@pytest.fixture(scope="module")
def backbone_model():
    return _backbone_model()


@pytest.fixture(scope="module")
def seg_ort(seg_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("dense") / "seg-ort"
    _export(seg_model, "cpu-onnxruntime", out)
    return out


@pytest.fixture(scope="module")
def backbone_ort(backbone_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("dense") / "bb-ort"
    _export(backbone_model, "cpu-onnxruntime", out)
    return out


def _check_fp32_parity(model, folder):
    predictor = load(folder)
    rng = np.random.default_rng(0)
    for h, w in SIZES:
        x = rng.standard_normal((2, 3, h, w)).astype(np.float32)
        got, want = _artifact_outputs(predictor, x), _torch_outputs(model, x)
        assert len(got) == len(want)
        for g, r in zip(got, want, strict=True):
            assert g.shape == r.shape
            assert _rel_l2(g, r) <= 1e-5, (folder.name, (h, w), g.shape)


def _check_channel_norms(model, folder):
    """cpu-onnxruntime: every LayerNorm2d (the backbone's and its output norms) runs as one ChannelLayerNorm node."""
    import onnx

    from vmamba_export.models.vmamba import LayerNorm2d

    ops = [n.op_type for n in onnx.load(str(folder / "model.onnx")).graph.node]
    norms2d = sum(isinstance(m, LayerNorm2d) for m in model.modules())
    assert read_manifest(folder)["lowering"]["layer_norms"]["replaced"] == ops.count("ChannelLayerNorm") == norms2d
    assert "LayerNormalization" not in ops


def test_fp32_segmentation_onnxruntime(seg_model, seg_ort):
    _check_fp32_parity(seg_model, seg_ort)
    _check_channel_norms(seg_model, seg_ort)
    # the UperNet's two bottlenecks (pyramid pooling, FPN) run as sums of convolutions (lowering/concat_convs.py),
    # the logits' upsampling to the input size as the library's planar kernel (lowering/output_resize.py): the parity
    # above covers it at sizes whose logits are not a quarter of the input
    import onnx

    rewrites = read_manifest(seg_ort)["lowering"]["rewrites"]
    assert rewrites["split_concat_convs"] == 2 and rewrites["bilinear_resize_outputs"] == 1
    (last,) = [n for n in onnx.load(str(seg_ort / "model.onnx")).graph.node if "logits" in n.output]
    assert (last.domain, last.op_type) == ("ai.vmamba", "BilinearResize")


def test_repeated_shape_runs_on_a_session_made_for_it(seg_model, seg_ort):
    """From a shape's second call, ONNX Runtime runs a session with the input's symbolic dimensions fixed to it. Its
    optimiser then folds every shape computation into constants, which needs the scan op's declared output shape (no
    Shape node survives), and runs the head's upsampling in its blocked NCHWc layout; the outputs still equal
    PyTorch's, on every call, at a size that is not a multiple of 32 too. One-off shapes stay on the general session;
    `specialize_shapes=False` makes no session."""
    import onnx
    import onnxruntime as ort

    from vmamba_export import kernels_paths
    from vmamba_export.runtime.onnxruntime_backend import dim_overrides_for

    predictor = load(seg_ort)
    rng = np.random.default_rng(3)
    for h, w in SIZES:
        x = rng.standard_normal((1, 3, h, w)).astype(np.float32)
        want = _torch_outputs(seg_model, x)[0]
        for _ in range(3):
            assert _rel_l2(_artifact_outputs(predictor, x)[0], want) <= 1e-5, (h, w)
    predictor(rng.standard_normal((2, 3, 64, 64)).astype(np.float32))  # seen once
    assert predictor.backend.shape_sessions.cached_shapes == [(1, 3, h, w) for h, w in SIZES]
    unspecialised = load(seg_ort, specialize_shapes=False)
    x = rng.standard_normal((1, 3, 64, 64)).astype(np.float32)
    for _ in range(2):
        unspecialised(x)
    assert unspecialised.backend.shape_sessions is None

    def optimised(overrides: dict, path) -> onnx.ModelProto:
        options = ort.SessionOptions()
        options.register_custom_ops_library(str(kernels_paths.ort_library_path()))
        for name, value in overrides.items():
            options.add_free_dimension_override_by_name(name, value)
        options.optimized_model_filepath = str(path)
        ort.InferenceSession(str(seg_ort / "model.onnx"), options, providers=["CPUExecutionProvider"])
        return onnx.load(str(path), load_external_data=False)

    general = predictor.backend.session
    fixed = optimised(dim_overrides_for(general, (1, 3, 64, 64)), seg_ort.parent / "fixed.onnx")
    dynamic = optimised({}, seg_ort.parent / "dynamic.onnx")
    assert sum(n.op_type == "Shape" for n in dynamic.graph.node) > 0
    assert sum(n.op_type == "Shape" for n in fixed.graph.node) == 0
    if any(n.domain == "com.microsoft.nchwc" for n in fixed.graph.node):  # x86 with AVX2 or AVX-512
        assert any(n.op_type == "Upsample" and n.domain == "com.microsoft.nchwc" for n in fixed.graph.node)
        assert not any(n.op_type == "Upsample" for n in dynamic.graph.node)


def test_fp32_backbone_onnxruntime(backbone_model, backbone_ort):
    _check_fp32_parity(backbone_model, backbone_ort)
    _check_channel_norms(backbone_model, backbone_ort)


@pytest.mark.parametrize(
    "task,target",
    [
        ("segmentation", "cpu-openvino"),
        pytest.param("backbone", "onnx-portable", marks=pytest.mark.slow),
        pytest.param("backbone", "cpu-openvino", marks=pytest.mark.slow),
        pytest.param("segmentation", "onnx-portable", marks=pytest.mark.slow),
    ],
)
def test_fp32_other_targets(task, target, seg_model, backbone_model, tmp_path):
    model = seg_model if task == "segmentation" else backbone_model
    _export(model, target, tmp_path / "a")
    _check_fp32_parity(model, tmp_path / "a")
    if (task, target) == ("segmentation", "cpu-openvino"):
        assert read_manifest(tmp_path / "a")["lowering"]["split_concat_convs"] == 2


def test_segmentation_manifest_and_references(seg_ort):
    m = read_manifest(seg_ort)
    out = m["output"]
    assert out["task"] == "segmentation" and out["num_classes"] == 5 and out["labels_source"] == "config"
    assert out["outputs"] == [{"name": "logits", "shape": ["batch", 5, "height", "width"], "stride": 1, "channels": 5}]
    assert m["input"]["preprocessing"]["labels"] == list(LABELS) and m["input"]["preprocessing"]["crop"] is False
    assert m["model"]["config"]["task"] == "segmentation"
    inputs, outputs, names = read_references(seg_ort, m)
    assert list(outputs) == ["logits"] and len(names) == len(inputs) == m["references"]["num_images"]
    assert inputs.shape[2:] == (m["references"]["size"],) * 2 == (64, 64)
    # The stored outputs are the PyTorch model's (the artifact's own self-check compares with them).
    predictor = load(seg_ort)
    assert _rel_l2(predictor(inputs), outputs["logits"]) <= 1e-5
    report = (seg_ort / "report.md").read_text()
    assert "| logits | (batch, 5, height, width) | 1 | 5 |" in report and "1: sky" in report


def test_backbone_manifest_and_references(backbone_ort, backbone_model):
    m = read_manifest(backbone_ort)
    out = m["output"]
    assert out["task"] == "backbone" and out["num_classes"] == 0 and out["labels_source"] is None
    assert [o["name"] for o in out["outputs"]] == ["features_0", "features_1", "features_2", "features_3"]
    assert [o["stride"] for o in out["outputs"]] == [4, 8, 16, 32]
    assert [o["channels"] for o in out["outputs"]] == list(backbone_model.config.widths)
    assert out["outputs"][2]["shape"] == ["batch", 64, "height/16", "width/16"]
    assert m["input"]["preprocessing"]["labels"] is None
    inputs, outputs, _ = read_references(backbone_ort, m)
    for (name, ref), want in zip(outputs.items(), _torch_outputs(backbone_model, inputs), strict=True):
        assert ref.shape == want.shape and _rel_l2(ref, want) <= 1e-5, name


def test_schema_checks_dense_outputs(seg_ort, backbone_ort):
    m = read_manifest(seg_ort)
    assert manifest_problem(m) is None
    bad = json.loads(json.dumps(m))
    bad["output"]["outputs"][0]["channels"] = 4
    assert "must equal output.num_classes" in manifest_problem(bad)
    bad = json.loads(json.dumps(m))
    bad["output"]["task"] = "detection"
    assert "'output.task' must be one of" in manifest_problem(bad)
    bad = json.loads(json.dumps(m))
    bad["input"]["preprocessing"]["crop"] = "no"
    assert "'input.preprocessing.crop' must be true or false" in manifest_problem(bad)
    bb = read_manifest(backbone_ort)
    bad = json.loads(json.dumps(bb))
    bad["output"]["num_classes"] = 3
    assert "'output.num_classes'" in manifest_problem(bad)
    bad = json.loads(json.dumps(bb))
    bad["output"]["outputs"][1]["name"] = "features_7"
    assert "features_0, features_1" in manifest_problem(bad)
    # A classifier's manifest as written before dense tasks (no output.task, no preprocessing.crop) still passes.
    old = json.loads(json.dumps(m))
    for key in ("task", "outputs", "spatial_size"):
        del old["output"][key]
    old["output"]["shape"] = ["batch", 5]
    del old["input"]["preprocessing"]["crop"]
    assert manifest_problem(old) is None


def test_backbone_predictor(backbone_ort):
    predictor = load(backbone_ort)
    assert predictor.task == "backbone"
    maps = predictor(np.zeros((1, 3, 77, 45), np.float32))
    assert list(maps) == ["features_0", "features_1", "features_2", "features_3"]
    assert [v.shape for v in maps.values()] == [(1, 16, 20, 12), (1, 32, 10, 6), (1, 64, 5, 3), (1, 128, 3, 2)]
    with pytest.raises(InputError, match="backbone artifact"):
        predictor.predict([Image.new("RGB", (50, 40))])
    batch = predictor.preprocess([Image.new("RGB", (96, 64)), Image.new("RGB", (48, 32))])  # same ratio: stacks
    assert batch.shape == (2, 3, 64, 96)
    with pytest.raises(InputError, match="preprocess to different sizes"):
        predictor.preprocess([Image.new("RGB", (96, 64)), Image.new("RGB", (64, 96))])
    with pytest.raises(InputError, match="outside what this artifact takes"):  # the input checks stay
        predictor(np.zeros((1, 3, 64, MAX_SIZE + 1), np.float32))


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth random colour field (varied enough that the class map has several classes)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


def test_no_crop_preprocessing():
    spec = dataclasses.replace(SEGMENTATION_INPUT, image_size=64)
    image = _photo(300, 180)
    x = preprocess(image, spec)
    assert x.shape == (3, 64, 106)  # shorter side 64, 300 * 64 / 180 = 106.7 truncated
    # Independent of the module: Pillow's bilinear resize, then ImageNet normalisation.
    want = np.asarray(image.resize((106, 64), Image.Resampling.BILINEAR), np.float32) / 255.0
    want = (want - np.array(spec.mean, np.float32)) / np.array(spec.std, np.float32)
    np.testing.assert_allclose(x, want.transpose(2, 0, 1), atol=1e-6)
    # A panorama is scaled down to the artifact's largest side; its shorter side stays at least min_size.
    assert preprocess(_photo(1000, 200), spec, max_size=128).shape == (3, 25, 128)
    assert preprocess(_photo(1000, 200), spec, max_size=128, min_size=33).shape == (3, 33, 128)
    assert preprocess(_photo(90, 500), spec, max_size=128).shape == (3, 128, 23)


def test_segment_matches_torch_at_original_size(seg_ort, seg_model):
    predictor = load(seg_ort)
    assert predictor.task == "segmentation" and predictor.labels == list(LABELS)
    images = [_photo(150, 90, seed=1), _photo(70, 120, seed=2)]
    results = predictor.predict(images)
    for image, result in zip(images, results, strict=True):
        assert result["class_map"].shape == (image.height, image.width) and result["class_map"].dtype == np.int32
        x = preprocess(image, predictor.input_spec, max_size=MAX_SIZE)
        logits = _torch_outputs(seg_model, x[None])[0]
        assert result["probabilities"].shape == logits.shape[1:]
        np.testing.assert_allclose(result["probabilities"].sum(axis=0), 1.0, atol=1e-5)
        # mmseg's inference: logits resized bilinearly to the original size, then the argmax.
        up = F.interpolate(torch.from_numpy(logits), size=(image.height, image.width), mode="bilinear")
        want = up[0].argmax(0).numpy()
        assert (result["class_map"] == want).mean() >= 0.99
        assert len(np.unique(want)) >= 2  # the check means something: several classes in the map
        fractions = result["class_pixels"]
        assert set(fractions) <= set(LABELS) and abs(sum(fractions.values()) - 1.0) < 1e-9
        for label, share in fractions.items():
            assert share == pytest.approx((want == LABELS.index(label)).mean(), abs=0.01)


def test_predict_cli_writes_mask_and_overlay(seg_ort, tmp_path, capsys):
    from vmamba_export.cli import main
    from vmamba_export.masks import palette

    image = _photo(150, 90, seed=1)
    path = tmp_path / "street.jpg"
    image.save(path, quality=95)
    out = tmp_path / "masks"
    assert main(["predict", str(seg_ort), str(path), "--out", str(out), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)[0]
    mask = Image.open(out / "street.mask.png")
    overlay = Image.open(out / "street.overlay.png")
    assert mask.mode == "P" and mask.size == (150, 90)
    assert overlay.mode == "RGB" and overlay.size == (300, 90)
    # Written as any new file is (mkstemp's 0600 would hide them from other users).
    from vmamba_export.artifact import current_umask

    for png in ("street.mask.png", "street.overlay.png"):
        assert (out / png).stat().st_mode & 0o777 == 0o666 & ~current_umask()
    assert np.array_equal(np.asarray(mask.getpalette()[: 3 * 256]).reshape(256, 3), palette())
    class_map = load(seg_ort).predict([path])[0]["class_map"]
    assert np.array_equal(np.asarray(mask), class_map)
    # Left half: the image itself; right half: the image blended with each pixel's class colour.
    left = np.asarray(overlay)[:, :150].astype(int)
    decoded = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert np.array_equal(left, decoded)
    blend = np.round(0.5 * decoded + 0.5 * palette()[class_map].astype(int))
    assert np.abs(np.asarray(overlay)[:, 150:].astype(int) - blend).max() <= 1
    assert record["class_pixels"] and record["mask"] == str(out / "street.mask.png")
    # Existing files are never replaced silently.
    before = (out / "street.mask.png").read_bytes()
    assert main(["predict", str(seg_ort), str(path), "--out", str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "street.mask.png").read_bytes() == before
    assert main(["predict", str(seg_ort), str(path), "--out", str(out), "--overwrite"]) == 0


def test_dense_refusals(seg_model, tmp_path):
    for target in ("cpu-tvm", "apple-coreml"):
        with pytest.raises(TargetUnavailableError, match="not implemented for task segmentation"):
            export_artifact(_source(seg_model), get_target(target), tmp_path / target)
    options = ExportOptions(accuracy_source="builtin", max_drop=1.0)
    with pytest.raises(InputError, match="do not apply to task segmentation"):
        export_artifact(_source(seg_model), get_target("cpu-onnxruntime"), tmp_path / "x", "int8", options=options)
    assert not list(tmp_path.iterdir())


def test_cli_default_segmenter_named_when_missing(capsys):
    from vmamba_export.cli import main
    from vmamba_export.model_source import bundled_names

    if "vmamba_shapes_seg" in bundled_names():
        pytest.skip("the bundled segmenter exists in this tree")
    assert main(["export", "--task", "segmentation", "--target", "cpu-onnxruntime", "--out", "/tmp/never"]) == 2
    assert "vmamba_shapes_seg" in capsys.readouterr().err


def _check_reduced(model, folder, max_rel_l2: float, min_agreement: float) -> dict:
    """Reduced precision against PyTorch fp32 on the photos stored in the references: rel L2 per output, and the
    argmax agreement of a segmenter's maps."""
    m = read_manifest(folder)
    inputs, _, _ = read_references(folder, m)
    got, want = _artifact_outputs(load(folder), inputs), _torch_outputs(model, inputs)
    errors = [_rel_l2(g, r) for g, r in zip(got, want, strict=True)]
    assert max(errors) <= max_rel_l2, errors
    agreement = None
    if m["output"]["task"] == "segmentation":
        agreement = float((got[0].argmax(1) == want[0].argmax(1)).mean())
        assert agreement >= min_agreement
    print(f"{folder.name}: rel L2 per output {[round(e, 4) for e in errors]}, argmax agreement {agreement}")
    return {"rel_l2": errors, "agreement": agreement}


def test_int8_segmentation_onnxruntime(seg_model, tmp_path, monkeypatch):
    import onnx

    from vmamba_export import validate as validate_mod
    from vmamba_export.data.segmentation_sources import write_segmentation_folder

    # Judged by its mIoU drop: the export records PyTorch's mIoU on a labelled set for a device without torch.
    labelled = write_segmentation_folder("shapes:holdout", tmp_path / "labelled", limit=6)
    folder = tmp_path / "seg-ort-int8"
    options = ExportOptions(calib_samples=8, reference_accuracy_source=str(labelled), extra={"show_progress": False})
    manifest = export_artifact(
        _source(seg_model), get_target("cpu-onnxruntime"), folder, "int8", max_size=MAX_SIZE, options=options
    )
    assert manifest["lowering"]["quantization"]["quantized_layers"]
    _check_reduced(seg_model, folder, 0.1, 0.95)
    proto = onnx.load(str(folder / "model.onnx"))  # int8 keeps its last-axis norms
    assert "ChannelLayerNorm" not in {n.op_type for n in proto.graph.node}

    record = manifest["references"]["accuracy"]
    assert record["source"] == str(labelled) and record["num_images"] == 6 and record["metric"] == "miou"
    conf = np.zeros((5, 5), dtype=np.int64)  # PyTorch's mIoU on those images, counted here
    for image in sorted((labelled / "images").iterdir()):
        x = preprocess(Image.open(image), seg_model.config.input)[None]
        truth = np.asarray(Image.open(labelled / "masks" / image.name), dtype=np.int64)
        pred = _torch_outputs(seg_model, x)[0][0].argmax(0)
        np.add.at(conf, (truth.ravel(), pred.ravel()), 1)
    inter, union = np.diag(conf), conf.sum(0) + conf.sum(1) - np.diag(conf)
    assert record["torch_miou"] == pytest.approx(float(np.mean(inter[union > 0] / union[union > 0])), abs=1e-12)

    # Where torch is missing, validate takes that number for the same data, so the drop is still measured...
    monkeypatch.setattr(validate_mod, "torch_available", lambda: False)
    result = validate_mod.validate_artifact(folder, accuracy_source=str(labelled), show_progress=False)
    acc = result["accuracy"]
    assert acc["torch_from"] == "recorded at export (references.accuracy)" and acc["torch_note"] is None
    assert acc["torch_miou"] == record["torch_miou"] and acc["data_sha256"] == record["data_sha256"]
    assert acc["drop_points"] == pytest.approx(100 * (record["torch_miou"] - acc["artifact_miou"]))
    # ...and only for the same data: one mask changed, the drop is unmeasured and the note says why.
    mask_path = next((labelled / "masks").iterdir())
    mask = np.asarray(Image.open(mask_path)).copy()
    mask[0, 0] = (int(mask[0, 0]) + 1) % 5
    Image.fromarray(mask, "L").save(mask_path)
    result = validate_mod.validate_artifact(folder, accuracy_source=str(labelled), show_progress=False)
    acc = result["accuracy"]
    assert acc["torch_miou"] is None and acc["drop_points"] is None and result["status"] == "fail"
    assert f"records PyTorch's score on {labelled}, not on these images" in acc["torch_note"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "task,target,precision",
    [
        ("backbone", "cpu-onnxruntime", "int8"),
        ("segmentation", "onnx-portable", "int8"),
        ("segmentation", "cpu-openvino", "bf16"),
        ("segmentation", "cpu-openvino", "int8"),
        ("backbone", "cpu-openvino", "int8"),
    ],
)
def test_reduced_precisions(task, target, precision, seg_model, backbone_model, tmp_path):
    model = seg_model if task == "segmentation" else backbone_model
    _export(model, target, tmp_path / f"{task}-{target}-{precision}", precision)
    _check_reduced(model, tmp_path / f"{task}-{target}-{precision}", 0.1, 0.95)


@pytest.mark.slow  # two exports (~70 s on a loaded 2-core machine)
def test_cuda_export_of_a_segmenter_builds(seg_model, tmp_path, monkeypatch):
    """cuda-onnxruntime cannot run here; the export can. Without the CUDA library, the CPU custom-op library stands
    in for it (the lowering only copies it): the fp32 graph, with ONNX Runtime's own LayerNormalization kept, then
    runs on the CPU with the CPU library and equals PyTorch; the fp16 graph passes onnx's checker."""
    import onnx

    from vmamba_export import kernels_paths
    from vmamba_export.runtime.onnxruntime_backend import make_session

    cpu_library = kernels_paths.ort_library_path()
    if kernels_paths.ort_cuda_library_path() is None:
        monkeypatch.setattr(kernels_paths, "ort_cuda_library_path", lambda *a, **k: cpu_library)
    manifest = _export(seg_model, "cuda-onnxruntime", tmp_path / "fp32", layer_norm="onnxruntime")
    lowering = manifest["lowering"]
    # No "cuda_graphs: off" note any more: dense artifacts run through CUDA graphs like classifiers.
    assert lowering["residual_layout"] == "channels-first" and "cuda_graphs" not in lowering
    assert manifest["output"]["outputs"][0]["name"] == "logits"
    session = make_session(tmp_path / "fp32" / "model.onnx", cpu_library, threads=1)
    x = np.random.default_rng(0).standard_normal((1, 3, 77, 45)).astype(np.float32)
    got = session.run(None, {"pixel_values": x})
    assert [o.name for o in session.get_outputs()] == ["logits"]
    assert _rel_l2(got[0], _torch_outputs(seg_model, x)[0]) <= 1e-5
    manifest = _export(seg_model, "cuda-onnxruntime", tmp_path / "fp16", "fp16")
    proto = onnx.load(str(tmp_path / "fp16" / "model.onnx"))
    onnx.checker.check_model(proto)
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert manifest["lowering"]["layer_norms"]["replaced"] > 0
    with pytest.raises(Exception, match="channels-last is for classifiers"):
        _export(seg_model, "cuda-onnxruntime", tmp_path / "cl", layout="channels-last")


def test_cli_backbone_of_trained_classifier_says_what_it_initialised(tmp_path, capsys):
    """The bundled digits classifier exported as a backbone: its classifier is dropped and the four out-norms, which a
    classifier does not have, are initialised; the manifest says both (nothing is silently invented)."""
    from vmamba_export.cli import main

    out = tmp_path / "bb"
    assert main(["export", "--task", "backbone", "--target", "cpu-onnxruntime", "--out", str(out)]) == 0
    weights = read_manifest(out)["model"]["weights"]
    assert weights["kind"] == "bundled" and weights["task"] == "backbone"
    assert weights["out_norms"] == "initialised"
    assert weights["task_dropped"]["count"] > 0 and "classifier" in str(weights["task_dropped"])


@pytest.mark.slow
def test_cli_export_backbone_of_random_weights(tmp_path, capsys):
    from vmamba_export.cli import main

    out = tmp_path / "bb"
    args = ["export", "--model", "vmamba_test_v2", "--random-weights", "--task", "backbone", "--target"]
    assert main([*args, "cpu-onnxruntime", "--out", str(out), "--max-size", "128"]) == 0
    assert "task backbone: outputs features_0 (16 ch, stride 4)" in capsys.readouterr().out
    m = read_manifest(out)
    assert m["model"]["config"]["task"] == "backbone" and m["model"]["weights"]["overrides"] == {"task": "backbone"}
    torch.manual_seed(0)
    model = build_model("vmamba_test_v2", task="backbone")
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 96)).astype(np.float32)
    for got, want in zip(_artifact_outputs(load(out), x), _torch_outputs(model, x), strict=True):
        assert _rel_l2(got, want) <= 1e-5


def test_build_of_a_segmenter_reports_pixel_agreement_and_miou(tmp_path):
    """`build` runs dense models as it runs classifiers: each target with a dense lowering exported and validated
    (its mIoU on a labelled set, PyTorch's beside it), the others listed as not built for the task, none an error.
    The bundled segmenter: build rebuilds the PyTorch model from the manifest, as for any bundled model."""
    from vmamba_export.build import BuildPlan, build, exit_status
    from vmamba_export.data.segmentation_sources import write_segmentation_folder
    from vmamba_export.model_source import resolve_model

    labelled = write_segmentation_folder("shapes:holdout", tmp_path / "labelled", limit=4)
    plan = BuildPlan(
        targets=[get_target("cpu-onnxruntime"), get_target("cpu-tvm")],
        precisions=["fp32"],
        accuracy_source=str(labelled),
        bench=False,
    )
    summary = build(resolve_model("vmamba_shapes_seg"), plan, tmp_path / "out", show_progress=False)
    rows = {r["target"]: r for r in summary["artifacts"]}
    assert summary["task"] == "segmentation" and exit_status(summary, fail_on_parity=True) == 0, summary
    assert rows["cpu-tvm"]["status"] == "not built for segmentation"
    assert "no segmentation lowering" in rows["cpu-tvm"]["note"]
    ort = rows["cpu-onnxruntime"]
    assert ort["status"] == "validated" and ort["runs"][0]["pixel_agreement"] >= 0.999
    acc = ort["accuracy"]
    assert acc["metric"] == "miou" and acc["num_images"] == 4 and acc["torch_from"] == "computed here"
    assert acc["artifact_miou"] == pytest.approx(acc["torch_miou"], abs=0.02)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| pixel agree | mIoU |" in report and f"PyTorch fp32 mIoU on {labelled}: {acc['torch_miou']:.4f}" in report
    assert (tmp_path / "out" / "report.png").is_file()
