"""`vmamba-export validate DIR`: parity of an artifact with its PyTorch fp32 model on real images: by default against
the reference inputs and logits the artifact carries (no torch needed), or recomputed with PyTorch."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..accuracy import RECORDED_AT_EXPORT
from ..cli import add_json_flag, print_json
from ._common import int_list, positive_int, print_fitting_table, thread_count
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
    p.add_argument(
        "--accuracy",
        metavar="SOURCE",
        help="also measure top-1 on this labelled source (a segmenter: mIoU and pixel accuracy on an image + mask "
        "folder, or shapes:holdout)",
    )
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
    elif result.get("task", "classification") != "classification":
        print_dense_result(Console(), args.artifact, result)
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
            if a.get("torch_from") == RECORDED_AT_EXPORT:
                torch_top1 += " (recorded at export)"
            console.print(
                f"top-1 on {a['source']}: artifact {a['artifact_top1']:.4f}, PyTorch {torch_top1} "
                f"({a['num_images']} images)"
            )
        for line in result.get("accuracy_failures") or []:
            console.print(f"FAIL: {line}", highlight=False)
    return finish(errors, 0 if result["status"] == "pass" else 1)


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _shapes(row: dict) -> str:
    """'5x64x64', or the first shape and how many others (images keeping their ratio differ in shape)."""
    shapes = row.get("shapes") or []
    if not shapes:
        return "-"
    first = "x".join(map(str, shapes[0]))
    return first + (f" +{len(shapes) - 1}" if len(shapes) > 1 else "")


def print_dense_result(console: Console, artifact: Path, result: dict) -> None:
    """One row per size and output (the optional columns give way in a narrow terminal; all are in --json), the
    failures below the table, then the labelled mIoU."""
    right = {"justify": "right"}
    columns = [
        ("size", right, 0),
        ("output", {"no_wrap": True}, 0),
        ("shape", {}, 4),
        ("max abs", right, 3),
        ("rel L2", right, 0),
        ("cos min", right, 0),
        ("pixel agree", right, 1),
        ("mIoU vs torch", right, 2),
        ("verdict", {}, 0),
    ]
    rows, failures = [], []
    for run in result["runs"]:
        for out in run["outputs"]:
            failed = [f for f in run["failures"] if f.startswith(f"{out['name']}: ")]
            rows.append(
                [
                    str(run["size"]),
                    out["name"],
                    _shapes(out),
                    _num(out.get("max_abs"), ".3g"),
                    _num(out.get("rel_l2"), ".3g"),
                    _num(out.get("cosine_min"), ".6f"),
                    _num(out.get("pixel_agreement"), ".4f"),
                    _num(out.get("miou_vs_torch"), ".4f"),
                    "FAIL" if failed else "pass",
                ]
            )
            failures += [f"size {run['size']}: {f}" for f in failed]
    title = f"{result['task']} parity of {artifact} ({result['num_images']} images from {result['images']})"
    print_fitting_table(console, title, columns, rows)
    for line in failures + (result.get("accuracy_failures") or []):
        console.print(f"FAIL: {line}", highlight=False, soft_wrap=True)
    a = result.get("accuracy")
    if a:
        if a["torch_miou"] is not None:
            torch = f"PyTorch {a['torch_miou']:.4f} (pixel acc {a['torch_pixel_accuracy']:.4f}), "
            torch += f"drop {a['drop_points']:.2f} points"
            if a.get("torch_from") == RECORDED_AT_EXPORT:
                torch += " (PyTorch's mIoU recorded at export for these images)"
        else:
            torch = f"PyTorch not measured: {a['torch_note']}"
        console.print(
            f"mIoU on {a['source']} ({a['num_images']} images): artifact {a['artifact_miou']:.4f} "
            f"(pixel acc {a['artifact_pixel_accuracy']:.4f}), {torch}",
            highlight=False,
            soft_wrap=True,
        )
