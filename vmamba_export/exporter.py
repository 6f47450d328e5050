"""export: model -> lowering for one target -> artifact folder (atomic), with its manifest and report."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .artifact import (
    ARTIFACT_FORMAT,
    MANIFEST,
    MAX_INPUT_SIDE,
    REPORT,
    SCHEMA_VERSION,
    atomic_artifact,
    file_entries,
    fit_preprocessing,
    manifest_problem,
    render_report,
    toolchain_versions,
    utc_now,
    write_json_atomic,
    write_text_atomic,
)
from .errors import ArtifactError, InputError, TargetUnavailableError
from .lowering import ExportOptions, get_lowering
from .model_source import ModelSource
from .models.shapes import export_min_size
from .outputs import output_section
from .platforms import PLATFORMS, cannot_build_reason, get_platform, host_platform, platform_record
from .references import write_references
from .targets import Target


def runtime_version(runtime: str) -> str | None:
    from importlib import metadata

    dists = {"onnxruntime": ("onnxruntime", "onnxruntime-gpu"), "openvino": ("openvino",), "coreml": ("coremltools",)}
    dists["tvm"] = ("apache-tvm",)
    for dist in dists.get(runtime, ()):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def check_max_size(max_size: int, cfg) -> None:
    """The largest input side must be at least the smallest one the model's graph can be exported for (below it a
    stage would shrink to one position). Smaller than the model's own side is allowed: fixed-size targets use it."""
    smallest = export_min_size(cfg)
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < smallest:
        raise InputError(f"max size (--max-size) {max_size!r} is below {cfg.name}'s smallest input side {smallest}")


def check_platform_for(target: Target, platform: str | None) -> str:
    """The platform name to build `target` for (None: this machine's); raises when the target cannot be built for it."""
    if platform is None and host_platform() not in PLATFORMS:
        return host_platform()  # e.g. macOS: builds for itself, as before platforms existed
    name = get_platform(platform).name
    why = cannot_build_reason(target.name, name)
    if why:
        raise TargetUnavailableError(f"target {target.name} cannot be built for {name}: {why}")
    return name


# Lowerings that build dense (backbone, segmentation) artifacts; the others refuse them in one line.
DENSE_LOWERINGS = ("custom-op", "custom-op-cuda", "portable", "openvino-extension")


def check_dense_export(task: str, target: Target, options: ExportOptions) -> None:
    """Refuse, before any work, what a dense task cannot be exported with: a target whose lowering has no dense
    path yet (cpu-tvm, apple-coreml), and the accuracy-aware int8 options, which keep layers float until a top-1
    drop fits (there is no top-1 for feature maps or per-pixel classes; validate measures mIoU). Plain calibrated
    int8 is fine."""
    if task == "classification":
        return
    if target.scan_lowering not in DENSE_LOWERINGS:
        raise TargetUnavailableError(f"target {target.name}: not implemented for task {task}")
    if options.accuracy_source or options.max_drop is not None:
        raise InputError(
            f"--accuracy/--max-drop (accuracy-aware int8, judged by top-1) do not apply to task {task}: export plain "
            "calibrated int8 and measure it with `vmamba-export validate` (mIoU for segmentation)"
        )


def _reference_score(model, task: str, manifest: dict, options: ExportOptions) -> dict | None:
    """PyTorch's score on a labelled source for a precision judged by its accuracy drop (accuracy.py), computed as
    validate will compute the artifact's (the manifest's preprocessing); None for other precisions, or when there is
    no labelled source (then a device without torch cannot measure the drop)."""
    from .accuracy import torch_score_record
    from .bundled import default_sources
    from .input_spec import InputSpec
    from .references import torch_reference

    source = options.reference_accuracy_source or default_sources(model.config.name)[0]
    if source is None or "max_accuracy_drop_points" not in manifest["thresholds"]:
        return None

    def runner(images):
        return torch_reference(model, images, 8)[0]

    spec = InputSpec.from_dict(manifest["input"]["preprocessing"])
    return torch_score_record(task, source, runner, spec, int(manifest["output"]["num_classes"]))


def _import_export_packages(target: Target) -> None:
    """Import the target's export packages now, before atomic_artifact turns SIGTERM into an exception. A native
    extension's module initialisation runs Python code (onnx's nanobind enums, for one) where a Python exception
    cannot unwind through it: a SIGTERM landing there aborted the process (SIGABRT, partial folder left behind)
    instead of exiting 143 with everything cleaned up. Afterwards the same signal finds ordinary Python frames."""
    import importlib

    for name in target.export_packages:
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # can_build() has checked they are installed; the lowering reports any import failure itself


def export_artifact(
    source: ModelSource,
    target: Target,
    out: Path,
    precision: str = "fp32",
    max_size: int | None = None,
    overwrite: bool = False,
    options: ExportOptions | None = None,
    platform: str | None = None,
) -> dict:
    """Build the artifact folder `out`; returns its manifest. Nothing is left at `out` if anything fails.

    `options` (precision-specific settings such as calibration) is optional; `precision`, `max_size` and `platform`
    (platforms.py name; default: this machine's) override it.
    """
    options = options or ExportOptions()
    options.precision = precision
    options.max_size = max_size or target.default_max_size
    if options.max_size > MAX_INPUT_SIDE:  # the loader refuses manifests beyond it (artifact.py)
        raise InputError(f"--max-size {options.max_size} is above the limit of {MAX_INPUT_SIDE} pixels a side")
    options.platform = check_platform_for(target, platform or options.platform)
    if precision not in target.precisions:
        raise TargetUnavailableError(
            f"target {target.name} does not offer precision {precision!r}; it offers {', '.join(target.precisions)}"
        )
    ok, why = target.can_build()
    if not ok:
        raise TargetUnavailableError(f"cannot build target {target.name} here: {why}")
    model = source.model.eval()
    cfg = model.config
    task = getattr(cfg, "task", "classification")
    check_dense_export(task, target, options)
    check_max_size(options.max_size, cfg)
    labels_source = source.labels_source or ("config" if cfg.input.labels is not None else None)
    if task == "backbone" and cfg.input.labels is not None:  # feature maps have no classes (output.num_classes 0)
        cfg = cfg.with_overrides(input=dataclasses.replace(cfg.input, labels=None))
        labels_source = None
    if cfg.input.labels is not None and len(cfg.input.labels) != cfg.num_classes:
        # A model built by hand with another head than its config's labels: number its classes (as resolve_model
        # does for a fine-tune given no labels) rather than write a manifest no loader accepts.
        cfg = cfg.with_overrides(input=dataclasses.replace(cfg.input, labels=None))
        labels_source = None
    lowering = get_lowering(target)
    _import_export_packages(target)
    with atomic_artifact(Path(out), overwrite=overwrite) as folder:
        entry, info = lowering(model, target, folder, options)
        # Inputs and PyTorch fp32 logits for the device's self-check (validate without torch): hashed in files.
        references = write_references(folder, model, cfg.input, info.get("min_size"), options.max_size)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "format": ARTIFACT_FORMAT,
            "created": utc_now(),
            "model": {"name": cfg.name, "config": cfg.to_dict(), "weights": source.weights},
            "target": {
                "name": target.name,
                "runtime": target.runtime,
                "device": target.device,
                "format": target.format,
                "scan_lowering": target.scan_lowering,
            },
            "runtime": {"name": target.runtime, "version": runtime_version(target.runtime)},
            "precision": precision,
            "input": {
                "name": "pixel_values",
                "layout": "NCHW",
                "dtype": "float32",
                "channels": cfg.in_chans,
                "shape": ["batch", cfg.in_chans, "height", "width"],
                "dynamic_axes": info.pop("dynamic_axes", None),
                "min_size": info.pop("min_size", None) or export_min_size(cfg),  # fixed-shape lowerings set it
                "max_size": options.max_size,
                "preprocessing": cfg.input.to_dict(),
            },
            "output": output_section(cfg, labels_source),
            "lowering": info,
            "entry": entry,
            "platform": platform_record(options.platform, folder),
            "references": references,
            "files": file_entries(folder),
            "toolchain": toolchain_versions(target.export_packages),
            "thresholds": target.thresholds_for(precision, task),
            "validation": None,
            "benchmark": None,
        }
        # Fixed-size lowerings (TVM, Core ML) may fix a side other than the config's crop: preprocess to that side.
        manifest["input"]["preprocessing"] = fit_preprocessing(manifest["input"])
        score = _reference_score(model, task, manifest, options)
        if score is not None:
            manifest["references"]["accuracy"] = score
        # Never write an artifact the loader would refuse (checked as it will be read: tuples become lists).
        problem = manifest_problem(json.loads(json.dumps(manifest, default=str)))
        if problem:
            raise ArtifactError(f"the manifest built for {out} fails the schema: {problem}")
        write_json_atomic(folder / MANIFEST, manifest)
        write_text_atomic(folder / REPORT, render_report(manifest))
    return manifest
