"""`vmamba-export validate DIR`: parity of an artifact with its PyTorch fp32 model on real images: by default against
the reference inputs and logits the artifact carries (no torch needed), or recomputed with PyTorch."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..cli import add_json_flag, print_json
from ._common import int_list


def add_parser(sub) -> None:
    p = sub.add_parser("validate", help="check an artifact's outputs against the PyTorch fp32 model")
    p.add_argument("artifact", type=Path)
    p.add_argument(
        "--recompute",
        action="store_true",
        help="recompute the PyTorch reference (needs torch) instead of using the artifact's references; implied by "
        "--images, --sizes and --checkpoint",
    )
    p.add_argument(
        "--images", help="recompute on this image source: builtin, digits:holdout, a folder, list or .npz (builtin)"
    )
    p.add_argument("--limit", type=int, help="use at most this many images")
    p.add_argument("--sizes", type=int_list, help="recompute at these input sides, comma-separated (the model's)")
    p.add_argument("--accuracy", metavar="SOURCE", help="also measure top-1 on this labelled source")
    p.add_argument("--checkpoint", help="recompute from these weights, if not where the manifest says")
    p.add_argument("--threads", type=int)
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..validate import validate_artifact

    result = validate_artifact(
        args.artifact,
        images=args.images,
        sizes=args.sizes,
        limit=args.limit,
        checkpoint=args.checkpoint,
        accuracy_source=args.accuracy,
        threads=args.threads,
        show_progress=not args.json,
        recompute=args.recompute,
    )
    if args.json:
        print_json(result)
    else:
        table = Table(title=f"parity of {args.artifact} ({result['num_images']} images from {result['images']})")
        for col in ("size", "max abs", "rel L2", "cosine min", "top-1 agree", "verdict"):
            table.add_column(col)
        for r in result["runs"]:
            table.add_row(
                str(r["size"]),
                f"{r['max_abs']:.3g}",
                f"{r['rel_l2']:.3g}",
                f"{r['cosine_min']:.6f}",
                f"{r['top1_agreement']:.3f}",
                "pass" if r["passed"] else "FAIL: " + "; ".join(r["failures"]),
            )
        console = Console(width=140)
        console.print(table)
        if result["accuracy"]:
            a = result["accuracy"]
            torch_top1 = f"{a['torch_top1']:.4f}" if a["torch_top1"] is not None else f"not measured: {a['torch_note']}"
            console.print(
                f"top-1 on {a['source']}: artifact {a['artifact_top1']:.4f}, PyTorch {torch_top1} "
                f"({a['num_images']} images)"
            )
    return 0 if result["status"] == "pass" else 1
