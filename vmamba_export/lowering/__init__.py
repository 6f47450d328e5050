"""Lowering by registry: a target's `scan_lowering` names the function that writes its model files.

Each function takes (model, target, folder, options) and returns (entry, info): `entry` tells the runtime loader which
files to open (model, custom-op library), `info` what the manifest records about the lowering (and, for int8, about
the calibration). `options` carries the precision and everything a precision needs (ExportOptions).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import TargetUnavailableError
from ..models import VMamba
from ..targets import Target


@dataclass
class ExportOptions:
    precision: str = "fp32"
    max_size: int = 1024  # largest input side the artifact must take
    calib: str = "builtin"  # image source for int8 calibration (data/sources.py spec)
    calib_samples: int = 64
    calib_method: str = "minmax"
    exclude: tuple[str, ...] = ()  # layer names kept in float
    accuracy_source: str | None = None  # labelled source for accuracy-aware int8
    max_drop: float | None = None  # accuracy-aware int8: largest top-1 drop allowed, in points
    extra: dict = field(default_factory=dict)  # target-specific settings


Lowering = Callable[[VMamba, Target, Path, ExportOptions], tuple[dict, dict]]


def _onnx_custom_op(model: VMamba, target: Target, folder: Path, options: ExportOptions) -> tuple[dict, dict]:
    from ..kernels_paths import ort_library_path
    from .onnx_export import export_onnx

    library = ort_library_path()
    if library is None:
        raise TargetUnavailableError(
            f"target {target.name} needs the ONNX Runtime custom-op library: run python -m vmamba_export.build_kernels"
        )
    info = export_onnx(model, folder / "model.onnx", scan="custom-op", max_size=options.max_size)
    shutil.copy2(library, folder / library.name)
    return {"model": "model.onnx", "custom_op_library": library.name}, info


def _onnx_portable(model: VMamba, target: Target, folder: Path, options: ExportOptions) -> tuple[dict, dict]:
    from .onnx_export import export_onnx

    info = export_onnx(model, folder / "model.onnx", scan="portable", max_size=options.max_size)
    return {"model": "model.onnx"}, info


LOWERINGS: dict[str, Lowering] = {
    "custom-op": _onnx_custom_op,
    "portable": _onnx_portable,
}


def get_lowering(target: Target) -> Lowering:
    try:
        return LOWERINGS[target.scan_lowering]
    except KeyError:
        raise TargetUnavailableError(
            f"target {target.name}: scan lowering {target.scan_lowering!r} is not implemented in this version"
        ) from None
