"""`vmamba-export bench DIR`: latency, throughput and peak memory of an artifact."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..cli import add_json_flag, print_json
from ._common import int_list, non_negative_int, positive_int, thread_list
from ._pin import add_expect_sha256, check_pin
from ._record import add_record_args, check_results_file, finish, save_results


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure an artifact's latency and throughput")
    p.add_argument("artifact", type=Path, metavar="DIR", help="artifact folder (made by `vmamba-export export`)")
    p.add_argument("--batch", type=int_list, default=[1], help="batch sizes, comma-separated (default 1)")
    p.add_argument("--threads", type=thread_list, help="thread counts, comma-separated (default 2)")
    p.add_argument("--sizes", type=int_list, help="input sides, comma-separated (default: the model's)")
    p.add_argument(
        "--warmup", type=non_negative_int, default=5, metavar="N", help="untimed calls before timing (default 5)"
    )
    p.add_argument("--runs", type=positive_int, default=20, metavar="N", help="timed calls per point (default 20)")
    add_expect_sha256(p)
    add_record_args(p, "latency results")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_pin(args.artifact, args.expect_sha256)  # before anything reads or rewrites the manifest
    from ..bench import bench_artifact

    check_results_file(args.out)
    result = bench_artifact(
        args.artifact,
        args.batch,
        args.threads,
        args.sizes,
        args.warmup,
        args.runs,
        show_progress=not args.json,
        record=False,  # recorded below, only when asked, and a failed write must not lose the results
    )
    errors = save_results(args, "benchmark", result)
    if args.json:
        print_json(result | ({"error": "; ".join(errors)} if errors else {}))
        return finish(errors, 0)
    table = Table(title=f"latency of {args.artifact} ({result['machine']})")
    graphs = any("cuda_graph" in r for r in result["results"])  # cuda-onnxruntime: with and without CUDA graphs
    columns = ["batch", "threads", "size", "median ms", "p90 ms", "images/s"]
    columns += ["graph median ms", "graph p90 ms", "graph images/s"] if graphs else []
    for col in (*columns, "predictor us", "peak RSS MB"):
        table.add_column(col, justify="right")
    for r in result["results"]:
        cells = [str(r["batch"]), str(r["threads"]), str(r["size"])]
        for stats in (r, r.get("cuda_graph")) if graphs else (r,):
            cells += [f"{stats['median_ms']:.2f}", f"{stats['p90_ms']:.2f}", f"{stats['throughput']:.1f}"]
        table.add_row(*cells, f"{r['predictor_overhead_us']:.0f}", f"{r['peak_rss_mb']:.0f}")
    Console(width=140).print(table)
    return finish(errors, 0)
