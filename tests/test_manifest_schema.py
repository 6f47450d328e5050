"""The manifest is data from outside (issue #20, item 5): every value the loader uses is checked against a schema with
ranges, one line naming the field; and `load(dir, expected_sha256=...)` / `--expect-sha256` pin the manifest."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vmamba_export import load
from vmamba_export.artifact import (
    INTERPOLATIONS,
    MAX_CLASSES,
    MAX_INPUT_SIDE,
    MAX_MANIFEST_BYTES,
    PREPROCESSING_KEYS,
    fit_preprocessing,
    manifest_problem,
    read_manifest,
)
from vmamba_export.cli import main
from vmamba_export.data.preprocess import _RESAMPLE
from vmamba_export.errors import ArtifactError, VMambaExportError
from vmamba_export.models.configs import InputSpec

# Values no field accepts in its place, whatever its type, plus ones only some fields refuse (ranges).
HOSTILE = [None, True, "x", "", [], {}, [1, 2], {"a": 1}, -1, 0, 1.5, 10**12, -(10**12), 1e308, math.nan, math.inf,
           -math.inf]  # fmt: skip

# Every field the loader, predictor, validate and bench read from the manifest (cpu-onnxruntime artifact).
FIELDS = [
    "model",
    "model.name",
    "model.weights",
    "model.weights.seed",
    "target",
    "target.name",
    "target.runtime",
    "target.device",
    "precision",
    "input",
    "input.channels",
    "input.min_size",
    "input.max_size",
    "input.preprocessing",
    "input.preprocessing.image_size",
    "input.preprocessing.resize",
    "input.preprocessing.interpolation",
    "input.preprocessing.mean",
    "input.preprocessing.mean.0",
    "input.preprocessing.std",
    "input.preprocessing.std.2",
    "input.preprocessing.channel_order",
    "input.preprocessing.labels",
    "input.preprocessing.labels.3",
    "output",
    "output.num_classes",
    "entry",
    "entry.model",
    "entry.custom_op_library",
    "entry.providers",
    "files",
    "files.model.onnx",
    "files.model.onnx.sha256",
    "files.model.onnx.bytes",
    "thresholds",
    "thresholds.max_rel_l2",
]


def _split(dotted: str) -> list[str]:
    # "files.model.onnx.sha256": file names hold dots; join the name back.
    parts = dotted.split(".")
    if parts[0] == "files" and len(parts) > 2:
        return ["files", f"{parts[1]}.{parts[2]}", *parts[3:]]
    return parts


def _set(manifest: dict, dotted: str, value, delete: bool = False) -> dict:
    out = copy.deepcopy(manifest)
    node = out
    *path, last = _split(dotted)
    for part in path:
        node = node[int(part)] if isinstance(node, list) else node[part]
    key = int(last) if isinstance(node, list) else last
    if delete:
        if isinstance(node, list) or key in node:
            del node[key]
    else:
        node[key] = value
    return out


@pytest.fixture(scope="module")
def manifest(digits_artifact) -> dict:
    return json.loads((digits_artifact / "manifest.json").read_text())


@pytest.fixture(scope="module")
def scratch(digits_artifact, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("schema") / "a"
    shutil.copytree(digits_artifact, folder)
    return folder


def _image(folder: Path) -> Path:
    path = folder.parent / "photo.png"
    if not path.exists():
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(path)
    return path


def _must_refuse_or_run(folder: Path, what: str, field: str) -> str:
    """Load the mutated artifact: a one-line error naming the field, or a predictor that gives finite answers."""
    try:
        predictor = load(folder)
    except VMambaExportError as exc:
        message = str(exc)
        assert "\n" not in message, what
        leaf = [p for p in _split(field) if not p.isdigit()][-1]
        assert leaf in message, f"{what}: the error does not name {leaf!r}: {message}"
        return "refused"
    side = predictor.input_spec.image_size
    logits = predictor(np.zeros((1, predictor.channels, side, side), np.float32))
    assert np.isfinite(logits).all(), what
    top = predictor.predict([_image(folder)], top_k=3)[0]
    assert all(math.isfinite(r["score"]) and isinstance(r["label"], str) for r in top), what
    return "ran"


def test_every_field_mutated_gives_one_line_naming_it_or_still_runs(manifest, scratch):
    outcomes: dict[str, int] = {"refused": 0, "ran": 0}
    for field in FIELDS:
        cases = [(f"{field} deleted", _set(manifest, field, None, delete=True))]
        cases += [(f"{field}={value!r}", _set(manifest, field, value)) for value in HOSTILE]
        for what, mutated in cases:
            (scratch / "manifest.json").write_text(json.dumps(mutated))
            outcomes[_must_refuse_or_run(scratch, what, field)] += 1
    print(f"\n{sum(outcomes.values())} mutations: {outcomes}")
    assert outcomes["refused"] > 10 * len(FIELDS)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("input.preprocessing.std.1", 0.0, "'input.preprocessing.std[1]' must be a finite number in 1e-06..1000"),
        ("input.preprocessing.std.0", math.nan, "'input.preprocessing.std[0]' must be a finite number"),
        ("input.preprocessing.mean.2", -math.inf, "'input.preprocessing.mean[2]' must be a finite number"),
        ("input.preprocessing.mean", [0.5, 0.5], "'input.preprocessing.mean' must hold one number per channel (3)"),
        ("input.preprocessing.image_size", 16, "'input.preprocessing.image_size' (16) must lie in"),
        ("input.preprocessing.image_size", 10**9, "'input.preprocessing.image_size' must be an integer in 1..4,096"),
        ("input.preprocessing.resize", 0, "'input.preprocessing.resize' must be an integer in 1..16,384"),
        ("input.preprocessing.resize", 32.0, "'input.preprocessing.resize' must be int, got float"),
        ("input.preprocessing.interpolation", "cubic", "'input.preprocessing.interpolation' must be one of nearest"),
        ("input.preprocessing.channel_order", "RGBA", "'input.preprocessing.channel_order' must be RGB or BGR"),
        ("input.preprocessing.labels", ["a"] * 9, "one label per class (output.num_classes 10), got 9 labels"),
        ("input.preprocessing.labels.4", 4, "'input.preprocessing.labels[4]' must be a string, got int"),
        ("input.max_size", 10**6, "'input.max_size' must be an integer in 1..4,096"),
        ("input.max_size", 20, "'input.preprocessing.image_size' (32) must lie in input.min_size..input.max_size"),
        ("input.min_size", 2000, "'input.min_size' (2000) must not exceed 'input.max_size' (1024)"),
        ("input.channels", 4, "'input.channels' must be 1 or 3, got 4"),
        ("output.num_classes", 10**9, "'output.num_classes' must be an integer in 1..1,000,000"),
        ("output.num_classes", 11, "one label per class (output.num_classes 11), got 10 labels"),
        ("entry.model", "libvmamba_ort.so", "'entry.model' of a onnxruntime artifact must end in .onnx"),
        ("entry.model", "../model.onnx", "'entry.model' must be a path inside the artifact folder"),
        ("entry.custom_op_library", "/usr/lib/libevil.so", "must be a path inside the artifact folder"),
        ("entry.custom_op_library", "other.so", "entry.custom_op_library names a file that is not among its hashed"),
        ("entry.batch1_model", "model.batch1.xml", "'entry.batch1_model' of a onnxruntime artifact must end in .onnx"),
        ("entry.batch1_model", "model.batch1.onnx", "entry.batch1_model names a file that is not among its hashed"),
        ("files.model.onnx.sha256", "00", "files['model.onnx'].sha256 must be 64 lowercase hexadecimal digits"),
        ("thresholds.max_rel_l2", "1e-5", "'thresholds.max_rel_l2' must be a number, got str"),
        ("target.runtime", 3, "'target.runtime' must be str, got int"),
        ("input.preprocessing.crop_pct", 0.9, "'input.preprocessing' has unknown key 'crop_pct'"),
        ("model.weights.seed", "0", "'model.weights.seed' must be int, got str"),
    ],
)
def test_the_message_names_the_field_and_what_was_expected(manifest, field, value, message):
    assert message in manifest_problem(_set(manifest, field, value))


def test_the_ranges_accept_what_is_valid(manifest):
    assert manifest_problem(manifest) is None
    for field, value in [
        ("input.preprocessing.resize", 1),  # smaller than the crop: the crop size is used
        ("input.preprocessing.interpolation", "NEAREST"),
        ("input.preprocessing.channel_order", "bgr"),
        ("input.preprocessing.labels", None),
        ("input.max_size", MAX_INPUT_SIDE),
        ("input.min_size", 32),
        ("input.preprocessing.std.0", 1e-6),
    ]:
        assert manifest_problem(_set(manifest, field, value)) is None, (field, value)
    grey = _set(
        _set(_set(manifest, "input.channels", 1), "input.preprocessing.mean", [0.5]), "input.preprocessing.std", [0.5]
    )
    assert manifest_problem(grey) is None
    assert set(INTERPOLATIONS) == set(_RESAMPLE)  # the schema knows exactly the filters the preprocessing has
    assert MAX_CLASSES >= 21841  # ImageNet-22k heads load
    # The schema's keys are exactly the fields the predictor's InputSpec takes.
    assert set(PREPROCESSING_KEYS) == {f.name for f in dataclasses.fields(InputSpec)}


def _as(manifest: dict, runtime: str, entry: dict, extra_files: list[str], lowering: dict | None = None) -> dict:
    """A manifest of another runtime, from the ONNX Runtime one: the same input, the runtime's entry and files."""
    out = copy.deepcopy(manifest)
    out["target"]["runtime"] = runtime
    out["entry"] = entry
    out["files"] = {name: {"sha256": "a" * 64, "bytes": 4} for name in extra_files}
    if lowering is not None:
        out["lowering"] = lowering
    return out


def test_runtime_entries_must_match_the_runtime(manifest):
    ov = _as(manifest, "openvino", {"model": "model.xml", "weights": "model.bin", "extension_library": "libx.so",
                                    "inference_precision": "f32", "openvino_version": "2026.4.1"},
             ["model.xml", "model.bin", "libx.so"])  # fmt: skip
    tvm = _as(manifest, "tvm", {"model": "model.so", "vm_device_type": 1, "device": "cpu"}, ["model.so"],
              {"input_shape": ["batch", 3, 32, 32], "batch_range": [1, 4096]})  # fmt: skip
    tvm["input"]["min_size"] = tvm["input"]["max_size"] = 32
    coreml = _as(manifest, "coreml", {"model": "model.mlpackage"}, ["model.mlpackage/Manifest.json"],
                 {"input_shape": [1, 3, 32, 32]})  # fmt: skip
    coreml["input"]["min_size"] = coreml["input"]["max_size"] = 32
    for good in (ov, tvm, coreml):
        assert manifest_problem(good) is None, good["target"]["runtime"]
    bad = [
        (ov, "entry.model", "model.onnx", "'entry.model' of a openvino artifact must end in .xml"),
        (ov, "entry.inference_precision", "fp32", "'entry.inference_precision' must be one of f32, bf16, f16"),
        (ov, "entry.extension_library", None, "'entry.extension_library' must be str, got null"),
        (tvm, "entry.vm_device_type", 99, "'entry.vm_device_type' must be one of [1, 2, 8]"),
        (tvm, "entry.vm_device_type", "1", "'entry.vm_device_type' must be int, got str"),
        (tvm, "lowering.input_shape", [3, 32, 32], "'lowering.input_shape' must have 4 entries"),
        (tvm, "lowering.input_shape.2", 10**9, "'lowering.input_shape[2]' must be an integer in input.min_size"),
        (tvm, "lowering.input_shape.1", 1, "'lowering.input_shape[1]' must equal input.channels (3)"),
        (tvm, "lowering.batch_range", [5, 1], "'lowering.batch_range' must be [low, high]"),
        (tvm, "entry.params", {"file": "model.so", "tensors": [{"shape": [-1]}]}, "'entry.params.tensors[0].shape'"),
        (tvm, "entry.params", {"file": "model.so", "tensors": [{"shape": [10**6]}]}, "4,000,000 bytes"),
        (coreml, "entry.model", "model.onnx", "'entry.model' of a coreml artifact must end in .mlpackage"),
        (coreml, "lowering.input_shape.0", 0, "'lowering.input_shape[0]' must be \"batch\" or an integer"),
    ]
    for base, field, value, message in bad:
        problem = manifest_problem(_set(base, field, value))
        assert problem and message.replace("4,000,000 bytes", "4 bytes") in problem.replace("4,000,000", "4"), (
            field,
            value,
            problem,
        )


def test_fixed_size_artifacts_preprocess_to_their_side():
    section = {"min_size": 64, "max_size": 64, "preprocessing": {"image_size": 224, "resize": 256}}
    assert fit_preprocessing(section) == {"image_size": 64, "resize": 73}  # 64 * 256 / 224 = 73.1
    section = {"min_size": 17, "max_size": 1024, "preprocessing": {"image_size": 224, "resize": 256}}
    assert fit_preprocessing(section) == {"image_size": 224, "resize": 256}


def test_unparsable_huge_and_deep_manifests(scratch, manifest):
    path = scratch / "manifest.json"
    for payload, message in [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"schema_version": 1, "a": "' + b"x" * (MAX_MANIFEST_BYTES + 1) + b'"}', "a manifest is at most"),
        (json.dumps({**manifest, "schema_version": True}).encode(), "schema_version True"),
        (b"\xff\xfe{}", "not valid JSON"),
    ]:
        path.write_bytes(payload)
        with pytest.raises(ArtifactError, match=message) as err:
            load(scratch)
        assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------- sha256 pin


def test_expected_sha256_pins_the_manifest(digits_artifact, tmp_path, capsys):
    folder = tmp_path / "pinned"
    shutil.copytree(digits_artifact, folder)
    right = hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()
    assert load(folder, expected_sha256=right.upper()).num_classes == 10
    wrong = "0" * 64
    with pytest.raises(ArtifactError, match=f"has sha256 {right}, not the expected {wrong}"):
        load(folder, expected_sha256=wrong)
    with pytest.raises(ArtifactError, match="expected_sha256 must be 64 hexadecimal digits"):
        load(folder, expected_sha256="abc")
    assert read_manifest(folder, expected_sha256=right)["output"]["num_classes"] == 10

    image = tmp_path / "x.png"
    Image.fromarray(np.full((40, 30, 3), 90, np.uint8)).save(image)
    assert main(["predict", str(folder), str(image), "--expect-sha256", right]) == 0
    capsys.readouterr()
    before = (folder / "manifest.json").read_bytes()
    for command in (["predict", str(folder), str(image)], ["validate", str(folder)], ["bench", str(folder)]):
        assert main([*command, "--expect-sha256", wrong]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "not the expected" in err, command
    assert (folder / "manifest.json").read_bytes() == before  # refused before anything was recorded
    assert main(["predict", str(folder), str(image), "--expect-sha256", "not-hex"]) == 2  # argparse: one line
    assert "expected 64 hexadecimal digits" in capsys.readouterr().err

    # A manifest edited by hand (here: a label) is refused by the pin though its own file hashes still match.
    edited = json.loads(before)
    edited["input"]["preprocessing"]["labels"][0] = "zero"
    (folder / "manifest.json").write_text(json.dumps(edited, indent=2))
    assert load(folder).labels[0] == "zero"
    with pytest.raises(ArtifactError, match="not the expected"):
        load(folder, expected_sha256=right)
