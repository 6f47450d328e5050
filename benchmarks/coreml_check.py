"""apple-coreml check without a Mac: build .mlpackage artifacts, evaluate them with the numpy MIL evaluator.

Prints, per (model, precision): package size, MIL op counts (total, per scan block, scan-related ops, while_loop),
parity against PyTorch fp32 on builtin photos (fp32/fp16) and held-out digits accuracy (w8/w8a8 on bundled models).
Nothing here runs Core ML: the numbers are those of the saved MIL program executed by vmamba_export/coreml_eval.py.

    python benchmarks/coreml_check.py --models vmamba_digits_v2 --precisions fp32 fp16 w8 w8a8
    python benchmarks/coreml_check.py --models vmamba_tiny_s1l8 vanilla_vmamba_tiny --precisions fp32 fp16 --images 2
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VMAMBA_COREML_EVALUATOR", "numpy")

from vmamba_export.coreml_eval import package_bytes  # noqa: E402
from vmamba_export.exporter import export_artifact  # noqa: E402
from vmamba_export.lowering import ExportOptions  # noqa: E402
from vmamba_export.model_source import bundled_names, resolve_model  # noqa: E402
from vmamba_export.targets import get_target  # noqa: E402
from vmamba_export.validate import validate_artifact  # noqa: E402

SCAN_OPS = ("cumsum", "exp", "matmul", "softplus", "while_loop")


def check(name: str, precision: str, images: int, root: Path) -> dict:
    bundled = name in bundled_names()
    source = resolve_model(name, random_weights=not bundled, seed=1)
    out = root / f"{name}-{precision}"
    t0 = time.perf_counter()
    options = ExportOptions(calib="digits:calib" if bundled else "builtin", calib_samples=64)
    manifest = export_artifact(source, get_target("apple-coreml"), out, precision, options=options)
    export_s = time.perf_counter() - t0
    low = manifest["lowering"]
    ops = low["mil_ops"]
    blocks = low["scan_blocks"]
    row = {
        "model": name,
        "precision": precision,
        "export_s": round(export_s, 1),
        "mlpackage_MB": round(package_bytes(out / "model.mlpackage") / 1e6, 3),
        "mil_ops_total": low["mil_ops_total"],
        "mil_ops_non_const": low["mil_ops_total"] - ops.get("const", 0),
        "scan_blocks": blocks,
        "scan_ops_per_block": {op: ops.get(op, 0) / blocks for op in SCAN_OPS},
        "chunk": low["scan_chunk"],
        "intra_chunk": low["scan_intra_chunk"],
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
        evaluated_with=v["evaluated_with"],
    )
    if v["accuracy"]:
        row["accuracy"] = {k: v["accuracy"][k] for k in ("num_images", "torch_top1", "artifact_top1", "drop_points")}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["vmamba_digits_v2"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "fp16", "w8", "w8a8"])
    parser.add_argument("--images", type=int, default=2, help="builtin photos for parity")
    parser.add_argument("--keep", type=Path, help="keep the artifacts here")
    args = parser.parse_args()
    print("NOTE: nothing here runs on Apple hardware; outputs come from the numpy MIL evaluator.", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        for name in args.models:
            for precision in args.precisions:
                print(json.dumps(check(name, precision, args.images, root)), flush=True)


if __name__ == "__main__":
    main()
