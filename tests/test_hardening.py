"""Hardening across the pipeline: concurrency, interruption, no network, malformed inputs, the CI workflow."""

from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from vmamba_export import load
from vmamba_export.errors import VMambaExportError
from vmamba_export.exporter import export_artifact
from vmamba_export.model_source import resolve_model
from vmamba_export.targets import get_target

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hard") / "a"
    export_artifact(resolve_model("vmamba_test_v2", random_weights=True, seed=3), get_target("onnx-portable"), folder)
    return folder


def test_concurrent_predict_calls_are_safe(artifact):
    predictor = load(artifact)
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((1 + i % 3, 3, 64, 48 + 8 * i), dtype=np.float32) for i in range(8)]
    expected = [predictor(b) for b in batches]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(3):
                results[i] = predictor(batches[i])
        except BaseException as exc:  # noqa: BLE001 - collected and re-raised by the test
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, want in enumerate(expected):
        np.testing.assert_array_equal(results[i], want)


def test_interrupted_build_leaves_no_partial_artifact(tmp_path, monkeypatch):
    from vmamba_export import lowering

    def interrupted(model, target, folder, options):
        (folder / "model.onnx").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setitem(lowering.LOWERINGS, "portable", interrupted)
    with pytest.raises(KeyboardInterrupt):
        source = resolve_model("vmamba_test_v2", random_weights=True)
        export_artifact(source, get_target("onnx-portable"), tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_no_network_at_run_time(artifact, tmp_path, monkeypatch):
    """Export, validation and prediction never open a socket (weights, images and tools are all local)."""
    from vmamba_export.validate import validate_artifact

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    folder = tmp_path / "b"
    export_artifact(resolve_model("vmamba_test_v0", random_weights=True), get_target("onnx-portable"), folder)
    assert validate_artifact(folder, images="builtin", limit=3, show_progress=False)["status"] == "pass"
    from PIL import Image

    image = tmp_path / "photo.png"
    Image.fromarray(np.full((50, 70, 3), 90, np.uint8)).save(image)
    assert len(load(artifact).predict([str(image)], top_k=2)[0]) == 2


def _mutations(manifest: dict, rng: random.Random):
    """Malformed variants of a valid manifest: dropped keys, wrong types, wrong versions, hostile paths."""
    for key in list(manifest):
        broken = dict(manifest)
        del broken[key]
        yield f"without {key}", json.dumps(broken).encode()
    for key in ("files", "entry", "input", "model", "target"):
        for value in (None, 3, "x", [], {"?": 1}):
            broken = dict(manifest)
            broken[key] = value
            yield f"{key}={value!r}", json.dumps(broken).encode()
    for version in (0, 2, "1", None):
        yield f"schema {version!r}", json.dumps({**manifest, "schema_version": version}).encode()
    hostile = dict(manifest)
    hostile["files"] = {**manifest["files"], "../../etc/passwd": {"sha256": "0" * 64}}
    yield "path outside", json.dumps(hostile).encode()
    text = json.dumps(manifest).encode()
    for _ in range(20):
        cut = rng.randrange(1, len(text))
        yield f"truncated at {cut}", text[:cut]
    for _ in range(10):
        data = bytearray(text)
        for _ in range(5):
            data[rng.randrange(len(data))] = rng.randrange(256)
        yield "bytes flipped", bytes(data)
    yield "binary", bytes(rng.randrange(256) for _ in range(300))
    yield "array", b"[1, 2, 3]"


def test_fuzzed_manifests_get_clear_errors(artifact, tmp_path):
    rng = random.Random(0)
    manifest = json.loads((artifact / "manifest.json").read_text())
    folder = tmp_path / "m"
    shutil.copytree(artifact, folder)
    for what, payload in _mutations(manifest, rng):
        (folder / "manifest.json").write_bytes(payload)
        try:
            predictor = load(folder)
        except VMambaExportError as exc:
            assert "\n" not in str(exc), what
            continue
        # A mutation that still loads must still run correctly (e.g. flipped bytes inside a label string).
        out = predictor(np.zeros((1, 3, 64, 64), np.float32))
        assert out.shape[0] == 1, what


def test_malformed_images_are_skipped_or_refused(tmp_path):
    from PIL import Image

    from vmamba_export.data.sources import load_batch
    from vmamba_export.errors import ImageSourceError
    from vmamba_export.models import get_config

    spec = get_config("vmamba_test_v2").input
    good = tmp_path / "good.png"
    Image.fromarray(np.full((40, 30, 3), 120, np.uint8)).save(good)
    payload = good.read_bytes()
    rng = random.Random(1)
    for i in range(12):
        cut = payload[: rng.randrange(1, len(payload) - 1)]
        (tmp_path / f"trunc{i}.png").write_bytes(cut)
    (tmp_path / "noise.jpg").write_bytes(bytes(rng.randrange(256) for _ in range(500)))
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning):
        batch, _, names = load_batch(str(tmp_path), spec)
    assert "good.png" in " ".join(names) and batch.shape[1:] == (3, 224, 224)
    assert np.isfinite(batch).all()
    empty = tmp_path / "only_bad"
    empty.mkdir()
    (empty / "x.png").write_bytes(payload[:20])
    with pytest.raises(ImageSourceError, match=str(empty.name)), pytest.warns(UserWarning):
        load_batch(str(empty), spec)


def test_fuzzed_checkpoints_get_clear_errors(tmp_path):
    from vmamba_export.checkpoint import load_checkpoint
    from vmamba_export.models import build_model

    path = tmp_path / "good.pth"
    torch.save({"model": build_model("vmamba_test_v2").state_dict()}, path)
    payload = path.read_bytes()
    rng = random.Random(2)
    cases = [payload[: rng.randrange(1, len(payload))] for _ in range(10)]
    for _ in range(10):
        data = bytearray(payload)
        for _ in range(20):
            data[rng.randrange(len(data))] = rng.randrange(256)
        cases.append(bytes(data))
    cases.append(bytes(rng.randrange(256) for _ in range(4096)))
    for i, data in enumerate(cases):
        bad = tmp_path / f"bad{i}.pth"
        bad.write_bytes(data)
        try:
            load_checkpoint(bad)
        except VMambaExportError as exc:
            assert str(bad) in str(exc) and "\n" not in str(exc)


def test_workflow_passes_the_linter_and_a_broken_one_does_not(tmp_path):
    linter = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent))
    assert linter, "check-jsonschema is installed by requirements.txt"
    workflow = ROOT / ".github" / "workflows" / "build.yml"
    ok = subprocess.run([linter, "--builtin-schema", "vendor.github-workflows", str(workflow)], capture_output=True)
    assert ok.returncode == 0, ok.stdout.decode() + ok.stderr.decode()
    broken = tmp_path / "broken.yml"
    broken.write_text(workflow.read_text().replace("runs-on: ubuntu-24.04", "runs_on: ubuntu-24.04", 1))
    bad = subprocess.run([linter, "--builtin-schema", "vendor.github-workflows", str(broken)], capture_output=True)
    assert bad.returncode != 0


def test_workflow_has_a_job_per_hardware_kind():
    text = (ROOT / ".github" / "workflows" / "build.yml").read_text()
    for needle in ("ubuntu-24.04", "self-hosted", "gpu", "macos-14", "vmamba-export build", "upload-artifact"):
        assert needle in text
