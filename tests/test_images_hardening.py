"""Images as a photo library holds them (issue #20, item 4): EXIF orientation, transparency, extreme aspect ratios and
decompression bombs, and `predict` over many images with some bad ones, through the CLI as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vmamba_export import load
from vmamba_export.cli import main
from vmamba_export.data import preprocess as pre
from vmamba_export.data.sources import SkippedImageWarning, load_batch
from vmamba_export.errors import InputError
from vmamba_export.models.configs import InputSpec

ROOT = Path(__file__).resolve().parent.parent
SPEC = InputSpec(image_size=24, resize=28, interpolation="bilinear", mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


def _asymmetric(h: int = 36, w: int = 60) -> np.ndarray:
    """Blocks of distinct colours, no symmetry: any flip or rotation changes the pixels."""
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 3, : w // 4] = (250, 20, 20)
    img[h // 3 :, w // 2 :] = (20, 240, 30)
    img[h // 2 :, : w // 5] = (30, 40, 230)
    img[:, -3:] = 200
    return img


# EXIF orientation -> (display from stored, stored from display), written with numpy (independent of Pillow's
# ImageOps.exif_transpose, which the code under test uses).
ORIENTATIONS = {
    2: (np.fliplr, np.fliplr),
    3: (lambda a: np.rot90(a, 2), lambda a: np.rot90(a, 2)),
    4: (np.flipud, np.flipud),
    5: (lambda a: a.transpose(1, 0, 2), lambda a: a.transpose(1, 0, 2)),
    6: (lambda a: np.rot90(a, -1), lambda a: np.rot90(a, 1)),
    7: (lambda a: np.rot90(a, 2).transpose(1, 0, 2), lambda a: np.rot90(a, 2).transpose(1, 0, 2)),
    8: (lambda a: np.rot90(a, 1), lambda a: np.rot90(a, -1)),
}


def _save_with_orientation(path: Path, stored: np.ndarray, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.ascontiguousarray(stored)).save(path, exif=exif.tobytes(), quality=95)


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_is_applied_before_preprocessing(tmp_path, orientation):
    upright = _asymmetric()
    display_from_stored, stored_from_display = ORIENTATIONS[orientation]
    path = tmp_path / f"o{orientation}.jpg"
    _save_with_orientation(path, stored_from_display(upright), orientation)
    with Image.open(path) as raw:  # the stored (sideways) pixels as decoded, tag not applied
        assert raw.getexif().get(0x0112) == orientation
        decoded = np.asarray(raw.convert("RGB"))
    reference = np.ascontiguousarray(display_from_stored(decoded))
    assert reference.shape == upright.shape
    assert np.abs(reference.astype(int) - upright).mean() < 4  # the numpy mapping is right (JPEG is lossy)
    expected = pre.preprocess(Image.fromarray(reference), SPEC)
    np.testing.assert_array_equal(pre.preprocess(pre.open_image(path), SPEC), expected)
    # The same through the image sources (validation, calibration) and through the loader's predictor path.
    batch, _, _ = load_batch(str(path), SPEC)
    np.testing.assert_array_equal(batch[0], expected)


def test_exif_orientation_through_predict(tmp_path, digits_artifact):
    upright = np.zeros((32, 48, 3), np.uint8)
    upright[4:28, 20:26] = 255  # a vertical bar: a "1"-like stroke, horizontal when seen sideways
    path = tmp_path / "sideways.jpg"
    _save_with_orientation(path, ORIENTATIONS[6][1](upright), 6)
    png = tmp_path / "upright.png"
    Image.fromarray(np.asarray(Image.open(path).convert("RGB")).copy()).save(tmp_path / "stored.png")
    Image.fromarray(np.ascontiguousarray(ORIENTATIONS[6][0](np.asarray(Image.open(tmp_path / "stored.png"))))).save(png)
    predictor = load(digits_artifact)
    assert predictor.predict([path], top_k=10) == predictor.predict([png], top_k=10)
    assert predictor.predict([path], top_k=10) != predictor.predict([tmp_path / "stored.png"], top_k=10)


# ------------------------------------------------------------------------------------------------- transparency


def test_transparency_is_composited_on_black():
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 128], [255, 0, 0, 0], [9, 9, 9, 1]]], np.uint8)
    expected = np.array([[[200, 100, 50], [100, 50, 25], [0, 0, 0], [0, 0, 0]]], np.uint8)  # round(c * a / 255)
    np.testing.assert_array_equal(np.asarray(pre.to_rgb(Image.fromarray(rgba, "RGBA"))), expected)
    np.testing.assert_array_equal(np.asarray(pre.to_rgb(Image.fromarray(rgba, "RGBA").convert("RGBa"))), expected)
    la = np.array([[[200, 255], [200, 128], [255, 0]]], np.uint8)
    np.testing.assert_array_equal(np.asarray(pre.to_rgb(Image.fromarray(la, "LA")))[..., 0], [[200, 100, 0]])
    np.testing.assert_array_equal(np.asarray(pre.to_rgb(Image.fromarray(la, "LA"))).std(axis=-1), 0)


@pytest.mark.parametrize("fmt", ["png", "gif"])
def test_palette_transparency_from_a_file(tmp_path, fmt):
    pal = Image.fromarray(np.array([[0, 1, 2, 1]], np.uint8), "P")
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    path = tmp_path / f"p.{fmt}"
    pal.save(path, transparency=1)  # green is the transparent entry
    rgb = pre.to_rgb(pre.open_image(path))
    np.testing.assert_array_equal(np.asarray(rgb), [[[255, 0, 0], [0, 0, 0], [0, 0, 255], [0, 0, 0]]])


def test_single_colour_transparency_and_preprocess(tmp_path):
    path = tmp_path / "trns.png"
    Image.fromarray(np.array([[[10, 20, 30], [40, 50, 60]]], np.uint8)).save(path, transparency=(10, 20, 30))
    np.testing.assert_array_equal(np.asarray(pre.to_rgb(pre.open_image(path))), [[[0, 0, 0], [40, 50, 60]]])
    spec = InputSpec(image_size=2, resize=2, interpolation="nearest", mean=(0, 0, 0), std=(1, 1, 1))
    grey_la = Image.fromarray(np.array([[[100, 0], [100, 255]], [[100, 255], [100, 255]]], np.uint8), "LA")
    out = pre.preprocess(grey_la, spec)
    np.testing.assert_allclose(out[:, 0, 0], 0.0)
    np.testing.assert_allclose(out[:, 1, 1], 100 / 255, rtol=1e-6)


# ------------------------------------------------------------------------------------------------- sizes


def _full_resize_then_crop(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """torchvision's Resize(resize) -> CenterCrop(image_size) on PIL, written out: the reference."""
    crop, target = spec.image_size, max(spec.resize, spec.image_size)
    w, h = image.size
    new = (target, int(target * h / w)) if w <= h else (int(target * w / h), target)
    if new != (w, h):
        image = image.resize(new, pre.resample_filter(spec.interpolation))
    left, top = int(round((new[0] - crop) / 2.0)), int(round((new[1] - crop) / 2.0))
    return np.asarray(image.crop((left, top, left + crop, top + crop)))


def test_normal_images_are_resized_exactly_as_before():
    rng = np.random.default_rng(0)
    for _ in range(60):
        w, h = (int(v) for v in rng.integers(5, 600, 2))
        crop = int(rng.choice([17, 32, 100, 224]))
        spec = InputSpec(
            image_size=crop,
            resize=int(rng.choice([crop, crop + 7, 256])),
            interpolation=str(rng.choice(["bilinear", "bicubic", "nearest", "lanczos"])),
        )
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        np.testing.assert_array_equal(
            np.asarray(pre.resize_and_crop(image, spec)), _full_resize_then_crop(image, spec), err_msg=f"{w}x{h} {spec}"
        )


def test_extreme_aspect_ratios_resample_only_the_crop():
    rng = np.random.default_rng(1)
    spec = InputSpec(image_size=32, resize=32, interpolation="bilinear")
    for size in ((1, 5000), (7000, 2), (3, 20000)):  # full resize: 32 x 160,000 and more (> 4 MP): the crop path
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        got = np.asarray(pre.resize_and_crop(image, spec)).astype(int)
        want = _full_resize_then_crop(image, spec).astype(int)
        assert got.shape == want.shape == (32, 32, 3)
        assert np.abs(got - want).max() <= 1, size  # same scale and centres; float rounding moves at most 1/255


def test_a_long_strip_takes_memory_of_the_output_not_of_the_upscale(tmp_path, digits_artifact):
    """A 1 x 1,000,000 PNG (5 KB) through `predict`: the old code scaled the short side up first (32 x 32,000,000
    RGB: 5.7 GB peak, 62 s measured here); now the peak RSS grows by less than 64 MB over a small image's."""
    strip = np.zeros((1_000_000, 1, 3), np.uint8)
    strip[::1000] = 255
    Image.fromarray(strip).save(tmp_path / "strip.png", optimize=True)
    Image.fromarray(np.full((40, 30, 3), 90, np.uint8)).save(tmp_path / "small.png")
    assert (tmp_path / "strip.png").stat().st_size < 10_000
    script = textwrap.dedent(
        f"""
        import json, resource, sys
        from vmamba_export.cli import main
        def peak(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        assert main(["predict", {str(digits_artifact)!r}, {str(tmp_path / "small.png")!r}, "--json"]) == 0
        before = peak()
        assert main(["predict", {str(digits_artifact)!r}, {str(tmp_path / "strip.png")!r}, "--json"]) == 0
        print(json.dumps({{"before": before, "after": peak()}}), file=sys.stderr)
        """
    )
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    rss = json.loads(done.stderr.strip().splitlines()[-1])
    grew_mb = (rss["after"] - rss["before"]) / 1024
    print(f"\npeak RSS {rss['before'] / 1024:.0f} MB -> {rss['after'] / 1024:.0f} MB with the strip (+{grew_mb:.0f})")
    assert grew_mb < 64


def test_images_above_the_pixel_limit_are_refused_before_decoding(tmp_path):
    just_over = tmp_path / "over.png"
    Image.new("1", (10_001, 10_000)).save(just_over)  # 100,010,000 px: ours refuses (Pillow would only warn)
    bomb = tmp_path / "bomb.png"
    Image.new("1", (14_000, 14_000)).save(bomb)  # 196 MP: Pillow's own bomb error comes first; same message
    for path in (just_over, bomb):
        assert path.stat().st_size < 200_000
        with pytest.raises(InputError, match=f"{path.name}.*above the limit of 100,000,000 pixels") as err:
            pre.open_image(path)
        assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="above the limit"):
        pre.preprocess(Image.new("1", (10_001, 10_000)), SPEC)
    with pytest.warns(SkippedImageWarning, match="over.png"), pytest.raises(Exception, match="no usable image"):
        load_batch(str(just_over), SPEC)


# ------------------------------------------------------------------------------------------------- predict, many


def test_predict_reports_each_bad_image_and_returns_the_others(tmp_path, digits_artifact, capsys):
    good = tmp_path / "good.png"
    Image.fromarray(np.full((40, 30, 3), 90, np.uint8)).save(good)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    bomb = tmp_path / "bomb.png"
    Image.new("1", (10_001, 10_000)).save(bomb)
    missing = tmp_path / "missing.jpg"
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good.read_bytes()[:60])
    images = [good, text, bomb, missing, truncated, good]
    expected = load(digits_artifact).predict([good], top_k=3)[0]

    assert main(["predict", str(digits_artifact), *map(str, images), "--top-k", "3", "--json"]) == 1
    out = capsys.readouterr()
    records = json.loads(out.out)
    assert [r["image"] for r in records] == [str(p) for p in images]
    assert records[0] == {"image": str(good), "top_k": expected, "error": None} and records[5] == records[0]
    for record, why in zip(records[1:5], ("not an image format", "above the limit", "no such file", "cannot read")):
        assert record["top_k"] is None and why in record["error"] and record["image"] in record["error"], record

    assert main(["predict", str(digits_artifact), *map(str, images), "--top-k", "3"]) == 1
    out = capsys.readouterr()
    assert out.out.splitlines() == [f"{good}: " + ", ".join(f"{r['label']} ({r['score']:.3f})" for r in expected)] * 2
    errors = [line for line in out.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 4 and all(str(p) in e for p, e in zip(images[1:5], errors))
    assert "4 of 6 images could not be classified" in out.err

    # All bad: still one line each, exit 1; all good: exit 0.
    assert main(["predict", str(digits_artifact), str(missing), str(text)]) == 1
    assert len(capsys.readouterr().err.splitlines()) == 3
    assert main(["predict", str(digits_artifact), str(good)]) == 0


def test_predictor_predict_raises_by_default_and_records_on_request(tmp_path, digits_artifact):
    good = tmp_path / "good.png"
    Image.fromarray(np.full((40, 30, 3), 90, np.uint8)).save(good)
    predictor = load(digits_artifact)
    with pytest.raises(InputError, match="missing.png: no such file"):
        predictor.predict([good, tmp_path / "missing.png"])
    results = predictor.predict([tmp_path / "missing.png", good, Image.open(good)], errors="record")
    assert isinstance(results[0], InputError) and results[1] == results[2] == predictor.predict(good)[0]
    with pytest.raises(ValueError, match="errors must be"):
        predictor.predict([good], errors="skip")


def test_single_channel_models_get_grey_input():
    pixels = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [100, 150, 200]]], np.uint8)
    spec = InputSpec(image_size=2, resize=2, interpolation="nearest", mean=(0.5,), std=(0.25,))
    out = pre.preprocess(Image.fromarray(pixels), spec, channels=1)
    luma = pixels.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # ITU-R 601-2, as Pillow's "L"
    assert out.shape == (1, 2, 2)
    np.testing.assert_allclose(out[0], (np.round(luma) / 255 - 0.5) / 0.25, atol=1 / 255 / 0.25)
    with pytest.raises(InputError, match="channels must be 1 or 3"):
        pre.preprocess(Image.fromarray(pixels), spec, channels=2)
