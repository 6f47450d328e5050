"""The self-check an artifact carries: reference inputs and PyTorch fp32 logits (references.npz, hashed in the
manifest), checked by `vmamba-export validate DIR` with nothing but the artifact and its runtime."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vmamba_export.artifact import MANIFEST, file_entries, read_manifest, write_json_atomic
from vmamba_export.cli import main
from vmamba_export.data.sources import load_batch
from vmamba_export.errors import VMambaExportError
from vmamba_export.input_spec import InputSpec
from vmamba_export.references import REFERENCES_FILE
from vmamba_export.validate import validate_artifact


def _rehash(folder: Path) -> None:
    """Rewrite the manifest's file hashes after changing a payload file: what a careless or hostile edit would do,
    so that only the self-check, not the hash check, can catch it."""
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"] = file_entries(folder)
    write_json_atomic(folder / MANIFEST, manifest)


def _copy(artifact: Path, tmp_path: Path) -> Path:
    folder = tmp_path / artifact.name
    shutil.copytree(artifact, folder)
    return folder


def test_references_are_real_photos_and_the_pytorch_fp32_logits(digits_ort_artifact):
    manifest = read_manifest(digits_ort_artifact)
    refs = manifest["references"]
    assert refs["file"] == REFERENCES_FILE and REFERENCES_FILE in manifest["files"]
    assert refs["source"] == "builtin:8" and refs["num_images"] == 8 and refs["size"] == 32
    data = np.load(digits_ort_artifact / REFERENCES_FILE, allow_pickle=False)
    assert data["inputs"].dtype == np.float32 and data["inputs"].shape == (8, 3, 32, 32)
    assert list(data["names"]) == refs["names"] and refs["names"][0] == "astronaut"
    # Independently: the same photos preprocessed as the manifest says, through the bundled model in plain torch.
    spec = InputSpec.from_dict(manifest["input"]["preprocessing"])
    photos, _, _ = load_batch("builtin:8", spec)
    np.testing.assert_array_equal(data["inputs"], photos)
    from vmamba_export.model_source import resolve_model
    from vmamba_export.scan.reference import selective_scan_reference

    def float64_scan(u, *rest):  # the float64 sequential reference, not the torch_scan the export used
        return selective_scan_reference(u, *rest).to(u.dtype)

    model = resolve_model("vmamba_digits_v2").model.set_scan(float64_scan)
    with torch.no_grad():
        expected = model(torch.from_numpy(photos)).numpy()
    np.testing.assert_allclose(data["logits"], expected, rtol=1e-4, atol=1e-5)


def test_self_check_passes_without_images_checkpoint_or_recompute(digits_ort_artifact, tmp_path, capsys):
    folder = _copy(digits_ort_artifact, tmp_path)
    assert main(["validate", str(folder), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mode"] == "self-check" and result["status"] == "pass"
    (run,) = result["runs"]
    assert run["size"] == 32 and run["num_images"] == 8
    assert run["rel_l2"] <= 1e-5 and run["top1_agreement"] == 1.0
    assert read_manifest(folder)["validation"] is None  # nothing written unless asked (--record)
    assert main(["validate", str(folder), "--record", "--json"]) == 0
    capsys.readouterr()
    assert read_manifest(folder)["validation"]["mode"] == "self-check"  # recorded like a recomputed validation


def test_self_check_fails_when_the_model_file_is_wrong(digits_ort_artifact, tmp_path, capsys):
    """Another model's weights behind valid hashes: a small change in the classifier (top-1 mostly unchanged) must
    still fail the fp32 rel-L2 threshold."""
    import onnx
    from onnx import numpy_helper

    folder = _copy(digits_ort_artifact, tmp_path)
    proto = onnx.load(folder / "model.onnx")
    (bias,) = [t for t in proto.graph.initializer if t.name == "classifier.head.bias"]
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + np.float32(0.02), bias.name))
    onnx.save(proto, folder / "model.onnx")
    _rehash(folder)
    assert main(["validate", str(folder), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["status"] == "fail" and result["mode"] == "self-check"
    assert any(f.startswith("rel_l2") for f in result["runs"][0]["failures"])


def test_self_check_fails_when_the_references_are_wrong(digits_ort_artifact, tmp_path, capsys):
    folder = _copy(digits_ort_artifact, tmp_path)
    data = dict(np.load(folder / REFERENCES_FILE, allow_pickle=False))
    data["logits"] = data["logits"][::-1].copy()  # each image's logits belong to another image now
    np.savez(folder / REFERENCES_FILE, **data)
    _rehash(folder)
    assert main(["validate", str(folder), "--json"]) == 1
    failures = json.loads(capsys.readouterr().out)["runs"][0]["failures"]
    assert any(f.startswith("top1_agreement") for f in failures)
    # Without the hashes rewritten, the loader refuses the changed file before anything runs.
    shutil.copy(digits_ort_artifact / MANIFEST, folder / MANIFEST)
    assert main(["validate", str(folder)]) == 2
    assert f"{REFERENCES_FILE}: sha256 does not match" in capsys.readouterr().err


def test_references_outside_the_hashed_files_are_refused(digits_ort_artifact, tmp_path, capsys):
    folder = _copy(digits_ort_artifact, tmp_path)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["references"]["file"] = "other.npz"
    write_json_atomic(folder / MANIFEST, manifest)
    assert main(["validate", str(folder)]) == 2
    assert "references.file 'other.npz' is not among its hashed files" in capsys.readouterr().err


def test_recompute_and_old_artifacts_use_pytorch(digits_ort_artifact, tmp_path):
    folder = _copy(digits_ort_artifact, tmp_path)
    result = validate_artifact(folder, recompute=True, limit=4, show_progress=False, record=False)
    assert result["mode"] == "recompute" and result["status"] == "pass" and result["runs"][0]["num_images"] == 4
    # An artifact from before references existed: validate recomputes with PyTorch where torch is there.
    manifest = json.loads((folder / MANIFEST).read_text())
    del manifest["references"]
    (folder / REFERENCES_FILE).unlink()
    write_json_atomic(folder / MANIFEST, manifest)
    _rehash(folder)
    result = validate_artifact(folder, limit=4, show_progress=False, record=False)
    assert result["mode"] == "recompute" and result["status"] == "pass"


def test_accuracy_with_the_self_check(digits_ort_artifact, digits_folder, tmp_path, monkeypatch):
    folder = _copy(digits_ort_artifact, tmp_path)
    result = validate_artifact(folder, accuracy_source=str(digits_folder), show_progress=False, record=False)
    acc = result["accuracy"]
    assert result["mode"] == "self-check" and acc["num_images"] == 40
    assert acc["artifact_top1"] >= 0.9 and acc["drop_points"] == pytest.approx(0.0)  # the trained model, fp32
    # Where torch is missing: the artifact's top-1 alone, and why the PyTorch one is not there.
    import vmamba_export.validate as validate_module

    monkeypatch.setattr(validate_module, "torch_available", lambda: False)
    alone = validate_artifact(folder, accuracy_source=str(digits_folder), show_progress=False, record=False)
    assert alone["status"] == "pass" and alone["accuracy"]["artifact_top1"] == acc["artifact_top1"]
    assert alone["accuracy"]["torch_top1"] is None and alone["accuracy"]["drop_points"] is None
    assert "torch is not installed" in alone["accuracy"]["torch_note"]
    with pytest.raises(
        VMambaExportError, match=r"recomputing the PyTorch reference needs torch.*vmamba-export\[export\]"
    ):
        validate_artifact(folder, recompute=True, show_progress=False, record=False)


@pytest.mark.slow
@pytest.mark.parametrize(
    "target,precision",
    [("onnx-portable", "fp32"), ("cpu-openvino", "fp32"), ("cpu-openvino", "int8"), ("cpu-onnxruntime", "int8")],
)
def test_self_check_passes_for_real_artifacts(target, precision, tmp_path):
    """The other CPU targets and reduced precisions (each export takes 30-50 s here: slow)."""
    from vmamba_export.exporter import export_artifact
    from vmamba_export.model_source import resolve_model
    from vmamba_export.targets import get_target

    folder = tmp_path / f"{target}-{precision}"
    export_artifact(resolve_model("vmamba_digits_v2"), get_target(target), folder, precision)
    result = validate_artifact(folder, show_progress=False)
    assert result["mode"] == "self-check" and result["status"] == "pass", result["runs"]
    run = result["runs"][0]
    if precision == "fp32":
        assert run["rel_l2"] <= 1e-5 and run["top1_agreement"] == 1.0
    else:
        assert run["cosine_min"] >= 0.99 and run["rel_l2"] > 1e-5  # int8 really differs, within its threshold
