"""`vmamba-export models`: every config with its task, parameters and GFLOPs at 224 (segmenters: at their input
size, 512; --json has both)."""

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
                "task": cfg.task,
                "num_classes": cfg.num_classes,
                "params": count_parameters(cfg),
                "gflops_224": round(count_flops(cfg, 224) / 1e9, 3),
                "input_size": cfg.input.image_size,
                "gflops_input": round(count_flops(cfg, cfg.input.image_size) / 1e9, 3),
                "published_top1": cfg.published_top1,
                "default": cfg.name == DEFAULT_MODEL,
                "description": cfg.description,
            }
        )
    return rows


_TASK_SHORT = {"classification": "cls", "segmentation": "seg", "backbone": "backbone"}


def _gflops(r: dict) -> str:
    if r.get("task") == "segmentation" and r.get("gflops_input") is not None:
        return f"{r['gflops_input']:.0f}@{r['input_size']}"
    return f"{r['gflops_224']:.2f}"


def run(args: argparse.Namespace) -> int:
    rows = describe_models()
    if args.json:
        print_json(rows)
        return 0
    right = {"justify": "right"}
    # (header, column options, rank): rank 0 always shown; in a narrow terminal the highest ranks go first.
    columns = [
        ("name", {"no_wrap": True}, 0),  # what --model takes: never wrapped or cut
        ("task", {}, 0),
        ("ver", {}, 0),
        ("depths", {}, 3),
        ("dims", right, 2),
        ("ratio", right, 1),
        ("d_state", right, 4),
        ("classes", right, 0),
        ("params (M)", right, 0),
        ("GFLOPs", {"justify": "right", "no_wrap": True}, 0),
        ("top-1", right, 0),
    ]
    table_rows = [
        [
            r["name"] + ("*" if r["default"] else ""),
            _TASK_SHORT.get(r.get("task", "classification"), r.get("task", "")),
            r["version"],
            "-".join(map(str, r["depths"])),
            str(r["dims"]),
            f"{r['ssm_ratio']:g}",
            str(r["d_state"]),
            str(r["num_classes"]),
            f"{r['params'] / 1e6:.2f}",
            _gflops(r),
            "" if r["published_top1"] is None else f"{r['published_top1']:.1f}",
        ]
        for r in rows
    ]
    console = Console()
    print_fitting_table(console, "VMamba configs", columns, table_rows)
    console.print(
        "* the default model (without --model or --checkpoint); task: cls classification, seg segmentation (UperNet);"
        " GFLOPs at 224x224, segmenters at their input size (@512); every column: --json",
        highlight=False,
    )
    return 0
