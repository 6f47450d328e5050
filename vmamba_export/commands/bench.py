"""`vmamba-export bench DIR`: latency, throughput and peak memory of an artifact."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..cli import add_json_flag, print_json
from ._common import int_list


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure an artifact's latency and throughput")
    p.add_argument("artifact", type=Path)
    p.add_argument("--batch", type=int_list, default=[1], help="batch sizes, comma-separated (default 1)")
    p.add_argument("--threads", type=int_list, help="thread counts, comma-separated (default 2)")
    p.add_argument("--sizes", type=int_list, help="input sides (default: the model's)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--runs", type=int, default=20)
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..bench import bench_artifact

    result = bench_artifact(
        args.artifact, args.batch, args.threads, args.sizes, args.warmup, args.runs, show_progress=not args.json
    )
    if args.json:
        print_json(result)
        return 0
    table = Table(title=f"latency of {args.artifact} ({result['machine']})")
    graphs = any("cuda_graph" in r for r in result["results"])  # cuda-onnxruntime: with and without CUDA graphs
    columns = ["batch", "threads", "size", "median ms", "p90 ms", "images/s"]
    columns += ["graph median ms", "graph p90 ms", "graph images/s"] if graphs else []
    for col in (*columns, "peak RSS MB"):
        table.add_column(col, justify="right")
    for r in result["results"]:
        cells = [str(r["batch"]), str(r["threads"]), str(r["size"])]
        for stats in (r, r.get("cuda_graph")) if graphs else (r,):
            cells += [f"{stats['median_ms']:.2f}", f"{stats['p90_ms']:.2f}", f"{stats['throughput']:.1f}"]
        table.add_row(*cells, f"{r['peak_rss_mb']:.0f}")
    Console(width=140).print(table)
    return 0
