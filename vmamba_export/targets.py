"""Targets are data: targets/<name>.toml says runtime, device, format, precisions, scan lowering and thresholds.
Code reads them; adding a target means adding a file and, if its runtime is new, a lowering and a runtime backend."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import TargetUnavailableError, VMambaExportError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TARGETS_DIR = Path(__file__).resolve().parent.parent / "targets"

TASKS = ("classification", "backbone", "segmentation")
# cuda-onnxruntime's graph rewrites (ExportOptions.extra["cuda_fusions"], `export --cuda-fusions`): "on" the fused ops
# (default), "off" none, "projected" / "conv-projected" / "merged" / "folded" / "packed" / "narrow" also the scan's
# input projections (lowering/cuda_fusions.py)
CUDA_FUSIONS = ("on", "off", "projected", "conv-projected", "merged", "folded", "packed", "narrow")
# Which threshold keys judge which task (validate.py applies them): top-1 agreement has no meaning for feature maps
# or class maps, pixel agreement of the argmax maps only for segmentation. The accuracy drop is top-1 points for a
# classifier and mIoU points for a segmenter.
TASK_THRESHOLD_KEYS = {
    "classification": ("max_rel_l2", "min_cosine", "min_top1_agreement", "max_accuracy_drop_points"),
    "backbone": ("max_rel_l2", "min_cosine"),
    "segmentation": ("max_rel_l2", "min_cosine", "min_pixel_agreement", "max_accuracy_drop_points"),
}


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    runtime: str
    device: str
    format: str
    scan_lowering: str
    precisions: tuple[str, ...]
    runtime_packages: tuple[str, ...] = ()
    export_packages: tuple[str, ...] = ()
    needs_library: str | None = None
    default_max_size: int = 1024
    thresholds: dict = field(default_factory=dict)
    # Per task, per precision: keys added to (or replacing) `thresholds[precision]` for that task, e.g.
    # [task_thresholds.segmentation.fp32] min_pixel_agreement = 0.999.
    task_thresholds: dict = field(default_factory=dict)

    def thresholds_for(self, precision: str, task: str = "classification") -> dict:
        """The pass/fail limits of an artifact of this precision and task: the precision's own limits that apply to
        the task, then the task's additions for that precision."""
        if task not in TASKS:
            raise VMambaExportError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
        merged = dict(self.thresholds.get(precision, {}))
        merged.update(self.task_thresholds.get(task, {}).get(precision, {}))
        if task == "classification":
            return merged  # as before tasks existed: every key of the precision's table
        return {k: v for k, v in merged.items() if k in TASK_THRESHOLD_KEYS[task]}

    def missing_packages(self, packages: tuple[str, ...]) -> list[str]:
        return [p for p in packages if importlib.util.find_spec(p) is None]

    def can_build(self) -> tuple[bool, str]:
        missing = self.missing_packages(self.export_packages)
        if missing:
            return False, f"missing Python packages: {', '.join(missing)}"
        if self.needs_library == "onnxruntime-custom-op":
            from .kernels_paths import ort_library_path

            if ort_library_path() is None:
                return False, "custom-op library not built (python -m vmamba_export.build_kernels)"
        if self.needs_library == "onnxruntime-cuda-custom-op":
            from .kernels_paths import ort_cuda_library_path

            if ort_cuda_library_path() is None:
                return False, "CUDA custom-op library not built (python -m vmamba_export.build_kernels --cuda)"
        if self.needs_library == "openvino-extension":
            from .kernels_paths import openvino_extension_path

            if openvino_extension_path() is None:
                return False, "OpenVINO extension not built (python -m vmamba_export.build_kernels)"
        return True, "ok"

    def can_run(self) -> tuple[bool, str]:
        missing = self.missing_packages(self.runtime_packages)
        if missing:
            return False, f"missing Python packages: {', '.join(missing)}"
        if self.device == "cuda":
            return cuda_runtime_status(self.runtime)
        if self.device == "apple":
            return False, "needs macOS"
        return True, "ok"


def cuda_runtime_status(runtime: str) -> tuple[bool, str]:
    """Whether `runtime` can run on a CUDA GPU here (onnxruntime-gpu's CUDAExecutionProvider and a visible GPU)."""
    if runtime != "onnxruntime":
        return False, "needs a CUDA GPU"
    from .runtime.onnxruntime_backend import cuda_unavailable_reason

    why = cuda_unavailable_reason()
    return (False, why) if why else (True, "ok")


def list_targets() -> list[Target]:
    return [load_target_file(p) for p in sorted(TARGETS_DIR.glob("*.toml"))]


def load_target_file(path: Path) -> Target:
    try:
        data = tomllib.loads(path.read_text())
        data["precisions"] = tuple(data["precisions"])
        for key in ("runtime_packages", "export_packages"):
            data[key] = tuple(data.get(key, ()))
        return Target(**data)
    except (OSError, tomllib.TOMLDecodeError, TypeError, KeyError) as exc:
        raise VMambaExportError(f"target file {path} is invalid: {exc}") from None


def get_target(name: str) -> Target:
    for target in list_targets():
        if target.name == name:
            return target
    known = ", ".join(t.name for t in list_targets())
    raise TargetUnavailableError(f"unknown target {name!r}; known targets: {known}")
