"""apple-coreml check without a Mac: build .mlpackage artifacts, evaluate them with the numpy MIL evaluator.

Per (model, precision): package size, MIL op counts (total, per scan block, quantize/dequantize), parity against
the PyTorch fp32 model on builtin photos (fp32/fp16) and held-out digits top-1 against PyTorch fp32 (w8/w8a8 on the
bundled models). Nothing here runs Core ML: the numbers are those of the saved MIL program executed by
vmamba_export/coreml_eval.py. Each (model, precision) runs in its own process, so one large program's memory is
given back before the next.

    python benchmarks/coreml_check.py                       # everything below, into benchmarks/results/coreml.md
    python benchmarks/coreml_check.py --models vmamba_digits_v2 --precisions w8 w8a8 --out ''
    python benchmarks/coreml_check.py --models vmamba_tiny_s1l8 --images 2 --out ''
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VMAMBA_COREML_EVALUATOR", "numpy")

RESULTS = Path(__file__).resolve().parent / "results" / "coreml.md"
DEFAULT_MODELS = ["vmamba_digits_v2", "vmamba_digits_v0", "vmamba_tiny_s1l8", "vanilla_vmamba_tiny"]
BUNDLED_PRECISIONS = ["fp32", "fp16", "w8", "w8a8"]
RANDOM_PRECISIONS = ["fp32", "fp16"]  # random weights: no accuracy to keep, so no quantised programs
PER_BLOCK_OPS = ("cumsum", "exp", "matmul", "softplus", "quantize", "dequantize", "while_loop")


def check(name: str, precision: str, images: int, root: Path, calib_samples: int) -> dict:
    """Export one artifact, validate it through the numpy evaluator; the row of the results tables."""
    from vmamba_export.coreml_eval import package_bytes
    from vmamba_export.exporter import export_artifact
    from vmamba_export.lowering import ExportOptions
    from vmamba_export.model_source import bundled_names, resolve_model
    from vmamba_export.targets import get_target
    from vmamba_export.validate import validate_artifact

    bundled = name in bundled_names()
    source = resolve_model(name, random_weights=not bundled, seed=1)
    out = root / f"{name}-{precision}"
    # Digits models calibrate on the digits calibration split (never the holdout); others on the builtin photos.
    calib = "digits:calib" if bundled else "builtin"
    options = ExportOptions(calib=calib, calib_samples=calib_samples, extra={"show_progress": False})
    t0 = time.perf_counter()
    manifest = export_artifact(source, get_target("apple-coreml"), out, precision, options=options)
    export_s = time.perf_counter() - t0
    low = manifest["lowering"]
    ops = low["mil_ops"]
    blocks = low["scan_blocks"]
    row: dict = {
        "model": name,
        "weights": "trained (bundled)" if bundled else "random (seed 1)",
        "precision": precision,
        "export_s": round(export_s, 1),
        "mlpackage_MB": round(package_bytes(out / "model.mlpackage") / 1e6, 3),
        "mil_ops": ops,
        "mil_ops_total": low["mil_ops_total"],
        "mil_ops_non_const": low["mil_ops_total"] - ops.get("const", 0),
        "scan_blocks": blocks,
        "ops_per_block": {op: ops.get(op, 0) / blocks for op in PER_BLOCK_OPS},
        "chunk": low["scan_chunk"],
        "intra_chunk": low["scan_intra_chunk"],
    }
    q = low.get("quantization")
    if q:
        row["quantization"] = {
            "tool": q["tool"],
            "method": q["method"],
            "calibration": q["calibration"],
            "quantized_layers": len(q["quantized_layers"]),
            "float_layers": list(q["float_layers"]),
        }
    accuracy = "digits:holdout" if bundled and precision in ("w8", "w8a8") else None
    t0 = time.perf_counter()
    v = validate_artifact(out, images="builtin", limit=images, show_progress=False, accuracy_source=accuracy)
    row["validate_s"] = round(time.perf_counter() - t0, 1)
    run = v["runs"][0]
    row.update(
        size=run["size"],
        images=run["num_images"],
        rel_l2=run["rel_l2"],
        cosine_min=run["cosine_min"],
        top1_agreement=run["top1_agreement"],
        status=v["status"],
        failures=run["failures"] + v["accuracy_failures"],
        evaluated_with=v["evaluated_with"],
    )
    if v["accuracy"]:
        row["accuracy"] = {k: v["accuracy"][k] for k in ("num_images", "torch_top1", "artifact_top1", "drop_points")}
    return row


def render(rows: list[dict], command: str) -> str:
    from vmamba_export.bench import machine_description

    lines = [
        "# apple-coreml: numpy MIL evaluator figures",
        "",
        "Nothing here ran on Apple hardware: every artifact output below is the saved `.mlpackage`'s MIL program "
        "executed op by op by `vmamba_export/coreml_eval.py` (each op rounded to the dtype the program declares). "
        "References are the PyTorch fp32 models with the scan in plain torch.",
        "",
        f"Command: `{command}`; machine: {machine_description()}.",
        "",
        "## Parity against PyTorch fp32 (builtin photos)",
        "",
        "| model | weights | precision | side | images | rel L2 | min cosine | top-1 agreement | status | "
        ".mlpackage MB | export s | validate s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['weights']} | {r['precision']} | {r['size']} | {r['images']} | {r['rel_l2']:.2e} | "
            f"{r['cosine_min']:.6f} | {r['top1_agreement']:.2f} | {r['status']} | {r['mlpackage_MB']:.3f} | "
            f"{r['export_s']:.0f} | {r['validate_s']:.0f} |"
        )
    acc = [r for r in rows if r.get("accuracy")]
    if acc:
        lines += [
            "",
            "## Held-out top-1 (digits:holdout) of the quantised programs",
            "",
            "Budget: at most 1 point below PyTorch fp32. Calibration on `digits:calib` (disjoint from the holdout).",
            "",
            "| model | precision | images | PyTorch fp32 top-1 | artifact top-1 | drop (points) | quantised layers | "
            "calibration |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in acc:
            a, q = r["accuracy"], r.get("quantization") or {}
            cal = q.get("calibration") or {}
            calib = f"{cal['samples']} from `{cal['source']}`, {q['method']}" if cal.get("samples") else q.get("method")
            lines.append(
                f"| {r['model']} | {r['precision']} | {a['num_images']} | {100 * a['torch_top1']:.2f} | "
                f"{100 * a['artifact_top1']:.2f} | {a['drop_points']:.2f} | {q.get('quantized_layers', '-')} | "
                f"{calib} |"
            )
    lines += [
        "",
        "## MIL program size",
        "",
        "Ops of the main function (nested blocks included; `const` excluded from non-const), and per scan block "
        "(totals divided by the number of VSS blocks). No `while_loop` anywhere: the scan is the chunked composite.",
        "",
        "| model | precision | blocks | ops | non-const ops | non-const / block | "
        + " | ".join(f"{op} / block" for op in PER_BLOCK_OPS)
        + " |",
        "|---|---|---|---|---|---|" + "---|" * len(PER_BLOCK_OPS),
    ]
    for r in rows:
        per = r["ops_per_block"]
        lines.append(
            f"| {r['model']} | {r['precision']} | {r['scan_blocks']} | {r['mil_ops_total']} | {r['mil_ops_non_const']} "
            f"| {r['mil_ops_non_const'] / r['scan_blocks']:.1f} | "
            + " | ".join(f"{per[op]:g}" for op in PER_BLOCK_OPS)
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--precisions", nargs="+", help="default: fp32 fp16 w8 w8a8 (bundled), fp32 fp16 (others)")
    parser.add_argument("--images", type=int, default=2, help="builtin photos for parity")
    parser.add_argument(
        "--images-for",
        nargs="*",
        default=[],
        metavar="MODEL=N",
        help="another photo count for one model (e.g. vanilla_vmamba_tiny=1 where the evaluator is slow)",
    )
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--keep", type=Path, help="keep the artifacts here")
    parser.add_argument("--out", default=str(RESULTS), help="results .md (and .json beside it); '' prints only")
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "PRECISION", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:  # one (model, precision) in this process; the row is the last stdout line
        name, precision, root = args.worker
        print(json.dumps(check(name, precision, args.images, Path(root), args.calib_samples)), flush=True)
        return

    from vmamba_export.bench import write_results
    from vmamba_export.model_source import bundled_names

    images_for = dict(item.split("=", 1) for item in args.images_for)
    print("NOTE: nothing here runs on Apple hardware; outputs come from the numpy MIL evaluator.", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        for name in args.models:
            default = BUNDLED_PRECISIONS if name in bundled_names() else RANDOM_PRECISIONS
            for precision in args.precisions or default:
                images = int(images_for.get(name, args.images))
                cmd = [sys.executable, __file__, "--images", str(images), "--calib-samples", str(args.calib_samples)]
                proc = subprocess.run(
                    [*cmd, "--worker", name, precision, str(root)], capture_output=True, text=True, check=False
                )
                if proc.returncode != 0:
                    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                    print(f"{name} {precision}: FAILED: {tail}", flush=True)
                    rows.append({"model": name, "precision": precision, "error": tail})
                    continue
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                print(json.dumps({k: row[k] for k in row if k not in ("mil_ops", "evaluated_with")}), flush=True)
                rows.append(row)
    ok = [r for r in rows if "error" not in r]
    command = shlex.join(["python", "benchmarks/coreml_check.py", *sys.argv[1:]])
    table = render(ok, command)
    failed = [r for r in rows if "error" in r]
    if failed:
        table += "\n\n## Failed\n\n" + "\n".join(f"- {r['model']} {r['precision']}: {r['error']}" for r in failed)
    write_results(Path(args.out) if args.out else None, table, rows)


if __name__ == "__main__":
    main()
