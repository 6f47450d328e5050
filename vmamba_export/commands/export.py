"""`vmamba-export export`: one artifact for one model, target and precision."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from rich.console import Console

from ..cli import add_json_flag, print_json
from ._common import add_model_args, add_platform_arg


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a model to an artifact folder for one target")
    add_model_args(p)
    p.add_argument("--target", required=True, help="target name (see `vmamba-export targets`)")
    p.add_argument("--precision", default="fp32", help="fp32 (default), or what the target offers")
    p.add_argument("--out", required=True, type=Path, help="artifact folder to create")
    p.add_argument("--max-size", type=int, help="largest input side the artifact must take (target default)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing artifact folder")
    p.add_argument("--validate", action="store_true", help="also validate parity on the built-in photos")
    add_platform_arg(p)
    p.add_argument(
        "--layout",
        choices=("channels-last", "channels-first"),
        help="cuda-onnxruntime, cpu-tvm: layout of a v2 model's residual stream in the graph (default channels-last)",
    )
    add_int8_args(p)
    add_tvm_args(p)
    add_json_flag(p)
    p.set_defaults(func=run)


def add_int8_args(p: argparse.ArgumentParser) -> None:
    from ..quantize import CALIB_METHODS

    g = p.add_argument_group(
        "int8 (--precision int8; apple-coreml: w8a8): post-training quantization from calibration images"
    )
    g.add_argument("--calib", default="builtin", metavar="SOURCE", help="calibration images (default: builtin)")
    g.add_argument("--calib-samples", type=int, default=64, metavar="N", help="calibration images to use (64)")
    g.add_argument("--calib-method", choices=CALIB_METHODS, default="minmax", help="activation range method")
    g.add_argument("--exclude", nargs="+", default=[], metavar="NAME", help="layers kept float (name, prefix, glob)")
    g.add_argument("--accuracy", metavar="SOURCE", help="labelled images: measure fp32 vs int8 top-1 on them")
    g.add_argument(
        "--max-drop", type=float, metavar="POINTS", help="with --accuracy: keep layers float until the top-1 drop fits"
    )
    g.add_argument(
        "--smooth-quant", type=float, metavar="ALPHA", help="cpu-openvino (NNCF): SmoothQuant alpha 0..1 (default off)"
    )
    g.add_argument(
        "--bias-correction",
        choices=("fast", "full", "none"),
        help="cpu-openvino (NNCF): bias correction after quantization (default fast)",
    )


def add_tvm_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("TVM (cpu-tvm): meta-schedule tuning of the graph outside the scan kernels")
    g.add_argument("--tune-budget", type=float, metavar="SECONDS", help="tune on this machine for up to SECONDS")
    g.add_argument("--tune-trials", type=int, metavar="N", help="tune at most N measured candidates in all")
    g.add_argument(
        "--tune-db",
        type=Path,
        metavar="PATH",
        help="start from this tuning database (an artifact folder, or its tuning/ folder); covered ops are not tuned",
    )
    g.add_argument(
        "--tune-again",
        action="store_true",
        help="with --tune-db and a budget: tune the covered ops too, starting from their best schedules",
    )
    g.add_argument("--tvm-mcpu", metavar="CPU", help="LLVM CPU to build for ('native': this machine; tuning's default)")
    g.add_argument("--tvm-batch", type=int, metavar="N", help="fixed batch size (tuning's default: 1)")


def tvm_extra(args: argparse.Namespace) -> dict:
    """TVM settings for ExportOptions.extra (lowering/tvm_relax.py reads them); empty when none was given."""
    pairs = {
        "tune_budget": args.tune_budget,
        "tune_trials": args.tune_trials,
        "tune_db": args.tune_db and str(args.tune_db),
        "tune_again": args.tune_again or None,
        "tvm_mcpu": args.tvm_mcpu,
        "batch": args.tvm_batch,
    }
    return {k: v for k, v in pairs.items() if v is not None}


def int8_options(args: argparse.Namespace):
    from ..errors import VMambaExportError
    from ..lowering import ExportOptions

    if args.max_drop is not None and not args.accuracy:
        raise VMambaExportError("--max-drop needs --accuracy SOURCE (labelled images to measure the drop on)")
    return ExportOptions(
        calib=args.calib,
        calib_samples=args.calib_samples,
        calib_method=args.calib_method,
        exclude=tuple(args.exclude),
        accuracy_source=args.accuracy,
        max_drop=args.max_drop,
        extra={"show_progress": not args.json}
        | ({"smooth_quant": args.smooth_quant} if args.smooth_quant is not None else {})
        | ({"bias_correction": args.bias_correction} if args.bias_correction else {})
        | ({"layout": args.layout} if args.layout else {})
        | tvm_extra(args),
    )


def run(args: argparse.Namespace) -> int:
    from ..exporter import export_artifact
    from ..model_source import resolve_model
    from ..targets import get_target

    console = Console(stderr=True)
    target = get_target(args.target)
    if args.layout and target.name not in ("cuda-onnxruntime", "cpu-tvm"):
        from ..errors import VMambaExportError

        raise VMambaExportError(
            f"--layout is for cuda-onnxruntime and cpu-tvm; target {target.name} chooses its own layout"
        )
    with console.status(f"loading {args.checkpoint or args.model or 'default model'}", spinner="dots"):
        source = resolve_model(args.model, args.checkpoint, args.random_weights, args.seed)
    # int8 shows its own progress bars (calibration), and rich allows one live display at a time: no spinner then.
    busy = (
        contextlib.nullcontext()
        if args.precision == "int8"
        else console.status(f"exporting {source.model.config.name} for {target.name} ({args.precision})")
    )
    with busy:
        manifest = export_artifact(
            source,
            target,
            args.out,
            args.precision,
            args.max_size,
            args.overwrite,
            options=int8_options(args),
            platform=args.platform,
        )
    status = 0
    if args.validate:
        from ..validate import validate_artifact

        if _foreign(manifest):  # built for another platform: its self-check under an emulator, or a clear no
            from ..emulation import validate_emulated

            manifest["validation"] = validate_emulated(args.out, manifest["platform"]["name"])
        else:
            manifest["validation"] = validate_artifact(args.out, show_progress=not args.json)
        status = 0 if manifest["validation"]["status"] == "pass" else 1
    if args.json:
        print_json({"artifact": str(args.out), "manifest": manifest})
    else:
        lw = manifest["lowering"]
        console.print(
            f"[green]wrote[/green] {args.out}: {lw['nodes']} ONNX nodes, {lw['scan_nodes']} scan nodes, "
            f"inputs {manifest['input']['min_size']}..{manifest['input']['max_size']} px"
        )
        tuning = lw.get("tuning")
        if tuning:
            console.print(
                f"tuning: {tuning['tuning_seconds']:.0f} s, {tuning['trials']} trials; {tuning['tasks_covered']} of "
                f"{tuning['tasks']} ops tuned ({tuning['tasks_reused']} from {tuning['database_from'] or '-'}); "
                f"database in {args.out}/{tuning['database']}"
            )
        quant = lw.get("quantization")
        if quant:
            console.print(
                f"int8 {quant['format']} ({quant['method']}, {quant['calibration']['samples']} images from "
                f"{quant['calibration']['source']}): {len(quant['quantized_layers'])} layers quantized, "
                f"{len(quant['float_layers'])} kept float"
            )
            acc = quant.get("accuracy")
            if acc:
                console.print(
                    f"top-1 on {acc['source']}: fp32 {100 * acc['fp32_top1']:.2f}, int8 {100 * acc['int8_top1']:.2f} "
                    f"(drop {acc['drop_points']:.2f} points; "
                    f"kept float for accuracy: {len(acc['kept_float_for_accuracy'])})"
                )
        if manifest.get("validation"):
            console.print(f"parity: {manifest['validation']['status']}")
    return status


def _foreign(manifest: dict) -> bool:
    """Whether the artifact holds native code for a platform other than this machine's."""
    from ..platforms import host_platform

    record = manifest["platform"]
    return record["name"] != host_platform() and not record["runs_anywhere"]
