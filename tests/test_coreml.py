"""apple-coreml: the chunked scan form, conversion to an ML Program, and parity through the numpy MIL evaluator.

Nothing here runs Core ML (it predicts only on macOS): the saved .mlpackage's MIL program is executed op by op by
vmamba_export/coreml_eval.py. Small models are converted at a small fixed input side to keep conversion short.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("coremltools")

from vmamba_export import load  # noqa: E402
from vmamba_export.artifact import read_manifest  # noqa: E402
from vmamba_export.coreml_eval import KERNELS, MILEvaluator, UnsupportedMILOpError  # noqa: E402
from vmamba_export.data.sources import load_batch  # noqa: E402
from vmamba_export.errors import ArtifactError, TargetUnavailableError  # noqa: E402
from vmamba_export.exporter import export_artifact  # noqa: E402
from vmamba_export.lowering import ExportOptions  # noqa: E402
from vmamba_export.lowering.coreml import Calibration, export_coreml  # noqa: E402
from vmamba_export.model_source import bundled_names, resolve_model  # noqa: E402
from vmamba_export.quantize.coreml_int8 import qdq_inserted, quantizable_layers  # noqa: E402
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
        result = validate_artifact(folder, images="builtin", sizes=[SIDE], limit=3, show_progress=False, record=True)
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
    assert TARGET.precisions == ("fp32", "fp16", "w8", "w8a8")


# ------------------------------------------------------------------------------------------ int8 ops and w8a8
# The evaluator's quantize / dequantize / constexpr_affine_dequantize against torch's quantized tensors, an
# independent implementation of the same affine arithmetic (round half to even, saturate at the dtype's range).


def _kernel(op_type, **inputs):
    return KERNELS[op_type](**inputs)


def _qd():
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)

    return torch.ops.quantized_decomposed


def test_quantize_rounds_half_to_even_and_saturates_as_torch():
    qd, scale = _qd(), 0.5
    # Ties (x / scale = k + 0.5), values beyond both ends of int8, and ordinary values.
    x = np.array([0.25, 0.75, 1.25, -0.25, -0.75, -1.25, 63.74, 63.76, 100.0, -64.0, -64.3, -1e9, 1e9, 0.1], np.float32)
    q = _kernel("quantize", input=x, scale=np.float32(scale), output_dtype="int8")
    ref = qd.quantize_per_tensor(torch.from_numpy(x), scale, 0, -128, 127, torch.int8).numpy()
    assert q.dtype == np.int8 and np.array_equal(q, ref)
    assert q[:6].tolist() == [0, 2, 2, 0, -2, -2] and q[8] == 127 and q[11] == -128
    # uint8 with a zero point: the zero point is added after rounding, then the result saturates at 0 / 255.
    qu = _kernel("quantize", input=x, scale=np.float32(scale), zero_point=np.uint8(128), output_dtype="uint8")
    ref_u = qd.quantize_per_tensor(torch.from_numpy(x), scale, 128, 0, 255, torch.uint8)
    assert qu.dtype == np.uint8 and np.array_equal(qu, ref_u.numpy())
    deq = _kernel("dequantize", input=qu, scale=np.float32(scale), zero_point=np.uint8(128))
    assert np.array_equal(deq, qd.dequantize_per_tensor(ref_u, scale, 128, 0, 255, torch.uint8).numpy())
    with pytest.raises(UnsupportedMILOpError, match="int4"):
        _kernel("quantize", input=x, scale=np.float32(scale), output_dtype="int4")


def test_per_channel_quantize_and_constexpr_dequantize_match_torch():
    qd, g = _qd(), torch.Generator().manual_seed(0)
    w = torch.randn(6, 4, 3, 3, generator=g) * torch.arange(1, 7).reshape(6, 1, 1, 1)
    scales = w.abs().amax(dim=(1, 2, 3)) / 127
    zps = torch.tensor([0, 1, -2, 3, 0, -5])
    ref = qd.quantize_per_channel(w, scales, zps, 0, -128, 127, torch.int8)
    zp8 = zps.numpy().astype(np.int8)
    q = _kernel("quantize", input=w.numpy(), scale=scales.numpy(), zero_point=zp8, axis=0, output_dtype="int8")
    assert np.array_equal(q, ref.numpy())
    deq = _kernel("constexpr_affine_dequantize", quantized_data=q, zero_point=zp8, scale=scales.numpy(), axis=0)
    ref_deq = qd.dequantize_per_channel(ref, scales, zps, 0, -128, 127, torch.int8).numpy()
    np.testing.assert_allclose(deq, ref_deq, rtol=1e-6, atol=1e-7)
    # A per-channel vector that does not fit the axis is refused, not broadcast along another axis.
    with pytest.raises(UnsupportedMILOpError, match="axis"):
        _kernel("dequantize", input=q, scale=scales.numpy(), axis=1)


def test_calibration_ranges_are_the_layer_inputs_and_bad_options_are_named():
    from vmamba_export.quantize.coreml_int8 import (
        CoreMLQuantizationError,
        calibrate_ranges,
        select_layers,
    )

    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.GELU(), torch.nn.Linear(5, 3)).eval()
    x = torch.randn(20, 6, generator=g) * 3
    with torch.no_grad():
        hidden = net[1](net[0](x))
    layers, floats = select_layers(net)
    assert layers == ["0", "2"] and all("scan" in why for why in floats.values())
    ranges = calibrate_ranges(net, layers, x.numpy(), "minmax", batch_size=7)
    assert ranges == pytest.approx({"0": float(x.abs().max()), "2": float(hidden.abs().max())})
    # percentile: the mean over batches of each batch's 99.99th percentile of |x|, so below the max here.
    pct = calibrate_ranges(net, layers, x.numpy(), "percentile", batch_size=10)
    expected = np.mean([float(torch.quantile(x[i : i + 10].abs().flatten(), 0.9999)) for i in (0, 10)])
    assert pct["0"] == pytest.approx(expected) and pct["0"] < ranges["0"]
    with pytest.raises(CoreMLQuantizationError, match="'entropy' is not offered for apple-coreml"):
        calibrate_ranges(net, layers, x.numpy(), "entropy")
    with pytest.raises(CoreMLQuantizationError, match="'blocks.*' names no quantizable layer"):
        select_layers(net, ("blocks.*",))
    assert select_layers(net, ("2",)) == (["0"], {**floats, "2": "--exclude"})


@pytest.fixture(scope="module")
def w8a8_program(tmp_path_factory):
    """vmamba_test_v2 (random weights) at SIDE, w8a8 calibrated on 8 builtin photos, with fp32 compute so that the
    evaluator can be compared with torch's int8 ops without fp16 rounding in between."""
    folder = tmp_path_factory.mktemp("w8a8")
    model = resolve_model("vmamba_test_v2", random_weights=True, seed=1).model
    spec = dataclasses.replace(model.config.input, image_size=SIDE, resize=SIDE)
    batch, _, names = load_batch("builtin:8", spec)
    info = export_coreml(model, folder, "w8a8", Calibration(batch, names, "builtin:8"), SIDE, compute_precision="fp32")
    return model, folder / "model.mlpackage", info, spec


def test_w8a8_program_computes_torch_int8_model(w8a8_program):
    model, package, info, spec = w8a8_program
    q = info["quantization"]
    layers = quantizable_layers(model)
    assert q["quantized_layers"] == layers and q["calibration"]["samples"] == 8
    ops = MILEvaluator(package).op_counts
    # The saved package's non-const ops are those the conversion reported (loading may split off a few consts).
    assert {k: v for k, v in ops.items() if k != "const"} == {k: v for k, v in info["mil_ops"].items() if k != "const"}
    assert ops["quantize"] == ops["dequantize"] == ops["constexpr_affine_dequantize"] == len(layers)
    x, _, _ = load_batch("builtin", spec)
    x = x[8:]  # the seven photos not among the calibration images
    evaluator = MILEvaluator(package)
    out = np.concatenate([evaluator(x[i : i + 1]) for i in range(len(x))])
    with torch.no_grad():
        float_ref = model.set_scan(torch_scan)(torch.from_numpy(x)).numpy()
        with qdq_inserted(model, q["activation_scales"]):
            int8_ref = model(torch.from_numpy(x)).numpy()

    def rel(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    # The program is the int8 model: per image it agrees with torch's int8 ops to float rounding, far more closely
    # than with the float model. Not on every image: an activation on a rounding boundary can land one step apart
    # in the two implementations (their float sums differ in order, by CPU), and the step then carries through the
    # later layers (seen on one of the seven photos on an AVX2-only CPU, none on AVX-512 ones).
    per_image = [rel(out[i : i + 1], int8_ref[i : i + 1]) for i in range(len(x))]
    assert sum(r <= 1e-5 for r in per_image) >= len(x) - 2, per_image
    assert rel(out, float_ref) > 10 * float(np.median(per_image))
    assert rel(out, float_ref) <= 0.1  # and int8 is still a close approximation of the float model


# ------------------------------------------------------------------------------------------ bundled digits models
BUNDLED = [n for n in ("vmamba_digits_v2", "vmamba_digits_v0") if n in bundled_names()]


@pytest.mark.slow  # a conversion and a held-out evaluation per case through the numpy evaluator
@pytest.mark.skipif(not BUNDLED, reason="no bundled digits weights yet")
@pytest.mark.parametrize("name", BUNDLED or ["none"])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "w8", "w8a8"])
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
        else:  # int8 activations: one quantize/dequantize pair and int8 weights per quantised layer
            layers = manifest["lowering"]["quantization"]["quantized_layers"]
            assert len(layers) == len(quantizable_layers(resolve_model(name).model)) > 0
            assert ops["quantize"] == ops["dequantize"] == ops["constexpr_affine_dequantize"] == len(layers)
            calibration = manifest["lowering"]["quantization"]["calibration"]
            assert (calibration["source"], calibration["samples"]) == ("digits:calib", 64)
