"""`vmamba-export models`: every config with parameters and GFLOPs at 224 (and at its own input size)."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from ..cli import add_json_flag, print_json


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
    table = Table(title="VMamba configs")
    for col in ("name", "ver", "depths", "dims", "ratio", "d_state", "classes", "params (M)", "GFLOPs@224", "top-1"):
        table.add_column(col, justify="right" if col not in ("name", "ver", "depths") else "left")
    for r in rows:
        name = r["name"] + (" (default)" if r["default"] else "")
        table.add_row(
            name,
            r["version"],
            "-".join(map(str, r["depths"])),
            str(r["dims"]),
            f"{r['ssm_ratio']:g}",
            str(r["d_state"]),
            str(r["num_classes"]),
            f"{r['params'] / 1e6:.2f}",
            f"{r['gflops_224']:.2f}",
            "" if r["published_top1"] is None else f"{r['published_top1']:.1f}",
        )
    Console().print(table)
    return 0
