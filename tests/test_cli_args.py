"""Issue 20, classes 8 and 9: every bad argument is one `error:` line with exit 2 (and a JSON object on stdout with
--json), --debug works anywhere on the line, every argument has help, the `models` and `targets` tables fit 80
columns without cutting a name, and the predictor converts or refuses arrays of other dtypes with the reason.

Bad arguments go through `vmamba_export.cli.main` as a user's command line would (in-process: the parsing and error
handling are the point, not the interpreter start-up); one test runs the real `python -m vmamba_export`."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vmamba_export.cli import main, make_parser
from vmamba_export.errors import CheckpointError, InputError

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "vmamba_export" / "weights" / "vmamba_digits_v2.safetensors"


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_error_line(err: str, *fragments: str) -> str:
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def assert_json_error(out: str, line: str, kind: str | None = None) -> None:
    data = json.loads(out)  # exactly one JSON document on stdout
    assert set(data) == {"error", "type"}
    assert f"error: {data['error']}" == line
    if kind:
        assert data["type"] == kind


# --- 8. one line, exit 2, for every bad argument --------------------------------------------------------------------

A = "no-such-artifact"  # parse-time refusals come before any artifact is opened
BAD_ARGUMENTS = [
    # (command line, what the line must name)
    (["predict", A, "x.png", "--top-k", "0"], ["--top-k", "'0'", ">= 1"]),
    (["predict", A, "x.png", "--top-k", "-3"], ["--top-k", "'-3'"]),
    (["predict", A, "x.png", "--top-k", "five"], ["--top-k", "'five'", "integer"]),
    (["predict", A, "x.png", "--threads", "0"], ["--threads", "'0'"]),
    (["predict", A, "x.png", "--threads", "100000"], ["--threads", "'100000'", "1024"]),
    (["validate", A, "--limit", "0"], ["--limit", "'0'"]),
    (["validate", A, "--threads", "-1"], ["--threads", "'-1'"]),
    (["validate", A, "--sizes", "32,0"], ["--sizes", "'32,0'"]),
    (["bench", A, "--runs", "0"], ["--runs", "'0'", ">= 1"]),
    (["bench", A, "--warmup", "-1"], ["--warmup", "'-1'", ">= 0"]),
    (["bench", A, "--threads", "0"], ["--threads", "'0'"]),
    (["bench", A, "--batch", "1,,x"], ["--batch", "'1,,x'"]),
    (["bench", A, "--sizes", "-32"], ["--sizes"]),
    (["export", "--target", "onnx-portable", "--out", "o", "--max-size", "0"], ["--max-size", "'0'"]),
    (["export", "--target", "onnx-portable", "--out", "o", "--max-size", "-64"], ["--max-size", "'-64'"]),
    (["export", "--target", "onnx-portable", "--out", "o", "--calib-samples", "0"], ["--calib-samples", "'0'"]),
    (["export", "--target", "onnx-portable", "--out", "o", "--max-drop", "-1"], ["--max-drop", "'-1'"]),
    (["export", "--target", "onnx-portable", "--out", "o", "--max-drop", "nan"], ["--max-drop", "'nan'", "finite"]),
    (["export", "--target", "cpu-openvino", "--out", "o", "--smooth-quant", "1.5"], ["--smooth-quant", "'1.5'"]),
    (["export", "--target", "cpu-tvm", "--out", "o", "--tune-budget", "0"], ["--tune-budget", "'0'", "> 0"]),
    (["export", "--target", "cpu-tvm", "--out", "o", "--tune-budget", "inf"], ["--tune-budget", "'inf'"]),
    (["export", "--target", "cpu-tvm", "--out", "o", "--tune-trials", "0"], ["--tune-trials", "'0'"]),
    (["export", "--target", "cpu-tvm", "--out", "o", "--tvm-batch", "0"], ["--tvm-batch", "'0'"]),
    (["export", "--target", "onnx-portable", "--out", "o", "--random-weights", "--seed", "-1"], ["--seed", "'-1'"]),
    (["export", "--target", "onnx-portable", "--out", "o", "--checkpoint", "w.pth", "--random-weights"], ["--random"]),
    (["build", "--out", "o", "--runs", "0"], ["--runs", "'0'"]),
    (["build", "--out", "o", "--calib-samples", "-2"], ["--calib-samples", "'-2'"]),
    (["build", "--out", "o", "--threads", "0,2"], ["--threads", "'0,2'"]),
    (["build", "--out", "o", "--random-weights", "--checkpoint", "w.pth"], ["--checkpoint", "--random-weights"]),
    # argparse's own refusals
    (["export", "--target", "onnx-portable"], ["required", "--out", "see vmamba-export export --help"]),
    (["predict", A], ["required", "IMAGE", "see vmamba-export predict --help"]),
    (["models", "--frobnicate"], ["unrecognized", "--frobnicate", "see vmamba-export models --help"]),
    (["validate", A, "--limit", "3", "extra-word"], ["unrecognized", "extra-word", "vmamba-export validate --help"]),
    (["no-such-command"], ["invalid choice", "'no-such-command'", "see vmamba-export --help"]),
    ([], ["required", "COMMAND"]),
    (["export", "--target", "x", "--out", "o", "--calib-method", "median"], ["--calib-method", "'median'"]),
]


@pytest.mark.parametrize("argv, fragments", BAD_ARGUMENTS, ids=[" ".join(argv) for argv, _ in BAD_ARGUMENTS])
def test_bad_argument_is_one_line_exit_2(capsys, tmp_path, monkeypatch, argv, fragments):
    monkeypatch.chdir(tmp_path)  # `--out o` must not be created anywhere (refused before any work)
    rc, out, err = run_cli(capsys, argv)
    assert rc == 2
    assert out == ""
    line = assert_one_error_line(err, *fragments)
    assert "Traceback" not in line
    assert list(tmp_path.iterdir()) == []

    rc, out, err = run_cli(capsys, [*argv, "--json"])
    assert rc == 2
    json_line = assert_one_error_line(err)
    assert_json_error(out, json_line, "usage")


def test_out_under_a_file_is_refused_and_the_file_untouched(capsys, tmp_path):
    owned = tmp_path / "notes.txt"
    owned.write_text("mine")
    for command in (["export", "--target", "onnx-portable"], ["build"]):
        rc, out, err = run_cli(capsys, [*command, "--random-weights", "--out", str(owned / "artifact"), "--json"])
        assert rc == 2
        line = assert_one_error_line(err, "--out", str(owned), "is a file, not a folder")
        assert_json_error(out, line, "usage")
    assert owned.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def _unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot create anything in: a read-only folder for a normal user; for root (whom
    permissions do not stop) sysfs, which refuses new entries."""
    import os
    import tempfile

    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    try:
        os.rmdir(tempfile.mkdtemp(dir="/sys"))
    except OSError:
        return Path("/sys")
    pytest.skip("no folder here refuses root")


def test_out_in_an_unwritable_place_is_refused_before_any_work(capsys, tmp_path):
    folder = _unwritable_folder(tmp_path)
    before = sorted(p.name for p in folder.iterdir())
    rc, out, err = run_cli(capsys, ["export", "--target", "onnx-portable", "--out", str(folder / "new" / "a")])
    assert rc == 2 and out == ""
    assert_one_error_line(err, "--out", f"cannot write in '{folder}'")
    assert sorted(p.name for p in folder.iterdir()) == before


def test_max_size_below_the_models_smallest_side(capsys, tmp_path):
    from vmamba_export.models import get_config
    from vmamba_export.models.shapes import export_min_size

    smallest = export_min_size(get_config("vmamba_digits_v2"))
    assert smallest > 8  # the case below must really be under the minimum
    out_dir = tmp_path / "a"
    argv = ["export", "--target", "onnx-portable", "--out", str(out_dir), "--max-size", "8", "--json"]
    rc, out, err = run_cli(capsys, argv)
    assert rc == 2
    line = assert_one_error_line(err, "--max-size", "8", f"smallest input side {smallest}")
    assert_json_error(out, line, "InputError")
    assert not out_dir.exists()


def test_build_precision_that_no_chosen_target_offers(capsys, tmp_path):
    out_dir = tmp_path / "o"
    argv = ["build", "--model", "vmamba_test_v2", "--random-weights", "--targets", "onnx-portable", "cpu-openvino"]
    rc, out, err = run_cli(capsys, [*argv, "--precisions", "fp32", "fp64", "--out", str(out_dir), "--json"])
    assert rc == 2
    line = assert_one_error_line(err, "--precisions fp64", "bf16, fp32, int8")
    assert_json_error(out, line, "VMambaExportError")
    assert not out_dir.exists()


def test_checkpoint_that_contradicts_model(capsys, tmp_path):
    out_dir = tmp_path / "a"
    argv = ["export", "--checkpoint", str(BUNDLED), "--model", "vmamba_test_v0", "--target", "onnx-portable"]
    rc, out, err = run_cli(capsys, [*argv, "--out", str(out_dir)])
    assert rc == 2 and out == ""
    assert_one_error_line(err, "vmamba_test_v0")
    assert not out_dir.exists()


def test_random_weights_with_checkpoint_refused_in_python_api_too():
    from vmamba_export.errors import VMambaExportError
    from vmamba_export.model_source import resolve_model

    with pytest.raises(VMambaExportError, match="--checkpoint and --random-weights"):
        resolve_model(checkpoint=BUNDLED, random_weights=True)


def test_validate_of_an_accuracy_judged_precision_without_labels_is_refused_before_export(capsys, tmp_path):
    """apple-coreml w8 is judged by top-1: `export --validate` with no labelled source for the model is refused up
    front (it used to export, then fail validation every time)."""
    out_dir = tmp_path / "w8"
    argv = ["export", "--model", "vmamba_test_v2", "--random-weights", "--target", "apple-coreml", "--precision", "w8"]
    rc, out, err = run_cli(capsys, [*argv, "--out", str(out_dir), "--validate", "--json"])
    assert rc == 2
    line = assert_one_error_line(err, "--accuracy SOURCE", "apple-coreml w8")
    assert_json_error(out, line, "VMambaExportError")
    assert not out_dir.exists()


@pytest.mark.slow  # a Core ML w8 export and a 359-image accuracy run: minutes on a busy 2-core machine
@pytest.mark.parametrize("precision", ["w8", "w8a8"])
def test_export_validate_of_coreml_int8_passes_the_accuracy_source_on(capsys, tmp_path, precision):
    out_dir = tmp_path / precision
    argv = ["export", "--target", "apple-coreml", "--precision", precision, "--out", str(out_dir), "--validate"]
    rc, out, err = run_cli(capsys, [*argv, "--json"])
    result = json.loads(out)
    validation = result["manifest"]["validation"]
    assert validation["accuracy"]["source"] == "digits:holdout"  # the bundled model's held-out set by default
    assert validation["accuracy_failures"] == []
    assert rc == 0 and validation["status"] == "pass", err


def test_every_flag_named_in_a_message_exists():
    """Messages and help name flags as they are spelled (a validation once said `--accuracy-source`)."""
    flags = set()

    def walk(parser: argparse.ArgumentParser) -> None:
        for action in parser._actions:
            flags.update(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)

    walk(make_parser())
    # Flags of other tools that messages point to: the kernel builder, nvcc, the benchmark scripts, and the pip
    # command line that fetches the aarch64 OpenVINO wheel (build_kernels.py).
    others = {"--cuda", "--force", "--quiet", "--version", "--fatbin", "--rounds", "--workdir"}
    others |= {"--no-deps", "--only-binary", "--python-version", "--implementation"}
    unknown = []
    for path in sorted((ROOT / "vmamba_export").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line):
                if flag not in flags | others:
                    unknown.append(f"{path.relative_to(ROOT)}:{number}: {flag}")
    assert not unknown


def test_json_result_already_printed_is_not_followed_by_a_second_document(capsys):
    """inspect --json prints its report (with an "error" field) and exits 2: stdout stays one JSON document."""
    rc, out, err = run_cli(capsys, ["inspect", str(BUNDLED), "--model", "vmamba_test_v0", "--json"])
    assert rc == 2
    report = json.loads(out)
    assert report["loadable"] is False and report["error"]
    assert_one_error_line(err, str(BUNDLED))


@pytest.mark.parametrize("position", ["before", "after"])
def test_debug_anywhere_shows_the_traceback(position, tmp_path):
    missing = str(tmp_path / "missing.pth")
    argv = ["--debug", "inspect", missing] if position == "before" else ["inspect", missing, "--debug"]
    with pytest.raises(CheckpointError, match="not found"):
        main(argv)


def test_debug_through_the_real_command_prints_a_traceback(tmp_path):
    missing = str(tmp_path / "missing.pth")
    cmd = [sys.executable, "-m", "vmamba_export", "inspect", missing, "--debug"]
    debug = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr and "CheckpointError" in debug.stderr


@pytest.mark.parametrize(
    "exc, fragments",
    [
        (PermissionError(13, "Permission denied", "/data/out"), ["/data/out: Permission denied", "--debug"]),
        (IsADirectoryError(21, "Is a directory", "a", None, "b"), ["a -> b: Is a directory"]),
        (RuntimeError("boom\nsecond line"), ["RuntimeError: boom; second line", "unexpected", "--debug"]),
    ],
)
def test_unexpected_exceptions_are_one_line(capsys, monkeypatch, exc, fragments):
    from vmamba_export.commands import models

    def fail():
        raise exc

    monkeypatch.setattr(models, "describe_models", fail)
    rc, out, err = run_cli(capsys, ["models", "--json"])
    assert rc == 2
    line = assert_one_error_line(err, *fragments)
    assert_json_error(out, line, type(exc).__name__)
    with pytest.raises(type(exc)):
        main(["models", "--debug"])


# --- 9. help a newcomer can use ----------------------------------------------------------------------------------


def test_every_argument_of_every_command_has_help():
    missing = []

    def walk(parser: argparse.ArgumentParser, where: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    if not choice.help:
                        missing.append(f"{where} {choice.dest} (command)")
                for name, sub in action.choices.items():
                    walk(sub, f"{where} {name}")
            elif not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{where} {'/'.join(action.option_strings) or action.dest}")

    walk(make_parser(), "vmamba-export")
    assert not missing


@pytest.fixture(scope="module")
def model_rows() -> list[dict]:
    from vmamba_export.commands.models import describe_models

    return describe_models()  # FLOPs of every config: computed once for the table tests below


def _rendered(capsys, monkeypatch, command: str, columns: int, model_rows: list[dict]) -> list[str]:
    from vmamba_export.commands import models

    monkeypatch.setattr(models, "describe_models", lambda: model_rows)
    monkeypatch.setenv("COLUMNS", str(columns))
    assert main([command]) == 0
    out, err = capsys.readouterr()
    return out.splitlines()


def test_models_table_fits_80_columns_and_keeps_every_name_whole(capsys, monkeypatch, model_rows):
    from vmamba_export.models import DEFAULT_MODEL, list_configs

    lines = _rendered(capsys, monkeypatch, "models", 80, model_rows)
    assert max(len(line) for line in lines) <= 80
    words = set(re.findall(r"[\w.-]+", "\n".join(lines)))
    for cfg in list_configs():
        assert cfg.name in words, cfg.name
    assert any(f" {DEFAULT_MODEL}* " in line for line in lines)
    assert not any("…" in line for line in lines)


def test_targets_table_fits_80_columns_and_keeps_every_name_whole(capsys, monkeypatch, model_rows):
    from vmamba_export.targets import list_targets

    lines = _rendered(capsys, monkeypatch, "targets", 80, model_rows)
    assert max(len(line) for line in lines) <= 80
    assert not any("…" in line for line in lines)
    for target in list_targets():
        row = [line for line in lines if re.match(rf"│ {re.escape(target.name)} +│", line)]
        assert len(row) == 1, target.name
        # The row's cells (and their continuation lines, if a cell wraps) hold every precision whole.
        start = lines.index(row[0])
        cells = [row[0]]
        for line in lines[start + 1 :]:
            if not line.startswith("│  "):
                break
            cells.append(line)
        words = re.findall(r"[\w-]+", " ".join(cells))
        for precision in target.precisions:
            assert precision in words, (target.name, precision)


def test_wide_terminal_shows_every_column(capsys, monkeypatch, model_rows):
    lines = _rendered(capsys, monkeypatch, "models", 200, model_rows)
    assert "depths" in lines[1] + lines[2] and "ratio" in lines[1] + lines[2]
    lines = _rendered(capsys, monkeypatch, "targets", 200, model_rows)
    assert "scan" in lines[2] and "mil-composite" in "\n".join(lines)


# --- 9. arrays of other dtypes given to the predictor -----------------------------------------------------------


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    from vmamba_export import load
    from vmamba_export.exporter import export_artifact
    from vmamba_export.model_source import resolve_model
    from vmamba_export.targets import get_target

    folder = tmp_path_factory.mktemp("args") / "a"
    export_artifact(resolve_model("vmamba_digits_v2"), get_target("cpu-onnxruntime"), folder, max_size=48)
    return load(folder)


def _batch(predictor) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((2, predictor.channels, 32, 32), dtype=np.float32)


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.dtype(">f4"), np.dtype(">f8")])
def test_float_arrays_of_any_width_or_byte_order_are_converted(predictor, dtype):
    batch = _batch(predictor).astype(dtype)
    original = batch.copy()
    reference = predictor(np.asarray(batch, dtype=np.float32))  # what the user meant, converted by hand
    np.testing.assert_array_equal(predictor(batch), reference)
    np.testing.assert_array_equal(batch, original)  # the caller's array is not modified
    assert batch.dtype == np.dtype(dtype)


def test_non_contiguous_float32_view_is_accepted(predictor):
    batch = _batch(predictor)
    wide = np.repeat(batch, 2, axis=3)[:, :, :, ::2]  # a strided view of the same values
    assert not wide.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(predictor(wide), predictor(batch))


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda b: (b * 50 + 128).clip(0, 255).astype(np.uint8), "raw pixels"),
        (lambda b: b.astype(np.int64), "raw pixels"),
        (lambda b: b > 0, "raw pixels"),
        (lambda b: b.astype(np.complex64), "real floating-point"),
        (lambda b: b.astype(object), "real floating-point"),
        (lambda b: np.where(b > 2.5, np.nan, b).astype(np.float32), "NaN or infinite"),
        (lambda b: np.where(b > 2.5, 1e300, b.astype(np.float64)), "NaN or infinite"),  # float64 beyond float32's range
        (lambda b: b.tolist(), "numpy.ndarray"),
        (lambda b: b[0], "4-D NCHW"),
    ],
)
def test_other_arrays_are_refused_with_the_reason(predictor, make, fragment):
    bad = make(_batch(predictor))
    with pytest.raises(InputError, match=re.escape(fragment)) as info:
        predictor(bad)
    assert "\n" not in str(info.value)


def test_torch_tensor_refusal_says_how_to_pass_it(predictor):
    torch = pytest.importorskip("torch")
    with pytest.raises(InputError, match=r"tensor\.numpy\(\)"):
        predictor(torch.from_numpy(_batch(predictor)))


def test_sizes_outside_the_artifact_range_are_refused_before_any_work(capsys, predictor):
    folder = str(predictor.folder)
    for command in (["validate", folder, "--sizes", "32,100000"], ["bench", folder, "--sizes", "100000"]):
        rc, out, err = run_cli(capsys, [*command, "--json"])
        assert rc == 2
        line = assert_one_error_line(err, "--sizes", "100000", f"{predictor.min_size}..{predictor.max_size}")
        assert_json_error(out, line, "InputError")
