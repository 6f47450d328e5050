"""`vmamba-export targets`: which targets this machine can build and which it can run."""

from __future__ import annotations

import argparse

from rich.console import Console

from ..cli import add_json_flag, print_json
from ..targets import list_targets
from ._common import print_fitting_table


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
    # Names a user types (target, precisions) are never cut: the target column does not wrap, precisions wrap only
    # between names; the reasons for a "no" go below the table, where a line can wrap between words.
    columns = [
        ("target", {"no_wrap": True}, 0),
        ("runtime", {}, 0),
        ("device", {}, 0),
        ("scan", {}, 1),
        ("precisions", {}, 0),
        ("build", {}, 0),
        ("run", {}, 0),
    ]
    table_rows = [
        [
            r["name"],
            r["runtime"],
            r["device"],
            r["scan_lowering"],
            " ".join(r["precisions"]),
            "yes" if r["can_build"] else "no",
            "yes" if r["can_run"] else "no",
        ]
        for r in rows
    ]
    console = Console()
    print_fitting_table(console, "targets (build, run: on this machine)", columns, table_rows)
    for r in rows:
        for ok, what, note in (
            (r["can_build"], "cannot build here", "build_note"),
            (r["can_run"], "cannot run here", "run_note"),
        ):
            if not ok:
                console.print(f"{r['name']} {what}: {r[note]}", markup=False, highlight=False)
    return 0
