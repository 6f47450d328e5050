"""`vmamba-export targets`: which targets this machine can build and which it can run."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from ..cli import add_json_flag, print_json
from ..targets import list_targets


def add_parser(sub) -> None:
    p = sub.add_parser("targets", help="list targets and whether this machine can build and run them")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    rows = []
    for t in list_targets():
        can_build, build_why = t.can_build()
        can_run, run_why = t.can_run()
        rows.append(
            {
                "name": t.name,
                "runtime": t.runtime,
                "device": t.device,
                "scan_lowering": t.scan_lowering,
                "precisions": list(t.precisions),
                "can_build": can_build,
                "build_note": build_why,
                "can_run": can_run,
                "run_note": run_why,
                "description": t.description,
            }
        )
    if args.json:
        print_json(rows)
        return 0
    table = Table(title="targets")
    for col in ("target", "runtime", "device", "scan", "precisions", "build here", "run here"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["name"],
            r["runtime"],
            r["device"],
            r["scan_lowering"],
            ",".join(r["precisions"]),
            "yes" if r["can_build"] else f"no: {r['build_note']}",
            "yes" if r["can_run"] else f"no: {r['run_note']}",
        )
    Console(width=160).print(table)
    return 0
