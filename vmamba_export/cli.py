"""The `vmamba-export` command line. Each subcommand lives in vmamba_export/commands/<name>.py and exposes
`add_parser(subparsers)` and `run(args) -> int`; this module only wires them and turns errors into one line."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from .errors import VMambaExportError

# Modules of the builder side and of the optional image sources -> the extra that installs them: a command that needs
# one where it is missing (a runtime-only install) says so in one line instead of a traceback.
MISSING_EXTRA = {
    "torch": "export",
    "onnx": "export",
    "onnxscript": "export",
    "safetensors": "export",
    "sklearn": "data",
    "skimage": "data",
}

COMMANDS = ("models", "inspect", "targets", "export", "validate", "bench", "predict", "build")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmamba-export",
        description="Export trained VMamba models to verified, measured edge artifacts.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        try:
            module = importlib.import_module(f".commands.{name}", __package__)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.endswith(f"commands.{name}"):
                continue  # command not written yet
            raise
        module.add_parser(sub)
    return parser


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")


def print_json(data) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except VMambaExportError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        extra = MISSING_EXTRA.get((exc.name or "").partition(".")[0])
        if extra is None or args.debug:
            raise
        print(
            f"error: {args.command} needs the {extra} extra: pip install 'vmamba-export[{extra}]' "
            f"({exc.name} is not installed)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
