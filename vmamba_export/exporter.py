"""export: model -> lowering for one target -> artifact folder (atomic), with its manifest and report."""

from __future__ import annotations

from pathlib import Path

from .artifact import (
    MANIFEST,
    REPORT,
    SCHEMA_VERSION,
    atomic_artifact,
    file_entries,
    render_report,
    toolchain_versions,
    utc_now,
    write_json_atomic,
    write_text_atomic,
)
from .errors import TargetUnavailableError
from .lowering import ExportOptions, get_lowering
from .model_source import ModelSource
from .models.shapes import export_min_size
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


def check_platform_for(target: Target, platform: str | None) -> str:
    """The platform name to build `target` for (None: this machine's); raises when the target cannot be built for it."""
    if platform is None and host_platform() not in PLATFORMS:
        return host_platform()  # e.g. macOS: builds for itself, as before platforms existed
    name = get_platform(platform).name
    why = cannot_build_reason(target.name, name)
    if why:
        raise TargetUnavailableError(f"target {target.name} cannot be built for {name}: {why}")
    return name


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
    lowering = get_lowering(target)
    with atomic_artifact(Path(out), overwrite=overwrite) as folder:
        entry, info = lowering(model, target, folder, options)
        # Inputs and PyTorch fp32 logits for the device's self-check (validate without torch): hashed in files.
        references = write_references(folder, model, cfg.input, info.get("min_size"), options.max_size)
        manifest = {
            "schema_version": SCHEMA_VERSION,
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
            "output": {"name": "logits", "shape": ["batch", cfg.num_classes], "num_classes": cfg.num_classes},
            "lowering": info,
            "entry": entry,
            "platform": platform_record(options.platform, folder),
            "references": references,
            "files": file_entries(folder),
            "toolchain": toolchain_versions(target.export_packages),
            "thresholds": target.thresholds_for(precision),
            "validation": None,
            "benchmark": None,
        }
        write_json_atomic(folder / MANIFEST, manifest)
        write_text_atomic(folder / REPORT, render_report(manifest))
    return manifest
