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
def digits_artifact(tmp_path_factory):
    """The bundled trained digits model (32 px) exported for cpu-onnxruntime once per session (about 15 s): the small
    real artifact the image and manifest hardening tests load, predict with and mutate copies of."""
    from vmamba_export.exporter import export_artifact
    from vmamba_export.model_source import resolve_model
    from vmamba_export.targets import get_target

    folder = tmp_path_factory.mktemp("digits") / "vmamba_digits_v2-cpu-onnxruntime-fp32"
    export_artifact(resolve_model("vmamba_digits_v2"), get_target("cpu-onnxruntime"), folder)
    return folder
