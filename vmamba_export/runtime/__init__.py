"""Runtime loader: `load(artifact_dir)` verifies an artifact and returns a predictor that runs it.

Only the target's runtime is imported (onnxruntime, openvino, ...), at this boundary, when an artifact needs it.
"""

from __future__ import annotations

from pathlib import Path

from ..artifact import read_manifest, verify_files
from ..errors import TargetUnavailableError
from .platform_check import check_platform
from .predictor import Predictor

_BACKENDS = {
    "onnxruntime": ("onnxruntime_backend", "OnnxRuntimeBackend"),
    "coreml": ("coreml_backend", "CoreMLBackend"),
    "openvino": ("openvino_backend", "OpenVinoBackend"),
    "tvm": ("tvm_backend", "TvmBackend"),
}


def load(
    artifact_dir: str | Path,
    threads: int | None = None,
    verify: bool = True,
    expected_sha256: str | None = None,
    cuda_graph: bool | None = None,
    specialize_shapes: bool = True,
) -> Predictor:
    """Open an artifact folder: check every file against its manifest hash, load its runtime, return a Predictor.

    `expected_sha256` (hex) pins manifest.json itself, checked before it is parsed: the manifest lists every other
    file's sha256, so a hash received through a trusted channel pins the whole artifact (README "Artifacts").
    `cuda_graph`: for cuda-onnxruntime artifacts, replay a captured CUDA graph per input shape (default on; False
    launches every kernel from the host, as ONNX Runtime does by default).
    `specialize_shapes`: for ONNX Runtime artifacts, run an input shape seen more than once on a session made for
    that shape (default on: ONNX Runtime folds the graph's shape arithmetic and picks faster kernels, such as the
    segmentation head's upsampling in its blocked layout; each costs a session creation and a copy of the weights;
    the last four shapes are kept). False keeps every call on the one session with symbolic shapes."""
    folder = Path(artifact_dir)
    manifest = read_manifest(folder, expected_sha256=expected_sha256)
    if verify:
        verify_files(folder, manifest)
    check_platform(folder, manifest)  # before any library of the artifact is loaded
    runtime = manifest["target"].get("runtime")
    if runtime not in _BACKENDS:
        raise TargetUnavailableError(f"artifact {folder} needs runtime {runtime!r}, which this loader does not know")
    import importlib

    module_name, class_name = _BACKENDS[runtime]
    module = importlib.import_module(f".{module_name}", __package__)
    options = {"cuda_graph": cuda_graph, "specialize_shapes": specialize_shapes} if runtime == "onnxruntime" else {}
    backend = getattr(module, class_name)(folder, manifest, threads=threads, **options)
    return Predictor(manifest, backend, folder)


__all__ = ["Predictor", "load"]
