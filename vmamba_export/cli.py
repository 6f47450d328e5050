"""The `vmamba-export` command line. Each subcommand lives in vmamba_export/commands/<name>.py and exposes
`add_parser(subparsers)` and `run(args) -> int`; this module only wires them and turns errors into one line.

Exit status: 0 done; 1 the work ran and a check it makes failed (parity, accuracy); 2 an error, printed as one
`error: ...` line on stderr (a bad argument, a bad input, or an unexpected failure, whose line says so); 130
interrupted. With `--json` an error is also a JSON object `{"error": ..., "type": ...}` on stdout, unless the command
had already printed its own JSON result (which then carries the problem itself, e.g. `inspect`'s "error" field).
`--debug` (anywhere on the line) re-raises instead, showing the traceback.
"""

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


class UsageError(Exception):
    """argparse refused the command line (unknown flag, missing argument, invalid value)."""

    def __init__(self, message: str, prog: str):
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """argparse, but its errors raise UsageError (main prints one line) instead of printing usage and exiting.

    add_subparsers() creates subparsers of the parent's class, so every subcommand's parser behaves the same."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message, self.prog)


def make_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="vmamba-export",
        description="Export trained VMamba models to verified, measured edge artifacts.",
        epilog="exit status: 0 done, 1 a check failed (parity, accuracy), 2 error (one line), 130 interrupted",
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
    for command_parser in sub.choices.values():
        # SUPPRESS: a subcommand that was not given --debug must not reset the top-level --debug to False.
        command_parser.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback on errors"
        )
    return parser


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")


_json_printed = False  # whether the running command has already written its JSON result on stdout


def print_json(data) -> None:
    global _json_printed
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
    _json_printed = True


def one_line(text: str) -> str:
    """A message on one line: its lines joined with '; ' (an error is one line, whatever raised it)."""
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip()) or "(no message)"


def _words(argv: list[str]) -> list[str]:
    """The options on the line, up to a `--` separator (after it every word is a positional value)."""
    return argv[: argv.index("--")] if "--" in argv else argv


def _report(message: str, kind: str, as_json: bool) -> None:
    print(f"error: {message}", file=sys.stderr)
    if as_json and not _json_printed:
        print_json({"error": message, "type": kind})


def _unexpected(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.filename is not None:
        # A user path the system refused (permissions, a file where a folder is needed, a full disk, ...).
        where = f"{exc.filename} -> {exc.filename2}" if exc.filename2 is not None else str(exc.filename)
        what = f"{where}: {exc.strerror or type(exc).__name__}"
    else:
        what = f"{type(exc).__name__}: {exc}"
    return f"{one_line(what)} (unexpected; rerun with --debug for the traceback)"


def main(argv: list[str] | None = None) -> int:
    global _json_printed
    _json_printed = False
    argv = list(sys.argv[1:] if argv is None else argv)
    words = _words(argv)
    parser = make_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # named after the subcommand, whose --help lists what it takes
            raise UsageError(f"unrecognized arguments: {' '.join(extra)}", f"{parser.prog} {args.command}")
    except UsageError as exc:  # no traceback even with --debug: the line itself is the whole story
        _report(f"{one_line(str(exc))} (see {exc.prog} --help)", "usage", "--json" in words)
        return 2
    as_json = bool(getattr(args, "json", False))
    try:
        return int(args.func(args) or 0)
    except VMambaExportError as exc:
        if args.debug:
            raise
        _report(one_line(str(exc)), type(exc).__name__, as_json)
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
        if args.debug:
            raise
        _report("interrupted", "KeyboardInterrupt", as_json)
        return 130
    except Exception as exc:  # noqa: BLE001 - anything else is still one line; --debug shows where it came from
        if args.debug:
            raise
        _report(_unexpected(exc), type(exc).__name__, as_json)
        return 2


if __name__ == "__main__":
    sys.exit(main())
