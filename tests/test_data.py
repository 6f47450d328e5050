"""Preprocessing and image sources: hand-computed numbers, every source kind, the warnings and errors, the split."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from vmamba_export.data.preprocess import preprocess, preprocess_batch
from vmamba_export.data.sources import (
    DIGITS_SUBSETS,
    SkippedImageWarning,
    augment,
    builtin_photo_names,
    digits_split,
    load_batch,
    open_source,
)
from vmamba_export.errors import ImageSourceError
from vmamba_export.models import get_config
from vmamba_export.models.configs import DIGITS_INPUT, InputSpec

TINY = InputSpec(image_size=2, resize=2, interpolation="nearest", mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))


def _png(path, value: int, size=(6, 4), mode="RGB") -> None:
    Image.new(mode, size, value if mode == "L" else (value, value // 2, 255 - value)).save(path)


# ------------------------------------------------------------------------------------------------- preprocessing


def test_preprocess_matches_hand_computation():
    # 2x2 RGB image, no resize, no crop: out[c] = (pixel / 255 - mean[c]) / std[c], channel-first.
    pixels = np.array([[[255, 0, 51], [0, 255, 102]], [[128, 64, 0], [10, 20, 30]]], dtype=np.uint8)
    out = preprocess(Image.fromarray(pixels), TINY)
    assert out.dtype == np.float32 and out.shape == (3, 2, 2)
    expected = np.empty((3, 2, 2), dtype=np.float64)
    for c, (m, s) in enumerate(zip(TINY.mean, TINY.std, strict=True)):
        expected[c] = (pixels[..., c] / 255.0 - m) / s
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert out[0, 0, 0] == pytest.approx(1.0) and out[1, 0, 0] == pytest.approx(-1.0)


def test_preprocess_resizes_shorter_side_then_centre_crops():
    # 4 wide x 2 high; resize 2 (nearest) -> 4x2 unchanged (shorter side already 2); crop 2 takes columns 1..2.
    pixels = np.zeros((2, 4, 3), dtype=np.uint8)
    pixels[:, :, 0] = [[10, 20, 30, 40], [50, 60, 70, 80]]
    out = preprocess(Image.fromarray(pixels), InputSpec(image_size=2, resize=2, mean=(0, 0, 0), std=(1, 1, 1)))
    np.testing.assert_allclose(out[0] * 255, [[20, 30], [60, 70]], atol=1e-4)
    # 8x4 -> shorter side 2 -> 4x2 (box-like averaging by bilinear with antialias is not checked here, only shape).
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (4, 8, 3), dtype=np.uint8))
    assert preprocess(big, InputSpec(image_size=2, resize=2)).shape == (3, 2, 2)


def test_preprocess_grey_bgr_and_batch():
    grey = Image.new("L", (3, 3), 255)
    out = preprocess(grey, InputSpec(image_size=3, resize=3, mean=(0, 0, 0), std=(1, 1, 1)))
    np.testing.assert_allclose(out, 1.0)
    rgb = Image.fromarray(np.full((2, 2, 3), (255, 0, 0), dtype=np.uint8))
    bgr = preprocess(rgb, InputSpec(image_size=2, resize=2, mean=(0, 0, 0), std=(1, 1, 1), channel_order="BGR"))
    assert bgr[0].max() == 0 and bgr[2].min() == 1.0
    batch = preprocess_batch([grey, grey], InputSpec(image_size=3, resize=3))
    assert batch.shape == (2, 3, 3, 3) and batch.dtype == np.float32


def test_preprocess_is_deterministic_on_a_photo():
    spec = get_config("vmamba_tiny_s2l5").input
    _, image, _ = next(iter(open_source("builtin:1")))
    a, b = preprocess(image, spec), preprocess(image, spec)
    assert a.shape == (3, 224, 224) and np.array_equal(a, b)


# ------------------------------------------------------------------------------------------------- builtin


def test_builtin_photos_are_real_and_offline():
    names = builtin_photo_names()
    assert names[:3] == ["astronaut", "chelsea", "coffee"] and len(names) >= 9
    items = list(open_source("builtin"))
    assert [n for n, _, _ in items] == names
    assert all(img.size[0] >= 256 and img.size[1] >= 256 for _, img, _ in items)
    assert all(label is None for _, _, label in items)


def test_builtin_augments_beyond_the_photos_deterministically():
    n = len(builtin_photo_names())
    items = list(open_source(f"builtin:{n + 3}"))
    assert len(items) == n + 3
    assert [name for name, _, _ in items[n:]] == [f"{p}@aug1" for p in builtin_photo_names()[:3]]
    # Mirror of the original, pixel for pixel.
    first, mirrored = np.asarray(items[0][1]), np.asarray(items[n][1])
    np.testing.assert_array_equal(first[:, ::-1], mirrored)
    # A later round is a crop; the same call gives the same pixels, another round other pixels.
    photo = items[0][1]
    assert np.array_equal(np.asarray(augment(photo, "astronaut", 2)), np.asarray(augment(photo, "astronaut", 2)))
    assert augment(photo, "astronaut", 2).size != augment(photo, "astronaut", 3).size
    assert len(list(open_source("builtin", limit=2))) == 2


# ------------------------------------------------------------------------------------------------- digits


def test_digits_split_is_disjoint_stratified_and_complete():
    split = digits_split()
    sets = {k: set(v) for k, v in split.items()}
    assert set(sets) == set(DIGITS_SUBSETS)
    assert sets["holdout"].isdisjoint(sets["calib"]) and sets["holdout"].isdisjoint(sets["train"])
    assert sets["calib"].isdisjoint(sets["train"])
    assert len(sets["holdout"] | sets["calib"] | sets["train"]) == 1797
    assert 350 <= len(sets["holdout"]) <= 370
    _, labels, _ = load_batch("digits:holdout", DIGITS_INPUT)
    counts = np.bincount(labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # 20% of each class (174..183 images a class)


def test_digits_calibration_never_sees_the_holdout():
    holdout = set(digits_split()["holdout"])
    calib_names = [name for name, _, _ in open_source("digits:calib", purpose="calibration")]
    calib_idx = {int(n.split("/")[1]) for n in calib_names}
    assert calib_idx and calib_idx.isdisjoint(holdout)
    for spec in ("digits", "digits:holdout"):
        with pytest.raises(ImageSourceError, match="holdout"):
            open_source(spec, purpose="calibration")


def test_digits_images_and_labels():
    x, labels, names = load_batch("digits:calib", DIGITS_INPUT, limit=5)
    assert x.shape == (5, 3, 32, 32) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0 and x.max() > 0.9  # ink reaches full white
    np.testing.assert_array_equal(x[:, 0], x[:, 1])  # grey replicated to RGB
    assert len(labels) == 5 and all(0 <= lbl <= 9 for lbl in labels) and names[0].startswith("digits/")
    with pytest.raises(ImageSourceError, match="unknown subset"):
        open_source("digits:test")


# ------------------------------------------------------------------------------------------------- paths


def test_image_folder_layout(tmp_path):
    for cls, value in (("cat", 10), ("ant", 200)):
        (tmp_path / cls).mkdir()
        for i in range(2):
            _png(tmp_path / cls / f"{i}.png", value)
    src = open_source(str(tmp_path))
    assert src.class_names == ("ant", "cat")
    items = list(src)
    assert [(n, lbl) for n, _, lbl in items] == [("ant/0.png", 0), ("ant/1.png", 0), ("cat/0.png", 1), ("cat/1.png", 1)]
    x, labels, _ = load_batch(str(tmp_path), InputSpec(image_size=4, resize=4))
    assert x.shape == (4, 3, 4, 4) and labels == [0, 0, 1, 1]


def test_image_folder_labels_follow_model_label_names(tmp_path):
    # Folders "3" and "7" only: labels must be the model's indices 3 and 7, not positions 0 and 1.
    for cls in ("3", "7"):
        (tmp_path / cls).mkdir()
        _png(tmp_path / cls / "a.png", 100, size=(32, 32))
    _, labels, _ = load_batch(str(tmp_path), DIGITS_INPUT)
    assert labels == [3, 7]


def test_flat_folder_skips_unreadable_files_with_a_warning(tmp_path):
    _png(tmp_path / "a.png", 1)
    Image.new("RGB", (5, 5), (1, 2, 3)).save(tmp_path / "b.jpg")
    (tmp_path / "c.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / ".DS_Store").write_bytes(b"\0\0")
    with pytest.warns(SkippedImageWarning) as record:
        items = list(open_source(str(tmp_path)))
    assert [n for n, _, _ in items] == ["a.png", "b.jpg"]
    messages = " ".join(str(w.message) for w in record)
    assert "c.jpg" in messages and "notes.txt" in messages and ".DS_Store" not in messages
    assert all(label is None for _, _, label in items)


def test_truncated_jpeg_is_skipped(tmp_path):
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "x.jpg")
    data = (tmp_path / "x.jpg").read_bytes()
    (tmp_path / "x.jpg").write_bytes(data[: len(data) // 2])
    _png(tmp_path / "y.png", 5)
    with pytest.warns(SkippedImageWarning, match="x.jpg"):
        assert [n for n, _, _ in open_source(str(tmp_path))] == ["y.png"]


def test_empty_or_unusable_sources_raise(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageSourceError, match="holds no files"):
        list(open_source(str(empty)))
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.txt").write_text("x")
    with pytest.raises(ImageSourceError, match="no usable image"), warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedImageWarning)
        list(open_source(str(junk)))
    with pytest.raises(ImageSourceError, match="no such file"):
        open_source(str(tmp_path / "missing"))
    with pytest.raises(ImageSourceError, match="builtin:N"):
        open_source("builtin:many")


def test_file_list(tmp_path):
    (tmp_path / "imgs").mkdir()
    _png(tmp_path / "imgs" / "one.png", 1)
    _png(tmp_path / "imgs" / "two words.png", 2)
    lst = tmp_path / "list.txt"
    lst.write_text("# a comment\nimgs/one.png 4\n\nimgs/two words.png 7\nimgs/gone.png 1\n")
    with pytest.warns(SkippedImageWarning, match="gone.png"):
        items = list(open_source(str(lst)))
    assert [lbl for _, _, lbl in items] == [4, 7]
    lst.write_text(f"{tmp_path / 'imgs' / 'one.png'}\n")
    (item,) = list(open_source(str(lst)))
    assert item[2] is None


def test_npy_uint8_nhwc_and_nchw(tmp_path):
    rng = np.random.default_rng(2)
    nhwc = rng.integers(0, 255, (3, 5, 5, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", nhwc)
    np.save(tmp_path / "b.npy", nhwc.transpose(0, 3, 1, 2).copy())
    spec = InputSpec(image_size=5, resize=5, mean=(0, 0, 0), std=(1, 1, 1))
    xa, la, names = load_batch(str(tmp_path / "a.npy"), spec)
    xb, _, _ = load_batch(str(tmp_path / "b.npy"), spec)
    np.testing.assert_allclose(xa, nhwc.transpose(0, 3, 1, 2) / 255.0, atol=1e-6)
    np.testing.assert_array_equal(xa, xb)
    assert la is None and names == ["a[0]", "a[1]", "a[2]"]


def test_npy_float_is_taken_as_preprocessed(tmp_path):
    x = np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "pre.npy", x)
    out, _, _ = load_batch(str(tmp_path / "pre.npy"), DIGITS_INPUT)
    np.testing.assert_array_equal(out, x)
    with pytest.raises(ImageSourceError, match="model takes"):
        load_batch(str(tmp_path / "pre.npy"), InputSpec())
    np.save(tmp_path / "bad.npy", np.zeros((2, 32, 32, 3), dtype=np.float32))
    with pytest.raises(ImageSourceError, match="preprocessed"):
        open_source(str(tmp_path / "bad.npy"))


def test_npz_images_and_labels(tmp_path):
    images = np.random.default_rng(4).integers(0, 255, (4, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=np.array([3, 1, 4, 1]))
    x, labels, _ = load_batch(str(tmp_path / "d.npz"), InputSpec(image_size=8, resize=8), limit=3)
    assert x.shape == (3, 3, 8, 8) and labels == [3, 1, 4]
    np.savez(tmp_path / "e.npz", pictures=images, other=images)
    with pytest.raises(ImageSourceError, match="'images'"):
        open_source(str(tmp_path / "e.npz"))
    np.savez(tmp_path / "f.npz", images=images, labels=np.array([1, 2]))
    with pytest.raises(ImageSourceError, match="labels"):
        open_source(str(tmp_path / "f.npz"))


def test_single_image_file(tmp_path):
    _png(tmp_path / "p.png", 9, size=(40, 30))
    x, labels, names = load_batch(str(tmp_path / "p.png"), InputSpec(image_size=16, resize=20))
    assert x.shape == (1, 3, 16, 16) and labels is None and names == ["p.png"]
