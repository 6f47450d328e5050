"""`vmamba-export predict DIR IMAGE...`: top-k labels for images, through the artifact's runtime; for a segmentation
artifact, per image a colour-coded mask `<stem>.mask.png` (PNG mode P, the fixed palette of masks.py: pixel value =
class index) and `<stem>.overlay.png` (the image beside the image blended with the mask) written into --out, and the
fraction of pixels of each class printed.

An image that cannot be used (unreadable, not an image, above the pixel limit) is reported on its own line and the
others are still classified. Exit status: 0 when every image was classified, 1 when at least one was not (the
results of the others are printed all the same), 2 for errors that stop everything (the artifact, the arguments).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli import add_json_flag, print_json
from ..errors import InputError
from ._common import positive_int, thread_count
from ._pin import add_expect_sha256


def add_parser(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="classify images with an artifact",
        description="Classify images with an artifact. Exit 0: all classified; 1: some image failed (each named, "
        "the others' results printed); 2: the artifact or arguments are unusable.",
    )
    p.add_argument("artifact", type=Path, metavar="DIR", help="artifact folder (made by `vmamba-export export`)")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files (any format Pillow reads)")
    p.add_argument("--top-k", type=positive_int, default=5, metavar="K", help="labels to show per image (default 5)")
    p.add_argument(
        "--threads", type=thread_count, metavar="N", help="threads for the artifact's runtime (default: its own)"
    )
    p.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="segmentation artifacts: folder for the mask and overlay PNGs (default: the current folder)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="segmentation artifacts: replace existing mask and overlay PNGs"
    )
    add_expect_sha256(p)
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..runtime import load

    predictor = load(args.artifact, threads=args.threads, expected_sha256=args.expect_sha256)
    if predictor.task == "segmentation":
        return run_segmentation(args, predictor)
    if predictor.task == "backbone":
        raise InputError(
            f"{args.artifact} is a backbone artifact (feature maps, no classes): predict has nothing to label; use "
            "the Python API, vmamba_export.runtime.load(DIR)(batch)"
        )
    if args.out is not None or args.overwrite:
        raise InputError("--out and --overwrite are for segmentation artifacts (mask PNGs); this one classifies")
    results = predictor.predict(args.images, top_k=args.top_k, errors="record")
    failed = sum(isinstance(r, Exception) for r in results)
    if args.json:
        records = []
        for path, result in zip(args.images, results):
            if isinstance(result, Exception):
                records.append({"image": str(path), "top_k": None, "error": str(result)})
            else:
                records.append({"image": str(path), "top_k": result, "error": None})
        print_json(records)
    else:
        for path, result in zip(args.images, results):
            if isinstance(result, Exception):
                print(f"error: {result}", file=sys.stderr)
            else:
                ranked = ", ".join(f"{r['label']} ({r['score']:.3f})" for r in result)
                print(f"{path}: {ranked}")
    if failed:
        print(f"{failed} of {len(results)} images could not be classified", file=sys.stderr)
    return 1 if failed else 0


PRINTED_CLASSES = 8  # classes shown per image on the text output, largest first


def output_paths(images: list[Path], out: Path, overwrite: bool) -> list[tuple[Path, Path]]:
    """(mask, overlay) paths per image in `out`; refused before any work: two images with one stem (their files
    would collide), a path that exists and is not a file, and an existing file without --overwrite."""
    seen: dict[str, Path] = {}
    paths = []
    for image in images:
        stem = image.stem
        if stem in seen:
            raise InputError(f"{seen[stem]} and {image} would both write {stem}.mask.png: give images distinct names")
        seen[stem] = image
        pair = (out / f"{stem}.mask.png", out / f"{stem}.overlay.png")
        for path in pair:
            if path.exists() or path.is_symlink():
                if not path.is_file() or path.is_symlink():
                    raise InputError(f"{path} exists and is not a regular file; refusing to replace it")
                if not overwrite:
                    raise InputError(f"{path} already exists; pass --overwrite to replace it")
        paths.append(pair)
    return paths


def run_segmentation(args: argparse.Namespace, predictor) -> int:
    from ..masks import mask_image, overlay_image, save_png_atomic
    from ..runtime.predictor import class_fractions

    out = args.out if args.out is not None else Path.cwd()
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder")
    paths = output_paths(list(args.images), out, args.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for image_path, (mask_path, overlay_path) in zip(args.images, paths):
        try:
            image = predictor._open(image_path)
            result = predictor.segment_one(image)
        except InputError as exc:
            message = str(exc) if str(image_path) in str(exc) else f"{image_path}: {exc}"
            records.append({"image": str(image_path), "error": message})
            if not args.json:
                print(f"error: {message}", file=sys.stderr)
            continue
        save_png_atomic(mask_image(result["class_map"]), mask_path)
        save_png_atomic(overlay_image(image, result["class_map"]), overlay_path)
        fractions = class_fractions(result["class_map"], predictor.labels)
        records.append(
            {
                "image": str(image_path),
                "size": [int(image.width), int(image.height)],
                "mask": str(mask_path),
                "overlay": str(overlay_path),
                "class_pixels": fractions,
                "error": None,
            }
        )
        if not args.json:
            items = list(fractions.items())
            shown = ", ".join(f"{label} {100 * share:.1f}%" for label, share in items[:PRINTED_CLASSES])
            if len(items) > PRINTED_CLASSES:  # every class is in --json
                shown += f" (+{len(items) - PRINTED_CLASSES} more classes)"
            print(f"{image_path}: {shown} -> {mask_path}, {overlay_path}")
    failed = sum(r["error"] is not None for r in records)
    if args.json:
        print_json(records)
    if failed:
        print(f"{failed} of {len(records)} images could not be segmented", file=sys.stderr)
    return 1 if failed else 0
