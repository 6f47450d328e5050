"""Loading dense-task checkpoints (dense_checkpoint.py): mmseg/mmdet training files, task and config detection,
backbones from classifiers, what is dropped or initialised, and the errors.

The official layouts come from the listings in ../shared/vmamba/keys/segmentation/ (built from the official
configs with real mmsegmentation). One training file of the tiny listing is written in full (mmengine layout: a
`state_dict` in listing order and dtypes, `meta`, optimizer and scheduler state); the others are checked through
the same key/shape code on meta tensors (as `inspect` does), which allocates nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vmamba_export.checkpoint import _load_sd, detect, inspect_checkpoint, load_checkpoint_selection
from vmamba_export.errors import CheckpointError, StateDictMismatchError, VMambaExportError
from vmamba_export.model_source import rebuild_from_manifest, resolve_model
from vmamba_export.models import UperNetSegmenter, VMambaBackbone, build_model

LISTINGS = Path(__file__).resolve().parents[2] / "shared" / "vmamba" / "keys" / "segmentation"
pytestmark = pytest.mark.skipif(not LISTINGS.is_dir(), reason=f"no key listings at {LISTINGS}")
NAMES = ("upernet_vssm_tiny", "upernet_vssm_small", "upernet_vssm_base")
SEG_OVERRIDES = {"task": "segmentation", "head_channels": 32, "num_classes": 5}


def read_listing(path: Path) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    rows = []
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, dtype = line.split("\t")
        rows.append((key, tuple(ast.literal_eval(shape)), getattr(torch, dtype)))
    return rows


def listing_state_dict(path: Path, device: str = "meta") -> dict[str, torch.Tensor]:
    with torch.device(device):
        return {k: torch.empty(s, dtype=d) for k, s, d in read_listing(path)}


def mmengine_file(path: Path, state_dict: dict[str, torch.Tensor], classes: int = 150) -> Path:
    """A training file as mmengine's CheckpointHook writes one, with plain-typed meta and runtime state."""
    first = next(iter(state_dict.values()))
    torch.save(
        {
            "meta": {
                "epoch": 0,
                "iter": 160000,
                "mmengine_version": "0.10.1",
                "mmseg_version": "1.2.2",
                "time": "20240415_101010",
                "seed": 0,
                "experiment_name": "upernet_vssm_4xb4-160k_ade20k-512x512_tiny",
                "env_info": "sys.platform: linux\nPython: 3.10",
                "config": "model = dict(type='EncoderDecoder', ...)",
                "dataset_meta": {
                    "classes": tuple(f"class{i}" for i in range(classes)),
                    "palette": [[i % 256, 0, 0] for i in range(classes)],
                },
                "hook_msgs": {"last_ckpt": "work_dirs/iter_160000.pth"},
            },
            "state_dict": state_dict,
            "message_hub": {"runtime_info": {"iter": 160000, "max_iters": 160000}, "resumed_keys": {"iter": True}},
            "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros_like(first)}}},
            "param_schedulers": [{"eta_min": 0.0, "power": 1.0, "last_step": 160000, "by_epoch": False}],
        },
        path,
    )
    return path


def small_segmenter(**overrides) -> UperNetSegmenter:
    torch.manual_seed(0)
    model = build_model("vmamba_test_v2", **{**SEG_OVERRIDES, **overrides})
    # Non-trivial norms and BatchNorm statistics, so a load that skipped them would show.
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if t.is_floating_point():
                t.add_(0.1 * torch.randn_like(t))
                if "running_var" in key:
                    t.abs_()
    return model


def aux_head(channels: int, classes: int) -> dict[str, torch.Tensor]:
    return {
        "auxiliary_head.conv_seg.weight": torch.randn(classes, 8, 1, 1),
        "auxiliary_head.conv_seg.bias": torch.randn(classes),
        "auxiliary_head.convs.0.conv.weight": torch.randn(8, channels, 3, 3),
        "auxiliary_head.convs.0.bn.weight": torch.ones(8),
        "auxiliary_head.convs.0.bn.bias": torch.zeros(8),
        "auxiliary_head.convs.0.bn.running_mean": torch.zeros(8),
        "auxiliary_head.convs.0.bn.running_var": torch.ones(8),
        "auxiliary_head.convs.0.bn.num_batches_tracked": torch.tensor(5),
    }


def seg_training_file(tmp_path: Path, model: UperNetSegmenter, name: str = "seg.pth") -> Path:
    state = {**model.state_dict(), **aux_head(model.config.widths[2], model.config.num_classes)}
    return mmengine_file(tmp_path / name, state, model.config.num_classes)


# ----------------------------------------------------------------------------------------------------------------
# The official listings


def test_listing_matches_our_segmenter_keys():
    """Guard for the meta checks below: the listing minus the auxiliary head is our segmenter's state dict."""
    rows = read_listing(LISTINGS / "upernet_vssm_tiny.txt")
    with torch.device("meta"):
        ours = build_model("upernet_vssm_tiny").state_dict()
    official = [(k, s) for k, s, _ in rows if not k.startswith("auxiliary_head.")]
    assert official == [(k, tuple(v.shape)) for k, v in ours.items()]


@pytest.mark.parametrize("order", ["", "release-order"])
@pytest.mark.parametrize("name", NAMES)
def test_listing_loads_strictly_with_aux_dropped(name, order):
    sd = listing_state_dict(LISTINGS / order / f"{name}.txt")
    aux = [k for k in sd if k.startswith("auxiliary_head.")]
    assert len(aux) == 8
    found = detect(sd)
    assert (found.name, found.task, found.config.num_classes, found.config.head_channels) == (
        name,
        "segmentation",
        150,
        512,
    )
    _, sel = _load_sd(sd, None, True, build=False)  # the strict key/shape check of a real load
    assert sel.config.name == name and sel.config.task == "segmentation" and sel.diff.exact
    assert sel.task_dropped == aux
    assert set(sel.state_dict) == set(sd) - set(aux)


def test_tiny_training_file_loads_strictly(tmp_path):
    """The whole tiny listing (62M values, empty tensors: the values do not matter here) in an mmengine file."""
    path = mmengine_file(tmp_path / "upernet_tiny.pth", listing_state_dict(LISTINGS / "upernet_vssm_tiny.txt", "cpu"))
    model, sel = load_checkpoint_selection(path)
    assert isinstance(model, UperNetSegmenter) and model.config.name == "upernet_vssm_tiny"
    assert sel.task_dropped == [k for k, *_ in read_listing(LISTINGS / "upernet_vssm_tiny.txt") if "auxiliary" in k]
    assert model.decode_head.bottleneck.bn.num_batches_tracked.dtype == torch.int64
    report = inspect_checkpoint(path)
    assert report["loadable"] and report["wrapper"] == "state_dict" and report["task"] == "segmentation"
    assert (report["config"], report["num_classes"], report["head_channels"]) == ("upernet_vssm_tiny", 150, 512)
    assert report["task_dropped_keys"]["count"] == 8
    assert report["task_dropped_keys"]["by_module"] == {"auxiliary_head": 8}
    assert not any("not float32" in p for p in report["problems"])  # int64 BatchNorm counters are not "widened"


def test_listing_as_backbone_keeps_backbone_only():
    sd = listing_state_dict(LISTINGS / "upernet_vssm_small.txt")
    _, sel = _load_sd(sd, None, True, build=False, task="backbone")
    assert sel.config.task == "backbone" and sel.config.name == "vmamba_small_s2l15" and sel.diff.exact
    assert set(sel.state_dict) == {k.removeprefix("backbone.") for k in sd if k.startswith("backbone.")}
    assert {k.split(".")[0] for k in sel.task_dropped} == {"decode_head", "auxiliary_head"}


def test_listing_with_other_classes_is_its_backbone_with_overrides():
    sd = listing_state_dict(LISTINGS / "upernet_vssm_tiny.txt")
    with torch.device("meta"):
        sd["decode_head.conv_seg.weight"] = torch.empty(19, 512, 1, 1)
        sd["decode_head.conv_seg.bias"] = torch.empty(19)
    found = detect(sd)
    assert (found.name, found.task, found.config.num_classes) == ("vmamba_tiny_s1l8", "segmentation", 19)
    _, sel = _load_sd(sd, None, True, build=False)
    assert sel.diff.exact and sel.config.input.labels is None


# ----------------------------------------------------------------------------------------------------------------
# Small real models: values, detection, reports, manifests


def test_segmentation_file_loads_the_same_segmenter(tmp_path):
    ref = small_segmenter()
    path = seg_training_file(tmp_path, ref)
    source = resolve_model(checkpoint=path)
    model = source.model
    assert isinstance(model, UperNetSegmenter)
    assert (model.config.name, model.config.num_classes, model.config.head_channels) == ("vmamba_test_v2", 5, 32)
    x = torch.randn(2, 3, 45, 37)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    rec = source.weights
    assert rec["task"] == "segmentation"
    assert rec["task_dropped"]["count"] == 8 and rec["task_dropped"]["by_module"] == {"auxiliary_head": 8}
    assert rec["task_dropped"]["keys"][0] == "auxiliary_head.conv_seg.weight"
    # validate rebuilds the same model from the manifest (and the same file)
    manifest = {"model": {"name": model.config.name, "config": model.config.to_dict(), "weights": rec}}
    again = rebuild_from_manifest(manifest, checkpoint=path)
    assert isinstance(again, UperNetSegmenter) and again.config == model.config


def test_other_head_width_and_classes_load_with_overrides(tmp_path):
    ref = small_segmenter(head_channels=24, num_classes=7)
    path = seg_training_file(tmp_path, ref)
    model, sel = load_checkpoint_selection(path)
    assert (model.config.head_channels, model.config.num_classes) == (24, 7)
    assert model.decode_head.conv_seg.weight.shape == (7, 24, 1, 1)
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    # named: the name's config, the file's head
    model, _ = load_checkpoint_selection(path, name="vmamba_test_v2")
    assert (model.config.task, model.config.head_channels, model.config.num_classes) == ("segmentation", 24, 7)


def test_segmentation_file_as_backbone(tmp_path):
    ref = small_segmenter()
    path = seg_training_file(tmp_path, ref)
    source = resolve_model(checkpoint=path, task="backbone")
    model = source.model
    assert isinstance(model, VMambaBackbone) and model.config.task == "backbone"
    expected = {k.removeprefix("backbone."): v for k, v in ref.state_dict().items() if k.startswith("backbone.")}
    got = model.state_dict()
    assert list(got) == list(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    dropped = source.weights["task_dropped"]
    assert dropped["by_module"]["auxiliary_head"] == 8 and dropped["by_module"]["decode_head"] > 10
    manifest = {"model": {"name": model.config.name, "config": model.config.to_dict(), "weights": source.weights}}
    assert isinstance(rebuild_from_manifest(manifest, checkpoint=path), VMambaBackbone)


def test_detection_file_is_a_backbone(tmp_path):
    ref = small_segmenter()
    state = {k: v for k, v in ref.state_dict().items() if k.startswith("backbone.")}
    state.update(
        {
            "neck.lateral_convs.0.conv.weight": torch.randn(8, 16, 1, 1),
            "rpn_head.rpn_conv.weight": torch.randn(8, 8, 3, 3),
            "roi_head.bbox_head.fc_cls.weight": torch.randn(81, 64),
        }
    )
    path = mmengine_file(tmp_path / "det.pth", state)
    found = detect(torch.load(path, weights_only=True)["state_dict"])
    assert (found.name, found.task) == ("vmamba_test_v2", "backbone")
    model, sel = load_checkpoint_selection(path)
    assert isinstance(model, VMambaBackbone)
    assert sorted(k.split(".")[0] for k in sel.task_dropped) == ["neck", "roi_head", "rpn_head"]


def test_backbone_from_classifier_initialises_out_norms(tmp_path):
    torch.manual_seed(1)
    clf = build_model("vmamba_test_v2")
    path = tmp_path / "cls.pth"
    torch.save({"model": clf.state_dict()}, path)
    source = resolve_model(checkpoint=path, task="backbone")
    backbone = source.model
    assert isinstance(backbone, VMambaBackbone)
    assert source.weights["out_norms"] == "initialised"
    assert source.weights["task_dropped"]["by_module"] == {"classifier": 4}
    assert backbone.config.input.labels is None
    for i in range(4):
        norm = getattr(backbone, f"outnorm{i}")
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
        assert torch.equal(norm.bias, torch.zeros_like(norm.bias))
    # Reference: the classifier's own stem and stages, each stage's map layer-normed over channels (weight 1, bias 0).
    x = torch.randn(1, 3, 50, 38)
    with torch.no_grad():
        h = clf.patch_embed(x)
        refs = []
        for layer in clf.layers:
            o = layer.blocks(h)
            h = layer.downsample(o)
            refs.append(F.layer_norm(o.permute(0, 2, 3, 1), (o.shape[1],)).permute(0, 3, 1, 2))
        maps = backbone(x)
    for got, ref in zip(maps, refs):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    report = inspect_checkpoint(path, task="backbone")
    assert report["loadable"] and report["task"] == "backbone" and report["out_norms"] == "initialised"
    manifest = {"model": {"name": "vmamba_test_v2", "config": backbone.config.to_dict(), "weights": source.weights}}
    again = rebuild_from_manifest(manifest, checkpoint=path)
    assert isinstance(again, VMambaBackbone)
    # Without a task a classifier file stays a classifier (detection unchanged).
    assert resolve_model(checkpoint=path).model.config.task == "classification"


def test_random_dense_weights_rebuild_from_manifest():
    source = resolve_model(
        "vmamba_test_v2", random_weights=True, seed=3, task="segmentation", overrides={"head_channels": 16}
    )
    model = source.model
    assert isinstance(model, UperNetSegmenter) and model.config.head_channels == 16
    manifest = {"model": {"name": model.config.name, "config": model.config.to_dict(), "weights": source.weights}}
    again = rebuild_from_manifest(manifest)  # the recorded state digest is checked inside
    assert again.config == model.config


# ----------------------------------------------------------------------------------------------------------------
# Errors


def test_task_contradicting_the_file_is_one_error(tmp_path):
    seg = seg_training_file(tmp_path, small_segmenter())
    with pytest.raises(CheckpointError, match=r"seg\.pth: task classification, but the file is a segmentation"):
        load_checkpoint_selection(seg, task="classification")
    torch.manual_seed(0)
    cls = tmp_path / "cls.pth"
    torch.save(build_model("vmamba_test_v2").state_dict(), cls)
    with pytest.raises(CheckpointError, match="task segmentation, but the file is a classification checkpoint"):
        resolve_model(checkpoint=cls, task="segmentation")
    with pytest.raises(CheckpointError, match="model upernet_vssm_tiny is a segmentation config, but the file is a"):
        resolve_model("upernet_vssm_tiny", checkpoint=cls)
    backbone_only = tmp_path / "bb.pth"
    sd = small_segmenter().state_dict()
    torch.save({k: v for k, v in sd.items() if k.startswith("backbone.")}, backbone_only)
    with pytest.raises(CheckpointError, match="task segmentation, but the file is a backbone/detection checkpoint"):
        load_checkpoint_selection(backbone_only, task="segmentation")
    with pytest.raises(CheckpointError, match="task 'detection': expected one of classification, backbone, segm"):
        load_checkpoint_selection(seg, task="detection")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda sd: sd.pop("decode_head.fpn_bottleneck.bn.running_var"), r"1 missing \(e\.g\. decode_head\.fpn_bot"),
        (lambda sd: sd.update({"neck.conv.weight": torch.zeros(1)}), r"1 unexpected \(e\.g\. neck\.conv\.weight"),
        (
            lambda sd: sd.update({"decode_head.bottleneck.conv.weight": torch.zeros(32, 7, 3, 3)}),
            r"decode_head\.bottleneck\.conv\.weight: file \[32, 7, 3, 3\] vs model",
        ),
    ],
)
def test_wrong_or_missing_keys_are_the_usual_errors(tmp_path, change, message):
    sd = {**small_segmenter().state_dict(), **aux_head(64, 5)}
    change(sd)
    path = mmengine_file(tmp_path / "bad.pth", sd)
    with pytest.raises(StateDictMismatchError, match=r"bad\.pth: weights do not fit vmamba_test_v2: .*" + message):
        load_checkpoint_selection(path, name="vmamba_test_v2")
    report = inspect_checkpoint(path, name="vmamba_test_v2")
    assert not report["loadable"] and report["error"]


def _fake_history_buffer_module(monkeypatch):
    """A module named like mmengine's, whose HistoryBuffer pickles as the real one does (numpy arrays, its
    statistics methods by getattr), so a file with a real training run's `message_hub` can be written here."""
    import sys
    import types

    import numpy as np

    module = types.ModuleType("mmengine.logging.history_buffer")

    class HistoryBuffer:
        def __init__(self):
            self._log_history = np.array([0.5, 0.4])
            self._count_history = np.array([1, 1])
            self.max_length = 1000000
            self.statistics_methods = {"min": HistoryBuffer.min, "mean": HistoryBuffer.mean}

        def min(self):
            return self._log_history.min()

        def mean(self):
            return self._log_history.mean()

    HistoryBuffer.__module__ = module.__name__
    HistoryBuffer.__qualname__ = "HistoryBuffer"
    for method in (HistoryBuffer.min, HistoryBuffer.mean):
        method.__module__, method.__qualname__ = module.__name__, f"HistoryBuffer.{method.__name__}"
    module.HistoryBuffer = HistoryBuffer
    for name in ("mmengine", "mmengine.logging", "mmengine.logging.history_buffer"):
        monkeypatch.setitem(sys.modules, name, module if name.endswith("history_buffer") else types.ModuleType(name))
    return HistoryBuffer


def test_training_file_with_logger_state_and_numpy_loads(tmp_path, monkeypatch):
    import pickletools
    import zipfile

    import numpy as np

    HistoryBuffer = _fake_history_buffer_module(monkeypatch)
    ref = small_segmenter()
    path = tmp_path / "run.pth"
    torch.save(
        {
            "meta": {"seed": np.int64(7), "iter": 160000, "dataset_meta": {"classes": ("a", "b", "c", "d", "e")}},
            "state_dict": {**ref.state_dict(), **aux_head(64, 5)},
            "message_hub": {
                "log_scalars": {"train/loss": HistoryBuffer(), "train/lr": HistoryBuffer()},
                "runtime_info": {"iter": 160000, "loss_scale": np.float64(1.0)},
                "resumed_keys": {"train/loss": True},
            },
        },
        path,
    )
    monkeypatch.undo()  # the reader must not need the class
    with zipfile.ZipFile(path) as z:
        pickle_bytes = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    globals_used = {arg for op, arg, _ in pickletools.genops(pickle_bytes) if op.name == "GLOBAL"}
    assert "mmengine.logging.history_buffer HistoryBuffer" in globals_used and "__builtin__ getattr" in globals_used
    model, sel = load_checkpoint_selection(path)
    assert isinstance(model, UperNetSegmenter) and len(sel.task_dropped) == 8
    assert sel.class_names == ["a", "b", "c", "d", "e"]  # meta.dataset_meta.classes
    x = torch.randn(1, 3, 33, 47)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)


def test_segmenter_class_names_come_from_the_training_file_unless_labels_are_given(tmp_path):
    from vmamba_export.model_source import resolve_model

    ref = small_segmenter()
    named = mmengine_file(tmp_path / "named.pth", ref.state_dict(), classes=ref.config.num_classes)
    source = resolve_model(checkpoint=named)
    assert source.model.config.input.labels == tuple(f"class{i}" for i in range(ref.config.num_classes))
    assert source.labels_source == "checkpoint meta.dataset_meta.classes"
    # --labels wins; a class list of another length (a file of another dataset's meta) is not used.
    given = [f"mine{i}" for i in range(ref.config.num_classes)]
    assert resolve_model(checkpoint=named, labels=given).model.config.input.labels == tuple(given)
    other = mmengine_file(tmp_path / "other.pth", ref.state_dict(), classes=ref.config.num_classes + 1)
    assert resolve_model(checkpoint=other).model.config.input.labels != tuple(
        f"class{i}" for i in range(ref.config.num_classes + 1)
    )
    assert resolve_model(checkpoint=other).labels_source != "checkpoint meta.dataset_meta.classes"


def test_other_globals_in_a_training_file_are_still_refused(tmp_path):
    import os

    path = tmp_path / "evil.pth"
    # A reference to a callable outside the allow-list (stored, not called: reading it is what must fail).
    torch.save({"state_dict": small_segmenter().state_dict(), "meta": {"hook": os.system}}, path)
    with pytest.raises(CheckpointError, match=r"refusing to execute code in the file: it needs the Python global pos"):
        load_checkpoint_selection(path)


def test_bare_backbone_state_dict_is_detected(tmp_path):
    torch.manual_seed(2)
    ref = build_model("vmamba_test_v0", task="backbone")
    path = tmp_path / "bare.pth"
    torch.save(ref.state_dict(), path)
    found = detect(ref.state_dict())
    assert (found.name, found.task) == ("vmamba_test_v0", "backbone")
    model, sel = load_checkpoint_selection(path)
    assert isinstance(model, VMambaBackbone) and not sel.task_dropped and not sel.initialised
    x = torch.randn(1, 3, 36, 52)
    with torch.no_grad():
        for got, want in zip(model(x), ref(x)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_segmenter_params_are_the_listing_minus_aux_head_and_buffers():
    from vmamba_export.models import get_config
    from vmamba_export.models.flops import count_parameters

    for name in NAMES:
        rows = read_listing(LISTINGS / f"{name}.txt")
        buffers = ("running_mean", "running_var", "num_batches_tracked")
        expected = sum(
            torch.Size(s).numel() for k, s, _ in rows if not k.startswith("auxiliary_head.") and not k.endswith(buffers)
        )
        assert count_parameters(get_config(name)) == expected, name


def test_cli_inspect_reports_the_dense_task(tmp_path, capsys, monkeypatch):
    import json

    from vmamba_export.cli import main

    monkeypatch.setenv("COLUMNS", "200")  # the table's rows unwrapped

    path = seg_training_file(tmp_path, small_segmenter(head_channels=24, num_classes=7))
    assert main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["task"], report["config"], report["num_classes"], report["head_channels"]) == (
        "segmentation",
        "vmamba_test_v2",
        7,
        24,
    )
    assert report["task_dropped_keys"]["by_module"] == {"auxiliary_head": 8}
    assert main(["inspect", str(path), "--task", "backbone"]) == 0
    out = capsys.readouterr().out
    assert "backbone" in out and "decode_head" in out and "auxiliary_head 8" in out
    assert main(["inspect", str(path), "--task", "classification"]) == 2
    err = capsys.readouterr().err
    assert "task classification, but the file is a segmentation checkpoint" in err


def test_bundled_classifier_as_backbone_and_default_segmenter():
    from vmamba_export.model_source import bundled_names

    source = resolve_model("vmamba_digits_v2", task="backbone")
    model = source.model
    assert isinstance(model, VMambaBackbone) and source.weights["kind"] == "bundled"
    assert source.weights["out_norms"] == "initialised" and source.weights["task"] == "backbone"
    manifest = {"model": {"name": "vmamba_digits_v2", "config": model.config.to_dict(), "weights": source.weights}}
    assert isinstance(rebuild_from_manifest(manifest), VMambaBackbone)  # same weights digest, checked inside
    if not any(name.endswith("_seg") for name in bundled_names()):
        with pytest.raises(VMambaExportError, match="no bundled segmentation model"):
            resolve_model(task="segmentation")
