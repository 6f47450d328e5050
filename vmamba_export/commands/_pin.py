"""`--expect-sha256 HEX`: pin an artifact's manifest (predict, validate, bench)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path


def sha256_hex(text: str) -> str:
    value = text.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise argparse.ArgumentTypeError(f"expected 64 hexadecimal digits (a sha256), got {text!r}")
    return value


def add_expect_sha256(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--expect-sha256",
        metavar="HEX",
        type=sha256_hex,
        help="refuse the artifact unless sha256(manifest.json) is HEX (the manifest hashes every other file, so "
        "this pins the whole artifact; pass HEX through a channel you trust)",
    )


def check_pin(folder: Path, expected: str | None) -> None:
    """Refuse the artifact unless its manifest has the expected sha256 (validate and bench: checked first, since they
    may rewrite the manifest when they record their results)."""
    if expected is not None:
        from ..artifact import read_manifest

        read_manifest(folder, expected_sha256=expected)
