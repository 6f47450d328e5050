"""Core ML backend for `apple-coreml` artifacts.

On macOS the `.mlpackage` is opened with `coremltools.models.MLModel` and Core ML predicts. Elsewhere Core ML does not
exist, and opening the artifact raises TargetUnavailableError, unless the numpy MIL evaluator is asked for with
`VMAMBA_COREML_EVALUATOR=numpy` (what `validate` does automatically off macOS, recording it in the manifest). The
evaluator executes the saved MIL program op by op (vmamba_export/coreml_eval.py): a numeric check of the program,
not of Core ML, and far slower.

The program has a fixed input shape (1, C, S, S), so batches run image by image.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from ..errors import InputError, TargetUnavailableError

EVALUATOR_ENV = "VMAMBA_COREML_EVALUATOR"
NUMPY_LABEL = "evaluated with the numpy MIL evaluator (vmamba_export.coreml_eval), not Core ML"


def selected_evaluator() -> str:
    """ "coreml" (the default) or "numpy", from VMAMBA_COREML_EVALUATOR."""
    value = os.environ.get(EVALUATOR_ENV, "coreml").strip().lower() or "coreml"
    if value not in ("coreml", "numpy"):
        raise TargetUnavailableError(f"{EVALUATOR_ENV} must be 'coreml' or 'numpy', got {value!r}")
    return value


class CoreMLBackend:
    def __init__(self, folder: Path, manifest: dict, threads: int | None = None):
        path = Path(folder) / manifest["entry"]["model"]
        self.input_shape = tuple(manifest["lowering"]["input_shape"])
        if selected_evaluator() == "numpy":
            from ..coreml_eval import MILEvaluator

            self._evaluator = MILEvaluator(path)
            self.evaluated_with = NUMPY_LABEL
            self._run_one = self._evaluator
            return
        if sys.platform != "darwin":
            raise TargetUnavailableError(
                "Core ML needs macOS: this apple-coreml artifact cannot run here. Use vmamba_export.coreml_eval "
                f"(or set {EVALUATOR_ENV}=numpy) for a numeric check of the program on Linux"
            )
        # Not through lowering.coreml (the converter's module imports torch): the device runs without it.
        try:
            import coremltools as ct
        except ImportError:
            raise TargetUnavailableError("this artifact needs coremltools: pip install coremltools==9.0") from None
        input_name = manifest["input"].get("name", "pixel_values")
        output_name = manifest["output"].get("name", "logits")
        self._model = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit.ALL)
        self.evaluated_with = "Core ML (coremltools MLModel.predict, compute units ALL)"

        def run_one(x: np.ndarray) -> np.ndarray:
            return np.asarray(self._model.predict({input_name: x})[output_name], dtype=np.float32)

        self._run_one = run_one

    def run(self, batch: np.ndarray) -> np.ndarray:
        expected = self.input_shape[1:]
        if tuple(batch.shape[1:]) != expected:
            raise InputError(
                f"this Core ML artifact takes images of shape {expected} (fixed-shape program), got {batch.shape}"
            )
        return np.concatenate([self._run_one(batch[i : i + 1]) for i in range(len(batch))]).astype(np.float32)
