"""Shared test helpers."""

from __future__ import annotations

import pytest


def _check_heldout_int8_accuracy(label: str, quant: dict) -> dict:
    """The int8 issue's bar on a bundled digits model, whatever the backend: the recorded held-out accuracy is the
    trained model's (>= 90%), int8 loses at most 1 point, and at least 10 layers went int8. Returns the accuracy."""
    acc = quant["accuracy"]
    print(
        f"\n{label}: holdout top-1 fp32 {100 * acc['fp32_top1']:.2f}, int8 {100 * acc['int8_top1']:.2f}, "
        f"drop {acc['drop_points']:.2f} points ({acc['num_images']} images), "
        f"{len(quant['quantized_layers'])} layers int8, {len(quant['float_layers'])} float"
    )
    assert acc["source"] == "digits:holdout" and acc["num_images"] == 359
    assert acc["fp32_top1"] >= 0.9  # the trained model, not random weights
    assert acc["drop_points"] <= 1.0
    assert len(quant["quantized_layers"]) >= 10
    return acc


@pytest.fixture
def heldout_int8_accuracy():
    """_check_heldout_int8_accuracy, for the ONNX Runtime and OpenVINO int8 tests."""
    return _check_heldout_int8_accuracy


@pytest.fixture(scope="session")
def digits_ort_artifact(tmp_path_factory):
    """A cpu-onnxruntime fp32 artifact of the bundled vmamba_digits_v2, built once per session (read-only: copy it
    before changing anything)."""
    from vmamba_export.exporter import export_artifact
    from vmamba_export.model_source import resolve_model
    from vmamba_export.targets import get_target

    folder = tmp_path_factory.mktemp("digits-ort") / "vmamba_digits_v2-cpu-onnxruntime-fp32"
    export_artifact(resolve_model("vmamba_digits_v2"), get_target("cpu-onnxruntime"), folder)
    return folder


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory):
    """40 held-out digits as PNG files in an ImageFolder layout (class folders "0".."9"): a labelled source that
    needs neither scikit-learn nor torch to read."""
    from vmamba_export.data.sources import open_source
    from vmamba_export.input_spec import DIGITS_LABELS

    root = tmp_path_factory.mktemp("digits-folder")
    for i, (_, image, label) in enumerate(open_source("digits:holdout", limit=40)):
        (root / DIGITS_LABELS[label]).mkdir(exist_ok=True)
        image.save(root / DIGITS_LABELS[label] / f"{i:03d}.png")
    return root
