"""Issue 20, class 2: `vmamba-export export` works for every target and precision this machine can build, with and
without --json (apple-coreml crashed after writing when --json was not given: its lowering counts MIL ops, not ONNX
nodes).

The CLI itself runs (`vmamba_export.cli.main`, and one real subprocess), on the smallest bundled model. Per (target,
precision): a real export in the human output mode (for onnx-portable fp32 as a real process, with --validate), whose
artifact is checked against its manifest with hashes computed here and opened by the loader where this machine can
run it; then the --json mode of the same command, with the exporter handing over the artifact just built (the export
itself is proven by the first run) so that each pair is built once. The first precision of every target runs in the
default suite, the others are marked slow.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vmamba_export.cli import main
from vmamba_export.targets import list_targets

ROOT = Path(__file__).resolve().parent.parent
REAL_PROCESS = (
    "onnx-portable",
    "fp32",
)  # this pair's human-mode export runs as `python -m vmamba_export ... --validate`


def _params() -> list:
    params = []
    for target in list_targets():
        for i, precision in enumerate(target.precisions):
            marks = [pytest.mark.slow] if i else []  # one precision per target in the default suite
            params.append(pytest.param(target.name, precision, marks=marks, id=f"{target.name}-{precision}"))
    return params


@functools.lru_cache(maxsize=1)
def cli_targets() -> dict[str, dict]:
    """What `vmamba-export targets --json` says about each target on this machine."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["targets", "--json"]) == 0
    return {t["name"]: t for t in json.loads(stdout.getvalue())}


def test_parametrization_covers_what_targets_json_says_is_buildable():
    listed = {(t["name"], p) for t in cli_targets().values() if t["can_build"] for p in t["precisions"]}
    params = {tuple(p.values) for p in _params()}
    assert listed and listed <= params


def check_artifact(folder: Path, target: str, precision: str) -> dict:
    """The artifact's manifest names this target and precision and every payload file matches its sha256; the
    loader opens it and runs a batch where this machine can run the target. Returns the manifest."""
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["target"]["name"] == target and manifest["precision"] == precision
    assert manifest["files"] and (folder / "report.md").is_file()
    for rel, entry in manifest["files"].items():
        digest = hashlib.sha256((folder / rel).read_bytes()).hexdigest()
        assert digest == entry["sha256"], rel
    assert not [p.name for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    if cli_targets()[target]["can_run"]:
        from vmamba_export import load

        side = manifest["input"]["preprocessing"]["image_size"]
        predictor = load(folder, threads=1)
        logits = predictor(np.zeros((1, manifest["input"]["channels"], side, side), np.float32))
        assert logits.shape == (1, manifest["output"]["num_classes"]) and np.isfinite(logits).all()
    return manifest


@pytest.mark.parametrize(("target", "precision"), _params())
def test_export_in_both_output_modes(target, precision, tmp_path, capsys, monkeypatch):
    info = cli_targets()[target]
    if not info["can_build"]:
        pytest.skip(f"{target} cannot be built here: {info['build_note']}")
    out = tmp_path / "human" / "art"
    args = ["export", "--target", target, "--precision", precision]
    if (target, precision) == REAL_PROCESS:
        # As a user runs it: a real process, with --validate (the verdict is printed and recorded in the artifact).
        cmd = [sys.executable, "-m", "vmamba_export", *args, "--out", str(out), "--validate"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        status, stdout, err = proc.returncode, proc.stdout, proc.stderr
        assert "parity: pass" in stdout and "Traceback" not in err
    else:
        status = main([*args, "--out", str(out)])
        stdout, err = capsys.readouterr()
    assert status == 0, err
    manifest = check_artifact(out, target, precision)
    if (target, precision) == REAL_PROCESS:
        assert manifest["validation"]["status"] == "pass"
    lines = [line for line in stdout.splitlines() if line.startswith(f"wrote {out}: ")]
    assert len(lines) == 1, stdout
    assert f"inputs {manifest['input']['min_size']}..{manifest['input']['max_size']} px" in lines[0]
    if "quantization" in manifest["lowering"]:
        assert f"{precision} {manifest['lowering']['quantization']['format']}" in stdout

    from vmamba_export import exporter

    def hand_over(source, target_, folder, precision_, max_size, overwrite, options, platform=None):
        assert (target_.name, precision_) == (target, precision)  # the CLI passed its arguments on
        shutil.copytree(out, folder)
        return json.loads((Path(folder) / "manifest.json").read_text())

    monkeypatch.setattr(exporter, "export_artifact", hand_over)
    json_out = tmp_path / "json" / "art"
    status = main([*args, "--out", str(json_out), "--json"])
    stdout, err = capsys.readouterr()
    assert status == 0, err
    printed = json.loads(stdout)
    assert printed["artifact"] == str(json_out)
    assert printed["manifest"] == json.loads((json_out / "manifest.json").read_text()) == manifest


@pytest.mark.slow
def test_cpu_tvm_tuned_export_prints_its_tuning(tmp_path, capsys):
    """The tuning line of the human output (only printed when --tune-budget tuned something)."""
    if not cli_targets()["cpu-tvm"]["can_build"]:
        pytest.skip(cli_targets()["cpu-tvm"]["build_note"])
    out = tmp_path / "art"
    status = main(["export", "--target", "cpu-tvm", "--out", str(out), "--tune-budget", "60", "--tune-trials", "8"])
    stdout, err = capsys.readouterr()
    assert status == 0, err
    tuning = check_artifact(out, "cpu-tvm", "fp32")["lowering"]["tuning"]
    assert f"tuning: {tuning['tuning_seconds']:.0f} s, {tuning['trials']} trials" in stdout
