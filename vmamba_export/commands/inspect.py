"""`vmamba-export inspect CHECKPOINT`: what a checkpoint file holds, which config it is, and whether it loads."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..cli import add_json_flag, print_json
from ..errors import CheckpointError
from ._common import add_key_args


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="identify a checkpoint's config and check that it loads (nothing is executed)")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help=".pth/.pt/.bin/.safetensors file")
    p.add_argument("--model", metavar="NAME", default=None, help="check against this config instead of detecting one")
    p.add_argument(
        "--key",
        default=None,
        metavar="NAME",
        help="dict entry holding the weights (default: model, model_ema, state_dict)",
    )
    p.add_argument(
        "--task",
        choices=("classification", "backbone", "segmentation"),
        default=None,
        help="check the load for this task (default: the file's: decode_head keys segmentation, backbone.* keys "
        "backbone, else classification)",
    )
    p.add_argument(
        "--labels", metavar="FILE", type=Path, help="class labels, one per line: checked against the head's class count"
    )
    add_key_args(p)
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
        task = r.get("task") or "classification"
        if task == "backbone":
            table.add_row("config", escape(f"{r['config']} (backbone: four feature maps, strides 4-32)"))
        else:
            classes = f"{r['num_classes']} classes" + (" (replaced head: fine-tune)" if r["head_replaced"] else "")
            if task == "segmentation":
                classes += f", UPerHead width {r['head_channels']}"
            table.add_row("config", escape(f"{r['config']} ({classes})"))
        table.add_row("task", task)
        table.add_row("params", f"{r['params']:,} ({r['params'] / 1e6:.2f}M)")
        dropped = r.get("task_dropped_keys") or {"count": 0}
        if dropped["count"]:
            modules = ", ".join(f"{m} {n}" for m, n in dropped["by_module"].items())
            table.add_row("dropped", escape(f"{dropped['count']} keys the {task} model does not use ({modules})"))
        if r.get("out_norms") == "initialised":
            table.add_row("out-norms", "[yellow]initialised[/yellow] (not in the file: weight 1, bias 0 / BN defaults)")
        labels = r["labels"]
        if task == "backbone":
            pass  # feature maps: no classes to name
        elif labels is None:
            known = "[yellow]unknown[/yellow]: classes numbered class_0, class_1, ... (export with --labels FILE)"
            table.add_row("labels", known)
        else:
            shown = ", ".join(labels[:5]) + (", ..." if len(labels) > 5 else "")
            table.add_row("labels", escape(f"known ({shown})"))
        for field, what in (("ignored_keys", "by --ignore-keys"), ("dropped_unexpected_keys", "by --non-strict")):
            if r[field]["count"]:
                examples = ", ".join(r[field]["examples"][:3]) + (", ..." if r[field]["count"] > 3 else "")
                table.add_row("left out", escape(f"{r[field]['count']} keys {what} ({examples})"))
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

    labels = None
    if args.labels is not None:
        from ..model_source import read_labels

        labels = read_labels(args.labels)
    report = inspect_checkpoint(
        args.checkpoint,
        name=args.model,
        key=args.key,
        ignore_keys=tuple(args.ignore_keys),
        drop_unexpected=args.non_strict,
        labels=labels,
        task=args.task,
    )
    if args.json:
        print_json(report)
    else:
        _print_report(report, args.model)
    if not report["loadable"]:
        raise CheckpointError(report["error"])  # cli.main prints it as one `error:` line, exit 2
    return 0
