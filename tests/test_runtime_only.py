"""The runtime without torch: a fresh venv that holds only the runtime's packages (numpy, onnxruntime and its
dependencies, Pillow, rich and its dependencies) and this package runs `predict`, `validate` (the self-check) and
`bench` on an artifact built here, and `import torch` fails there."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNTIME_DISTRIBUTIONS = ("numpy", "onnxruntime", "pillow", "rich")
BUILDER_MODULES = ("torch", "onnx", "onnxscript", "safetensors", "openvino", "tvm", "coremltools", "nncf", "sklearn")


def _closure(names: tuple[str, ...]) -> dict[str, metadata.Distribution]:
    """The distributions `names` need, following their requirements (markers evaluated for this Python, no extras)."""
    from packaging.requirements import Requirement

    seen: dict[str, metadata.Distribution] = {}
    todo = list(names)
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        dist = metadata.distribution(name)
        seen[key] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory) -> Path:
    """`python -m venv --without-pip`, whose site-packages gets one .pth naming a folder of symlinks to the runtime
    distributions' files in this environment, and this package."""
    root = tmp_path_factory.mktemp("runtime-venv")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    links = root / "site"
    links.mkdir()
    dists = _closure(RUNTIME_DISTRIBUTIONS)
    assert not {"torch", "onnx", "onnxscript", "safetensors"} & set(dists), sorted(dists)
    for dist in dists.values():
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
            src = Path(dist.locate_file(top))
            if src.exists() and not (links / top).exists():
                (links / top).symlink_to(src)
    (links / "vmamba_export").symlink_to(ROOT / "vmamba_export")
    purelib = sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)})
    Path(purelib).mkdir(parents=True, exist_ok=True)
    (Path(purelib) / "runtime_only.pth").write_text(f"{links}\n")
    return venv


def _run(venv: Path, *args: str) -> subprocess.CompletedProcess:
    # -I: no PYTHONPATH, no user site, no current directory on sys.path; children (bench's workers) get no
    # PYTHONPATH either, so nothing from this environment can be found.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return subprocess.run(
        [str(venv / "bin" / "python"), "-I", *args], capture_output=True, text=True, env=env, cwd=venv.parent
    )


def test_runtime_venv_has_no_torch(runtime_venv):
    for module in ("torch", "onnx", "sklearn"):
        proc = _run(runtime_venv, "-c", f"import {module}")
        assert proc.returncode != 0 and f"No module named '{module}'" in proc.stderr
    proc = _run(
        runtime_venv, "-c", "import onnxruntime, numpy, PIL, rich, vmamba_export; print(vmamba_export.__file__)"
    )
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).resolve() == (ROOT / "vmamba_export" / "__init__.py").resolve()


def test_predict_validate_bench_without_torch(runtime_venv, digits_ort_artifact, digits_folder, tmp_path):
    import shutil

    from vmamba_export import load
    from vmamba_export.validate import validate_artifact

    digits_ort_artifact = shutil.copytree(digits_ort_artifact, tmp_path / "artifact")  # validate/bench record in it

    images = sorted(str(p) for p in digits_folder.rglob("*.png"))[:6]
    proc = _run(runtime_venv, "-m", "vmamba_export", "predict", str(digits_ort_artifact), *images, "--json")
    assert proc.returncode == 0, proc.stderr
    expected = load(digits_ort_artifact).predict(images, top_k=5)  # the same artifact, in this environment
    got = json.loads(proc.stdout)
    assert [r["image"] for r in got] == images
    assert [[t["index"] for t in r["top_k"]] for r in got] == [[t["index"] for t in e] for e in expected]
    # The digit each file's class folder names is the top-1 for most of them (a trained model).
    assert sum(r["top_k"][0]["label"] == Path(r["image"]).parent.name for r in got) >= 5

    proc = _run(runtime_venv, "-m", "vmamba_export", "validate", str(digits_ort_artifact), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    here = validate_artifact(digits_ort_artifact, show_progress=False, record=False)
    assert result["mode"] == "self-check" and result["status"] == "pass"
    assert result["runs"][0]["rel_l2"] == pytest.approx(here["runs"][0]["rel_l2"], rel=1e-6)
    assert result["runs"][0]["top1_agreement"] == 1.0

    proc = _run(
        runtime_venv, "-m", "vmamba_export", "validate", str(digits_ort_artifact), "--accuracy", str(digits_folder)
    )
    assert proc.returncode == 0, proc.stderr
    assert "top-1 on" in proc.stdout and "PyTorch not measured: torch is not installed" in proc.stdout

    proc = _run(
        runtime_venv, "-m", "vmamba_export", "bench", str(digits_ort_artifact), "--runs", "3", "--warmup", "1", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    (point,) = json.loads(proc.stdout)["results"]
    assert point["batch"] == 1 and point["size"] == 32 and point["median_ms"] > 0


def test_builder_commands_name_the_missing_extra(runtime_venv, digits_ort_artifact):
    proc = _run(runtime_venv, "-m", "vmamba_export", "--help")
    assert proc.returncode == 0 and all(c in proc.stdout for c in ("export", "validate", "predict", "bench"))
    proc = _run(runtime_venv, "-m", "vmamba_export", "export", "--target", "cpu-onnxruntime", "--out", "x")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: export needs the export extra: pip install 'vmamba-export[export]' (torch is not installed)"
    )
    proc = _run(runtime_venv, "-m", "vmamba_export", "validate", str(digits_ort_artifact), "--recompute")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "needs torch, which is not installed: pip install 'vmamba-export[export]'" in proc.stderr


def test_runtime_side_imports_nothing_from_the_builder():
    """In this environment (everything installed): the runtime's modules and the CLI's parser import none of the
    builder's packages."""
    code = (
        "import sys, vmamba_export, vmamba_export.cli as cli; cli.make_parser();"
        "import vmamba_export.runtime, vmamba_export.validate, vmamba_export.bench, vmamba_export.data.sources;"
        "import vmamba_export.runtime.onnxruntime_backend, vmamba_export.runtime.openvino_backend;"
        "import vmamba_export.runtime.tvm_backend;"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({BUILDER_MODULES!r})))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_cli_default_model_is_the_registry_default():
    from vmamba_export.commands._common import DEFAULT_MODEL
    from vmamba_export.models import DEFAULT_MODEL as REGISTRY_DEFAULT

    assert DEFAULT_MODEL == REGISTRY_DEFAULT
