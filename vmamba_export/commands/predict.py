"""`vmamba-export predict DIR IMAGE...`: top-k labels for images, through the artifact's runtime."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import add_json_flag, print_json


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="classify images with an artifact")
    p.add_argument("artifact", type=Path)
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--threads", type=int)
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
