"""Scores on a labelled source (top-1 for a classifier; mIoU and pixel accuracy for a segmenter), and the PyTorch
score an artifact records at export so that a device without torch can still measure its accuracy drop.

A precision judged by accuracy (an int8 segmenter, Core ML w8/w8a8) is judged by the artifact's score minus the
PyTorch fp32 model's on the same labelled data. A device has the runtime, neither torch nor the weights. So the
export runs the PyTorch model once on the model's labelled held-out source and records its score in the manifest
(`references.accuracy`), with the sha256 of the preprocessed images and labels it scored. `validate --accuracy`
without torch takes PyTorch's score from there, and only when the source gives the same bytes on the device: a
folder that changed, or preprocessing that rounds differently there, leaves the drop unmeasured, as before.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np

from .errors import ParityError
from .input_spec import InputSpec
from .segmentation_metrics import confusion_matrix, miou, pixel_accuracy

Runner = Callable[[np.ndarray], np.ndarray]  # preprocessed images (N, 3, H, W) -> logits (N, classes[, H, W])


def classification_scores(runners: dict[str, Runner], source: str, spec: InputSpec) -> dict:
    """{"num_images", "data_sha256", "top1": {runner name: top-1}} of each runner on a labelled image source."""
    from .data.sources import load_batch

    batch, labels, _ = load_batch(source, spec, None)
    if labels is None or any(lab is None for lab in labels):
        raise ParityError(f"accuracy source {source!r} has no labels")
    labels = np.asarray(labels, dtype=np.int64)
    digest = hashlib.sha256(np.ascontiguousarray(batch, dtype=np.float32).tobytes())
    digest.update(labels.tobytes())
    top1 = {name: float((run(batch).argmax(1) == labels).mean()) for name, run in runners.items()}
    return {"num_images": len(labels), "data_sha256": digest.hexdigest(), "top1": top1}


def segmentation_scores(
    runners: dict[str, Runner], source: str, spec: InputSpec, num_classes: int, batch: int = 8
) -> dict:
    """{"num_images", "data_sha256", "miou", "class_iou", "pixel_accuracy"} (the last three keyed by runner name)
    of each runner's class maps against the masks of a labelled segmentation source. A folder's images keep their
    own shapes: runners get up to `batch` consecutive images of one shape at a time."""
    from .data.segmentation_sources import iter_segmentation_samples

    confusions = {name: np.zeros((num_classes, num_classes), dtype=np.int64) for name in runners}
    digest = hashlib.sha256()
    pending: list[tuple[str, np.ndarray, np.ndarray]] = []
    count = 0

    def score(group: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
        images = np.concatenate([image for _, image, _ in group])
        for runner, run in runners.items():
            logits = np.asarray(run(images))
            if logits.ndim != 4 or len(logits) != len(group):
                raise ParityError(
                    f"{source}: the {runner} returned {logits.shape} for {len(group)} images: expected class maps "
                    "(N, classes, H, W)"
                )
            for (name, _, mask), one in zip(group, logits, strict=True):
                if one.shape[-2:] != mask.shape:
                    raise ParityError(
                        f"{source}: mask of {name} is {mask.shape[0]}x{mask.shape[1]}, the class map "
                        f"{one.shape[-2]}x{one.shape[-1]}"
                    )
                try:
                    confusions[runner] += confusion_matrix(one.argmax(0), mask, num_classes)
                except ValueError as exc:  # a mask value beyond the model's classes (another dataset's masks)
                    raise ParityError(f"{source}: mask of {name}: {exc}") from None

    for name, image, mask in iter_segmentation_samples(source, spec):
        mask = np.asarray(mask, dtype=np.int64)
        image = np.ascontiguousarray(image, dtype=np.float32)
        digest.update(image.tobytes())
        digest.update(mask.tobytes())
        count += 1
        if pending and (len(pending) == batch or pending[0][1].shape != image.shape):
            score(pending)
            pending = []
        pending.append((name, image, mask))
    if pending:
        score(pending)
    scores = {name: miou(conf) for name, conf in confusions.items()}
    return {
        "num_images": count,
        "data_sha256": digest.hexdigest(),
        "miou": {name: score[0] for name, score in scores.items()},
        "class_iou": {name: [None if np.isnan(v) else float(v) for v in score[1]] for name, score in scores.items()},
        "pixel_accuracy": {name: pixel_accuracy(conf) for name, conf in confusions.items()},
    }


def torch_score_record(task: str, source: str, torch_runner: Runner, spec: InputSpec, num_classes: int) -> dict:
    """The manifest's `references.accuracy`: the PyTorch model's score on `source` and the data's sha256."""
    if task == "segmentation":
        scores = segmentation_scores({"torch": torch_runner}, source, spec, num_classes)
        score = {
            "metric": "miou",
            "torch_miou": scores["miou"]["torch"],
            "torch_pixel_accuracy": scores["pixel_accuracy"]["torch"],
        }
    else:
        scores = classification_scores({"torch": torch_runner}, source, spec)
        score = {"metric": "top1", "torch_top1": scores["top1"]["torch"]}
    return {"source": source, "num_images": scores["num_images"], "data_sha256": scores["data_sha256"], **score}


# validate's `torch_from` when PyTorch's score came from the artifact's record, not from torch here.
RECORDED_AT_EXPORT = "recorded at export (references.accuracy)"


def _record(manifest: dict) -> dict | None:
    record = (manifest.get("references") or {}).get("accuracy")
    return record if isinstance(record, dict) else None


def recorded_torch_score(manifest: dict, data_sha256: str) -> dict | None:
    """The PyTorch score the artifact recorded at export for exactly this data (same sha256), or None."""
    record = _record(manifest)
    return record if record is not None and record.get("data_sha256") == data_sha256 else None


def recorded_source(manifest: dict) -> str | None:
    """The labelled source whose PyTorch score the artifact recorded, if any (for error messages)."""
    record = _record(manifest)
    return record.get("source") if record is not None else None
