"""Image sources for calibration, validation and the CLI's `--calib SOURCE` / `--images SOURCE`.

A source yields `(name, image, label)`: `image` is a PIL image, or, only for float arrays loaded from .npy/.npz, an
already preprocessed (3, H, W) float32 array; `label` is a class index or None. Spec strings (calibration/README.md):

    builtin, builtin:N     real photographs bundled with scikit-image (no download); N beyond the number of photos
                           adds deterministic crops/flips of them
    digits                 scikit-learn's 1,797 handwritten digits, as 32x32 RGB, labelled
    digits:train|calib|holdout   a fixed, seeded, stratified split of them; the holdout is never used for calibration
    shapes, shapes:N, shapes:train|calib|holdout   the generated scenes of the bundled segmenter, images only here
                           (data/segmentation_sources.py; their masks come with load_segmentation_batch)
    PATH                   an image folder (class subfolders -> labels, or flat), a text file listing images
                           ("path [label]" a line), a .npy/.npz array, or a single image file

Files that cannot be read as images (or hold more than preprocess.MAX_IMAGE_PIXELS pixels) are skipped with a
`SkippedImageWarning` naming them; a source that yields no usable image raises ImageSourceError.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ImageSourceError
from ..input_spec import DIGITS_LABELS, InputSpec
from .preprocess import fixed_size_spec, open_image, preprocess

Item = tuple[str, "Image.Image | np.ndarray", "int | None"]

LIST_SUFFIXES = (".txt", ".lst")
ARRAY_SUFFIXES = (".npy", ".npz")
PURPOSES = ("any", "calibration")


class SkippedImageWarning(UserWarning):
    """A file in an image source was not a readable image and was left out."""


@dataclass
class ImageSource:
    """An iterable of `(name, image, label)`; iterating again starts over. `class_names[label]` names a label."""

    spec: str
    expected: str  # what the source should hold, for the error raised when nothing usable is found
    _items: Callable[[], Iterator[Item]]
    class_names: tuple[str, ...] | None = None
    limit: int | None = None

    def __iter__(self) -> Iterator[Item]:
        count = 0
        for item in self._items():
            if self.limit is not None and count >= self.limit:
                return
            count += 1
            yield item
        if count == 0:
            raise ImageSourceError(f"{self.spec}: no usable image found; expected {self.expected}")


# --------------------------------------------------------------------------------------------------- files


def _read_image(path: Path) -> Image.Image | None:
    """The decoded image, or None (with a warning) when the file is not a readable image or is above the pixel limit
    (preprocess.MAX_IMAGE_PIXELS, checked before decoding)."""
    try:
        return open_image(path)  # decoded now: a truncated or corrupt file fails here rather than in preprocessing
    except Exception as err:  # InputError from open_image; anything else a decoder raises also means "not an image"
        warnings.warn(f"skipping it: {err}", SkippedImageWarning, stacklevel=2)
        return None


def _visible(entries: list[Path]) -> list[Path]:
    # Dotfiles (.DS_Store, editor swap files) are never images; skipping them silently keeps warnings meaningful.
    return sorted(p for p in entries if not p.name.startswith("."))


def _files_under(root: Path) -> list[Path]:
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(_visible([Path(dirpath) / f for f in filenames]))
    return sorted(out)


def _folder_source(root: Path, spec: str) -> ImageSource:
    entries = _visible(list(root.iterdir()))
    class_dirs = [p for p in entries if p.is_dir()]
    if class_dirs:
        # ImageFolder layout: one subfolder per class, label = index among the sorted class names.
        class_names = tuple(p.name for p in class_dirs)
        for stray in (p for p in entries if p.is_file()):
            warnings.warn(
                f"skipping {stray}: files beside class folders have no class", SkippedImageWarning, stacklevel=2
            )
        files = [(f, label) for label, d in enumerate(class_dirs) for f in _files_under(d)]
        expected = f"images in the class folders of {root}"
    else:
        class_names = None
        files = [(p, None) for p in entries if p.is_file()]
        expected = f"image files (.jpg, .png, ...) in {root}"
    if not files:
        raise ImageSourceError(f"{spec}: the folder holds no files; expected {expected}")

    def items() -> Iterator[Item]:
        for path, label in files:
            image = _read_image(path)
            if image is not None:
                yield path.relative_to(root).as_posix(), image, label

    return ImageSource(spec, expected, items, class_names)


def _list_source(list_path: Path, spec: str) -> ImageSource:
    """One image a line: `path` or `path label` (integer); relative paths are taken from the list's folder."""
    entries: list[tuple[Path, int | None]] = []
    for line in list_path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        label: int | None = None
        if len(parts) == 2:
            try:
                label = int(parts[1])
                line = parts[0]
            except ValueError:
                pass  # no label: the whole line is a path (which may hold spaces)
        path = Path(line).expanduser()
        entries.append((path if path.is_absolute() else list_path.parent / path, label))
    expected = f"lines 'path [label]' naming image files in {list_path}"
    if not entries:
        raise ImageSourceError(f"{spec}: the list names no files; expected {expected}")

    def items() -> Iterator[Item]:
        for path, label in entries:
            if not path.is_file():
                warnings.warn(
                    f"skipping {path} (listed in {list_path}): no such file", SkippedImageWarning, stacklevel=2
                )
                continue
            image = _read_image(path)
            if image is not None:
                yield str(path), image, label

    return ImageSource(spec, expected, items)


def _array_images(arr: np.ndarray, where: str) -> tuple[list[Image.Image | np.ndarray], str]:
    """Split an array into images: uint8 NHWC / NCHW / NHW -> PIL images; float NCHW -> preprocessed arrays."""
    if arr.dtype == np.uint8:
        if arr.ndim == 3 and arr.shape[-1] in (3, 4):  # one HWC image
            arr = arr[None]
        if arr.ndim == 3:  # N grey images
            return [Image.fromarray(a) for a in arr], "grey"
        if arr.ndim == 4:
            if arr.shape[-1] not in (1, 3, 4) and arr.shape[1] in (1, 3):
                arr = arr.transpose(0, 2, 3, 1)  # NCHW uint8 -> NHWC
            if arr.shape[-1] == 1:
                return [Image.fromarray(a[..., 0]) for a in arr], "grey"
            if arr.shape[-1] in (3, 4):
                return [Image.fromarray(np.ascontiguousarray(a)) for a in arr], "rgb"
        raise ImageSourceError(
            f"{where}: uint8 array of shape {arr.shape} is not images; expected (N, H, W, 3), (N, 3, H, W) or (N, H, W)"
        )
    if np.issubdtype(arr.dtype, np.floating):
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim == 4 and arr.shape[1] == 3:
            return [np.ascontiguousarray(a, dtype=np.float32) for a in arr], "preprocessed"
        raise ImageSourceError(
            f"{where}: float array of shape {arr.shape}; float arrays are taken as already preprocessed model input "
            "and must be (N, 3, H, W) (uint8 arrays are taken as raw images)"
        )
    raise ImageSourceError(f"{where}: array of dtype {arr.dtype}; expected uint8 images or float32 preprocessed NCHW")


def _array_source(path: Path, spec: str) -> ImageSource:
    expected = "uint8 images (N, H, W, 3) or preprocessed float32 (N, 3, H, W), in .npz under key 'images'"
    try:
        loaded = np.load(path, allow_pickle=False)  # never unpickle: arrays may come from anywhere
    except Exception as err:
        raise ImageSourceError(f"{spec}: cannot read the array file ({err}); expected {expected}") from err
    labels = None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            keys = list(loaded.files)
            if "images" in keys:
                arr = loaded["images"]
            elif len(keys) == 1:
                arr = loaded[keys[0]]
            else:
                raise ImageSourceError(f"{spec}: no 'images' key among {keys}; expected {expected}")
            if "labels" in keys:
                labels = loaded["labels"]
    else:
        arr = loaded
    images, _ = _array_images(arr, spec)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise ImageSourceError(
                f"{spec}: 'labels' must be {len(images)} integers, got {labels.dtype} array of shape {labels.shape}"
            )
    stem = path.stem

    def items() -> Iterator[Item]:
        for i, image in enumerate(images):
            yield f"{stem}[{i}]", image, None if labels is None else int(labels[i])

    return ImageSource(spec, expected, items)


def _single_file_source(path: Path, spec: str) -> ImageSource:
    def items() -> Iterator[Item]:
        image = _read_image(path)
        if image is not None:
            yield path.name, image, None

    return ImageSource(spec, "a readable image file", items)


def _path_source(spec: str) -> ImageSource:
    path = Path(spec).expanduser()
    if not path.exists():
        raise ImageSourceError(
            f"{spec}: no such file or folder; expected an image folder, an image list (.txt), a .npy/.npz array, "
            "an image file, 'builtin[:N]', 'digits[:train|calib|holdout]' or 'shapes[:N|train|calib|holdout]'"
        )
    if path.is_dir():
        return _folder_source(path, spec)
    suffix = path.suffix.lower()
    if suffix in LIST_SUFFIXES:
        return _list_source(path, spec)
    if suffix in ARRAY_SUFFIXES:
        return _array_source(path, spec)
    return _single_file_source(path, spec)


# --------------------------------------------------------------------------------------------------- builtin photos

# Real photographs that scikit-image ships inside its wheel (skimage/data/), so no pooch download is ever attempted:
# other skimage.data images (e.g. kidney, lily, cells3d) are fetched from the network on first use. Colour first, so
# `builtin:9` is all colour; the greyscale photographs come after (converted to RGB like any grey image).
BUILTIN_PHOTOS: tuple[tuple[str, str], ...] = (
    ("astronaut", "astronaut.png"),
    ("chelsea", "chelsea.png"),
    ("coffee", "coffee.png"),
    ("rocket", "rocket.jpg"),
    ("motorcycle_left", "motorcycle_left.png"),
    ("motorcycle_right", "motorcycle_right.png"),
    ("hubble_deep_field", "hubble_deep_field.jpg"),
    ("immunohistochemistry", "ihc.png"),
    ("retina", "retina.jpg"),
    ("camera", "camera.png"),
    ("coins", "coins.png"),
    ("moon", "moon.png"),
    ("grass", "grass.png"),
    ("gravel", "gravel.png"),
    ("brick", "brick.png"),
)


def _skimage_data_dir() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise ImageSourceError("builtin: the built-in photos come with scikit-image; pip install 'vmamba-export[data]'")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def builtin_photo_names() -> list[str]:
    data = _skimage_data_dir()
    return [name for name, fname in BUILTIN_PHOTOS if (data / fname).is_file()]


def _unit(digest: bytes, i: int) -> float:
    """Byte pair i of a hash as a number in [0, 1): version-proof randomness for the augmentations."""
    return int.from_bytes(digest[2 * i : 2 * i + 2], "big") / 65536.0


def augment(image: Image.Image, name: str, round_: int) -> Image.Image:
    """Variant `round_` (>= 1) of a photo: round 1 is the mirror image; later rounds crop 50-90% of each side at a
    position drawn from a hash of (name, round), mirrored on odd rounds. Same inputs, same pixels, on every machine."""
    w, h = image.size
    if round_ == 1:
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    digest = hashlib.sha256(f"{name}:{round_}".encode()).digest()
    scale = 0.5 + 0.4 * _unit(digest, 0)
    cw, ch = max(1, int(w * scale)), max(1, int(h * scale))
    left = int((w - cw) * _unit(digest, 1))
    top = int((h - ch) * _unit(digest, 2))
    out = image.crop((left, top, left + cw, top + ch))
    if round_ % 2:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out


def _builtin_source(spec: str, count: int | None) -> ImageSource:
    data = _skimage_data_dir()
    photos = [(name, data / fname) for name, fname in BUILTIN_PHOTOS if (data / fname).is_file()]
    expected = "scikit-image's bundled photographs (skimage/data/*.png)"
    if not photos:
        raise ImageSourceError(f"{spec}: no photographs found in {data}; expected {expected}")

    def items() -> Iterator[Item]:
        loaded: list[tuple[str, Image.Image]] = []
        for name, path in photos:
            if count is not None and len(loaded) >= count:  # builtin:N is N images, the photos first
                return
            image = _read_image(path)
            if image is not None:
                loaded.append((name, image))
                yield name, image, None
        if not loaded:
            return
        n = len(loaded) if count is None else count
        # More asked for than there are photos: cycle through deterministic variants of them.
        for j in range(max(0, n - len(loaded))):
            round_, (name, image) = j // len(loaded) + 1, loaded[j % len(loaded)]
            yield f"{name}@aug{round_}", augment(image, name, round_), None

    return ImageSource(spec, expected, items)


# --------------------------------------------------------------------------------------------------- digits

DIGITS_SPLIT_SEED = 0
DIGITS_HOLDOUT_FRACTION = 0.2  # of each class: the held-out test set of the bundled models
DIGITS_CALIB_FRACTION = 0.1  # of each class: calibration images, never trained on
DIGITS_IMAGE_SIZE = 32  # matches DIGITS_INPUT.image_size
DIGITS_SUBSETS = ("train", "calib", "holdout")


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImageSourceError("digits: needs scikit-learn; pip install 'vmamba-export[data]'") from err
    d = load_digits()  # bundled with scikit-learn, no download
    return d.images, d.target.astype(np.int64)


@lru_cache(maxsize=1)
def digits_split() -> dict[str, tuple[int, ...]]:
    """Indices of the train / calib / holdout split: per class, images ordered by a hash of (seed, index); the first
    20% are held out, the next 10% calibrate, the rest train. Hash order (not an RNG) keeps the split identical
    across numpy and scikit-learn versions."""
    _, target = _digits_arrays()
    split: dict[str, list[int]] = {s: [] for s in DIGITS_SUBSETS}
    for c in np.unique(target):
        members = sorted(
            (int(i) for i in np.flatnonzero(target == c)),
            key=lambda i: hashlib.sha256(f"digits:{DIGITS_SPLIT_SEED}:{i}".encode()).digest(),
        )
        n_hold = round(DIGITS_HOLDOUT_FRACTION * len(members))
        n_cal = round(DIGITS_CALIB_FRACTION * len(members))
        split["holdout"] += members[:n_hold]
        split["calib"] += members[n_hold : n_hold + n_cal]
        split["train"] += members[n_hold + n_cal :]
    out = {k: tuple(sorted(v)) for k, v in split.items()}
    hold = set(out["holdout"])
    assert hold.isdisjoint(out["calib"]) and hold.isdisjoint(out["train"]), "digits holdout overlaps another subset"
    assert set(out["calib"]).isdisjoint(out["train"]), "digits calib overlaps train"
    assert sum(map(len, out.values())) == len(target), "digits split lost or duplicated images"
    return out


def digit_image(pixels: np.ndarray) -> Image.Image:
    """One 8x8 digit (values 0..16) -> 32x32 RGB PIL image, bilinear upscaling."""
    grey = np.round(pixels.astype(np.float64) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB").resize((DIGITS_IMAGE_SIZE,) * 2, Image.Resampling.BILINEAR)


def digits_indices(subset: str | None) -> tuple[int, ...]:
    """Indices of `subset` (None: all 1,797 images)."""
    if subset is None:
        return tuple(range(len(_digits_arrays()[1])))
    if subset not in DIGITS_SUBSETS:
        raise ImageSourceError(f"digits:{subset}: unknown subset; expected one of {', '.join(DIGITS_SUBSETS)}")
    return digits_split()[subset]


def _digits_source(spec: str, subset: str | None) -> ImageSource:
    indices = digits_indices(subset)
    if subset == "calib":
        # The rule the bundled models' reported accuracy rests on: no held-out image ever calibrates.
        assert set(indices).isdisjoint(digits_split()["holdout"]), "calibration indices include held-out digits"

    def items() -> Iterator[Item]:
        images, target = _digits_arrays()
        for i in indices:
            yield f"digits/{i:04d}", digit_image(images[i]), int(target[i])

    return ImageSource(spec, "scikit-learn's digits", items, class_names=DIGITS_LABELS)


# --------------------------------------------------------------------------------------------------- shapes


def _shapes_source(spec: str, purpose: str) -> ImageSource:
    """The synthetic segmentation scenes as unlabelled images (e.g. `--calib shapes:calib`)."""
    from .segmentation_sources import includes_holdout, parse_shapes_spec, shapes_scene

    indices = parse_shapes_spec(spec)
    if purpose == "calibration" and includes_holdout(indices):
        raise ImageSourceError(
            f"{spec}: includes the shapes holdout, on which the bundled segmenter's mIoU is measured; "
            "calibrate with shapes:calib (or shapes:train)"
        )

    def items() -> Iterator[Item]:
        for i in indices:
            yield f"shapes/{i:05d}", shapes_scene(i)[0], None

    return ImageSource(spec, "the generated shapes scenes", items)


# --------------------------------------------------------------------------------------------------- entry points


def open_source(spec: str, limit: int | None = None, *, purpose: str = "any") -> ImageSource:
    """The source a spec string names (module docstring). `limit` caps the number of images; `purpose="calibration"`
    refuses sources that contain the digits holdout."""
    if limit is not None and limit < 1:
        raise ImageSourceError(f"{spec}: limit must be at least 1, got {limit}")
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
    spec = spec.strip()
    head, _, arg = spec.partition(":")
    if head == "builtin":
        count = None
        if arg:
            try:
                count = int(arg)
            except ValueError:
                raise ImageSourceError(f"{spec}: expected 'builtin' or 'builtin:N' with N a number") from None
            if count < 1:
                raise ImageSourceError(f"{spec}: N must be at least 1")
        if limit is not None:
            # A limit beyond the photos asks for augmented variants too, as builtin:N does.
            count = limit if count is None else min(count, limit)
        source = _builtin_source(spec, count)
    elif head == "digits":
        subset = arg or None
        if purpose == "calibration" and subset in (None, "holdout"):
            raise ImageSourceError(
                f"{spec}: includes the digits holdout, on which the bundled models' accuracy is measured; "
                "calibrate with digits:calib (or digits:train)"
            )
        source = _digits_source(spec, subset)
    elif head == "shapes":
        source = _shapes_source(spec, purpose)
    else:
        source = _path_source(spec)
    source.limit = limit
    return source


def load_batch(
    spec: str | ImageSource, input_spec: InputSpec, limit: int | None = None, *, purpose: str = "any"
) -> tuple[np.ndarray, list[int] | None, list[str]]:
    """All images of a source, preprocessed: ((N, 3, H, W) float32, labels or None, names).

    Labels are returned only when every image has one. When a source's class names (ImageFolder subfolders, digits)
    are all among `input_spec.labels`, labels are mapped to the model's indices of those names, so a folder holding
    only some classes still scores correctly."""
    source = open_source(spec, limit, purpose=purpose) if isinstance(spec, str) else spec
    if not input_spec.crop:  # a no-crop (segmentation) spec gives images of different sizes: square ones stack
        input_spec = fixed_size_spec(input_spec)
    size = (3, input_spec.image_size, input_spec.image_size)
    remap = None
    if source.class_names is not None and input_spec.labels is not None:
        if set(source.class_names) <= set(input_spec.labels):
            remap = [input_spec.labels.index(n) for n in source.class_names]
    arrays, labels, names = [], [], []
    for name, image, label in source:
        if isinstance(image, np.ndarray):
            if image.shape != size:
                raise ImageSourceError(
                    f"{source.spec}: preprocessed array {name} has shape {image.shape}, the model takes {size}"
                )
            arrays.append(image)
        else:
            arrays.append(preprocess(image, input_spec))
        labels.append(label if label is None or remap is None else remap[label])
        names.append(name)
    has_labels = all(lbl is not None for lbl in labels)
    return np.stack(arrays).astype(np.float32, copy=False), labels if has_labels else None, names
