"""The predictor an artifact opens into: arrays in, logits out; images in, top-k labels out.

Dense artifacts (outputs.py): a backbone's predictor returns {name: feature map} for a batch and has no `predict`;
a segmenter's returns the per-pixel logits for a batch, and `segment` / `predict` take images (of any sizes, run one
at a time) and give class maps at each image's original size."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import InputError
from ..input_spec import InputSpec


class Backend(Protocol):
    def run(self, batch: np.ndarray) -> np.ndarray: ...


class Predictor:
    def __init__(self, manifest: dict, backend: Backend, folder: Path):
        self.manifest = manifest
        self.backend = backend
        self.folder = folder
        spec = dict(manifest["input"]["preprocessing"])
        for key in ("mean", "std"):
            spec[key] = tuple(spec[key])
        if spec.get("labels") is not None:
            spec["labels"] = tuple(spec["labels"])
        self.input_spec = InputSpec(**spec)
        self.num_classes = int(manifest["output"]["num_classes"])
        self.labels = list(self.input_spec.labels or [f"class_{i}" for i in range(self.num_classes)])
        self.min_size = int(manifest["input"]["min_size"])
        self.max_size = int(manifest["input"]["max_size"])
        self.channels = int(manifest["input"]["channels"])
        from ..outputs import manifest_output_names, manifest_task

        self.task = manifest_task(manifest)  # "classification", "backbone" or "segmentation"
        self.output_names = manifest_output_names(manifest)

    def check_input(self, batch) -> np.ndarray:
        """The batch as the runtime takes it: a C-contiguous, native-byte-order float32 NCHW array.

        Converted: any real floating dtype (float16, float64, big-endian float32, ...) to native float32 (values
        beyond float32's range become infinite and are then refused). Refused, with the reason: a non-numpy input
        (a torch tensor: pass `.numpy()`), integer or bool arrays (raw pixels: the model takes preprocessed values,
        see `predict` / `preprocess`), complex or non-numeric arrays, NaN or infinite values, and shapes other than
        (N >= 1, channels, height, width) with sides within the artifact's size range.
        """
        if not isinstance(batch, np.ndarray):
            hint = " (a torch tensor: pass tensor.numpy())" if hasattr(batch, "numpy") else ""
            raise InputError(f"expected a numpy.ndarray, got {type(batch).__name__}{hint}")
        if batch.ndim != 4:
            raise InputError(f"expected a 4-D NCHW batch, got shape {batch.shape}")
        n, c, h, w = batch.shape
        if n < 1:
            raise InputError("the batch is empty")
        if c != self.channels:
            raise InputError(f"expected {self.channels} channels in dimension 1 (NCHW), got shape {batch.shape}")
        for side, value in (("height", h), ("width", w)):
            if not self.min_size <= value <= self.max_size:
                raise InputError(
                    f"{side} {value} is outside what this artifact takes ({self.min_size}..{self.max_size}): "
                    f"shape {batch.shape}"
                )
        kind = batch.dtype.kind
        if kind in "iub":
            raise InputError(
                f"got {batch.dtype} input: raw pixels? The model takes preprocessed float32 (resized, cropped, "
                "normalised with the manifest's mean and std): use predictor.predict(images) or "
                "predictor.preprocess(images)"
            )
        if kind != "f":
            raise InputError(f"expected real floating-point input (float32), got {batch.dtype}")
        # astype copies only when needed: another width or byte order becomes native float32 here.
        with np.errstate(over="ignore"):  # out-of-range values become inf, refused just below
            batch = np.ascontiguousarray(batch.astype(np.float32, copy=False))
        finite = np.isfinite(batch)
        if not finite.all():
            bad = int(batch.size - np.count_nonzero(finite))
            raise InputError(
                f"the batch holds {bad} NaN or infinite value(s) (after conversion to float32, whose largest value "
                "is about 3.4e38): the model's outputs would be meaningless"
            )
        return batch

    def __call__(self, batch: np.ndarray) -> np.ndarray | dict[str, np.ndarray]:
        """Logits (N, num_classes) for a preprocessed float32 NCHW batch; for a segmentation artifact per-pixel
        logits (N, num_classes, H, W) at the batch's size; for a backbone {"features_0": (N, C0, H/4, W/4), ...} in
        output order.

        A batch already on the GPU (a torch or cupy tensor: anything with `__dlpack__`) runs on a cuda-onnxruntime
        artifact without a host round trip, and the logits stay on the GPU: an ONNX Runtime OrtValue that
        `torch.from_dlpack` / `cupy.from_dlpack` take without a copy (`.numpy()` brings it to the host). The work
        that produced the batch must be finished (or on the default stream) before the call."""
        from .cuda_graphs import is_device_array

        if is_device_array(batch):
            result = self._run_device(batch)
            if self.task == "backbone":
                return dict(zip(self.output_names, result, strict=True))
            return result
        batch = self.check_input(batch)
        if self.task == "backbone":
            return dict(zip(self.output_names, self.backend.run_outputs(batch), strict=True))
        return self.backend.run(batch)

    def _run_device(self, batch):
        run_device = getattr(self.backend, "run_device", None)
        if run_device is None or not getattr(self.backend, "on_cuda", False):
            raise InputError(
                f"this {self.manifest['target']['name']} artifact takes numpy arrays; the batch is on a GPU "
                "(copy it to the host first, e.g. tensor.cpu().numpy())"
            )
        shape = tuple(int(d) for d in batch.shape)
        if "float32" not in str(getattr(batch, "dtype", "")):
            raise InputError(f"expected a float32 batch on the GPU, got dtype {getattr(batch, 'dtype', None)}")
        if len(shape) != 4 or shape[1] != self.channels:
            raise InputError(f"expected a 4-D NCHW batch with {self.channels} channels, got shape {shape}")
        for side, value in (("height", shape[2]), ("width", shape[3])):
            if not self.min_size <= value <= self.max_size:
                raise InputError(
                    f"{side} {value} is outside what this artifact takes ({self.min_size}..{self.max_size})"
                )
        return run_device(batch)

    def _open(self, item):
        """One path or PIL image -> PIL image (upright: its EXIF orientation applied); InputError naming the image."""
        from PIL import Image

        from ..data.preprocess import open_image, upright

        if isinstance(item, Image.Image):
            return upright(item)
        if not isinstance(item, (str, Path)):
            raise InputError(f"expected an image path or a PIL image, got {type(item).__name__}")
        return upright(open_image(item))

    def _preprocess_one(self, item) -> np.ndarray:
        """One path or PIL image -> (C, H, W) float32; InputError naming the image if it cannot be used."""
        from PIL import Image

        from ..data.preprocess import open_image, preprocess

        sizes = {"max_size": self.max_size, "min_size": self.min_size}  # used by the no-crop (segmentation) resize
        if isinstance(item, Image.Image):
            return preprocess(item, self.input_spec, self.channels, **sizes)
        if not isinstance(item, (str, Path)):
            raise InputError(f"expected an image path or a PIL image, got {type(item).__name__}")
        try:
            return preprocess(open_image(item), self.input_spec, self.channels, **sizes)
        except InputError as exc:
            message = str(exc)
            # open_image's messages name the file; preprocess's (e.g. the pixel limit) are made to.
            raise InputError(message if str(item) in message else f"{item}: {message}") from None

    def preprocess(self, images) -> np.ndarray:
        """Paths or PIL images -> (N, C, H, W) float32, as the manifest says; raises InputError on the first bad one.
        Each image is decoded, preprocessed and released before the next, so memory holds one decoded image."""
        arrays = [self._preprocess_one(item) for item in images]
        if not arrays:
            size = self.input_spec.image_size
            return np.zeros((0, self.channels, size, size), dtype=np.float32)
        shapes = sorted({a.shape[1:] for a in arrays})
        if len(shapes) > 1:  # a no-crop spec (segmentation) keeps each image's ratio
            raise InputError(
                f"the images preprocess to different sizes ({', '.join(f'{h}x{w}' for h, w in shapes[:4])}), which "
                "do not stack into one batch: preprocess and run them one at a time (segmentation: predictor.segment)"
            )
        return np.stack(arrays)

    def predict(self, images, top_k: int = 5, errors: str = "raise") -> list:
        """Top-k labels with softmax scores for each image (paths or PIL images), preprocessed as the manifest says:
        one list of `{"index", "label", "score"}` per image, in order.

        `errors="raise"` (the default): the first image that cannot be read or preprocessed raises InputError.
        `errors="record"`: that image's entry is the InputError instead of a list, and the others are still run."""
        if errors not in ("raise", "record"):
            raise ValueError(f"errors must be 'raise' or 'record', got {errors!r}")
        if self.task == "backbone":
            raise InputError(
                "this is a backbone artifact: it outputs feature maps, not labels; call predictor(batch) on a "
                "preprocessed batch (predictor.preprocess(images)) for {name: feature map}"
            )
        if isinstance(images, (str, Path)) or hasattr(images, "convert"):
            images = [images]
        images = list(images)
        if self.task == "segmentation":
            return self._predict_segmentation(images, errors)
        results: list = [None] * len(images)
        arrays, good = [], []
        for i, item in enumerate(images):
            try:
                arrays.append(self._preprocess_one(item))
                good.append(i)
            except InputError as exc:
                if errors == "raise":
                    raise
                results[i] = exc
        if not good:
            return results
        logits = self(np.stack(arrays))
        shifted = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
        k = max(1, min(top_k, self.num_classes))
        for i, row in zip(good, probs):
            top = np.argsort(-row)[:k]
            results[i] = [{"index": int(j), "label": self.labels[j], "score": float(row[j])} for j in top]
        return results

    # ------------------------------------------------------------------------------------------------ segmentation

    def _require_segmentation(self, what: str) -> None:
        if self.task != "segmentation":
            raise InputError(f"{what} is for segmentation artifacts; this one's task is {self.task}")

    def segment_one(self, item) -> dict:
        """One image (path or PIL image) -> {"class_map": (H, W) int32 at the image's original (upright) size,
        "probabilities": (num_classes, h, w) float32 softmax at the model's input size, "labels": [...]}.

        The image is preprocessed without a crop whatever the artifact's spec says (a map covers every pixel): its
        shorter side at image_size, its longer side within the artifact's max_size (preprocess.resize_keep_ratio).
        The class map is the argmax of the logits resized bilinearly to the original size (as mmseg does at
        inference), one class at a time, so memory holds two maps of the original size, not num_classes."""
        import dataclasses

        from ..data.preprocess import preprocess

        self._require_segmentation("segment")
        image = self._open(item)
        spec = self.input_spec if not self.input_spec.crop else dataclasses.replace(self.input_spec, crop=False)
        try:
            array = preprocess(image, spec, self.channels, max_size=self.max_size, min_size=self.min_size)
        except InputError as exc:
            message = str(exc)
            raise InputError(message if str(item) in message else f"{item}: {message}") from None
        logits = np.asarray(self(array[None]))[0]
        return {
            "class_map": upsampled_argmax(logits, image.size),
            "probabilities": softmax(logits, axis=0),
            "labels": list(self.labels),
        }

    def segment(self, images) -> list[dict]:
        """segment_one for each image (paths or PIL images), one at a time (their sizes differ)."""
        self._require_segmentation("segment")
        if isinstance(images, (str, Path)) or hasattr(images, "convert"):
            images = [images]
        return [self.segment_one(item) for item in images]

    def _predict_segmentation(self, images: list, errors: str) -> list:
        results: list = []
        for item in images:
            try:
                result = self.segment_one(item)
            except InputError as exc:
                if errors == "raise":
                    raise
                results.append(exc)
                continue
            result["class_pixels"] = class_fractions(result["class_map"], self.labels)
            results.append(result)
        return results


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    shifted = np.exp(x - x.max(axis=axis, keepdims=True))
    return (shifted / shifted.sum(axis=axis, keepdims=True)).astype(np.float32)


def upsampled_argmax(logits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """argmax over classes of (C, h, w) logits resized bilinearly to `size` (width, height), as (H, W) int32.

    Each class's map is resized on its own (Pillow, mode F: half-pixel centres, align_corners False) and folded into
    a running maximum; ties go to the lower class index, as numpy's argmax."""
    from PIL import Image

    width, height = size
    best = np.full((height, width), -np.inf, dtype=np.float32)
    classes = np.zeros((height, width), dtype=np.int32)
    same = (logits.shape[2], logits.shape[1]) == (width, height)
    for c in range(logits.shape[0]):
        plane = np.ascontiguousarray(logits[c], dtype=np.float32)
        if not same:
            plane = np.asarray(Image.fromarray(plane, mode="F").resize((width, height), Image.Resampling.BILINEAR))
        better = plane > best
        best = np.where(better, plane, best)
        classes[better] = c
    return classes


def class_fractions(class_map: np.ndarray, labels: list[str]) -> dict[str, float]:
    """{label: fraction of the map's pixels} for the classes present, largest first."""
    counts = np.bincount(class_map.ravel(), minlength=len(labels))
    total = max(int(class_map.size), 1)
    order = np.argsort(-counts, kind="stable")
    return {labels[i]: float(counts[i]) / total for i in order if counts[i] > 0}
