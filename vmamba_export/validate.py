"""Parity of an artifact with the PyTorch fp32 model on real images, with pass/fail thresholds per precision.

Every metric is computed and every failure listed before the verdict, as Optimum's validate_model_outputs does.
The PyTorch side runs the scan in plain torch (scan/op.py `torch_scan`), so it shares no code with the C++ kernel the
artifact may run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from pathlib import Path

import numpy as np
import torch

from .artifact import read_manifest, update_manifest
from .errors import InputError, ParityError
from .model_source import rebuild_from_manifest
from .models.configs import InputSpec
from .progress import progress_bar
from .scan.op import torch_scan


def parity_metrics(out: np.ndarray, ref: np.ndarray) -> dict:
    out64, ref64 = out.astype(np.float64), ref.astype(np.float64)
    diff = out64 - ref64
    ref_norms = np.linalg.norm(ref64, axis=1)
    out_norms = np.linalg.norm(out64, axis=1)
    cos = (out64 * ref64).sum(axis=1) / np.maximum(out_norms * ref_norms, 1e-30)
    finite = bool(np.isfinite(out64).all())
    return {
        "max_abs": float(np.abs(diff).max()),
        "max_rel": float(np.abs(diff).max() / max(np.abs(ref64).max(), 1e-30)),
        "rel_l2": float(np.linalg.norm(diff) / max(np.linalg.norm(ref64), 1e-30)),
        "cosine_min": float(cos.min()),
        "cosine_mean": float(cos.mean()),
        "top1_agreement": float((out64.argmax(1) == ref64.argmax(1)).mean()),
        "all_finite": finite,
    }


def threshold_failures(metrics: dict, thresholds: dict) -> list[str]:
    failures = []
    if not metrics["all_finite"]:
        failures.append("non-finite outputs")
    checks = {
        "max_rel_l2": ("rel_l2", lambda v, t: v <= t, "<="),
        "min_cosine": ("cosine_min", lambda v, t: v >= t, ">="),
        "min_top1_agreement": ("top1_agreement", lambda v, t: v >= t, ">="),
    }
    for key, limit in thresholds.items():
        if key not in checks:
            continue
        metric, ok, sign = checks[key]
        if not ok(metrics[metric], limit):
            failures.append(f"{metric} {metrics[metric]:.3g} (needs {sign} {limit:g})")
    return failures


def run_torch(model: torch.nn.Module, batch: np.ndarray, batch_size: int = 8) -> np.ndarray:
    outs = []
    with torch.no_grad():
        for start in range(0, len(batch), batch_size):
            outs.append(model(torch.from_numpy(batch[start : start + batch_size])).numpy())
    return np.concatenate(outs)


def run_predictor(predictor, batch: np.ndarray, batch_size: int = 8) -> np.ndarray:
    return np.concatenate([predictor(batch[s : s + batch_size]) for s in range(0, len(batch), batch_size)])


def check_sizes(sizes: list[int], min_size: int, max_size: int) -> None:
    """Refuse input sides the artifact does not take before any image is resized to them (a huge side would take
    all memory in the PyTorch reference before the artifact's own check ran)."""
    bad = [s for s in sizes if not min_size <= s <= max_size]
    if bad:
        raise InputError(
            f"sizes (--sizes) {','.join(map(str, bad))}: this artifact takes input sides {min_size}..{max_size}"
        )


def validate_artifact(
    folder: Path,
    images: str = "builtin",
    sizes: list[int] | None = None,
    limit: int | None = None,
    checkpoint: str | None = None,
    accuracy_source: str | None = None,
    threads: int | None = None,
    show_progress: bool = True,
    record: bool = False,
) -> dict:
    """Compare the artifact with its PyTorch fp32 model; with `record`, also write the result into its manifest and
    report (by default nothing is written: the artifact may be read-only)."""
    from .data.sources import load_batch
    from .runtime import load

    folder = Path(folder)
    manifest = read_manifest(folder)
    with _coreml_numpy_evaluator_off_macos(manifest):
        predictor = load(folder, threads=threads)
    if sizes:
        check_sizes(sizes, predictor.min_size, predictor.max_size)
    model = rebuild_from_manifest(manifest, checkpoint=checkpoint)  # checks the file against the recorded sha256
    model.set_scan(torch_scan)
    base_spec = predictor.input_spec
    sizes = sizes or [base_spec.image_size]
    thresholds = manifest.get("thresholds", {})
    runs = []
    with progress_bar(show_progress) as progress:
        task = progress.add_task("parity", total=len(sizes) * 2 + (2 if accuracy_source else 0))
        for size in sizes:
            spec = _spec_at(base_spec, size)
            batch, _, names = load_batch(images, spec, limit)
            ref = run_torch(model, batch)
            progress.advance(task)
            out = run_predictor(predictor, batch)
            progress.advance(task)
            metrics = parity_metrics(out, ref)
            failures = threshold_failures(metrics, thresholds)
            runs.append(
                {"size": size, "num_images": len(batch), **metrics, "passed": not failures, "failures": failures}
            )
        accuracy = None
        if accuracy_source:
            batch, labels, _ = load_batch(accuracy_source, base_spec, None)
            if labels is None or any(lab is None for lab in labels):
                raise ParityError(f"accuracy source {accuracy_source!r} has no labels")
            labels = np.asarray(labels)
            torch_top1 = float((run_torch(model, batch).argmax(1) == labels).mean())
            progress.advance(task)
            art_top1 = float((run_predictor(predictor, batch).argmax(1) == labels).mean())
            progress.advance(task)
            accuracy = {
                "source": accuracy_source,
                "num_images": len(labels),
                "torch_top1": torch_top1,
                "artifact_top1": art_top1,
                "drop_points": 100 * (torch_top1 - art_top1),
            }
    # Quantised targets are judged by accuracy: a limit without labelled images to check it is a failure, not a pass.
    accuracy_failures = []
    if "max_accuracy_drop_points" in thresholds:
        limit = thresholds["max_accuracy_drop_points"]
        if accuracy is None:
            accuracy_failures.append(f"accuracy drop limit {limit:g} points needs labelled images: --accuracy SOURCE")
        elif accuracy["drop_points"] > limit:
            accuracy_failures.append(f"accuracy drop {accuracy['drop_points']:.2f} points (needs <= {limit:g})")
    validation = {
        "images": images,
        "num_images": runs[0]["num_images"] if runs else 0,
        "thresholds": thresholds,
        "runs": runs,
        "accuracy": accuracy,
        "status": "pass" if all(r["passed"] for r in runs) and not accuracy_failures else "fail",
        "accuracy_failures": accuracy_failures,
        # Which engine produced the artifact's outputs (e.g. the numpy MIL evaluator instead of Core ML off macOS).
        "evaluated_with": getattr(predictor.backend, "evaluated_with", None),
        "reference": "PyTorch fp32 model, scan in plain torch (independent of the C++ kernel)",
    }
    if record:
        update_manifest(folder, validation=validation)
    return validation


@contextlib.contextmanager
def _coreml_numpy_evaluator_off_macos(manifest: dict):
    """Core ML cannot run off macOS: there, validate a Core ML artifact with the numpy MIL evaluator (the backend
    labels it, and the label goes into the manifest). An explicit VMAMBA_COREML_EVALUATOR wins."""
    from .runtime.coreml_backend import EVALUATOR_ENV

    if manifest["target"].get("runtime") != "coreml" or sys.platform == "darwin" or EVALUATOR_ENV in os.environ:
        yield
        return
    os.environ[EVALUATOR_ENV] = "numpy"
    try:
        yield
    finally:
        os.environ.pop(EVALUATOR_ENV, None)


def _spec_at(spec: InputSpec, size: int) -> InputSpec:
    """The model's preprocessing at another input size, keeping its resize/crop ratio."""
    if size == spec.image_size:
        return spec
    resize = max(size, round(size * spec.resize / spec.image_size))
    return dataclasses.replace(spec, image_size=size, resize=resize)
