"""fp32 parity of every released config through the ONNX lowerings, at 224 and a second resolution.

    python benchmarks/parity_all_configs.py [--models ...] [--targets cpu-onnxruntime onnx-portable]
                                            [--sizes 224,193] [--images 4] [--out benchmarks/results/parity.md]

Random weights (seeded), the built-in photos, the PyTorch fp32 model with the scan in plain torch as reference;
thresholds of the targets (fp32: relative L2 <= 1e-5, 100% top-1 agreement). Slow on 2 cores (full-size models).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    from vmamba_export.exporter import export_artifact
    from vmamba_export.model_source import resolve_model
    from vmamba_export.models import RELEASED_MODELS
    from vmamba_export.targets import get_target
    from vmamba_export.validate import validate_artifact

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(RELEASED_MODELS))
    parser.add_argument("--targets", nargs="+", default=["cpu-onnxruntime", "onnx-portable"])
    parser.add_argument("--sizes", default="224,193", help="comma-separated input sides")
    parser.add_argument("--images", type=int, default=4, help="built-in photos per size")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="vmamba-parity-") as tmp:
        for name in args.models:
            source = resolve_model(name, random_weights=True)
            for target in args.targets:
                folder = Path(tmp) / f"{name}-{target}"
                t0 = time.perf_counter()
                export_artifact(source, get_target(target), folder)
                export_s = time.perf_counter() - t0
                result = validate_artifact(folder, sizes=sizes, limit=args.images, show_progress=False, record=False)
                for run in result["runs"]:
                    rows.append({"model": name, "target": target, "export_s": export_s, **run})
                    print(
                        f"{name:22s} {target:16s} {run['size']:4d}  rel L2 {run['rel_l2']:.2e}  max abs "
                        f"{run['max_abs']:.2e}  cos {run['cosine_min']:.7f}  top-1 {run['top1_agreement']:.2f}  "
                        f"{'pass' if run['passed'] else 'FAIL ' + '; '.join(run['failures'])}",
                        flush=True,
                    )
    lines = [
        f"fp32 parity vs PyTorch fp32 ({args.images} built-in photos per size, random weights seed 0)",
        "",
        "| model | target | size | rel L2 | max abs | cosine min | top-1 agree | pass |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['target']} | {r['size']} | {r['rel_l2']:.2e} | {r['max_abs']:.2e} | "
            f"{r['cosine_min']:.7f} | {r['top1_agreement']:.2f} | {'yes' if r['passed'] else 'NO'} |"
        )
    from vmamba_export.bench import write_results

    write_results(args.out, "\n".join(lines), rows)
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
