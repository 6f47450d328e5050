"""`vmamba-export export`: one artifact for one model, target and precision."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from ..cli import add_json_flag, print_json
from ._common import add_model_args


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a model to an artifact folder for one target")
    add_model_args(p)
    p.add_argument("--target", required=True, help="target name (see `vmamba-export targets`)")
    p.add_argument("--precision", default="fp32", help="fp32 (default), or what the target offers")
    p.add_argument("--out", required=True, type=Path, help="artifact folder to create")
    p.add_argument("--max-size", type=int, help="largest input side the artifact must take (target default)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing artifact folder")
    p.add_argument("--validate", action="store_true", help="also validate parity on the built-in photos")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..exporter import export_artifact
    from ..model_source import resolve_model
    from ..targets import get_target

    console = Console(stderr=True)
    target = get_target(args.target)
    with console.status(f"loading {args.checkpoint or args.model or 'default model'}", spinner="dots"):
        source = resolve_model(args.model, args.checkpoint, args.random_weights, args.seed)
    with console.status(f"exporting {source.model.config.name} for {target.name} ({args.precision})", spinner="dots"):
        manifest = export_artifact(source, target, args.out, args.precision, args.max_size, args.overwrite)
    status = 0
    if args.validate:
        from ..validate import validate_artifact

        manifest["validation"] = validate_artifact(args.out, show_progress=not args.json)
        status = 0 if manifest["validation"]["status"] == "pass" else 1
    if args.json:
        print_json({"artifact": str(args.out), "manifest": manifest})
    else:
        lw = manifest["lowering"]
        console.print(
            f"[green]wrote[/green] {args.out}: {lw['nodes']} ONNX nodes, {lw['scan_nodes']} scan nodes, "
            f"inputs {manifest['input']['min_size']}..{manifest['input']['max_size']} px"
        )
        if manifest.get("validation"):
            console.print(f"parity: {manifest['validation']['status']}")
    return status
