"""Arguments shared by several subcommands."""

from __future__ import annotations

import argparse

# models.configs.DEFAULT_MODEL, spelled out: importing vmamba_export.models imports torch, and building the parser
# (every command's --help) must not (tests/test_runtime_only.py checks the two agree).
DEFAULT_MODEL = "vmamba_digits_v2"


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(f"model (default: the bundled trained model {DEFAULT_MODEL})")
    g.add_argument("--model", metavar="NAME", help="config name (see `vmamba-export models`)")
    g.add_argument(
        "--checkpoint", metavar="PATH", help="weights file (.pth/.pt/.safetensors); config detected if no --model"
    )
    g.add_argument("--random-weights", action="store_true", help="seeded random weights (speed measurements only)")
    g.add_argument("--seed", type=int, default=0, help="seed for --random-weights (default 0)")


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_platform_arg(p: argparse.ArgumentParser) -> None:
    from ..platforms import PLATFORMS, host_platform

    p.add_argument(
        "--platform",
        choices=sorted(PLATFORMS),
        help=f"platform the artifacts are built for (default: this machine, {host_platform()}); another one is "
        "cross-built (docs/platforms.md)",
    )
