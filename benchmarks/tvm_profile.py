"""Where a cpu-tvm artifact spends its time: wall time of every kernel call the Relax VM makes, grouped by kernel.

    python benchmarks/tvm_profile.py ARTIFACT_DIR [--threads 2] [--runs 5] [--top 25]

TVM 0.27's Relax VM has no per-op profiler in the wheel (`VirtualMachine(..., profile=True)` is gone), but it calls
an instrument hook before and after every packed function: the hook timestamps both sides. Kernels of the same
computation at different shapes (conv2d7, conv2d23, ...) stay separate rows; names ending in digits are the TIR
functions TVM generated, `selective_scan_2d_*` are ours (lowering/tvm_scan.py). The hook adds a few microseconds
per call, so the total is a little above the benchmark's latency.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's pool starts

    import tvm
    from tvm import relax

    from vmamba_export.runtime.tvm_backend import _read_params

    manifest = json.loads((args.artifact / "manifest.json").read_text())
    if manifest["target"]["name"] != "cpu-tvm":
        print(f"{args.artifact} is a {manifest['target']['name']} artifact; this profiles cpu-tvm", file=sys.stderr)
        return 2
    entry = manifest["entry"]
    dev = tvm.cpu(0)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(args.artifact / entry["model"])), dev)
    shape = tuple(manifest["lowering"]["input_shape"])
    x = tvm.runtime.tensor(np.random.default_rng(0).standard_normal((1, *shape[1:]), dtype=np.float32), dev)
    params = [tvm.runtime.tensor(p, dev) for p in _read_params(args.artifact, entry.get("params"))]
    for _ in range(3):
        vm["main"](x, *params)

    spent: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    started: dict[str, float] = {}

    def instrument(func, name, before_run, ret_value, *call_args) -> int:
        now = time.perf_counter()
        if before_run:
            started[name] = now
        elif name in started:
            spent[name] += now - started.pop(name)
            calls[name] += 1
        return 0  # VMInstrumentReturnKind.NO_OP: run the call as usual

    vm.set_instrument(instrument)
    t0 = time.perf_counter()
    for _ in range(args.runs):
        vm["main"](x, *params)
    total = (time.perf_counter() - t0) / args.runs * 1e3
    print(f"{args.artifact.name}: {total:.1f} ms per image ({args.threads} threads, {args.runs} runs, hook included)")
    rows = sorted(spent.items(), key=lambda kv: -kv[1])
    scan = sum(v for k, v in spent.items() if k.startswith("selective_scan")) / args.runs * 1e3
    print(f"{'ms':>8} {'share':>6} {'calls':>5}  kernel")
    for name, seconds in rows[: args.top]:
        ms = seconds / args.runs * 1e3
        print(f"{ms:8.2f} {100 * ms / total:5.1f}% {calls[name] // args.runs:5d}  {name}")
    print(f"scan kernels: {scan:.2f} ms ({100 * scan / total:.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
