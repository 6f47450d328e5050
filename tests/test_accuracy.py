"""accuracy.py: scores on labelled sources, batched by shape, and the data fingerprint that lets a device without
torch use the PyTorch score an artifact recorded at export. The confusion counts are checked against per-pixel
counts written here, the batching against one image at a time."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from vmamba_export.accuracy import recorded_torch_score, segmentation_scores, torch_score_record
from vmamba_export.errors import ParityError
from vmamba_export.models.configs import SEGMENTATION_INPUT

CLASSES = 4
SPEC = dataclasses.replace(SEGMENTATION_INPUT, image_size=32, labels=("a", "b", "c", "d"))


def _levels(images: np.ndarray) -> np.ndarray:
    """A stand-in model: class c scores -|red - level c|, so each pixel goes to the nearest of four levels."""
    levels = np.linspace(-1.5, 1.5, CLASSES, dtype=np.float32)
    return -np.abs(images[:, :1] - levels[None, :, None, None])


def _folder(root, sizes: list[tuple[int, int]], seed: int = 0):
    """images/ and masks/ with images of the given (width, height); masks random, some pixels ignored (255)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{i:02d}.png")
        mask = rng.integers(0, CLASSES, (h, w)).astype(np.uint8)
        mask[0] = 255
        Image.fromarray(mask, "L").save(root / "masks" / f"{i:02d}.png")
    return root


def _expected(root) -> tuple[float, float]:
    """mIoU and pixel accuracy counted pixel by pixel over the preprocessed images and masks (independent code)."""
    from vmamba_export.data.segmentation_sources import iter_segmentation_samples

    inter, union = np.zeros(CLASSES), np.zeros(CLASSES)
    right = total = 0
    for _, image, mask in iter_segmentation_samples(str(root), SPEC):
        pred = _levels(image)[0].argmax(0).ravel()
        truth = mask.ravel()
        keep = truth != 255
        pred, truth = pred[keep], truth[keep]
        right += int((pred == truth).sum())
        total += len(truth)
        for c in range(CLASSES):
            inter[c] += np.sum((pred == c) & (truth == c))
            union[c] += np.sum((pred == c) | (truth == c))
    return float(np.mean(inter[union > 0] / union[union > 0])), right / total


def test_scores_batch_by_shape_and_equal_one_at_a_time(tmp_path):
    # Three shapes in runs (32x32 three times, 48x32 twice, 32x32 again): batches never mix shapes.
    root = _folder(tmp_path / "data", [(32, 32)] * 3 + [(48, 32)] * 2 + [(32, 32)])
    calls: list[tuple[int, ...]] = []

    def runner(images):
        calls.append(images.shape)
        return _levels(images)

    batched = segmentation_scores({"m": runner}, str(root), SPEC, CLASSES, batch=2)
    assert calls == [(2, 3, 32, 32), (1, 3, 32, 32), (2, 3, 32, 48), (1, 3, 32, 32)]
    single = segmentation_scores({"m": _levels}, str(root), SPEC, CLASSES, batch=1)
    assert batched == single
    want_miou, want_accuracy = _expected(root)
    assert batched["num_images"] == 6
    assert batched["miou"]["m"] == pytest.approx(want_miou, abs=1e-12)
    assert batched["pixel_accuracy"]["m"] == pytest.approx(want_accuracy, abs=1e-12)


def test_the_fingerprint_follows_the_data_not_the_runner(tmp_path):
    root = _folder(tmp_path / "data", [(32, 32)] * 3)
    first = segmentation_scores({"m": _levels}, str(root), SPEC, CLASSES)
    other_runner = segmentation_scores({"m": lambda x: -_levels(x)}, str(root), SPEC, CLASSES)
    assert other_runner["data_sha256"] == first["data_sha256"] and other_runner["miou"] != first["miou"]
    mask = np.asarray(Image.open(root / "masks" / "01.png")).copy()
    mask[5, 5] = (int(mask[5, 5]) + 1) % CLASSES
    Image.fromarray(mask, "L").save(root / "masks" / "01.png")
    assert segmentation_scores({"m": _levels}, str(root), SPEC, CLASSES)["data_sha256"] != first["data_sha256"]


def test_the_record_is_used_only_for_the_same_data(tmp_path):
    root = _folder(tmp_path / "data", [(32, 32)] * 2)
    record = torch_score_record("segmentation", str(root), _levels, SPEC, CLASSES)
    want_miou, want_accuracy = _expected(root)
    assert record["metric"] == "miou" and record["num_images"] == 2 and record["source"] == str(root)
    assert record["torch_miou"] == pytest.approx(want_miou, abs=1e-12)
    assert record["torch_pixel_accuracy"] == pytest.approx(want_accuracy, abs=1e-12)
    manifest = {"references": {"accuracy": record}}
    assert recorded_torch_score(manifest, record["data_sha256"]) is record
    assert recorded_torch_score(manifest, "0" * 64) is None
    assert recorded_torch_score({"references": {}}, record["data_sha256"]) is None


def test_a_class_map_of_another_size_is_named(tmp_path):
    root = _folder(tmp_path / "data", [(32, 32)])
    with pytest.raises(ParityError, match=r"mask of 00(\.png)? is 32x32, the class map 16x16"):
        segmentation_scores({"m": lambda x: _levels(x)[..., ::2, ::2]}, str(root), SPEC, CLASSES)


def test_a_runner_that_returns_no_class_maps_is_named(tmp_path):
    root = _folder(tmp_path / "data", [(32, 32)] * 2)
    with pytest.raises(ParityError, match=r"the m returned \(2, 10\) for 2 images: expected class maps"):
        segmentation_scores({"m": lambda x: np.zeros((len(x), 10))}, str(root), SPEC, CLASSES)
