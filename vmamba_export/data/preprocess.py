"""Image -> model input, as the config's `InputSpec` says. One function for export, calibration, validation and the
runtime loader, so that every stage sees the same numbers.

Only numpy and Pillow are used: the runtime loader ships to edge devices where torch/torchvision are not installed.
The steps follow torchvision's `Resize(resize) -> CenterCrop(image_size) -> ToTensor -> Normalize` on PIL images
(shorter side to `resize`, the longer one truncated to int; crop offsets rounded), so published eval pipelines match.

Images arrive as a photo library holds them: the EXIF orientation is applied first (a phone photo stored sideways is
classified upright), transparent pixels are composited on black, and images above `MAX_IMAGE_PIXELS` are refused
before they are decoded. The work is bounded by the output size: an image so elongated that scaling its shorter side
up would create more pixels than `_FULL_RESIZE_PIXELS` allows has only the centre region that survives the crop
resampled (results within 1/255 of the full resize; normal images take the exact full-resize path).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

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


# Largest image (width x height) that is decoded: 100 megapixels (a 108 MP phone sensor is the largest in common use
# after binning to 12-27 MP); decoded RGB that is 300 MB. Pillow's own bomb check (89 MP warning, 179 MP error) is
# replaced by this one limit and one message.
MAX_IMAGE_PIXELS = 100_000_000

# Up to this many pixels (or the image's own count, if larger) the shorter side is scaled on the whole image, exactly
# as torchvision does; beyond it only the region kept by the centre crop is resampled (see resize_and_crop).
_FULL_RESIZE_PIXELS = 4_000_000


def check_pixel_count(size: tuple[int, int], what: str) -> None:
    """Refuse an image of more than MAX_IMAGE_PIXELS pixels (checked from the header, before decoding)."""
    w, h = size
    if w * h > MAX_IMAGE_PIXELS:
        raise InputError(
            f"{what} is {w}x{h} = {w * h:,} pixels, above the limit of {MAX_IMAGE_PIXELS:,} pixels "
            "(vmamba_export.data.preprocess.MAX_IMAGE_PIXELS); downscale it first"
        )


def open_image(path: str | Path) -> Image.Image:
    """Decode an image file: size checked against MAX_IMAGE_PIXELS before decoding, first frame only.

    Raises InputError naming the file for anything that is not a readable image of acceptable size."""
    path = Path(path)
    try:
        with open(path, "rb") as fh, warnings.catch_warnings():
            # Our own limit decides (above); Pillow's warning between 89 and 179 MP would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(fh)
            check_pixel_count(image.size, f"image {path}")
            image.load()  # decode now, while the file is open; the pixels outlive the file object
            return image
    except Image.DecompressionBombError:
        # Pillow refuses above 2 x its own limit before our check sees the size; same message either way.
        raise InputError(
            f"image {path} is above the limit of {MAX_IMAGE_PIXELS:,} pixels; downscale it first"
        ) from None
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"cannot read image {path}: no such file") from None
    except Image.UnidentifiedImageError:
        raise InputError(f"cannot read image {path}: not an image format Pillow can decode") from None
    except IsADirectoryError:
        raise InputError(f"cannot read image {path}: it is a folder, not an image file") from None
    except Exception as exc:  # decoders raise OSError, ValueError, SyntaxError, struct.error ...: "not an image"
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"cannot read image {path}: {detail}") from None


def upright(image: Image.Image) -> Image.Image:
    """The image as a viewer shows it: its EXIF orientation tag (phone cameras store rotated pixels) applied."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a malformed EXIF block is metadata noise; the pixels are still the image
        return image


def resample_filter(name: str) -> Image.Resampling:
    try:
        return _RESAMPLE[name.lower()]
    except KeyError:
        raise InputError(f"unknown interpolation {name!r}; expected one of {', '.join(_RESAMPLE)}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Transparency (an alpha channel: RGBA, LA, PA, ...; or a transparent palette entry or
    colour, `info["transparency"]`) is composited on black: out = colour * alpha / 255, so a fully transparent pixel
    is black whatever colour it stores, and a half transparent one is half as bright."""
    if "transparency" in image.info and image.mode in ("P", "L", "RGB", "1"):
        # Palette or single-colour transparency (PNG tRNS, GIF): alpha is made explicit, then composited below.
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _composite_on_black(image)
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        # Pillow's direct conversion clips 16-bit values at 255, which turns most 16-bit photos white; scale instead.
        # Mode "I" holding only 0..255 is 8-bit data widened (e.g. by some PNG decoders) and is kept as it is.
        arr = np.asarray(image, dtype=np.float64)
        scale = 1.0 if image.mode == "I" and arr.max() <= 255 else 255.0 / 65535.0
        return Image.fromarray(np.clip(np.round(arr * scale), 0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def _composite_on_black(image: Image.Image) -> Image.Image:
    """colour * alpha / 255, rounded: what Pillow's premultiplied mode (RGBa) stores, so its conversion does it in
    place of a numpy pass (exact for every colour and alpha; no wider copies of a large image)."""
    if image.mode == "La":
        grey = image.split()[0]
        return Image.merge("RGB", (grey, grey, grey))
    if image.mode != "RGBa":
        image = image.convert("RGBA").convert("RGBa")  # LA and PA through RGBA (grey replicated, alpha kept)
    red, green, blue, _ = image.split()  # Pillow's own RGBa -> RGB would un-premultiply
    return Image.merge("RGB", (red, green, blue))


def resize_and_crop(image: Image.Image, spec: InputSpec) -> Image.Image:
    """Shorter side to `spec.resize` (aspect kept), then the centred `image_size` square.

    When the resized image would hold more than max(_FULL_RESIZE_PIXELS, the image's own pixels) (an extreme aspect
    ratio: a 1 x 1,000,000 strip scaled to 256 wide is 256 x 256,000,000), only the part the crop keeps is resampled,
    with the same scale and centre: the work and memory are those of the output, not of the resized image."""
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
    left = int(round((new_w - crop) / 2.0))
    top = int(round((new_h - crop) / 2.0))
    if (new_w, new_h) == (w, h):
        return image.crop((left, top, left + crop, top + crop))
    if new_w * new_h > max(_FULL_RESIZE_PIXELS, w * h):
        # Resample only the crop's region of the source (Pillow's `box`): same scale and pixel centres as the full
        # resize, but the float rounding of the box's coefficients can move a pixel by 1/255.
        sx, sy = w / new_w, h / new_h
        box = (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)
        return image.resize((crop, crop), resample, box=box)
    image = image.resize((new_w, new_h), resample)
    return image.crop((left, top, left + crop, top + crop))


# Largest side a no-crop (segmentation) preprocessing produces when the caller gives no artifact limit: the loader's
# own limit on input.max_size (artifact.MAX_INPUT_SIDE, not imported: this module stays free of the artifact code).
DEFAULT_MAX_SIDE = 4096


def resize_keep_ratio(
    image: Image.Image, spec: InputSpec, max_size: int | None = None, min_size: int | None = None
) -> Image.Image:
    """The no-crop resize (`spec.crop` False, segmentation): the shorter side to `spec.image_size`, the ratio kept
    (the longer side truncated to int, as torchvision's Resize), nothing cropped, so every pixel of the image has a
    place in the model's input (mmseg's inference resize, with `spec.interpolation`, bilinear for the segmenters).

    Max-side guard: when the longer side would exceed `max_size` (the artifact's largest input side; default
    DEFAULT_MAX_SIDE), the image is scaled down instead so that the longer side is `max_size` (a panorama then has a
    shorter side below image_size). The shorter side never goes below `min_size` (the smallest side the graph
    takes): an image more elongated than max_size:min_size has its ratio changed at that side."""
    resample = resample_filter(spec.interpolation)
    w, h = image.size
    if w <= 0 or h <= 0:
        raise InputError(f"image has no pixels (size {w}x{h})")
    limit = max_size or DEFAULT_MAX_SIDE
    short, long = min(w, h), max(w, h)
    new_short, new_long = spec.image_size, int(spec.image_size * long / short)
    if new_long > limit:  # scale down to fit the artifact's largest side
        new_long, new_short = limit, max(1, int(limit * short / long))
    new_short = min(max(new_short, min_size or 1), new_long)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return image
    return image.resize((new_w, new_h), resample)


def fixed_size_spec(spec: InputSpec, size: int | None = None) -> InputSpec:
    """A cropping spec of side `size` (default image_size) with the resize at the same side: square inputs of one
    size for the places that need a stacked batch (int8 calibration, the references of a dense artifact) when the
    spec itself does not crop. Images are resized as a no-crop spec does (shorter side to the size), then the centre
    square is kept."""
    import dataclasses

    size = size or spec.image_size
    return dataclasses.replace(spec, image_size=size, resize=size, crop=True)


def preprocess(
    image: Image.Image,
    spec: InputSpec,
    channels: int = 3,
    *,
    max_size: int | None = None,
    min_size: int | None = None,
) -> np.ndarray:
    """One PIL image -> (channels, H, W) float32, normalised; 3 channels in `spec.channel_order`, or 1 (grey,
    Pillow's ITU-R 601-2 luma) for single-channel models. With `spec.crop` (classifiers) H = W = image_size (resize
    then centre crop); without (segmentation), the whole image with its shorter side at image_size and its longer
    side at most `max_size` (resize_keep_ratio: the sides then differ from image to image).

    EXIF orientation applied, transparency composited on black (`to_rgb`), more than MAX_IMAGE_PIXELS refused."""
    if channels not in (1, 3):
        raise InputError(f"channels must be 1 or 3, got {channels!r}")
    if not isinstance(image, Image.Image):
        raise InputError(f"preprocess takes a PIL image, got {type(image).__name__}")
    order = spec.channel_order.upper()
    if order not in ("RGB", "BGR"):
        raise InputError(f"unsupported channel order {spec.channel_order!r}; expected RGB or BGR")
    check_pixel_count(image.size, "image")
    rgb = to_rgb(upright(image))
    img = resize_and_crop(rgb, spec) if spec.crop else resize_keep_ratio(rgb, spec, max_size, min_size)
    if channels == 1:
        img = img.convert("L")
    arr = np.asarray(img, dtype=np.float32).reshape(img.height, img.width, channels) / np.float32(255.0)  # [0, 1]
    if order == "BGR" and channels == 3:
        arr = arr[..., ::-1]
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    arr = (arr - mean) / std
    return np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32)


def preprocess_batch(images: Iterable[Image.Image], spec: InputSpec) -> np.ndarray:
    """PIL images -> (N, 3, image_size, image_size) float32 (a no-crop spec's images are centre-cropped to a square
    of image_size here, so that they stack: fixed_size_spec)."""
    if not spec.crop:
        spec = fixed_size_spec(spec)
    arrays = [preprocess(im, spec) for im in images]
    if not arrays:
        return np.zeros((0, 3, spec.image_size, spec.image_size), dtype=np.float32)
    return np.stack(arrays)
