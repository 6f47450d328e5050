"""`vmamba-export predict DIR IMAGE...`: top-k labels for images, through the artifact's runtime."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import add_json_flag, print_json
from ._common import positive_int, thread_count


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="classify images with an artifact")
    p.add_argument("artifact", type=Path, metavar="DIR", help="artifact folder (made by `vmamba-export export`)")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files (any format Pillow reads)")
    p.add_argument("--top-k", type=positive_int, default=5, metavar="K", help="labels to show per image (default 5)")
    p.add_argument(
        "--threads", type=thread_count, metavar="N", help="threads for the artifact's runtime (default: its own)"
    )
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..runtime import load

    predictor = load(args.artifact, threads=args.threads)
    results = predictor.predict(args.images, top_k=args.top_k)
    if args.json:
        print_json([{"image": str(path), "top_k": top} for path, top in zip(args.images, results)])
        return 0
    for path, top in zip(args.images, results):
        ranked = ", ".join(f"{r['label']} ({r['score']:.3f})" for r in top)
        print(f"{path}: {ranked}")
    return 0
