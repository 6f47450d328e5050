"""apple-coreml: the chunked scan form, conversion to an ML Program, and parity through the numpy MIL evaluator.

Nothing here runs Core ML (it predicts only on macOS): the saved .mlpackage's MIL program is executed op by op by
vmamba_export/coreml_eval.py. Small models are converted at a small fixed input side to keep conversion short.
"""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("coremltools")

from vmamba_export import load  # noqa: E402
from vmamba_export.artifact import read_manifest  # noqa: E402
from vmamba_export.coreml_eval import KERNELS, MILEvaluator, UnsupportedMILOpError  # noqa: E402
from vmamba_export.errors import ArtifactError, TargetUnavailableError  # noqa: E402
from vmamba_export.exporter import export_artifact  # noqa: E402
from vmamba_export.lowering import ExportOptions  # noqa: E402
from vmamba_export.model_source import bundled_names, resolve_model  # noqa: E402
from vmamba_export.runtime.coreml_backend import EVALUATOR_ENV, NUMPY_LABEL  # noqa: E402
from vmamba_export.scan import selective_scan_reference  # noqa: E402
from vmamba_export.scan.chunked import selective_scan_chunked  # noqa: E402
from vmamba_export.scan.op import torch_scan  # noqa: E402
from vmamba_export.targets import get_target  # noqa: E402
from vmamba_export.validate import validate_artifact  # noqa: E402

SMALL = ("vmamba_test_v2", "vmamba_test_v0")
SIDE = 64  # fixed input side of the small-model programs (stage 1: 16 x 16 = 256 positions)
TARGET = get_target("apple-coreml")


def scan_inputs(b, di, h, w, n, delta_scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = 4
    return (
        torch.randn(b, di, h, w, generator=g),
        torch.randn(b, k, di, h, w, generator=g) * delta_scale,
        torch.randn(k * di, n, generator=g),
        torch.randn(b, k, n, h, w, generator=g),
        torch.randn(b, k, n, h, w, generator=g),
        torch.randn(k * di, generator=g),
        torch.randn(k * di, generator=g),
    )


@pytest.mark.parametrize("intra", ["segsum", "prefix"])
@pytest.mark.parametrize(
    "shape",
    [
        (2, 8, 7, 9, 1, 1.0),
        (1, 6, 12, 13, 16, 1.0),
        (1, 4, 56, 56, 1, 1.0),
        (1, 4, 56, 56, 1, 8.0),
        (1, 3, 20, 21, 16, 8.0),
    ],
)
def test_chunked_scan_matches_float64_reference(shape, intra):
    """Exact to ~1e-6 relative in fp32, at L = 3136 and with large deltas (decays near 0) too; nothing non-finite."""
    *dims, scale = shape
    args = scan_inputs(*dims, scale)
    ref = selective_scan_reference(*(t.double() for t in args))
    for chunk in (16, 64):
        out = selective_scan_chunked(*args, chunk=chunk, intra=intra)
        assert torch.isfinite(out).all()
        assert float((out.double() - ref).norm() / ref.norm()) <= 1e-6


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("coreml")
    built = {}
    for name in SMALL:
        source = resolve_model(name, random_weights=True, seed=1)
        for precision in ("fp32", "fp16"):
            folder = root / f"{name}-{precision}"
            export_artifact(source, TARGET, folder, precision, options=ExportOptions(extra={"input_size": SIDE}))
            built[(name, precision)] = folder
    return built


@pytest.mark.parametrize("name", SMALL)
def test_parity_through_numpy_evaluator(artifacts, name, tmp_path):
    for precision in ("fp32", "fp16"):
        folder = tmp_path / precision
        shutil.copytree(artifacts[(name, precision)], folder)
        result = validate_artifact(folder, images="builtin", sizes=[SIDE], limit=3, show_progress=False)
        run = result["runs"][0]
        assert result["status"] == "pass", result
        assert result["evaluated_with"] == NUMPY_LABEL  # labelled: this is not Core ML
        assert read_manifest(folder)["validation"]["evaluated_with"] == NUMPY_LABEL
        if precision == "fp32":
            assert run["rel_l2"] <= 1e-4 and run["top1_agreement"] == 1.0
        else:
            assert run["cosine_min"] >= 0.999
            # fp16 really is fp16: the evaluator rounds to the dtypes the program declares, so it is not exact.
            assert run["rel_l2"] > 1e-5
        dtypes = MILEvaluator(folder / "model.mlpackage").dtypes
        assert (dtypes.get("float16", 0) > 0) == (precision == "fp16")


@pytest.mark.parametrize("name", SMALL)
def test_program_has_no_loop_and_a_fixed_scan_composite_per_block(artifacts, name):
    manifest = read_manifest(artifacts[(name, "fp32")])
    low = manifest["lowering"]
    ops, blocks = low["mil_ops"], low["scan_blocks"]
    assert blocks == sum(resolve_model(name, random_weights=True).model.config.depths)
    assert "while_loop" not in ops and "cond" not in ops
    # Counts from the saved package (not the in-memory conversion) agree with the manifest.
    assert dict(MILEvaluator(artifacts[(name, "fp32")] / "model.mlpackage").op_counts) == ops
    if low["scan_intra_chunk"] == "segsum":  # d_state 1: one (T x T) matmul and two cumsums per block
        assert ops["matmul"] == blocks and ops["cumsum"] == 2 * blocks
    else:  # d_state 16: the in-chunk prefix, one cumsum for the carry
        assert "matmul" not in ops and ops["cumsum"] == blocks
    assert ops["softplus"] == blocks
    assert manifest["input"]["min_size"] == manifest["input"]["max_size"] == SIDE


def test_unknown_op_is_an_error_naming_it(artifacts, monkeypatch):
    monkeypatch.delitem(KERNELS, "softplus")
    with pytest.raises(UnsupportedMILOpError, match="softplus"):
        MILEvaluator(artifacts[("vmamba_test_v2", "fp32")] / "model.mlpackage")


def test_package_files_are_hashed_and_checked(artifacts, tmp_path):
    folder = tmp_path / "a"
    shutil.copytree(artifacts[("vmamba_test_v2", "fp32")], folder)
    files = read_manifest(folder)["files"]
    weights = "model.mlpackage/Data/com.apple.CoreML/weights/weight.bin"
    assert weights in files and "model.mlpackage/Data/com.apple.CoreML/model.mlmodel" in files
    with open(folder / weights, "r+b") as fh:
        fh.seek(200)
        fh.write(b"\x01\x02")
    with pytest.raises(ArtifactError, match="weight.bin: sha256 does not match"):
        load(folder)


@pytest.mark.skipif(sys.platform == "darwin", reason="on macOS Core ML runs")
def test_off_macos_the_runtime_refuses_and_points_at_the_evaluator(artifacts, monkeypatch):
    monkeypatch.delenv(EVALUATOR_ENV, raising=False)
    with pytest.raises(TargetUnavailableError, match="Core ML needs macOS.*coreml_eval"):
        load(artifacts[("vmamba_test_v2", "fp32")])
    monkeypatch.setenv(EVALUATOR_ENV, "numpy")
    predictor = load(artifacts[("vmamba_test_v2", "fp32")])
    x = np.random.default_rng(0).standard_normal((2, 3, SIDE, SIDE), dtype=np.float32)
    model = resolve_model("vmamba_test_v2", random_weights=True, seed=1).model.set_scan(torch_scan)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    out = predictor(x)  # a batch of 2 through the batch-1 program
    assert out.shape == (2, 10) and np.linalg.norm(out - ref) / np.linalg.norm(ref) <= 1e-4


def test_targets_say_build_here_but_not_run():
    assert TARGET.can_build() == (True, "ok")
    ok, why = TARGET.can_run()
    assert not ok and "macOS" in why
    assert TARGET.precisions == ("fp32", "fp16", "w8")  # w8a8 not offered until its FX trace works


# ------------------------------------------------------------------------------------------ bundled digits models
BUNDLED = [n for n in ("vmamba_digits_v2", "vmamba_digits_v0") if n in bundled_names()]


@pytest.mark.slow  # a conversion and a held-out evaluation per case through the numpy evaluator
@pytest.mark.skipif(not BUNDLED, reason="no bundled digits weights yet")
@pytest.mark.parametrize("name", BUNDLED or ["none"])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "w8"])
def test_bundled_model(name, precision, tmp_path):
    folder = tmp_path / "a"
    options = ExportOptions(calib="digits:calib", calib_samples=64)
    manifest = export_artifact(resolve_model(name), TARGET, folder, precision, options=options)
    quantised = precision in ("w8", "w8a8")
    result = validate_artifact(
        folder, images="builtin", limit=4, show_progress=False, accuracy_source="digits:holdout" if quantised else None
    )
    assert result["status"] == "pass", result
    run = result["runs"][0]
    if precision == "fp32":
        assert run["rel_l2"] <= 1e-4 and run["top1_agreement"] == 1.0
    elif precision == "fp16":
        assert run["cosine_min"] >= 0.999
    else:
        assert result["accuracy"]["num_images"] >= 300
        assert result["accuracy"]["drop_points"] <= 1.0
        ops = manifest["lowering"]["mil_ops"]
        if precision == "w8":  # int8 weights, dequantised at load
            assert ops.get("constexpr_affine_dequantize", 0) + ops.get("constexpr_blockwise_shift_scale", 0) > 0
        else:  # int8 activations: quantize/dequantize pairs in the program
            assert ops.get("quantize", 0) > 0 and ops.get("dequantize", 0) > 0
