"""Parity of an artifact with the PyTorch fp32 model, with pass/fail thresholds per precision.

Two references, the same figures (rel L2, cosine, top-1 agreement against the target's thresholds):
- self-check (the default): the artifact's own `references.npz` (real photos preprocessed at export and the PyTorch
  fp32 logits for them, hashed in the manifest). Needs only the artifact and its runtime: no torch, no checkpoint.
- recompute (`images`, `sizes` or `checkpoint` given, `recompute=True`, or an artifact without references): the
  PyTorch fp32 model is rebuilt from the manifest's weights and run on those images and sizes (needs torch).
Either way the PyTorch side runs the scan in plain torch (scan/op.py `torch_scan`), so it shares no code with the C++
kernel the artifact may run. Every metric is computed and every failure listed before the verdict, as Optimum's
validate_model_outputs does.

Runtime side: torch and the model code are imported only when recomputing (or for the PyTorch top-1 of --accuracy).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np

from .artifact import read_manifest, update_manifest
from .errors import ParityError, VMambaExportError
from .input_spec import InputSpec
from .progress import progress_bar
from .references import read_references

EXPORT_EXTRA_HINT = "pip install 'vmamba-export[export]'"


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


def run_torch(model, batch: np.ndarray, batch_size: int = 8) -> np.ndarray:
    import torch

    outs = []
    with torch.no_grad():
        for start in range(0, len(batch), batch_size):
            outs.append(model(torch.from_numpy(batch[start : start + batch_size])).numpy())
    return np.concatenate(outs)


def run_predictor(predictor, batch: np.ndarray, batch_size: int = 8) -> np.ndarray:
    return np.concatenate([predictor(batch[s : s + batch_size]) for s in range(0, len(batch), batch_size)])


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def validate_artifact(
    folder: Path,
    images: str | None = None,
    sizes: list[int] | None = None,
    limit: int | None = None,
    checkpoint: str | None = None,
    accuracy_source: str | None = None,
    threads: int | None = None,
    show_progress: bool = True,
    record: bool = True,
    recompute: bool = False,
) -> dict:
    """Compare the artifact with its PyTorch fp32 model; record the result in its manifest and report.

    With no `images`, `sizes`, `checkpoint` or `recompute`, the reference is the artifact's own references.npz (the
    self-check, no torch needed); otherwise, or for an artifact without references, the PyTorch model is rebuilt
    and run on `images` (default: the built-in photos) at `sizes` (default: the model's)."""
    from .runtime import load

    folder = Path(folder)
    manifest = read_manifest(folder)
    with _coreml_numpy_evaluator_off_macos(manifest):
        predictor = load(folder, threads=threads)
    references = None
    if not (recompute or images or sizes or checkpoint):
        references = read_references(folder, manifest)
    if references is None:
        why = "" if (recompute or images or sizes or checkpoint) else f"artifact {folder} carries no references; "
        _need_torch(f"{why}recomputing the PyTorch reference")
    base_spec = predictor.input_spec
    thresholds = manifest.get("thresholds", {})
    model = None if references is not None else _torch_model(manifest, checkpoint)
    runs = []
    with progress_bar(show_progress) as progress:
        if references is not None:
            task = progress.add_task("self-check", total=1 + (2 if accuracy_source else 0))
            inputs, ref, names = references
            if limit:
                inputs, ref, names = inputs[:limit], ref[:limit], names[:limit]
            size = int(inputs.shape[-1])
            out = run_predictor(predictor, inputs)
            progress.advance(task)
            runs.append(_run_record(size, out, ref, thresholds))
            images_label = f"the artifact's references ({manifest['references'].get('source', '?')})"
        else:
            images = images or "builtin"
            images_label = images
            sizes = sizes or [base_spec.image_size]
            task = progress.add_task("parity", total=len(sizes) * 2 + (2 if accuracy_source else 0))
            from .data.sources import load_batch

            for size in sizes:
                batch, _, names = load_batch(images, _spec_at(base_spec, size), limit)
                ref = run_torch(model, batch)
                progress.advance(task)
                out = run_predictor(predictor, batch)
                progress.advance(task)
                runs.append(_run_record(size, out, ref, thresholds))
        accuracy = None
        if accuracy_source:
            accuracy = _accuracy(predictor, manifest, model, checkpoint, accuracy_source, base_spec, progress, task)
    # Quantised targets are judged by accuracy: a limit without labelled images to check it is a failure, not a pass.
    accuracy_failures = []
    if "max_accuracy_drop_points" in thresholds:
        limit_points = thresholds["max_accuracy_drop_points"]
        if accuracy is None:
            accuracy_failures.append(f"accuracy drop limit {limit_points:g} points needs a labelled --accuracy source")
        elif accuracy["drop_points"] is None:
            accuracy_failures.append(
                f"accuracy drop limit {limit_points:g} points needs the PyTorch top-1: {accuracy['torch_note']}"
            )
        elif accuracy["drop_points"] > limit_points:
            accuracy_failures.append(f"accuracy drop {accuracy['drop_points']:.2f} points (needs <= {limit_points:g})")
    validation = {
        "mode": "self-check" if references is not None else "recompute",
        "images": images_label,
        "num_images": runs[0]["num_images"] if runs else 0,
        "thresholds": thresholds,
        "runs": runs,
        "accuracy": accuracy,
        "status": "pass" if all(r["passed"] for r in runs) and not accuracy_failures else "fail",
        "accuracy_failures": accuracy_failures,
        # Which engine produced the artifact's outputs (e.g. the numpy MIL evaluator instead of Core ML off macOS).
        "evaluated_with": getattr(predictor.backend, "evaluated_with", None),
        "reference": (
            "the artifact's references.npz: PyTorch fp32 logits recorded at export, scan in plain torch"
            if references is not None
            else "PyTorch fp32 model, scan in plain torch (independent of the C++ kernel)"
        ),
    }
    if record:
        update_manifest(folder, validation=validation)
    return validation


def _run_record(size: int, out: np.ndarray, ref: np.ndarray, thresholds: dict) -> dict:
    metrics = parity_metrics(out, ref)
    failures = threshold_failures(metrics, thresholds)
    return {"size": size, "num_images": len(ref), **metrics, "passed": not failures, "failures": failures}


def _need_torch(what: str) -> None:
    if not torch_available():
        raise VMambaExportError(f"{what} needs torch, which is not installed: {EXPORT_EXTRA_HINT}")


def _torch_model(manifest: dict, checkpoint: str | None):
    """The PyTorch fp32 model the artifact was built from, scan in plain torch (builder side: imports torch)."""
    from .model_source import rebuild_from_manifest, resolve_model
    from .scan.op import torch_scan

    if checkpoint:
        model = resolve_model(manifest["model"]["name"], checkpoint=checkpoint).model
    else:
        model = rebuild_from_manifest(manifest)
    return model.set_scan(torch_scan)


def _accuracy(predictor, manifest, model, checkpoint, source: str, spec: InputSpec, progress, task) -> dict:
    """Top-1 of the artifact on a labelled source; the PyTorch model's too where torch and its weights are here."""
    from .data.sources import load_batch

    batch, labels, _ = load_batch(source, spec, None)
    if labels is None or any(lab is None for lab in labels):
        raise ParityError(f"accuracy source {source!r} has no labels")
    labels = np.asarray(labels)
    torch_top1, torch_note = None, None
    if model is None and not torch_available():
        torch_note = f"torch is not installed ({EXPORT_EXTRA_HINT})"
    elif model is None:
        try:
            model = _torch_model(manifest, checkpoint)
        except VMambaExportError as exc:  # e.g. the checkpoint is not on this machine: the artifact's top-1 stands
            torch_note = str(exc)
    if model is not None:
        torch_top1 = float((run_torch(model, batch).argmax(1) == labels).mean())
    progress.advance(task)
    art_top1 = float((run_predictor(predictor, batch).argmax(1) == labels).mean())
    progress.advance(task)
    return {
        "source": source,
        "num_images": len(labels),
        "torch_top1": torch_top1,
        "artifact_top1": art_top1,
        "drop_points": None if torch_top1 is None else 100 * (torch_top1 - art_top1),
        "torch_note": torch_note,
    }


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
