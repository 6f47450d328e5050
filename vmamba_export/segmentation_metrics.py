"""Segmentation scores from class maps: the confusion matrix, mean IoU, pixel accuracy, and the agreement of two maps.

mIoU follows mmseg's convention: one confusion matrix summed over the whole dataset (not a mean of per-image
scores), the mean taken over the classes present in the prediction or the ground truth. Runtime side: numpy only.
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255  # mask value of pixels that belong to no class (ADE20K, mmseg)


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX):
    """(num_classes, num_classes) int64 counts, rows = target class, columns = predicted class.

    Pixels whose target is `ignore_index` are left out; any other target or prediction outside 0..num_classes-1 is
    an error (a mask of another dataset, or logits of another head), never silently dropped."""
    pred = np.asarray(pred)
    target = np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target shape {target.shape}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    keep = target != ignore_index
    t = target[keep].astype(np.int64)
    p = pred[keep].astype(np.int64)
    for what, values in (("target", t), ("prediction", p)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            bad = values[(values < 0) | (values >= num_classes)][0]
            raise ValueError(
                f"{what} holds class {int(bad)}, outside 0..{num_classes - 1} (ignore value {ignore_index})"
            )
    counts = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def miou(conf: np.ndarray) -> tuple[float, np.ndarray]:
    """(mean IoU, per-class IoU) of a confusion matrix; a class absent from both prediction and target has IoU nan
    and is left out of the mean (nan when no class is present at all)."""
    conf = np.asarray(conf, dtype=np.float64)
    intersection = np.diag(conf)
    union = conf.sum(axis=0) + conf.sum(axis=1) - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, intersection / union, np.nan)
    present = ~np.isnan(iou)
    return (float(iou[present].mean()) if present.any() else float("nan")), iou


def pixel_accuracy(conf: np.ndarray) -> float:
    """Fraction of the counted (not ignored) pixels whose predicted class is the target's; nan if none counted."""
    conf = np.asarray(conf)
    total = conf.sum()
    return float(np.trace(conf) / total) if total else float("nan")


def pixel_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of pixels where two class maps of the same shape give the same class."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"class maps of different shapes: {a.shape} and {b.shape}")
    return float((a == b).mean()) if a.size else float("nan")
