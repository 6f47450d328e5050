"""The bundled segmenter vmamba_shapes_seg: it loads strictly through load_bundled, is small, and its held-out mIoU
re-measured here with the PyTorch model (its own scan op) on shapes:holdout equals the number in its sidecar."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vmamba_export.data.segmentation_sources import IGNORE_INDEX, SHAPES_CLASSES, SHAPES_SPLITS, load_segmentation_batch
from vmamba_export.models import UperNetSegmenter, get_config
from vmamba_export.weights import WEIGHTS_DIR, bundled_info, list_bundled, load_bundled

NAME = "vmamba_shapes_seg"
# The shipped weights reached 0.715 (sidecar; short of the 0.8 aimed at: 13 epochs in the 15-minute CPU budget
# separate background from shapes (IoU 0.97) better than the shapes from each other, 0.59-0.76). A regression of the
# data, the preprocessing or the model code shows as a large drop, which this floor catches without depending on the
# last digit.
MIOU_FLOOR = 0.69


def _miou(pred: np.ndarray, target: np.ndarray, k: int) -> tuple[float, float, np.ndarray]:
    """Dataset-level confusion over every held-out pixel (independent of the training script's code)."""
    keep = target != IGNORE_INDEX
    conf = np.zeros((k, k), dtype=np.int64)
    np.add.at(conf, (target[keep], pred[keep]), 1)
    inter = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - inter
    iou = inter / np.maximum(union, 1)
    return float(iou[union > 0].mean()), float(inter.sum() / conf.sum()), iou


@pytest.fixture(scope="module")
def model():
    return load_bundled(NAME)


def test_bundled_segmenter_is_listed_small_and_recorded(model):
    assert NAME in list_bundled()
    assert (WEIGHTS_DIR / f"{NAME}.safetensors").stat().st_size < 2 * 1024 * 1024
    assert isinstance(model, UperNetSegmenter) and not model.training
    cfg = get_config(NAME)
    assert cfg.task == "segmentation" and cfg.input.labels == SHAPES_CLASSES and cfg.num_classes == 5
    info = bundled_info(NAME)
    assert info["config"]["name"] == NAME and info["seed"] == 0 and info["epochs"] >= 1
    assert info["split_sizes"] == {k: end - start for k, (start, end) in SHAPES_SPLITS.items()}
    assert info["heldout_data"] == "shapes:holdout" and info["train_data"] == "shapes:train"
    from safetensors import safe_open

    with safe_open(str(WEIGHTS_DIR / f"{NAME}.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["config_name"] == NAME and float(meta["heldout_miou"]) == pytest.approx(info["heldout_miou"], abs=1e-6)
    assert json.loads(meta["split_sizes"]) == info["split_sizes"]


def test_bundled_segmenter_heldout_miou(model):
    cfg = get_config(NAME)
    x, y, _ = load_segmentation_batch("shapes:holdout", cfg.input)
    assert len(x) == 500
    with torch.no_grad():
        pred = np.concatenate([model(torch.from_numpy(x[i : i + 100])).argmax(1).numpy() for i in range(0, 500, 100)])
    miou, acc, iou = _miou(pred, y, cfg.num_classes)
    info = bundled_info(NAME)
    print(f"\n{NAME}: held-out mIoU {miou:.4f} (sidecar {info['heldout_miou']:.4f}), pixel accuracy {acc:.4f}")
    assert abs(miou - info["heldout_miou"]) <= 0.005  # within 0.5 points of the recorded number
    assert abs(acc - info["heldout_pixel_accuracy"]) <= 0.005
    for name, v in zip(SHAPES_CLASSES, iou):
        assert v == pytest.approx(info["heldout_per_class_iou"][name], abs=0.01), name
    assert miou >= MIOU_FLOOR
    # Not the trivial answer: every class is predicted, and far better than all-background.
    assert set(np.unique(pred)) == set(range(cfg.num_classes))
    assert acc > (y == 0).mean() + 0.1
