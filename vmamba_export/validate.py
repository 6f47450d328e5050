"""Parity of an artifact with the PyTorch fp32 model, with pass/fail thresholds per precision.

Two references, the same figures (rel L2, cosine, top-1 agreement against the target's thresholds):
- self-check (the default): the artifact's own `references.npz` (real photos preprocessed at export and the PyTorch
  fp32 logits for them, hashed in the manifest). Needs only the artifact and its runtime: no torch, no checkpoint.
- recompute (`images`, `sizes` or `checkpoint` given, `recompute=True`, or an artifact without references): the
  PyTorch fp32 model is rebuilt from the manifest's weights and run on those images and sizes (needs torch).
Either way the PyTorch side runs the scan in plain torch (scan/op.py `torch_scan`), so it shares no code with the C++
kernel the artifact may run. Every metric is computed and every failure listed before the verdict, as Optimum's
validate_model_outputs does.

Dense artifacts (manifest `output.task` "backbone" or "segmentation") are judged per output (`output.outputs`): rel L2
over the batch, cosine per image (each output map flattened), max abs, all finite; for a segmenter also the agreement
of the argmax maps and the mIoU of the artifact's map taken against the PyTorch model's map. Their labelled source
(`--accuracy`) is a segmentation source (image + mask folders, `shapes:holdout`): mIoU and pixel accuracy against the
masks, and the drop in mIoU points that `max_accuracy_drop_points` bounds.

Runtime side: torch and the model code are imported only when recomputing (or for the PyTorch score of --accuracy).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np

from .accuracy import (
    RECORDED_AT_EXPORT,
    classification_scores,
    recorded_source,
    recorded_torch_score,
    segmentation_scores,
)
from .artifact import read_manifest, update_manifest
from .errors import InputError, ParityError, VMambaExportError
from .input_spec import InputSpec
from .outputs import manifest_output_names, manifest_task
from .progress import progress_bar
from .references import read_references
from .segmentation_metrics import confusion_matrix, miou

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


def check_sizes(sizes: list[int], min_size: int, max_size: int) -> None:
    """Refuse input sides the artifact does not take before any image is resized to them (a huge side would take
    all memory in the PyTorch reference before the artifact's own check ran)."""
    bad = [s for s in sizes if not min_size <= s <= max_size]
    if bad:
        raise InputError(
            f"sizes (--sizes) {','.join(map(str, bad))}: this artifact takes input sides {min_size}..{max_size}"
        )


def as_outputs(result, names: list[str], what: str) -> dict[str, np.ndarray]:
    """A predictor's or model's result as {output name: array}: a dict (backbone) is checked for every name, a
    single array (logits) is the first output, a tuple or list is taken in output order."""
    if isinstance(result, dict):
        missing = [n for n in names if n not in result]
        if missing:
            raise ParityError(f"{what} returned no output {missing[0]!r} (it returned {', '.join(map(str, result))})")
        return {n: np.asarray(result[n]) for n in names}
    if isinstance(result, (tuple, list)):
        if len(result) != len(names):
            raise ParityError(f"{what} returned {len(result)} outputs, the artifact describes {len(names)}")
        return {n: np.asarray(r) for n, r in zip(names, result)}
    return {names[0]: np.asarray(result)}


class DenseParity:
    """Parity of dense outputs accumulated over batches (images of different shapes run one group at a time):
    per output rel L2 over everything, cosine per image, max abs; for the segmentation logits also the argmax
    maps' pixel agreement and the confusion matrix of the artifact's map against the PyTorch map."""

    def __init__(self, names: list[str], segmentation: bool, num_classes: int):
        self.names = names
        self.class_output = names[0] if segmentation else None
        self.num_classes = num_classes
        self.stats = {
            n: {
                "sq_diff": 0.0,
                "sq_ref": 0.0,
                "max_abs": 0.0,
                "max_ref": 0.0,
                "cos": [],
                "finite": True,
                "shapes": [],
                "problem": None,
                "agree": 0,
                "pixels": 0,
            }
            for n in names
        }
        self.conf = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.num_images = 0

    def add(self, out: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> None:
        self.num_images += len(next(iter(ref.values())))
        for name in self.names:
            st = self.stats[name]
            o, r = out[name], ref[name]
            if st["problem"]:
                continue
            if o.shape != r.shape:
                st["problem"] = f"shape {tuple(o.shape)} differs from PyTorch's {tuple(r.shape)}"
                continue
            shape = [int(d) for d in o.shape[1:]]
            if shape not in st["shapes"]:
                st["shapes"].append(shape)
            o64, r64 = o.astype(np.float64), r.astype(np.float64)
            st["finite"] = st["finite"] and bool(np.isfinite(o64).all())
            diff = o64 - r64
            st["sq_diff"] += float((diff * diff).sum())
            st["sq_ref"] += float((r64 * r64).sum())
            st["max_abs"] = max(st["max_abs"], float(np.abs(diff).max()))
            st["max_ref"] = max(st["max_ref"], float(np.abs(r64).max()))
            of, rf = o64.reshape(len(o64), -1), r64.reshape(len(r64), -1)
            norms = np.linalg.norm(of, axis=1) * np.linalg.norm(rf, axis=1)
            st["cos"].extend(((of * rf).sum(axis=1) / np.maximum(norms, 1e-30)).tolist())
            if name == self.class_output:
                art_map, torch_map = o.argmax(axis=1), r.argmax(axis=1)
                st["agree"] += int((art_map == torch_map).sum())
                st["pixels"] += int(art_map.size)
                self.conf += confusion_matrix(art_map, torch_map, self.num_classes, ignore_index=-1)

    def metrics(self) -> list[dict]:
        rows = []
        for name in self.names:
            st = self.stats[name]
            row = {"name": name, "shapes": st["shapes"], "problem": st["problem"]}
            if st["problem"] is None:
                cos = np.asarray(st["cos"])
                row.update(
                    max_abs=st["max_abs"],
                    max_rel=st["max_abs"] / max(st["max_ref"], 1e-30),
                    rel_l2=float(np.sqrt(st["sq_diff"]) / max(np.sqrt(st["sq_ref"]), 1e-30)),
                    cosine_min=float(cos.min()),
                    cosine_mean=float(cos.mean()),
                    all_finite=st["finite"],
                )
                if name == self.class_output:
                    row["pixel_agreement"] = st["agree"] / st["pixels"]
                    row["miou_vs_torch"] = miou(self.conf)[0]
            rows.append(row)
        return rows


# threshold key -> (metric of an output row, comparison, sign); the segmentation-only key applies to its logits only.
_DENSE_CHECKS = {
    "max_rel_l2": ("rel_l2", lambda v, t: v <= t, "<="),
    "min_cosine": ("cosine_min", lambda v, t: v >= t, ">="),
    "min_pixel_agreement": ("pixel_agreement", lambda v, t: v >= t, ">="),
}


def dense_threshold_failures(rows: list[dict], thresholds: dict) -> list[str]:
    """Every threshold broken by any output, each failure naming the output."""
    failures = []
    for row in rows:
        if row["problem"]:
            failures.append(f"{row['name']}: {row['problem']}")
            continue
        if not row["all_finite"]:
            failures.append(f"{row['name']}: non-finite outputs")
        for key, limit in thresholds.items():
            if key not in _DENSE_CHECKS or _DENSE_CHECKS[key][0] not in row:
                continue
            metric, ok, sign = _DENSE_CHECKS[key]
            if not ok(row[metric], limit):
                failures.append(f"{row['name']}: {metric} {row[metric]:.4g} (needs {sign} {limit:g})")
    return failures


def dense_run_record(size: int, parity: DenseParity, thresholds: dict) -> dict:
    """One size's result: every output's row, the worst figures over outputs (the build report's columns) and the
    verdict."""
    rows = parity.metrics()
    failures = dense_threshold_failures(rows, thresholds)
    good = [r for r in rows if r["problem"] is None]
    seg = next((r for r in good if "pixel_agreement" in r), None)
    return {
        "size": size,
        "num_images": parity.num_images,
        "outputs": rows,
        "max_abs": max((r["max_abs"] for r in good), default=None),
        "max_rel": max((r["max_rel"] for r in good), default=None),
        "rel_l2": max((r["rel_l2"] for r in good), default=None),
        "cosine_min": min((r["cosine_min"] for r in good), default=None),
        "cosine_mean": min((r["cosine_mean"] for r in good), default=None),
        "top1_agreement": None,
        "pixel_agreement": seg["pixel_agreement"] if seg else None,
        "miou_vs_torch": seg["miou_vs_torch"] if seg else None,
        "all_finite": all(r["all_finite"] for r in good) and len(good) == len(rows),
        "passed": not failures,
        "failures": failures,
    }


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
    record: bool = False,
    recompute: bool = False,
) -> dict:
    """Compare the artifact with its PyTorch fp32 model; with `record`, also write the result into its manifest and
    report (by default nothing is written: the artifact may be read-only).

    With no `images`, `sizes`, `checkpoint` or `recompute`, the reference is the artifact's own references.npz (the
    self-check, no torch needed); otherwise, or for an artifact without references, the PyTorch model is rebuilt
    and run on `images` (default: the built-in photos) at `sizes` (default: the model's)."""
    from .runtime import load

    folder = Path(folder)
    manifest = read_manifest(folder)
    task = manifest_task(manifest)  # read_manifest's schema check has refused any other task
    if accuracy_source and task == "backbone":
        raise InputError(
            f"--accuracy {accuracy_source}: a backbone artifact outputs feature maps, with no classes to score "
            "against labels; validate its parity without --accuracy"
        )
    with _coreml_numpy_evaluator_off_macos(manifest):
        predictor = load(folder, threads=threads)
    if sizes:
        check_sizes(sizes, predictor.min_size, predictor.max_size)
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
    extra = 2 if accuracy_source else 0
    with progress_bar(show_progress) as progress:
        if task != "classification":
            runs, images_label, bar = _dense_runs(
                predictor, manifest, task, references, model, images, sizes, limit, thresholds, progress, extra
            )
        elif references is not None:
            bar = progress.add_task("self-check", total=1 + extra)
            inputs, ref, names = references
            if limit:
                inputs, ref, names = inputs[:limit], ref[:limit], names[:limit]
            size = int(inputs.shape[-1])
            out = run_predictor(predictor, inputs)
            progress.advance(bar)
            runs.append(_run_record(size, out, ref, thresholds))
            images_label = f"the artifact's references ({manifest['references'].get('source', '?')})"
        else:
            images = images or "builtin"
            images_label = images
            sizes = sizes or [base_spec.image_size]
            bar = progress.add_task("parity", total=len(sizes) * 2 + extra)
            from .data.sources import load_batch

            for size in sizes:
                batch, _, names = load_batch(images, _spec_at(base_spec, size), limit)
                ref = run_torch(model, batch)
                progress.advance(bar)
                out = run_predictor(predictor, batch)
                progress.advance(bar)
                runs.append(_run_record(size, out, ref, thresholds))
        accuracy = None
        if accuracy_source and task == "segmentation":
            accuracy = _segmentation_accuracy(
                predictor, manifest, model, checkpoint, accuracy_source, base_spec, progress, bar
            )
        elif accuracy_source:
            accuracy = _accuracy(predictor, manifest, model, checkpoint, accuracy_source, base_spec, progress, bar)
    # Quantised targets are judged by accuracy: a limit without labelled images to check it is a failure, not a pass.
    accuracy_failures = []
    score = "mIoU" if task == "segmentation" else "top-1"
    if "max_accuracy_drop_points" in thresholds:
        limit_points = thresholds["max_accuracy_drop_points"]
        if accuracy is None:
            recorded = recorded_source(manifest)
            accuracy_failures.append(
                f"{score} drop limit {limit_points:g} points needs a labelled --accuracy source"
                + (" (images with masks)" if task == "segmentation" else "")
                + (f"; the artifact records PyTorch's {score} on {recorded}: --accuracy {recorded}" if recorded else "")
            )
        elif accuracy["drop_points"] is None:
            accuracy_failures.append(
                f"{score} drop limit {limit_points:g} points needs the PyTorch {score}: {accuracy['torch_note']}"
            )
        elif accuracy["drop_points"] > limit_points:
            accuracy_failures.append(f"{score} drop {accuracy['drop_points']:.2f} points (needs <= {limit_points:g})")
    validation = {
        "mode": "self-check" if references is not None else "recompute",
        "task": task,
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
            f"the artifact's references.npz: PyTorch fp32 {'outputs' if task != 'classification' else 'logits'} "
            "recorded at export, scan in plain torch"
            if references is not None
            else "PyTorch fp32 model, scan in plain torch (independent of the C++ kernel)"
        ),
    }
    if record:
        update_manifest(folder, validation=validation)
    return validation


def _dense_runs(
    predictor, manifest, task, references, model, images, sizes, limit, thresholds, progress, extra
) -> tuple[list[dict], str, object]:
    """Per-output parity of a backbone or segmentation artifact: against its references.npz (one size), or against
    the PyTorch model at each of `sizes` (images keeping their ratio run one shape group at a time)."""
    names = manifest_output_names(manifest)
    segmentation = task == "segmentation"
    num_classes = int(manifest["output"].get("num_classes") or 0)
    runs = []
    if references is not None:
        bar = progress.add_task("self-check", total=1 + extra)
        inputs, refs, ref_names = references
        refs = as_outputs(refs, names, "the references.npz")
        if limit:
            inputs, refs, ref_names = inputs[:limit], {k: v[:limit] for k, v in refs.items()}, ref_names[:limit]
        parity = DenseParity(names, segmentation, num_classes)
        parity.add(run_dense_predictor(predictor, inputs, names), refs)
        progress.advance(bar)
        runs.append(dense_run_record(int(inputs.shape[-1]), parity, thresholds))
        return runs, f"the artifact's references ({manifest['references'].get('source', '?')})", bar
    images = images or "builtin"
    spec = predictor.input_spec
    sizes = sizes or [spec.image_size]
    bar = progress.add_task("parity", total=len(sizes) * 2 + extra)
    for size in sizes:
        parity = DenseParity(names, segmentation, num_classes)
        groups = preprocessed_groups(images, _spec_at(spec, size), limit)
        refs = [run_dense_torch(model, batch, names) for batch, _ in groups]
        progress.advance(bar)
        for (batch, _), ref in zip(groups, refs):
            parity.add(run_dense_predictor(predictor, batch, names), ref)
        progress.advance(bar)
        runs.append(dense_run_record(size, parity, thresholds))
    return runs, images, bar


def preprocessed_groups(images: str, spec: InputSpec, limit: int | None) -> list[tuple[np.ndarray, list[str]]]:
    """The images of a source preprocessed by `spec`, as batches of one shape each: one batch when the spec crops
    to a square; consecutive images of the same shape together when it keeps their ratio (`crop=False`)."""
    from .data.sources import load_batch, open_source

    if getattr(spec, "crop", True):
        batch, _, names = load_batch(images, spec, limit)
        return [(batch, names)]
    from .data.preprocess import preprocess

    groups: list[tuple[list[np.ndarray], list[str]]] = []
    for name, image, _ in open_source(images, limit):
        if isinstance(image, np.ndarray):
            raise InputError(
                f"{images}: {name} is an already preprocessed array; a model that keeps the image ratio needs images"
            )
        array = preprocess(image, spec)
        if groups and groups[-1][0][0].shape == array.shape:
            groups[-1][0].append(array)
            groups[-1][1].append(name)
        else:
            groups.append(([array], [name]))
    return [(np.stack(arrays).astype(np.float32, copy=False), names) for arrays, names in groups]


# Dense models run one image at a time in validation: their activations and outputs grow with the pixels (an
# UperNet at 512 holds ~0.5 GB per image in its FPN alone; batches of 8 took validate to 13-16 GB), and batching
# buys nothing for a per-pixel comparison.
DENSE_BATCH = 1


def run_dense_torch(model, batch: np.ndarray, names: list[str], batch_size: int = DENSE_BATCH) -> dict[str, np.ndarray]:
    import torch

    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    with torch.no_grad():
        for start in range(0, len(batch), batch_size):
            result = model(torch.from_numpy(batch[start : start + batch_size]))
            if isinstance(result, (tuple, list)):
                result = [r.numpy() for r in result]
            elif isinstance(result, dict):
                result = {k: v.numpy() for k, v in result.items()}
            else:
                result = result.numpy()
            for name, array in as_outputs(result, names, "the PyTorch model").items():
                parts[name].append(array)
    return {n: np.concatenate(v) for n, v in parts.items()}


def run_dense_predictor(
    predictor, batch: np.ndarray, names: list[str], batch_size: int = DENSE_BATCH
) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for start in range(0, len(batch), batch_size):
        result = as_outputs(predictor(batch[start : start + batch_size]), names, "the artifact")
        for name, array in result.items():
            parts[name].append(array)
    return {n: np.concatenate(v) for n, v in parts.items()}


def _run_record(size: int, out: np.ndarray, ref: np.ndarray, thresholds: dict) -> dict:
    metrics = parity_metrics(out, ref)
    failures = threshold_failures(metrics, thresholds)
    return {"size": size, "num_images": len(ref), **metrics, "passed": not failures, "failures": failures}


def _need_torch(what: str) -> None:
    if not torch_available():
        raise VMambaExportError(f"{what} needs torch, which is not installed: {EXPORT_EXTRA_HINT}")


def _torch_model(manifest: dict, checkpoint: str | None):
    """The PyTorch fp32 model the artifact was built from, scan in plain torch (builder side: imports torch)."""
    from .model_source import rebuild_from_manifest
    from .scan.op import torch_scan

    return rebuild_from_manifest(manifest, checkpoint=checkpoint).set_scan(torch_scan)  # checks the file's sha256


def _torch_for_accuracy(manifest: dict, model, checkpoint: str | None):
    """(the PyTorch model or None, why not): it is needed for the PyTorch side of an accuracy comparison."""
    if model is not None:
        return model, None
    if not torch_available():
        return None, f"torch is not installed ({EXPORT_EXTRA_HINT})"
    try:
        return _torch_model(manifest, checkpoint), None
    except VMambaExportError as exc:  # e.g. the checkpoint is not on this machine: the artifact's score stands
        return None, str(exc)


def _torch_side(manifest: dict, data_sha256: str, keys: tuple[str, ...], computed: dict | None, note: str | None):
    """PyTorch's scores (`keys`): computed here, else those the artifact recorded at export for the same data bytes,
    else None with why (naming the source it recorded, when the data differ)."""
    if computed is not None:
        return {**computed, "torch_from": "computed here", "torch_note": None}
    record = recorded_torch_score(manifest, data_sha256)
    if record is not None and all(record.get(k) is not None for k in keys):
        return {
            **{k: record[k] for k in keys},
            "torch_from": RECORDED_AT_EXPORT,
            "torch_note": None,
        }
    recorded = recorded_source(manifest)
    if recorded is not None:
        note += f"; the artifact records PyTorch's score on {recorded}, not on these images"
    return {**dict.fromkeys(keys), "torch_from": None, "torch_note": note}


def _accuracy(predictor, manifest, model, checkpoint, source: str, spec: InputSpec, progress, task) -> dict:
    """Top-1 of the artifact on a labelled source; the PyTorch model's too where torch and its weights are here, or
    as the artifact recorded it at export for the same data (accuracy.py)."""
    model, torch_note = _torch_for_accuracy(manifest, model, checkpoint)
    runners = {"artifact": lambda batch: run_predictor(predictor, batch)}
    if model is not None:
        runners["torch"] = lambda batch: run_torch(model, batch)
    scores = classification_scores(runners, source, spec)
    progress.advance(task, 2)
    computed = {"torch_top1": scores["top1"]["torch"]} if model is not None else None
    torch_side = _torch_side(manifest, scores["data_sha256"], ("torch_top1",), computed, torch_note)
    art_top1, torch_top1 = scores["top1"]["artifact"], torch_side["torch_top1"]
    return {
        "source": source,
        "num_images": scores["num_images"],
        "artifact_top1": art_top1,
        **torch_side,
        "drop_points": None if torch_top1 is None else 100 * (torch_top1 - art_top1),
        "data_sha256": scores["data_sha256"],
    }


def _segmentation_accuracy(predictor, manifest, model, checkpoint, source: str, spec: InputSpec, progress, bar):
    """mIoU and pixel accuracy of the artifact's class maps against the masks of a labelled segmentation source,
    the PyTorch model's too where torch and its weights are here (or as the artifact recorded them at export for the
    same data, accuracy.py), and the drop in mIoU points."""
    model, torch_note = _torch_for_accuracy(manifest, model, checkpoint)
    names = manifest_output_names(manifest)
    runners = {"artifact": lambda image: run_dense_predictor(predictor, image, names)[names[0]]}
    if model is not None:
        runners["torch"] = lambda image: run_dense_torch(model, image, names)[names[0]]
    scores = segmentation_scores(runners, source, spec, int(manifest["output"]["num_classes"]))
    progress.advance(bar, 2)
    keys = ("torch_miou", "torch_pixel_accuracy")
    computed = None
    if model is not None:
        computed = {"torch_miou": scores["miou"]["torch"], "torch_pixel_accuracy": scores["pixel_accuracy"]["torch"]}
    torch_side = _torch_side(manifest, scores["data_sha256"], keys, computed, torch_note)
    art_miou, torch_miou = scores["miou"]["artifact"], torch_side["torch_miou"]
    return {
        "source": source,
        "metric": "miou",
        "num_images": scores["num_images"],
        "artifact_miou": art_miou,
        "artifact_pixel_accuracy": scores["pixel_accuracy"]["artifact"],
        "artifact_class_iou": scores["class_iou"]["artifact"],
        **torch_side,
        "drop_points": None if torch_miou is None else 100 * (torch_miou - art_miou),
        "data_sha256": scores["data_sha256"],
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
    if not getattr(spec, "crop", True):  # shorter side to `size`, nothing cropped: `resize` is unused
        return dataclasses.replace(spec, image_size=size)
    resize = max(size, round(size * spec.resize / spec.image_size))
    return dataclasses.replace(spec, image_size=size, resize=resize)
