"""Backend-neutral parts of accuracy-aware int8: top-1 on labelled images, the first-order layer sensitivity terms, and
the loop that keeps the most sensitive layers float until the top-1 drop fits `--max-drop`.

The ONNX Runtime path (onnxruntime_int8.py) and the OpenVINO/NNCF path (openvino_int8.py) each supply how to run a
model, how to read a layer's activations and weight, and how to re-quantize with a given set of float layers; the
ranking and the budget loop are the same for both.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import VMambaExportError


class QuantizationError(VMambaExportError):
    """int8 quantization cannot be done as asked (unknown layer name, method, format, or accuracy budget missed)."""


def labelled_batch(source: str, input_spec) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of an `--accuracy` source, preprocessed by `input_spec`; a source without labels is an
    error."""
    from ..data.sources import load_batch

    batch, labels, _ = load_batch(source, input_spec, None)
    if labels is None:
        raise QuantizationError(f"--accuracy {source!r}: the images have no labels")
    return batch, np.asarray(labels)


def top1(predict: Callable[[np.ndarray], np.ndarray], batch: np.ndarray, labels: np.ndarray, chunk: int = 64) -> float:
    """Top-1 accuracy of `predict` (images -> logits) on `batch`, `chunk` images per call."""
    preds = np.concatenate([predict(batch[s : s + chunk]).argmax(1) for s in range(0, len(batch), chunk)])
    return float((preds == labels).mean())


def activation_rounding_error(x: np.ndarray, low: float, high: float) -> float:
    """Relative L2 error of rounding `x` to asymmetric uint8 over the range [low, high] (widened to hold 0)."""
    x = x.astype(np.float64)
    lo, hi = min(float(low), 0.0), max(float(high), 0.0)
    scale = (hi - lo) / 255 or 1.0
    zero = np.round(-lo / scale)
    q = np.clip(np.round(x / scale) + zero, 0, 255)
    return float(np.linalg.norm((q - zero) * scale - x) / max(np.linalg.norm(x), 1e-30))


def weight_rounding_error(flat: np.ndarray) -> float:
    """Relative L2 error of rounding a (out_channels, fan_in) weight to per-output-channel symmetric int8."""
    flat = flat.astype(np.float64)
    scale = np.maximum(np.abs(flat).max(axis=1, keepdims=True) / 127, 1e-30)
    wq = np.clip(np.round(flat / scale), -127, 127) * scale
    return float(np.linalg.norm(wq - flat) / max(np.linalg.norm(flat), 1e-30))


def keep_float_until_within_budget(
    fp32_top1: float,
    int8_top1: float,
    budget: float | None,
    candidates: list[str],
    sensitivity: Callable[[list[str]], dict[str, float]],
    requantize: Callable[[list[str]], float],
) -> tuple[float, list[str], list[dict]]:
    """While the int8 top-1 drop (points) exceeds `budget`, keep the most sensitive 1, 2, 4, ... of `candidates` float.

    `sensitivity(candidates)` scores layers (higher: more error when quantized), called only when the budget is missed;
    `requantize(kept)` rebuilds the int8 model with `kept` float too and returns its top-1. Returns the final int8
    top-1, the layers kept float for accuracy, and every trial. Raises QuantizationError when even every candidate
    float misses the budget."""
    trials = [{"kept_float": 0, "int8_top1": int8_top1}]
    kept: list[str] = []
    if budget is None or 100 * (fp32_top1 - int8_top1) <= budget:
        return int8_top1, kept, trials
    scores = sensitivity(candidates)
    ranked = sorted(candidates, key=lambda n: -scores[n])
    count = 1
    while 100 * (fp32_top1 - int8_top1) > budget:
        if count > len(ranked):
            raise QuantizationError(
                f"int8 top-1 drop {100 * (fp32_top1 - int8_top1):.2f} points exceeds --max-drop {budget:g} "
                f"even with every layer but the first {len(ranked)} sensitive ones float; "
                "try another --calib-method or more --calib-samples"
            )
        kept = ranked[:count]
        int8_top1 = requantize(kept)
        trials.append({"kept_float": len(kept), "int8_top1": int8_top1})
        count *= 2
    return int8_top1, kept, trials


def accuracy_record(
    source: str,
    labels: np.ndarray,
    fp32_top1: float,
    int8_top1: float,
    budget: float | None,
    kept: list[str],
    trials: list[dict],
) -> dict:
    """The manifest's `quantization.accuracy` entry (same keys for every backend)."""
    return {
        "source": source,
        "num_images": int(len(labels)),
        "fp32_top1": fp32_top1,
        "int8_top1": int8_top1,
        "drop_points": 100 * (fp32_top1 - int8_top1),
        "max_drop": budget,
        "kept_float_for_accuracy": kept,
        "trials": trials,
    }
