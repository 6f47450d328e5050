"""`vmamba-export build`: export, validate and benchmark one model for several targets; a combined report."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from ..cli import add_json_flag, print_json
from ._common import add_model_args, add_platform_arg, int_list


def add_parser(sub) -> None:
    p = sub.add_parser("build", help="export + validate + bench for several targets and precisions (what CI runs)")
    add_model_args(p)
    p.add_argument("--targets", nargs="+", help="target names (default: every target this machine can build)")
    p.add_argument("--precisions", nargs="+", help="precisions (default: every precision each target offers)")
    p.add_argument("--out", required=True, type=Path, help="folder for the artifacts and the combined report")
    p.add_argument("--images", default="builtin", help="parity image source (default: the built-in photos)")
    p.add_argument("--sizes", type=int_list, help="input sides for parity (default: the model's)")
    p.add_argument("--accuracy", metavar="SOURCE", help="labelled source for top-1 (bundled digits: digits:holdout)")
    p.add_argument("--calib", metavar="SOURCE", help="int8 calibration source (default: digits:calib or builtin)")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--batch", type=int_list, default=[1], help="benchmark batch sizes")
    p.add_argument("--threads", type=int_list, default=[2], help="benchmark thread counts")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--no-bench", action="store_true", help="skip the latency measurement")
    p.add_argument("--overwrite", action="store_true", help="replace existing artifact folders")
    p.add_argument("--fail-on-parity", action="store_true", help="exit 1 if any artifact fails parity (for CI)")
    add_platform_arg(p)
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..build import BuildPlan, build, default_targets, exit_status
    from ..model_source import resolve_model
    from ..targets import get_target

    targets = [get_target(t) for t in args.targets] if args.targets else default_targets()
    plan = BuildPlan(
        targets=targets,
        precisions=args.precisions,
        images=args.images,
        sizes=args.sizes,
        accuracy_source=args.accuracy,
        calib=args.calib,
        calib_samples=args.calib_samples,
        batches=args.batch,
        threads=args.threads,
        runs=args.runs,
        bench=not args.no_bench,
        platform=args.platform,
    )
    console = Console(stderr=True)
    with console.status("loading model", spinner="dots"):
        source = resolve_model(args.model, args.checkpoint, args.random_weights, args.seed)
    summary = build(source, plan, args.out, overwrite=args.overwrite, show_progress=not args.json)
    status = exit_status(summary, args.fail_on_parity)
    if args.json:
        print_json(summary)
    else:
        print((args.out / "report.md").read_text())
        console.print(f"artifacts and report in {args.out} (report.md, report.json, report.png)")
    return status
