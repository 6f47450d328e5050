"""Image -> model input, as the config's `InputSpec` says. One function for export, calibration, validation and the
runtime loader, so that every stage sees the same numbers.

Only numpy and Pillow are used: the runtime loader ships to edge devices where torch/torchvision are not installed.
The steps follow torchvision's `Resize(resize) -> CenterCrop(image_size) -> ToTensor -> Normalize` on PIL images
(shorter side to `resize`, the longer one truncated to int; crop offsets rounded), so published eval pipelines match.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from PIL import Image

from ..errors import InputError
from ..input_spec import InputSpec

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def resample_filter(name: str) -> Image.Resampling:
    try:
        return _RESAMPLE[name.lower()]
    except KeyError:
        raise InputError(f"unknown interpolation {name!r}; expected one of {', '.join(_RESAMPLE)}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Transparent pixels become black (Pillow's RGBA -> RGB drops alpha)."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        # Pillow's direct conversion clips 16-bit values at 255, which turns most 16-bit photos white; scale instead.
        # Mode "I" holding only 0..255 is 8-bit data widened (e.g. by some PNG decoders) and is kept as it is.
        arr = np.asarray(image, dtype=np.float64)
        scale = 1.0 if image.mode == "I" and arr.max() <= 255 else 255.0 / 65535.0
        return Image.fromarray(np.clip(np.round(arr * scale), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # avoids Pillow's warning about palette transparency
    return image.convert("RGB")


def resize_and_crop(image: Image.Image, spec: InputSpec) -> Image.Image:
    """Shorter side to `spec.resize` (aspect kept), then the centred `image_size` square."""
    crop = spec.image_size
    resample = resample_filter(spec.interpolation)  # checked even when no resize is needed, so a typo fails early
    # A resize smaller than the crop would leave nothing to crop: the shorter side then goes to the crop size.
    target = max(spec.resize, crop)
    w, h = image.size
    if w <= 0 or h <= 0:
        raise InputError(f"image has no pixels (size {w}x{h})")
    if w <= h:
        new_w, new_h = target, int(target * h / w)
    else:
        new_w, new_h = int(target * w / h), target
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), resample)
    left = int(round((new_w - crop) / 2.0))
    top = int(round((new_h - crop) / 2.0))
    return image.crop((left, top, left + crop, top + crop))


def preprocess(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """One PIL image -> (3, image_size, image_size) float32, channels in `spec.channel_order`, normalised."""
    if not isinstance(image, Image.Image):
        raise InputError(f"preprocess takes a PIL image, got {type(image).__name__}")
    order = spec.channel_order.upper()
    if order not in ("RGB", "BGR"):
        raise InputError(f"unsupported channel order {spec.channel_order!r}; expected RGB or BGR")
    img = resize_and_crop(to_rgb(image), spec)
    arr = np.asarray(img, dtype=np.float32) / np.float32(255.0)  # (H, W, 3) in [0, 1]
    if order == "BGR":
        arr = arr[..., ::-1]
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    arr = (arr - mean) / std
    return np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32)


def preprocess_batch(images: Iterable[Image.Image], spec: InputSpec) -> np.ndarray:
    """PIL images -> (N, 3, image_size, image_size) float32."""
    arrays = [preprocess(im, spec) for im in images]
    if not arrays:
        return np.zeros((0, 3, spec.image_size, spec.image_size), dtype=np.float32)
    return np.stack(arrays)
