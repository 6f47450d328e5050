"""Arguments shared by several subcommands, and argument types that refuse bad values at parse time.

A type that raises argparse.ArgumentTypeError gets its message printed as `error: argument --FLAG: MESSAGE`
(cli.Parser), so every message here says what was expected and repeats the value given."""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

# models.configs.DEFAULT_MODEL, spelled out: importing vmamba_export.models imports torch, and building the parser
# (every command's --help) must not (tests/test_runtime_only.py checks the two agree).
DEFAULT_MODEL = "vmamba_digits_v2"

MAX_THREADS = 1024  # more threads than any machine here has cores; a typo like 20000 should not spawn them
MAX_SEED = 2**63 - 1  # torch.manual_seed's range (non-negative half)


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(f"model (default: the bundled trained model {DEFAULT_MODEL})")
    g.add_argument("--model", metavar="NAME", help="config name (see `vmamba-export models`)")
    # Weights come from a checkpoint or are random, never both: argparse refuses the pair in one line.
    weights = g.add_mutually_exclusive_group()
    weights.add_argument(
        "--checkpoint", metavar="PATH", help="weights file (.pth/.pt/.safetensors); config detected if no --model"
    )
    weights.add_argument(
        "--random-weights", action="store_true", help="seeded random weights (speed measurements only)"
    )
    g.add_argument(
        "--seed", type=int_range(0, MAX_SEED), default=0, metavar="N", help="seed for --random-weights (default 0)"
    )

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


def int_range(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [minimum, maximum]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            wanted = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
            raise argparse.ArgumentTypeError(f"expected an integer {wanted}, got {text!r}")
        return value

    parse.__name__ = "integer"
    return parse


positive_int = int_range(1)
non_negative_int = int_range(0)
thread_count = int_range(1, MAX_THREADS)


def float_range(minimum: float, maximum: float | None = None, *, above: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number >= minimum (> minimum with above=True) and <= maximum."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        low_ok = value > minimum if above else value >= minimum
        if not math.isfinite(value) or not low_ok or (maximum is not None and value > maximum):
            low = f"> {minimum:g}" if above else f">= {minimum:g}"
            wanted = low if maximum is None else f"{low} and <= {maximum:g}"
            raise argparse.ArgumentTypeError(f"expected a finite number {wanted}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def thread_list(text: str) -> list[int]:
    values = int_list(text)
    if any(v > MAX_THREADS for v in values):
        raise argparse.ArgumentTypeError(f"expected thread counts from 1 to {MAX_THREADS}, got {text!r}")
    return values


def out_folder(text: str) -> Path:
    """An argparse type for --out: a folder we could create. Refused here, before any work: a path under a file, or
    under a folder this process cannot write in. Whether an existing `text` may be replaced is the exporter's call."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a folder path, got an empty string")
    path = Path(text)
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is under {str(parent)!r}, which is a file, not a folder")
    # os.access says yes to root on read-only mounts and pseudo file systems: try creating a folder instead.
    try:
        probe = tempfile.mkdtemp(prefix=".vmamba-export-probe-", dir=parent)
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise argparse.ArgumentTypeError(f"cannot create {text!r}: cannot write in {str(parent)!r} ({why})") from None
    os.rmdir(probe)
    return path


def print_fitting_table(
    console: Console,
    title: str,
    columns: list[tuple[str, dict, int]],
    rows: list[list[str]],
) -> None:
    """Print a table in the console's width: while it is too wide, leave out the optional column with the highest
    rank (rank 0: always shown). Columns that hold names a user types are no_wrap, so they are never cut; the
    optional ones are all in the command's --json output."""
    shown = list(range(len(columns)))
    while True:
        table = Table(title=title)
        for i in shown:
            header, kwargs, _ = columns[i]
            table.add_column(header, **kwargs)
        for row in rows:
            table.add_row(*(row[i] for i in shown))
        optional = [i for i in shown if columns[i][2] > 0]
        natural = console.measure(table, options=console.options.update(max_width=10_000)).maximum
        if natural <= console.width or not optional:
            break
        shown.remove(max(optional, key=lambda i: columns[i][2]))
    console.print(table)


def add_platform_arg(p: argparse.ArgumentParser) -> None:
    from ..platforms import PLATFORMS, host_platform

    p.add_argument(
        "--platform",
        choices=sorted(PLATFORMS),
        help=f"platform the artifacts are built for (default: this machine, {host_platform()}); another one is "
        "cross-built (docs/platforms.md)",
    )
