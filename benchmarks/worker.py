"""The benchmarks' worker processes: each timing runs in a process of its own (runtimes' thread pools never share a
process: an idle pool spins). A benchmark script runs itself with `--worker SPEC_JSON` and prints its result as
one JSON object on the last line."""

from __future__ import annotations

import json
import subprocess
import sys


def run_in_worker(script: str, spec: dict) -> dict:
    """`python SCRIPT --worker SPEC_JSON` in its own process; the JSON object on the last line of its output."""
    proc = subprocess.run([sys.executable, script, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec} failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
