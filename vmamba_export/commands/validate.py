"""`vmamba-export validate DIR`: parity of an artifact with its PyTorch fp32 model on real images: by default against
the reference inputs and logits the artifact carries (no torch needed), or recomputed with PyTorch."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..cli import add_json_flag, print_json
from ._common import int_list, positive_int, thread_count
from ._pin import add_expect_sha256, check_pin
from ._record import add_record_args, check_results_file, finish, save_results


def add_parser(sub) -> None:
    p = sub.add_parser("validate", help="check an artifact's outputs against the PyTorch fp32 model")
    p.add_argument("artifact", type=Path, metavar="DIR", help="artifact folder (made by `vmamba-export export`)")
    p.add_argument(
        "--recompute",
        action="store_true",
        help="recompute the PyTorch reference (needs torch) instead of using the artifact's references; implied by "
        "--images, --sizes and --checkpoint",
    )
    p.add_argument(
        "--images", help="recompute on this image source: builtin, digits:holdout, a folder, list or .npz (builtin)"
    )
    p.add_argument("--limit", type=positive_int, metavar="N", help="use at most this many images")
    p.add_argument("--sizes", type=int_list, help="recompute at these input sides, comma-separated (the model's)")
    p.add_argument("--accuracy", metavar="SOURCE", help="also measure top-1 on this labelled source")
    p.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="recompute from the checkpoint file a checkpoint build came from (its sha256 must be the one the "
        "manifest records)",
    )
    p.add_argument(
        "--threads", type=thread_count, metavar="N", help="threads for the artifact's runtime (default: its own)"
    )
    add_expect_sha256(p)
    add_record_args(p, "parity results")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_pin(args.artifact, args.expect_sha256)  # before anything reads or rewrites the manifest
    from ..validate import validate_artifact

    check_results_file(args.out)
    result = validate_artifact(
        args.artifact,
        images=args.images,
        sizes=args.sizes,
        limit=args.limit,
        checkpoint=args.checkpoint,
        accuracy_source=args.accuracy,
        threads=args.threads,
        show_progress=not args.json,
        record=False,  # recorded below, only when asked, and a failed write must not lose the results
        recompute=args.recompute,
    )
    errors = save_results(args, "validation", result)
    if args.json:
        print_json(result | ({"error": "; ".join(errors)} if errors else {}))
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
    return finish(errors, 0 if result["status"] == "pass" else 1)
