"""The predictor an artifact opens into: arrays in, logits out; images in, top-k labels out."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import InputError
from ..models.configs import InputSpec


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

    def check_input(self, batch) -> np.ndarray:
        if not isinstance(batch, np.ndarray):
            raise InputError(f"expected a numpy.ndarray, got {type(batch).__name__}")
        if batch.dtype != np.float32:
            raise InputError(f"expected float32 input, got {batch.dtype} (preprocessed NCHW float32 batches)")
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
        return np.ascontiguousarray(batch)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Logits (N, num_classes) for a preprocessed float32 NCHW batch.

        A batch already on the GPU (a torch or cupy tensor: anything with `__dlpack__`) runs on a cuda-onnxruntime
        artifact without a host round trip, and the logits stay on the GPU: an ONNX Runtime OrtValue that
        `torch.from_dlpack` / `cupy.from_dlpack` take without a copy (`.numpy()` brings it to the host). The work
        that produced the batch must be finished (or on the default stream) before the call."""
        from .cuda_graphs import is_device_array

        if is_device_array(batch):
            return self._run_device(batch)
        return self.backend.run(self.check_input(batch))

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

    def preprocess(self, images) -> np.ndarray:
        from PIL import Image

        from ..data.preprocess import preprocess_batch

        pil = []
        for item in images:
            if isinstance(item, Image.Image):
                pil.append(item)
                continue
            path = Path(item)
            try:
                with Image.open(path) as im:
                    im.load()
                    pil.append(im.copy())
            except (OSError, ValueError) as exc:
                raise InputError(f"cannot read image {path}: {exc}") from None
        return preprocess_batch(pil, self.input_spec)

    def predict(self, images, top_k: int = 5) -> list[list[dict]]:
        """Top-k labels with softmax scores for each image (paths or PIL images), preprocessed as the manifest says."""
        if isinstance(images, (str, Path)) or hasattr(images, "convert"):
            images = [images]
        logits = self(self.preprocess(list(images)))
        shifted = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
        k = max(1, min(top_k, self.num_classes))
        results = []
        for row in probs:
            top = np.argsort(-row)[:k]
            results.append([{"index": int(i), "label": self.labels[i], "score": float(row[i])} for i in top])
        return results
