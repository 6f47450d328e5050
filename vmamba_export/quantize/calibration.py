"""Calibration data: images from a source spec (data/sources.py), preprocessed exactly as the artifact will see them.

Calibration refuses the digits holdout (`purpose="calibration"`): the bundled models' accuracy is measured there, so
calibrating on it would leak the test set into the quantized model.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..data.preprocess import fixed_size_spec, preprocess
from ..data.sources import open_source
from ..errors import ImageSourceError
from ..models.configs import InputSpec
from ..progress import progress_bar

# Fewer images than this give activation ranges that depend on which few images were picked: refuse them.
MIN_CALIB_SAMPLES = 8


def load_calibration_batch(
    spec: str, input_spec: InputSpec, samples: int, show_progress: bool = True
) -> tuple[np.ndarray, list[str]]:
    """`samples` preprocessed images (N, C, H, W) float32 from source `spec`, and their names.

    Raises ImageSourceError when `samples` is below MIN_CALIB_SAMPLES, the source holds fewer usable images than
    asked, or a preprocessed array does not fit the model."""
    if samples < MIN_CALIB_SAMPLES:
        raise ImageSourceError(
            f"--calib-samples {samples} is too few: int8 calibration needs at least {MIN_CALIB_SAMPLES} images"
        )
    if not input_spec.crop:
        # A no-crop (segmentation) spec gives images of different sizes; calibration takes one batch: square crops
        # at image_size, whose activation statistics are those of the whole images at the same scale.
        input_spec = fixed_size_spec(input_spec)
    source = open_source(spec, limit=samples, purpose="calibration")
    shape = (3, input_spec.image_size, input_spec.image_size)
    arrays: list[np.ndarray] = []
    names: list[str] = []
    with progress_bar(show_progress) as progress:
        task = progress.add_task(f"calibration images ({spec})", total=samples)
        for name, image, _label in source:
            if isinstance(image, np.ndarray):
                if image.shape != shape:
                    raise ImageSourceError(
                        f"{spec}: preprocessed array {name} has shape {image.shape}, the model takes {shape}"
                    )
                arrays.append(image.astype(np.float32, copy=False))
            else:
                arrays.append(preprocess(image, input_spec))
            names.append(name)
            progress.advance(task)
    if len(arrays) < samples:
        raise ImageSourceError(
            f"{spec}: only {len(arrays)} usable calibration image(s), fewer than the {samples} asked "
            f"(--calib-samples); give a larger source or ask for fewer (at least {MIN_CALIB_SAMPLES})"
        )
    batch = np.stack(arrays).astype(np.float32, copy=False)
    if not np.isfinite(batch).all():
        raise ImageSourceError(f"{spec}: calibration images hold non-finite values after preprocessing")
    return batch, names


def iter_batches(batch: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(batch), batch_size):
        yield batch[start : start + batch_size]


class ArrayCalibrationReader:
    """onnxruntime.quantization CalibrationDataReader over a preprocessed array, `batch_size` images per run.

    Duck-typed (get_next / rewind / __len__ / set_range) rather than subclassed, so this module imports without
    onnxruntime; quantize_static only calls these methods. A progress bar advances per batch the calibrator reads."""

    def __init__(self, input_name: str, batch: np.ndarray, batch_size: int = 8, progress=None, task=None):
        self.input_name = input_name
        self.batch = batch
        self.batch_size = max(1, batch_size)
        self.progress, self.task = progress, task
        self._start, self._end = 0, len(batch)
        self._iter: Iterator[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.batch)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._start, self._end = start_index, end_index
        self._iter = None

    def rewind(self) -> None:
        self._iter = None

    def get_next(self) -> dict | None:
        if self._iter is None:
            self._iter = iter_batches(self.batch[self._start : self._end], self.batch_size)
        chunk = next(self._iter, None)
        if chunk is None:
            return None
        if self.progress is not None:
            self.progress.advance(self.task, len(chunk))
        return {self.input_name: np.ascontiguousarray(chunk)}

    def __iter__(self):
        self.rewind()
        while (item := self.get_next()) is not None:
            yield item
