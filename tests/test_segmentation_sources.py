"""Labelled segmentation data: the generated shapes scenes (determinism, disjoint splits, masks that match the
pixels), the images/ + masks/ folder form (round trip, each error), preprocessing of image and mask together, and
the shapes as an unlabelled calibration source."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from vmamba_export.data.segmentation_sources import (
    SHAPES_CLASSES,
    SHAPES_SPLITS,
    iter_segmentation_samples,
    load_segmentation_batch,
    parse_shapes_spec,
    shapes_scene,
    write_segmentation_folder,
)
from vmamba_export.data.sources import load_batch, open_source
from vmamba_export.errors import ImageSourceError
from vmamba_export.models import get_config
from vmamba_export.models.configs import InputSpec

SPEC = get_config("vmamba_shapes_seg").input
RAW = InputSpec(image_size=64, resize=64, mean=(0, 0, 0), std=(1, 1, 1), labels=SHAPES_CLASSES, crop=False)


def _digest(image: Image.Image, mask: np.ndarray) -> str:
    return hashlib.sha256(image.tobytes() + mask.tobytes()).hexdigest()


def test_scenes_are_deterministic_and_varied():
    a, b = shapes_scene(7), shapes_scene(7)
    assert a[0].tobytes() == b[0].tobytes() and np.array_equal(a[1], b[1])
    assert a[0].size == (64, 64) and a[0].mode == "RGB" and a[1].shape == (64, 64) and a[1].dtype == np.uint8
    # Same scene whichever spec asks for it.
    x1, m1, _ = load_segmentation_batch("shapes:3", SPEC)
    x2, m2, _ = load_segmentation_batch("shapes:train", SPEC, limit=3)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(m1, m2)
    # Every foreground class occurs, and colour does not give the class away: the mean colour of each class's pixels
    # over many scenes is near mid-grey for every class.
    masks = np.stack([shapes_scene(i)[1] for i in range(200)])
    images = np.stack([np.asarray(shapes_scene(i)[0]) for i in range(200)]).astype(np.float64)
    assert set(np.unique(masks)) == set(range(len(SHAPES_CLASSES)))
    for cls in range(1, len(SHAPES_CLASSES)):
        mean = images[masks == cls].mean(axis=0)
        assert np.all(np.abs(mean - 127.5) < 35), (SHAPES_CLASSES[cls], mean)


def test_splits_are_disjoint_and_sized():
    ranges = {k: parse_shapes_spec(f"shapes:{k}") for k in SHAPES_SPLITS}
    assert [len(r) for r in ranges.values()] == [4000, 200, 500]
    seen: dict[str, str] = {}
    for split in ("calib", "holdout"):
        for i in ranges[split]:
            seen[_digest(*shapes_scene(i))] = split
    assert len(seen) == 700  # no scene repeated within or across calib / holdout
    # A sample of train scenes: none equals a calib or holdout scene.
    for i in list(ranges["train"])[::40]:
        assert _digest(*shapes_scene(i)) not in seen
    assert parse_shapes_spec("shapes") == range(4700)
    assert parse_shapes_spec("shapes:5") == range(5)


def test_masks_match_the_pixels():
    # Raw pixels (mean 0, std 1): background pixels differ from shape pixels, and the mask is what was painted.
    x, m, names = load_segmentation_batch("shapes:holdout", RAW, limit=5)
    assert x.shape == (5, 3, 64, 64) and m.shape == (5, 64, 64) and m.dtype == np.int64
    assert names[0] == "shapes/04200"
    for i in range(5):
        image, mask = shapes_scene(4200 + i)
        np.testing.assert_allclose(x[i].transpose(1, 2, 0) * 255, np.asarray(image), atol=1e-3)
        np.testing.assert_array_equal(m[i], mask)
        fg, bg = m[i] > 0, m[i] == 0
        assert fg.any() and bg.any()
        # Shapes are painted far from the background's mean colour, so the two pixel sets are told apart.
        pix = np.asarray(image, dtype=np.float64)
        assert np.abs(pix[fg].mean(0) - pix[bg].mean(0)).sum() > 30


def test_folder_round_trip(tmp_path):
    root = write_segmentation_folder("shapes:holdout", tmp_path / "seg", limit=4)
    expected = [f"{4200 + i:05d}.png" for i in range(4)]
    assert sorted(p.name for p in (root / "images").iterdir()) == expected
    assert sorted(p.name for p in (root / "masks").iterdir()) == expected
    xa, ma, _ = load_segmentation_batch("shapes:holdout", SPEC, limit=4)
    xb, mb, names = load_segmentation_batch(str(root), SPEC)
    assert names == [f"{4200 + i:05d}" for i in range(4)]
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ma, mb)
    assert Image.open(root / "masks" / "04200.png").mode == "L"


def test_folder_resizes_mask_nearest_keeping_ratio(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, 20:] = 255
    mask = np.zeros((20, 40), np.uint8)
    mask[:, 20:] = 3
    mask[:4, :4] = 255  # ignore survives the nearest resize
    Image.fromarray(image).save(tmp_path / "images" / "a.jpg", quality=100)
    Image.fromarray(mask, "L").convert("P").save(tmp_path / "masks" / "a.png")  # mode P: values are the indices
    spec = InputSpec(image_size=10, resize=10, interpolation="bilinear", labels=SHAPES_CLASSES, crop=False)
    (name, x, m), *rest = list(iter_segmentation_samples(str(tmp_path), spec))
    assert not rest and name == "a"
    assert x.shape == (1, 3, 10, 20) and m.shape == (10, 20)  # shorter side 10, ratio kept, nothing cropped
    assert set(np.unique(m)) == {0, 3, 255}
    assert (m[:, :10] != 3).all() and (m[:, 10:] == 3).all() and (m[:2, :2] == 255).all()
    assert x[0, 0, :, :9].mean() < -1.5 and x[0, 0, :, 11:].mean() > 1.5


def _folder(tmp_path, image_size=(8, 8), mask_size=(8, 8), value=1, mask_mode="L", with_mask=True):
    (tmp_path / "images").mkdir(parents=True)
    (tmp_path / "masks").mkdir()
    Image.new("RGB", image_size, (10, 20, 30)).save(tmp_path / "images" / "x.png")
    if with_mask:
        Image.new(mask_mode, mask_size, value if mask_mode == "L" else (value,) * 3).save(tmp_path / "masks" / "x.png")
    return str(tmp_path)


def test_folder_errors(tmp_path):
    def error(path, **kw) -> str:
        with pytest.raises(ImageSourceError) as exc:
            load_segmentation_batch(path, SPEC, **kw)
        return str(exc.value)

    assert "no such folder" in error(str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "masks").mkdir()
    assert "no images in" in error(str(empty))
    no_masks_dir = tmp_path / "nomasks"
    (no_masks_dir / "images").mkdir(parents=True)
    assert "masks" in error(str(no_masks_dir))
    msg = error(_folder(tmp_path / "a", with_mask=False))
    assert "no mask for image" in msg and "x.png" in msg
    msg = error(_folder(tmp_path / "b", mask_size=(8, 7)))
    assert "8x7" in msg and "8x8" in msg and "same size" in msg
    msg = error(_folder(tmp_path / "c", value=7))
    assert "class index 7" in msg and "0..4" in msg
    # 255 is ignore, not out of range; an explicit num_classes overrides the spec's labels.
    assert load_segmentation_batch(_folder(tmp_path / "d", value=255), SPEC)[1].max() == 255
    assert "class index 3" in error(_folder(tmp_path / "e", value=3), num_classes=3)
    assert "mode RGB" in error(_folder(tmp_path / "f", mask_mode="RGB"))


def test_shapes_spec_errors():
    for spec in ("shapes:test", "shapes:0", "shapes:99999"):
        with pytest.raises(ImageSourceError, match="shapes"):
            load_segmentation_batch(spec, SPEC)


def test_shapes_as_unlabelled_image_source():
    x, labels, names = load_batch("shapes:calib", SPEC, limit=3)
    assert x.shape == (3, 3, 64, 64) and labels is None and names[0] == "shapes/04000"
    xs, _, _ = load_segmentation_batch("shapes:calib", SPEC, limit=3)
    np.testing.assert_allclose(x, xs, atol=1e-6)  # the classifier preprocessing equals ours at 64 -> 64
    assert len(list(open_source("shapes:calib", purpose="calibration"))) == 200
    for spec in ("shapes:holdout", "shapes", "shapes:4300"):
        with pytest.raises(ImageSourceError, match="holdout"):
            open_source(spec, purpose="calibration")
    assert len(list(open_source("shapes:10", purpose="calibration"))) == 10
