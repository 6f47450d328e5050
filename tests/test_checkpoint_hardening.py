"""Issue 20, items 3, 7 and 9 (part): checkpoints from outside, fed through the CLI as a user would.

- Fine-tunes with their own classes: a head of 7 classes on the bundled digits backbone exports with labels from
  `--labels FILE` (or numbered classes without), and the artifact loads, predicts with those labels and validates.
- Checkpoints that lie: a key claiming stage 999999999999, keys that are not strings, tensors whose shape claims
  more than the file stores: one line, fast. Extra keys load only on request (`--ignore-keys`, `--non-strict`), and
  the refusal names them, also with --json.
- The manifest records the checkpoint's file name and sha256; validate needs `--checkpoint` for it and checks it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vmamba_export.bundled import bundled_weights_path, load_bundled
from vmamba_export.checkpoint import inspect_checkpoint, load_checkpoint, load_state_dict_into_model
from vmamba_export.cli import main as cli_main
from vmamba_export.errors import CheckpointError, VMambaExportError
from vmamba_export.model_source import read_labels, rebuild_from_manifest, resolve_model

BASE = "vmamba_digits_v2"
CLASSES = 7
# Time bound for a crafted file's refusal. It takes ~2 s on an idle machine (most of it building the known configs
# on the meta device once); the bound leaves room for a shared, loaded CI machine. Before the fix: minutes and GBs.
FAST_S = 60
LABELS = ["zero", "one", "two", "three", "four", "five", "six"]


def _finetune_sd() -> dict[str, torch.Tensor]:
    """The bundled digits model "fine-tuned" to 7 classes: its head sliced to the first 7 rows."""
    sd = {k: v.clone() for k, v in load_bundled(BASE).state_dict().items()}
    sd["classifier.head.weight"] = sd["classifier.head.weight"][:CLASSES].clone()
    sd["classifier.head.bias"] = sd["classifier.head.bias"][:CLASSES].clone()
    return sd


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    sd = _finetune_sd()
    torch.save({"model": sd}, d / "ft7.pth")
    # The same fine-tune with training leftovers the model does not have.
    extra = dict(sd, **{"aux_head.weight": torch.ones(3, 4), "teacher.proj.bias": torch.zeros(5)})
    torch.save({"model": extra}, d / "ft7_extra.pth")
    # Blank lines and stray whitespace, as a hand-written file has them.
    (d / "labels.txt").write_text("\n  zero \none\n\ntwo\nthree\t\nfour\nfive\nsix\n\n")
    (d / "labels6.txt").write_text("\n".join(LABELS[:6]) + "\n")
    return d


def _one_line_error(capsys, *names: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for name in names:
        assert name in err, (name, err)
    return err


def _timed_cli(argv: list[str]) -> tuple[int, float]:
    start = time.monotonic()
    rc = cli_main(argv)
    return rc, time.monotonic() - start


# ----------------------------------------------------------------------------------- 7. checkpoints that lie


def test_key_claiming_a_huge_stage_is_refused_fast(tmp_path, capsys):
    path = tmp_path / "huge.pth"
    key = "layers.999999999999.blocks.0.w"
    torch.save({key: torch.zeros(1), "layers.1" + "0" * 5000 + ".blocks.0.w": torch.zeros(1)}, path)
    assert path.stat().st_size < 16 * 1024
    rc, seconds = _timed_cli(["inspect", str(path)])
    assert rc == 2 and seconds < FAST_S, (rc, seconds)
    err = _one_line_error(capsys, str(path), "match no known config", key)
    assert len(err) < 2000  # the 5,000-digit key is shortened in the message
    rc, seconds = _timed_cli(["inspect", str(path), "--json"])
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert rc == 2 and seconds < FAST_S
    assert report["loadable"] is False and key in report["key_diff"]["unexpected"]["examples"]
    assert report["key_diff"]["unexpected"]["count"] == 2
    assert key in captured.err and "\n" not in captured.err.strip()


def test_huge_stage_key_beside_real_weights_is_named_and_can_be_ignored(tmp_path, capsys):
    sd = _finetune_sd()
    key = "layers.999999999999.blocks.0.w"
    sd[key] = torch.zeros(1)
    path = tmp_path / "lying.pth"
    torch.save(sd, path)
    rc, seconds = _timed_cli(["inspect", str(path)])
    assert rc == 2 and seconds < FAST_S
    _one_line_error(capsys, key, "1 unexpected", "--ignore-keys")
    # --non-strict leaves out only keys outside the model's modules: a `layers.*` key is the model's business.
    assert cli_main(["inspect", str(path), "--non-strict"]) == 2
    _one_line_error(capsys, key, "--non-strict drops only keys outside the model's modules")
    assert cli_main(["inspect", str(path), "--ignore-keys", "layers.999999999999.*", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["loadable"] and report["config"] == BASE and report["num_classes"] == CLASSES
    assert report["ignored_keys"] == {"count": 1, "examples": [key]}


@pytest.mark.parametrize(
    "bad_key,type_name", [(7, "int"), (("layers", 0), "tuple"), (b"patch_embed.0.weight", "bytes")]
)
def test_keys_that_are_not_strings(tmp_path, capsys, bad_key, type_name):
    sd = _finetune_sd()
    sd[bad_key] = torch.zeros(2)
    path = tmp_path / f"key_{type_name}.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and "not strings" in msg and f"({type_name})" in msg, msg
    with pytest.raises(CheckpointError, match="not strings"):
        load_state_dict_into_model(sd)  # a dict handed over in Python, not read from a file
    for argv in (["inspect", str(path)], ["inspect", str(path), "--json"]):
        assert cli_main(argv) == 2
        _one_line_error(capsys, str(path), "not strings")
    out = tmp_path / "art"
    assert cli_main(["export", "--checkpoint", str(path), "--target", "onnx-portable", "--out", str(out)]) == 2
    _one_line_error(capsys, str(path), "not strings")
    assert not out.exists()


def test_tensors_claiming_more_than_the_file_holds(tmp_path, capsys):
    cases = {
        # 4 bytes stored, a 1e12-value head claimed: sizing a model by it would take terabytes.
        "expanded.pth": ({"classifier.head.weight": torch.zeros(1).expand(10**6, 10**6)}, "stores only 4 bytes"),
        "meta.pth": ({"patch_embed.0.weight": torch.empty(10**12, device="meta")}, "no data in the file"),
    }
    for name, (sd, expected) in cases.items():
        path = tmp_path / name
        torch.save(sd, path)
        assert path.stat().st_size < 4096
        rc, seconds = _timed_cli(["inspect", str(path)])
        assert rc == 2 and seconds < FAST_S
        _one_line_error(capsys, str(path), expected)


# ----------------------------------------------------------------------------------- extra keys, on request only


def test_extra_keys_refused_by_default_and_named_in_every_mode(files, capsys):
    path = files / "ft7_extra.pth"
    assert cli_main(["inspect", str(path)]) == 2
    _one_line_error(capsys, "2 unexpected", "aux_head.weight", "teacher.proj.bias", "--non-strict")
    assert cli_main(["inspect", str(path), "--json"]) == 2
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["key_diff"]["unexpected"] == {"count": 2, "examples": ["aux_head.weight", "teacher.proj.bias"]}
    assert report["key_diff"]["missing"]["count"] == 0
    assert "aux_head.weight" in captured.err
    # Named config: the same keys named.
    assert cli_main(["inspect", str(path), "--model", BASE]) == 2
    _one_line_error(capsys, f"do not fit {BASE}", "2 unexpected", "aux_head.weight")
    with pytest.raises(CheckpointError, match="aux_head.weight"):
        load_checkpoint(path)


def test_extra_keys_accepted_with_ignore_keys_or_non_strict(files, capsys):
    path = files / "ft7_extra.pth"
    reference = load_checkpoint(files / "ft7.pth")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = reference(x)
    for kwargs in ({"ignore_keys": ["aux_head.*", "teacher.*"]}, {"drop_unexpected": True}):
        model = load_checkpoint(path, **kwargs)
        with torch.no_grad():
            torch.testing.assert_close(model(x), want, rtol=0, atol=0)
    for flags, field in (
        (["--ignore-keys", "aux_head.*", "--ignore-keys", "teacher.*"], "ignored_keys"),
        (["--non-strict"], "dropped_unexpected_keys"),
    ):
        assert cli_main(["inspect", str(path), "--json", *flags]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["loadable"] and report[field]["count"] == 2
    # One pattern is not enough: the other key is still named.
    assert cli_main(["inspect", str(path), "--ignore-keys", "aux_head.*"]) == 2
    _one_line_error(capsys, "1 unexpected", "teacher.proj.bias")
    # A pattern that matches nothing is a typo, not a silent no-op.
    assert cli_main(["inspect", str(path), "--ignore-keys", "aux_head", "--non-strict"]) == 2
    _one_line_error(capsys, "--ignore-keys 'aux_head' matches none of its")


def test_non_strict_never_loads_a_deeper_model_into_a_shallower_config(files, capsys, tmp_path):
    """Extra blocks are `layers.*` keys: --non-strict must not drop them and load the model with blocks missing."""
    sd = _finetune_sd()
    for key in [k for k in sd if k.startswith("layers.1.blocks.1.")]:
        sd[key.replace("layers.1.blocks.1.", "layers.1.blocks.2.")] = sd[key].clone()
    path = tmp_path / "deeper.pth"
    torch.save(sd, path)
    assert cli_main(["inspect", str(path), "--non-strict"]) == 2
    _one_line_error(capsys, "layers.1.blocks.2.", "--non-strict drops only keys outside")


def test_missing_weights_are_never_made_up(files, capsys, tmp_path):
    sd = _finetune_sd()
    del sd["layers.0.blocks.0.norm.weight"]
    sd["aux.w"] = torch.zeros(1)
    path = tmp_path / "partial.pth"
    torch.save(sd, path)
    for flags in (["--non-strict"], ["--ignore-keys", "aux.*"]):
        assert cli_main(["inspect", str(path), *flags]) == 2
        _one_line_error(capsys, "1 missing", "layers.0.blocks.0.norm.weight")


# ----------------------------------------------------------------------------------- 3. fine-tunes with own classes


def test_labels_file_parsing(files, tmp_path):
    assert read_labels(files / "labels.txt") == LABELS
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\t\n")
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffa\nb\n".encode())
    assert read_labels(bom) == ["a", "b"]
    for path, expected in ((bad, "not UTF-8"), (blank, "no labels"), (tmp_path / "nope.txt", "not found")):
        with pytest.raises(VMambaExportError) as info:
            read_labels(path)
        assert str(path) in str(info.value) and expected in str(info.value) and "\n" not in str(info.value)


def test_inspect_reports_classes_and_whether_labels_are_known(files, capsys):
    assert cli_main(["inspect", str(files / "ft7.pth"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["config"], report["num_classes"], report["head_replaced"]) == (BASE, CLASSES, True)
    assert report["labels_known"] is False and report["labels"] is None
    assert cli_main(["inspect", str(files / "ft7.pth"), "--labels", str(files / "labels.txt"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["labels_known"] is True and report["labels"] == LABELS
    assert cli_main(["inspect", str(files / "ft7.pth")]) == 0
    out = capsys.readouterr().out
    assert "7 classes" in out and "unknown" in out
    # The bundled model itself: 10 classes, labels known from its config.
    report = inspect_checkpoint(bundled_weights_path(BASE))
    assert (report["num_classes"], report["labels_known"], report["labels"]) == (10, True, [str(i) for i in range(10)])


def test_label_count_must_match_the_head(files, capsys, tmp_path):
    out = tmp_path / "art"
    argv = ["export", "--checkpoint", str(files / "ft7.pth"), "--target", "onnx-portable", "--out", str(out)]
    assert cli_main([*argv, "--labels", str(files / "labels6.txt")]) == 2
    _one_line_error(capsys, str(files / "labels6.txt"), "6 labels", "7 classes")
    assert not out.exists() and not list(tmp_path.iterdir())
    with pytest.raises(VMambaExportError, match="6 labels, but the model"):
        resolve_model(checkpoint=files / "ft7.pth", labels=LABELS[:6])
    assert load_checkpoint(files / "ft7.pth", labels=files / "labels.txt").config.input.labels == tuple(LABELS)
    with pytest.raises(VMambaExportError, match="labels6.txt: 6 labels"):
        load_checkpoint(files / "ft7.pth", labels=files / "labels6.txt")
    source = resolve_model(checkpoint=files / "ft7.pth", labels=LABELS)
    assert source.model.config.input.labels == tuple(LABELS) and source.labels_source == "given"
    # Without labels the fine-tune keeps none of the base model's 10 (numbered at run time).
    source = resolve_model(checkpoint=files / "ft7.pth")
    assert source.model.config.num_classes == CLASSES and source.model.config.input.labels is None
    assert source.labels_source is None
    # The bundled model keeps its own, and takes a replacement of the right count.
    assert resolve_model(BASE).labels_source == "config"
    assert resolve_model(BASE, labels=list("abcdefghij")).model.config.input.labels == tuple("abcdefghij")


@pytest.fixture(scope="module")
def exported(files, tmp_path_factory):
    """The 7-class fine-tune (with training leftovers) exported through the CLI with --labels and --ignore-keys."""
    out = tmp_path_factory.mktemp("art") / "ft7-ort"
    argv = [
        "export",
        "--checkpoint",
        str(files / "ft7_extra.pth"),
        "--ignore-keys",
        "aux_head.*",
        "--non-strict",
        "--labels",
        str(files / "labels.txt"),
        "--target",
        "cpu-onnxruntime",
        "--out",
        str(out),
        "--json",
    ]
    assert cli_main(argv) == 0
    return out


def _png(path: Path, seed: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    return path


def test_finetune_artifact_loads_predicts_with_its_labels_and_validates(exported, files, capsys, tmp_path):
    from vmamba_export import load

    manifest = json.loads((exported / "manifest.json").read_text())
    assert (
        manifest["output"]["num_classes"] == CLASSES and manifest["output"]["labels_source"] == "labels file labels.txt"
    )
    assert manifest["input"]["preprocessing"]["labels"] == LABELS
    weights = manifest["model"]["weights"]
    assert weights["file"] == "ft7_extra.pth" and "path" not in weights
    assert weights["ignore_keys"] == ["aux_head.*"] and weights["non_strict"] is True and weights["dropped_keys"] == 2
    # No path of the build machine in the manifest or report.
    for name in ("manifest.json", "report.md"):
        assert str(files) not in (exported / name).read_text()

    images = [_png(tmp_path / f"img{i}.png", i) for i in range(3)]
    assert cli_main(["predict", str(exported), *map(str, images), "--top-k", "3", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    # Reference: the PyTorch fine-tune read straight from the clean file, on the same preprocessed pixels.
    predictor = load(exported)
    reference = load_checkpoint(files / "ft7.pth")
    with torch.no_grad():
        logits = reference(torch.from_numpy(predictor.preprocess(images))).numpy()
    for record, row in zip(records, logits):
        best = int(row.argmax())
        assert record["top_k"][0]["index"] == best and record["top_k"][0]["label"] == LABELS[best]
        assert {r["label"] for r in record["top_k"]} <= set(LABELS)

    # validate: the self-check against the artifact's references needs no checkpoint; recomputing the PyTorch
    # reference of a checkpoint build needs the file, and only that file.
    assert cli_main(["validate", str(exported), "--limit", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mode"] == "self-check"
    assert cli_main(["validate", str(exported), "--limit", "4", "--recompute"]) == 2
    _one_line_error(capsys, "'ft7_extra.pth'", "--checkpoint")
    assert cli_main(["validate", str(exported), "--limit", "4", "--checkpoint", str(files / "ft7.pth")]) == 2
    _one_line_error(capsys, "not the same file", "'ft7_extra.pth'")
    argv = ["validate", str(exported), "--limit", "4", "--checkpoint", str(files / "ft7_extra.pth"), "--json"]
    assert cli_main(argv) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "pass"


@pytest.mark.slow  # a second export (~40 s on a loaded machine); the fast tests check the config has no labels
def test_finetune_without_labels_numbers_its_classes(files, tmp_path):
    from vmamba_export import load
    from vmamba_export.exporter import export_artifact
    from vmamba_export.targets import get_target

    out = tmp_path / "ft7-numbered"
    source = resolve_model(checkpoint=files / "ft7.pth")
    manifest = export_artifact(source, get_target("cpu-onnxruntime"), out)
    assert manifest["input"]["preprocessing"]["labels"] is None and manifest["output"]["labels_source"] is None
    predictor = load(out)
    top = predictor.predict([_png(tmp_path / "x.png", 9)], top_k=CLASSES)[0]
    assert sorted(r["label"] for r in top) == [f"class_{i}" for i in range(CLASSES)]


# ----------------------------------------------------------------------------------- 9. checkpoint by name and hash


def test_rebuild_from_manifest_needs_the_recorded_checkpoint(files, tmp_path):
    source = resolve_model(checkpoint=files / "ft7.pth")
    assert source.weights["file"] == "ft7.pth" and "path" not in source.weights
    manifest = {"model": {"name": BASE, "weights": source.weights}}
    with pytest.raises(CheckpointError, match="built from checkpoint 'ft7.pth'.*pass --checkpoint"):
        rebuild_from_manifest(manifest)
    with pytest.raises(CheckpointError, match="not the same file"):
        rebuild_from_manifest(manifest, checkpoint=files / "ft7_extra.pth")
    with pytest.raises(CheckpointError, match="not found"):
        rebuild_from_manifest(manifest, checkpoint=tmp_path / "gone.pth")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuild_from_manifest(manifest, checkpoint=files / "ft7.pth")(x), source.model(x))
    # A manifest from before this change holds the build machine's absolute path: it is not opened, only named.
    old = {"kind": "checkpoint", "path": str(files / "ft7.pth"), "sha256": source.weights["sha256"]}
    with pytest.raises(CheckpointError) as info:
        rebuild_from_manifest({"model": {"name": BASE, "weights": old}})
    assert "'ft7.pth'" in str(info.value) and str(files) not in str(info.value)
    # Bundled weights are found by name.
    bundled = resolve_model(BASE)
    rebuilt = rebuild_from_manifest({"model": {"name": BASE, "weights": bundled.weights}})
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), bundled.model(x), rtol=0, atol=0)


@pytest.mark.slow  # export + validate of one artifact through `build`
def test_build_validates_a_checkpoint_build(files, tmp_path, capsys):
    out = tmp_path / "b"
    argv = [
        "build",
        "--checkpoint",
        str(files / "ft7_extra.pth"),
        "--non-strict",
        "--labels",
        str(files / "labels.txt"),
    ]
    argv += ["--targets", "cpu-onnxruntime", "--precisions", "fp32", "--no-bench", "--out", str(out), "--json"]
    assert cli_main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [row["status"] for row in summary["artifacts"]] == ["validated"]
    assert summary["weights"]["file"] == "ft7_extra.pth" and str(files) not in json.dumps(summary)
