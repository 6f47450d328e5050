"""`vmamba-export inspect CHECKPOINT`: what a checkpoint file holds, which config it is, and whether it loads."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..cli import add_json_flag, print_json
from ..errors import CheckpointError


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="identify a checkpoint's config and check that it loads (nothing is executed)")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help=".pth/.pt/.bin/.safetensors file")
    p.add_argument("--model", metavar="NAME", default=None, help="check against this config instead of detecting one")
    p.add_argument("--key", default=None, help="dict entry holding the weights (default: model, model_ema, state_dict)")
    add_json_flag(p)
    p.set_defaults(func=run)


def _print_report(r: dict, model: str | None) -> None:
    table = Table(title=escape(f"checkpoint {r['path']}"), show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    fmt = r["format"] + (f", weights under {r['wrapper']!r}" if r["wrapper"] else ", bare state dict")
    if r["stripped_prefix"]:
        fmt += f", prefix {r['stripped_prefix']!r} stripped"
    table.add_row("format", escape(fmt))
    table.add_row("sha256", r["sha256"])
    table.add_row("size", f"{r['file_size'] / 2**20:.1f} MiB")
    dtypes = ", ".join(f"{n} {d}" for d, n in r["dtypes"].items())
    table.add_row("tensors", f"{r['tensors']} ({r['elements']:,} values; {dtypes})")
    table.add_row("key names", "v0 legacy (renamed on load)" if r["legacy_names"] else "current")
    if r["loadable"]:
        classes = f"{r['num_classes']} classes" + (" (replaced head: fine-tune)" if r["head_replaced"] else "")
        table.add_row("config", escape(f"{r['config']} ({classes})"))
        table.add_row("params", f"{r['params']:,} ({r['params'] / 1e6:.2f}M)")
    else:
        table.add_row("config", f"[red]does not fit {escape(model)}[/red]" if model else "[red]none fits[/red]")
    table.add_row("loadable", "yes" if r["loadable"] else "[red]no[/red]")
    for problem in r["problems"]:
        table.add_row("problem", f"[yellow]{escape(problem)}[/yellow]")
    if not r["problems"]:
        table.add_row("problems", "none")
    Console(soft_wrap=False).print(table)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import inspect_checkpoint

    report = inspect_checkpoint(args.checkpoint, name=args.model, key=args.key)
    if args.json:
        print_json(report)
    else:
        _print_report(report, args.model)
    if not report["loadable"]:
        raise CheckpointError(report["error"])  # cli.main prints it as one `error:` line, exit 2
    return 0
