"""CPU benchmark through OpenVINO: VMamba on cpu-openvino (fp32 and bf16) against a ConvNeXt-T peer, same run.

    python benchmarks/cpu_openvino.py [--models vmamba_tiny_s1l8] [--rounds 3] [--runs 20] [--out results/x.md]

ConvNeXt-T (benchmarks/convnext.py) goes through the same path as our models: ONNX -> ov.convert_model -> IR, then
compiled for the CPU with INFERENCE_PRECISION_HINT f32 or bf16. Every (model, precision) is timed in its own process
(batch 1, 224x224, the given threads) after warm-up, once per round, in turn with ConvNeXt-T; each ratio (against
ConvNeXt-T in the same precision) is the median over rounds of the ratio within a round, so machine drift moves both
sides. For VMamba, OpenVINO's per-node counters (PERF_COUNT) give the share of
node time spent in the scan ops and in the precision conversions (Reorder nodes) at their inputs and outputs.
Random weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

PRECISIONS = {"fp32": "f32", "bf16": "bf16"}  # precision -> INFERENCE_PRECISION_HINT
SCAN_TYPE = "SelectiveScan2D"


def worker(xml: str, library: str, hint: str, threads: int, warmup: int, runs: int, profile: int) -> dict:
    from vmamba_export.bench import peak_rss_mb, time_calls
    from vmamba_export.runtime.openvino_backend import compile_ir

    compiled = compile_ir(Path(xml), Path(library) if library != "-" else None, hint, threads, profile=bool(profile))
    request = compiled.create_infer_request()
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
    stats = time_calls(lambda: request.infer({0: x}, share_inputs=True), warmup, runs)
    result = {**stats, "peak_rss_mb": peak_rss_mb()}
    if profile:
        result["profile"] = node_profile(request, compiled, Path(xml))
    return result


def node_profile(request, compiled, xml: Path) -> dict:
    """Node time of the last inference by node type (ms), the scan ops' share, and their runtime precision.

    The CPU plugin runs an extension op as a generic "Reference" node, so scan nodes are found by their names in the
    IR; the precision conversions it inserts around them are Reorder nodes named after them."""
    import xml.etree.ElementTree as ET

    scan_names = {
        layer.get("name") for layer in ET.parse(xml).getroot().iter("layer") if layer.get("type") == SCAN_TYPE
    }
    by_type: dict[str, float] = defaultdict(float)
    scan_ms = around_ms = 0.0
    for info in request.get_profiling_info():
        ms = info.real_time.total_seconds() * 1e3
        by_type[info.node_type] += ms
        if info.node_name in scan_names:
            scan_ms += ms
        elif info.node_type == "Reorder" and any(name in info.node_name for name in scan_names):
            around_ms += ms
    total = sum(by_type.values())
    scan_precisions = set()
    for op in compiled.get_runtime_model().get_ops():
        if op.get_friendly_name() in scan_names:
            scan_precisions.add(op.get_rt_info()["runtimePrecision"].astype(str))
    return {
        "total_node_ms": total,
        "scan_ms": scan_ms,
        "scan_share": scan_ms / total if total else float("nan"),
        "scan_reorder_ms": around_ms,
        "scan_runtime_precision": sorted(scan_precisions),
        "top_node_types_ms": dict(sorted(by_type.items(), key=lambda kv: -kv[1])[:8]),
    }


def time_in_subprocess(xml: Path, library: Path | None, hint: str, args, profile: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(xml), str(library or "-"), hint]
    cmd += [str(v) for v in (args.threads, args.warmup, args.runs if not profile else 5, int(profile))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"timing {xml} ({hint}) failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def convnext_ir(workdir: Path) -> Path:
    """ConvNeXt-T as OpenVINO IR (fp32 weights), through ONNX like our models."""
    import openvino as ov
    from convnext import export_convnext_onnx

    xml = workdir / "convnext_tiny.xml"
    if not xml.exists():
        onnx_path = workdir / "convnext_tiny.onnx"
        if not onnx_path.exists():
            export_convnext_onnx(str(onnx_path))
        ov.save_model(ov.convert_model(str(onnx_path)), str(xml), compress_to_fp16=False)
    return xml


def main() -> int:
    from vmamba_export.bench import add_round_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vmamba_tiny_s1l8"])
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    add_round_arguments(parser, runs=20, rounds=3)
    parser.add_argument("--no-profile", action="store_true", help="skip the PERF_COUNT pass (scan share)")
    parser.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        xml, lib, hint, *nums = args.worker
        print(json.dumps(worker(xml, lib, hint, *(int(n) for n in nums))))
        return 0

    from vmamba_export.bench import interleaved, machine_description, merge_rounds, paired_ratio
    from vmamba_export.exporter import export_artifact
    from vmamba_export.model_source import resolve_model
    from vmamba_export.targets import get_target

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vmamba-ov-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    peer_xml = convnext_ir(workdir)
    graphs = {}  # (model, precision) -> (IR, extension library or None, inference precision hint)
    for precision in args.precisions:
        graphs[("convnext_tiny (peer)", precision)] = (peer_xml, None, PRECISIONS[precision])
    for name in args.models:
        source = None
        for precision in args.precisions:
            folder = workdir / f"{name}-cpu-openvino-{precision}"
            if not (folder / "manifest.json").exists():
                source = source or resolve_model(name, random_weights=True)
                t0 = time.perf_counter()
                export_artifact(source, get_target("cpu-openvino"), folder, precision=precision, overwrite=True)
                print(f"exported {folder.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            entry = json.loads((folder / "manifest.json").read_text())["entry"]
            graphs[(name, precision)] = (
                folder / entry["model"],
                folder / entry["extension_library"],
                entry["inference_precision"],
            )

    samples = interleaved(graphs, lambda key: time_in_subprocess(*graphs[key], args), args.rounds, " ".join)
    rows = []
    for (name, precision), results in samples.items():
        row = {"model": name, "precision": precision, **merge_rounds(results)}
        row["vs_convnext"] = paired_ratio(results, samples[("convnext_tiny (peer)", precision)])
        if graphs[(name, precision)][1] is not None and not args.no_profile:
            row["profile"] = time_in_subprocess(*graphs[(name, precision)], args, profile=True)["profile"]
        rows.append(row)
    from vmamba_export.runtime.openvino_backend import cpu_capabilities, installed_openvino_version

    caps = cpu_capabilities()
    lines = [
        f"CPU OpenVINO {installed_openvino_version()}, {machine_description()}; batch 1, 224x224, {args.threads} "
        f"threads; {args.rounds} interleaved rounds of {args.runs} runs after {args.warmup} warm-up (ratios: median "
        f"over rounds of the ratio within a round); CPU plugin capabilities: {', '.join(caps)}",
        "",
        "| model | precision | median ms | p90 ms | x ConvNeXt-T (same precision) | scan share | scan ms | "
        "reorders at scan ms | peak RSS MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        prof = r.get("profile")
        share = f"{100 * prof['scan_share']:.1f}%" if prof else "-"
        scan_ms = f"{prof['scan_ms']:.1f}" if prof else "-"
        conv = f"{prof['scan_reorder_ms']:.1f}" if prof else "-"
        lines.append(
            f"| {r['model']} | {r['precision']} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | {r['vs_convnext']:.2f} | "
            f"{share} | {scan_ms} | {conv} | {r['peak_rss_mb']:.0f} |"
        )
    if "bf16" in args.precisions and "BF16" not in caps:
        lines += ["", "No native bf16 on this CPU (no AVX512-BF16/AMX): the bf16 rows are OpenVINO's emulation."]
    from vmamba_export.bench import write_results

    write_results(args.out, "\n".join(lines), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
