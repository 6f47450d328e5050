"""Arguments shared by several subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..models import DEFAULT_MODEL


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(f"model (default: the bundled trained model {DEFAULT_MODEL})")
    g.add_argument("--model", metavar="NAME", help="config name (see `vmamba-export models`)")
    g.add_argument(
        "--checkpoint", metavar="PATH", help="weights file (.pth/.pt/.safetensors); config detected if no --model"
    )
    g.add_argument("--random-weights", action="store_true", help="seeded random weights (speed measurements only)")
    g.add_argument("--seed", type=int, default=0, help="seed for --random-weights (default 0)")
    g.add_argument(
        "--labels",
        metavar="FILE",
        type=Path,
        help="class labels, one per line (blank lines skipped); count must match the head (a fine-tune's classes)",
    )
    add_key_args(g)


def add_key_args(g) -> None:
    """--ignore-keys / --non-strict: which extra keys of a checkpoint may be left out."""
    g.add_argument(
        "--ignore-keys",
        action="append",
        default=[],
        metavar="PATTERN",
        help="leave out checkpoint keys matching this glob (e.g. 'aux_head.*'; repeatable)",
    )
    g.add_argument(
        "--non-strict",
        action="store_true",
        help="leave out checkpoint keys outside the model's modules; missing weights are still an error",
    )


def source_args(args: argparse.Namespace) -> dict:
    """resolve_model's keyword arguments from add_model_args' options."""
    return {
        "model_name": args.model,
        "checkpoint": args.checkpoint,
        "random_weights": args.random_weights,
        "seed": args.seed,
        "labels": args.labels,
        "ignore_keys": tuple(args.ignore_keys),
        "non_strict": args.non_strict,
    }


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values
