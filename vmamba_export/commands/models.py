"""`vmamba-export models`: every config with parameters and GFLOPs at 224 (and at its own input size)."""

from __future__ import annotations

import argparse

from rich.console import Console

from ..cli import add_json_flag, print_json
from ._common import print_fitting_table


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list the model configs this tool knows")
    add_json_flag(p)
    p.set_defaults(func=run)


def describe_models() -> list[dict]:
    from ..models import DEFAULT_MODEL, list_configs
    from ..models.flops import count_flops, count_parameters

    rows = []
    for cfg in list_configs():
        rows.append(
            {
                "name": cfg.name,
                "version": cfg.version,
                "depths": list(cfg.depths),
                "dims": cfg.dims,
                "ssm_ratio": cfg.ssm_ratio,
                "d_state": cfg.d_state,
                "num_classes": cfg.num_classes,
                "params": count_parameters(cfg),
                "gflops_224": round(count_flops(cfg, 224) / 1e9, 3),
                "input_size": cfg.input.image_size,
                "published_top1": cfg.published_top1,
                "default": cfg.name == DEFAULT_MODEL,
                "description": cfg.description,
            }
        )
    return rows


def run(args: argparse.Namespace) -> int:
    rows = describe_models()
    if args.json:
        print_json(rows)
        return 0
    right = {"justify": "right"}
    # (header, column options, rank): rank 0 always shown; in a narrow terminal the highest ranks go first.
    columns = [
        ("name", {"no_wrap": True}, 0),  # what --model takes: never wrapped or cut
        ("ver", {}, 0),
        ("depths", {}, 3),
        ("dims", right, 2),
        ("ratio", right, 1),
        ("d_state", right, 0),
        ("classes", right, 0),
        ("params (M)", right, 0),
        ("GFLOPs @224", right, 0),
        ("top-1", right, 0),
    ]
    table_rows = [
        [
            r["name"] + ("*" if r["default"] else ""),
            r["version"],
            "-".join(map(str, r["depths"])),
            str(r["dims"]),
            f"{r['ssm_ratio']:g}",
            str(r["d_state"]),
            str(r["num_classes"]),
            f"{r['params'] / 1e6:.2f}",
            f"{r['gflops_224']:.2f}",
            "" if r["published_top1"] is None else f"{r['published_top1']:.1f}",
        ]
        for r in rows
    ]
    console = Console()
    print_fitting_table(console, "VMamba configs", columns, table_rows)
    console.print("* the default model (without --model or --checkpoint); every column: --json", highlight=False)
    return 0
