"""Labelled segmentation data: images with per-pixel class masks, for training the bundled segmenter, validating
segmentation artifacts against ground truth, and calibrating (images only).

Spec strings:

    shapes                       the generated synthetic set, all splits (train, calib, holdout)
    shapes:N                     its first N scenes (train first, then calib, then holdout)
    shapes:train|calib|holdout   a fixed split; the holdout is never trained on nor calibrated with
    DIR                          a folder holding images/ and masks/ with matching file stems: any image suffix for
                                 the images; masks PNG (mode L or P), pixel value = class index, 255 = ignore

The shapes set: 64x64 RGB scenes, a textured noisy background and 1-3 overlapping shapes (disc, square, triangle,
ring) drawn in random colours that do not depend on the class, so a model has to tell them apart by shape. Scene i is
drawn from its own seeded generator (SHAPES_SEED, i): same index, same pixels, whichever split or limit asks for it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ImageSourceError, InputError
from ..input_spec import SHAPES_LABELS, InputSpec
from .preprocess import open_image, preprocess, to_rgb, upright

SHAPES_CLASSES: tuple[str, ...] = SHAPES_LABELS
SHAPES_IMAGE_SIZE = 64
SHAPES_SEED = 20241
# Scene indices of each split, one index space so the splits are disjoint by construction: train first, so that
# `shapes:N` (N up to the train size) never reaches a held-out scene.
SHAPES_SPLITS: dict[str, tuple[int, int]] = {"train": (0, 4000), "calib": (4000, 4200), "holdout": (4200, 4700)}
SHAPES_TOTAL = max(end for _, end in SHAPES_SPLITS.values())
IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")

Sample = tuple[str, Image.Image, np.ndarray]  # name, RGB image, (H, W) uint8 mask


# --------------------------------------------------------------------------------------------------- shapes


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A base colour, a random sinusoidal texture (stripes at a random angle and frequency) and pixel noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    base = rng.uniform(40, 215, size=3)
    angle, freq, phase = rng.uniform(0, math.pi), rng.uniform(0.1, 0.6), rng.uniform(0, 2 * math.pi)
    wave = np.sin(freq * (xx * math.cos(angle) + yy * math.sin(angle)) + phase)
    amp = rng.uniform(5, 30, size=3)
    img = base + wave[..., None] * amp + rng.normal(0, rng.uniform(4, 14), size=(size, size, 3))
    return img


def _shape_mask(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """Boolean (size, size) mask of one shape at a random place, size and rotation."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    # Radius 10-18 px: at the model's stride-4 first stage a shape spans 5-9 positions, enough to tell its outline.
    r = rng.uniform(10, 18)
    cx, cy = rng.uniform(r * 0.6, size - r * 0.6), rng.uniform(r * 0.6, size - r * 0.6)
    dx, dy = xx - cx, yy - cy
    theta = rng.uniform(0, 2 * math.pi)
    if kind == "disc":
        return dx * dx + dy * dy <= r * r
    if kind == "ring":
        dist = np.sqrt(dx * dx + dy * dy)
        return (dist <= r) & (dist >= r * rng.uniform(0.45, 0.65))
    if kind == "square":
        half = r * 0.85
        u = dx * math.cos(theta) + dy * math.sin(theta)
        v = -dx * math.sin(theta) + dy * math.cos(theta)
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    if kind == "triangle":
        # Inside all three edges of an equilateral triangle inscribed in the circle of radius r.
        inside = np.ones((size, size), dtype=bool)
        for k in range(3):
            a = theta + 2 * math.pi * k / 3 + math.pi / 3  # outward normal of edge k
            inside &= dx * math.cos(a) + dy * math.sin(a) <= r * 0.5
        return inside
    raise ValueError(kind)


def _shape_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A random colour far enough from the background's mean colour to be visible (class-independent)."""
    mean = background.reshape(-1, 3).mean(axis=0)
    for _ in range(100):
        colour = rng.uniform(0, 255, size=3)
        if np.abs(colour - mean).sum() >= 120:
            return colour
    return 255.0 - mean  # unreachable in practice; a visible colour anyway


def shapes_scene(index: int, size: int = SHAPES_IMAGE_SIZE) -> tuple[Image.Image, np.ndarray]:
    """Scene `index`: (RGB PIL image, (size, size) uint8 mask of class indices into SHAPES_CLASSES). Shapes are
    painted in order, each over the ones before (occlusion); a ring's hole shows what lies under it."""
    if not 0 <= index < SHAPES_TOTAL:
        raise ImageSourceError(f"shapes: scene index {index} outside 0..{SHAPES_TOTAL - 1}")
    rng = np.random.default_rng([SHAPES_SEED, index])
    img = _background(rng, size)
    mask = np.zeros((size, size), dtype=np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        cls = int(rng.integers(1, len(SHAPES_CLASSES)))
        region = _shape_mask(SHAPES_CLASSES[cls], rng, size)
        colour = _shape_colour(rng, img)
        shade = rng.normal(0, rng.uniform(3, 10), size=(size, size, 3))  # a little texture on the shape too
        img[region] = (colour + shade)[region]
        mask[region] = cls
    pixels = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB"), mask


def shapes_indices(subset: str | None, count: int | None = None) -> range:
    """Scene indices of a split (None: all scenes, or the first `count`)."""
    if subset is None:
        n = SHAPES_TOTAL if count is None else count
        if not 1 <= n <= SHAPES_TOTAL:
            raise ImageSourceError(f"shapes:{count}: N must be between 1 and {SHAPES_TOTAL}")
        return range(n)
    if subset not in SHAPES_SPLITS:
        raise ImageSourceError(
            f"shapes:{subset}: unknown subset; expected one of {', '.join(SHAPES_SPLITS)} or a number"
        )
    return range(*SHAPES_SPLITS[subset])


def parse_shapes_spec(spec: str) -> range:
    """`shapes`, `shapes:N` or `shapes:<split>` -> scene indices."""
    head, _, arg = spec.strip().partition(":")
    if head != "shapes":
        raise ImageSourceError(f"{spec}: not a shapes spec")
    if not arg:
        return shapes_indices(None)
    if arg.isdigit():
        return shapes_indices(None, int(arg))
    return shapes_indices(arg)


def includes_holdout(indices: range) -> bool:
    start, end = SHAPES_SPLITS["holdout"]
    return indices.start < end and indices.stop > start


def _shapes_samples(indices: range) -> Iterator[Sample]:
    for i in indices:
        image, mask = shapes_scene(i)
        yield f"shapes/{i:05d}", image, mask


# --------------------------------------------------------------------------------------------------- folders


def _folder_pairs(root: Path, spec: str) -> list[tuple[Path, Path]]:
    images_dir, masks_dir = root / "images", root / "masks"
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise ImageSourceError(f"{spec}: no folder {d}; a segmentation folder holds images/ and masks/")
    images = sorted(
        p
        for p in images_dir.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not images:
        raise ImageSourceError(f"{spec}: no images in {images_dir} (expected {', '.join(IMAGE_SUFFIXES)} files)")
    masks = {p.stem: p for p in masks_dir.iterdir() if p.is_file() and p.suffix.lower() == ".png"}
    pairs = []
    for image in images:
        if image.stem not in masks:
            raise ImageSourceError(f"{spec}: no mask for image {image} (expected {masks_dir / (image.stem + '.png')})")
        pairs.append((image, masks[image.stem]))
    return pairs


def _read_mask(path: Path) -> np.ndarray:
    try:
        mask = open_image(path)
    except InputError as err:
        raise ImageSourceError(f"mask {path}: {err}") from None
    if mask.mode not in ("L", "P"):
        raise ImageSourceError(
            f"mask {path} has mode {mask.mode}; expected a single-channel PNG (mode L or P) holding class indices"
        )
    return np.asarray(mask, dtype=np.uint8)  # mode P: the palette indices, which are the class indices


def _folder_samples(pairs: list[tuple[Path, Path]], num_classes: int | None) -> Iterator[Sample]:
    for image_path, mask_path in pairs:
        try:
            image = upright(open_image(image_path))
        except InputError as err:
            raise ImageSourceError(str(err)) from None
        mask = _read_mask(mask_path)
        if mask.shape != (image.height, image.width):
            raise ImageSourceError(
                f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]}, its image {image_path} is "
                f"{image.width}x{image.height}; they must be the same size"
            )
        if num_classes is not None:
            bad = (mask >= num_classes) & (mask != IGNORE_INDEX)
            if bad.any():
                raise ImageSourceError(
                    f"mask {mask_path} holds class index {int(mask[bad].max())}, outside 0..{num_classes - 1} "
                    f"(and {IGNORE_INDEX} = ignore) for a model of {num_classes} classes"
                )
        yield image_path.stem, image, mask


# --------------------------------------------------------------------------------------------------- entry points


def open_segmentation_source(spec: str, num_classes: int | None = None) -> Iterator[Sample]:
    """Samples `(name, RGB/any-mode PIL image, (H, W) uint8 mask)` of a spec (module docstring), unprocessed."""
    spec = spec.strip()
    if spec == "shapes" or spec.startswith("shapes:"):
        return _shapes_samples(parse_shapes_spec(spec))
    root = Path(spec).expanduser()
    if not root.is_dir():
        raise ImageSourceError(
            f"{spec}: no such folder; expected a folder with images/ and masks/, 'shapes', 'shapes:N' or "
            "'shapes:train|calib|holdout'"
        )
    return _folder_samples(_folder_pairs(root, spec), num_classes)


def _preprocess_pair(image: Image.Image, mask: np.ndarray, spec: InputSpec) -> tuple[np.ndarray, np.ndarray]:
    """Image -> (3, h, w) float32 by the InputSpec (preprocess: crop=False keeps the ratio, crop=True resizes and
    centre-crops); mask -> (h, w) int64 on the same grid (nearest resize, and the same centre crop)."""
    rgb = to_rgb(image)
    arr = preprocess(rgb, spec)
    w, h = rgb.size
    m = Image.fromarray(mask, "L")
    if spec.crop:
        target = max(spec.resize, spec.image_size)
        new_w, new_h = (target, int(target * h / w)) if w <= h else (int(target * w / h), target)
        if (new_w, new_h) != (w, h):
            m = m.resize((new_w, new_h), Image.Resampling.NEAREST)
        crop = spec.image_size
        left, top = int(round((new_w - crop) / 2.0)), int(round((new_h - crop) / 2.0))
        m = m.crop((left, top, left + crop, top + crop))
    elif (arr.shape[2], arr.shape[1]) != (w, h):
        m = m.resize((arr.shape[2], arr.shape[1]), Image.Resampling.NEAREST)
    return arr, np.asarray(m, dtype=np.int64)


def _num_classes(input_spec: InputSpec, num_classes: int | None) -> int | None:
    if num_classes is not None:
        return num_classes
    return len(input_spec.labels) if input_spec.labels is not None else None


def iter_segmentation_samples(
    spec: str, input_spec: InputSpec, limit: int | None = None, *, num_classes: int | None = None
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """`(name, image (1, 3, h, w) float32 preprocessed, mask (h, w) int64)` one at a time (images may differ in
    size). Mask values are class indices or 255 (ignore); with `num_classes` (default: the number of the spec's
    labels) a folder mask holding another value is an error."""
    if limit is not None and limit < 1:
        raise ImageSourceError(f"{spec}: limit must be at least 1, got {limit}")
    count = 0
    for name, image, mask in open_segmentation_source(spec, _num_classes(input_spec, num_classes)):
        if limit is not None and count >= limit:
            return
        x, m = _preprocess_pair(image, mask, input_spec)
        count += 1
        yield name, x[None], m


def load_segmentation_batch(
    spec: str, input_spec: InputSpec, limit: int | None = None, *, num_classes: int | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All samples of a source: (images (N, 3, H, W) float32 preprocessed, masks (N, H, W) int64, names). Every
    preprocessed image must have the same size (iter_segmentation_samples takes images of different shapes)."""
    images, masks, names = [], [], []
    for name, x, m in iter_segmentation_samples(spec, input_spec, limit, num_classes=num_classes):
        if images and x.shape != images[0].shape:
            raise ImageSourceError(
                f"{spec}: {name} preprocesses to {tuple(x.shape[2:])}, {names[0]} to {tuple(images[0].shape[2:])}; "
                "images of different aspect ratios cannot form one batch, use iter_segmentation_samples"
            )
        images.append(x)
        masks.append(m)
        names.append(name)
    return np.concatenate(images).astype(np.float32, copy=False), np.stack(masks), names


def write_segmentation_folder(spec: str, out_dir: str | Path, limit: int | None = None) -> Path:
    """Materialise a source (e.g. `shapes:holdout`) as `out_dir/images/<name>.png` + `out_dir/masks/<name>.png`
    (mode L, class indices), the folder form this module reads back."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    for count, (name, image, mask) in enumerate(open_segmentation_source(spec)):
        if limit is not None and count >= limit:
            break
        stem = Path(name).name
        image.save(out / "images" / f"{stem}.png")
        Image.fromarray(np.asarray(mask, dtype=np.uint8), "L").save(out / "masks" / f"{stem}.png")
    return out


__all__ = [
    "IGNORE_INDEX",
    "SHAPES_CLASSES",
    "SHAPES_SPLITS",
    "includes_holdout",
    "iter_segmentation_samples",
    "load_segmentation_batch",
    "open_segmentation_source",
    "parse_shapes_spec",
    "shapes_scene",
    "write_segmentation_folder",
]
