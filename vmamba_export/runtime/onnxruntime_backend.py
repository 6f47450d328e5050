"""ONNX Runtime backend: registers the artifact's custom-op library (if it has one) and runs the session."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ArtifactError, TargetUnavailableError


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise TargetUnavailableError(
            "this artifact needs ONNX Runtime: pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA)"
        ) from None
    return onnxruntime


def make_session(model_path: Path, library: Path | None, threads: int | None, providers=None):
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if library is not None:
        try:
            options.register_custom_ops_library(str(library))
        except Exception as exc:  # onnxruntime raises its own Fail/RuntimeException types
            raise ArtifactError(f"cannot load the custom-op library {library}: {exc}") from None
    try:
        return ort.InferenceSession(str(model_path), options, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:
        raise ArtifactError(f"ONNX Runtime cannot open {model_path}: {str(exc).splitlines()[0]}") from None


class OnnxRuntimeBackend:
    def __init__(self, folder: Path, manifest: dict, threads: int | None = None):
        entry = manifest["entry"]
        library = entry.get("custom_op_library")
        self.session = make_session(
            folder / entry["model"], folder / library if library else None, threads, entry.get("providers")
        )
        self.input_name = self.session.get_inputs()[0].name

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]
