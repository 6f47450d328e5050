"""`vmamba-export predict DIR IMAGE...`: top-k labels for images, through the artifact's runtime.

An image that cannot be used (unreadable, not an image, above the pixel limit) is reported on its own line and the
others are still classified. Exit status: 0 when every image was classified, 1 when at least one was not (the
results of the others are printed all the same), 2 for errors that stop everything (the artifact, the arguments).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli import add_json_flag, print_json
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
    add_expect_sha256(p)
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..runtime import load

    predictor = load(args.artifact, threads=args.threads, expected_sha256=args.expect_sha256)
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
