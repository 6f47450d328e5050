"""Segmentation maps as images: a fixed palette (class index -> colour), the colour-coded mask (PNG mode P carrying
that palette, so the pixel values stay the class indices) and the overlay (the image beside the image blended with
the mask). numpy and Pillow only (runtime side).

The palette is the bit-interleaved one PASCAL VOC's masks use: class i's bits 0, 1, 2 go to the top bits of red,
green and blue, bits 3, 4, 5 to the next ones, and so on, so neighbouring indices get clearly different colours and
the colours never change between runs or models. Index 0 is black; 255 (the usual "ignore" value) is white.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from .artifact import current_umask
from .errors import InputError

PALETTE_SIZE = 256
IGNORE_INDEX = 255
OVERLAY_ALPHA = 0.5  # weight of the mask's colours in the blended half of the overlay


def palette(size: int = PALETTE_SIZE) -> np.ndarray:
    """(size, 3) uint8 colours: class index -> RGB (module docstring); index 255 is white."""
    colours = np.zeros((size, 3), dtype=np.uint8)
    for index in range(size):
        value, r, g, b = index, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (value & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
            if value == 0:
                break
        colours[index] = (r, g, b)
    if size > IGNORE_INDEX:
        colours[IGNORE_INDEX] = (255, 255, 255)
    return colours


def mask_image(class_map: np.ndarray) -> Image.Image:
    """(H, W) class indices -> PNG-ready mode P image with the fixed palette (pixel value = class index)."""
    class_map = np.asarray(class_map)
    if class_map.ndim != 2:
        raise InputError(f"a class map is 2-D (H, W), got shape {class_map.shape}")
    if class_map.size and (class_map.min() < 0 or class_map.max() >= PALETTE_SIZE):
        raise InputError(
            f"class indices {int(class_map.min())}..{int(class_map.max())} do not fit a palette image (0..255): "
            "a model with more than 256 classes cannot be written as a mode P mask"
        )
    image = Image.fromarray(class_map.astype(np.uint8), mode="P")
    image.putpalette(palette().reshape(-1).tolist())
    return image


def overlay_image(image: Image.Image, class_map: np.ndarray, alpha: float = OVERLAY_ALPHA) -> Image.Image:
    """The original image (left) beside it blended with the colour-coded mask (right), RGB, twice as wide."""
    rgb = image.convert("RGB")
    if rgb.size != (class_map.shape[1], class_map.shape[0]):
        raise InputError(f"the class map {class_map.shape[::-1]} does not match the image size {rgb.size}")
    colours = palette()[np.asarray(class_map, dtype=np.int64)]
    blended = np.asarray(rgb, dtype=np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha
    side = Image.new("RGB", (2 * rgb.width, rgb.height))
    side.paste(rgb, (0, 0))
    side.paste(Image.fromarray(np.clip(np.round(blended), 0, 255).astype(np.uint8), mode="RGB"), (rgb.width, 0))
    return side


def save_png_atomic(image: Image.Image, path: Path) -> None:
    """Write `image` as PNG at `path` through a temporary file beside it and a rename: a reader never sees half a
    file, and a failure leaves nothing."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            image.save(fh, format="PNG")
        # mkstemp creates 0600; a written image gets what any new file would (0644 under the usual umask 022).
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
