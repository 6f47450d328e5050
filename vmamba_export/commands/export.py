"""`vmamba-export export`: one artifact for one model, target and precision."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from ..cli import add_json_flag, print_json
from ..targets import CUDA_FUSIONS
from ._common import add_model_args, add_platform_arg, float_range, out_folder, positive_int, source_args


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a model to an artifact folder for one target")
    add_model_args(p)
    p.add_argument("--target", required=True, metavar="T", help="target name (see `vmamba-export targets`)")
    p.add_argument("--precision", default="fp32", help="fp32 (default), or what the target offers")
    p.add_argument("--out", required=True, type=out_folder, metavar="DIR", help="artifact folder to create")
    p.add_argument(
        "--max-size",
        type=positive_int,
        metavar="N",
        help="largest input side the artifact must take, at least the model's own input side (target default)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing artifact folder")
    p.add_argument(
        "--validate",
        action="store_true",
        help="also validate parity on the built-in photos (w8/w8a8: and top-1 on --accuracy, digits:holdout for "
        "the bundled digits models)",
    )
    p.add_argument(
        "--task",
        choices=TASK_CHOICES,
        help="what the artifact outputs: logits (classification), four feature maps (backbone) or per-pixel class "
        "logits (segmentation); default: the model's own task (--task segmentation without --model: "
        f"{DEFAULT_SEGMENTATION_MODEL})",
    )
    add_platform_arg(p)
    p.add_argument(
        "--layout",
        choices=("channels-last", "channels-first"),
        help="cuda-onnxruntime, cpu-tvm: layout of a v2 model's residual stream in the graph (default channels-last)",
    )
    p.add_argument(
        "--cuda-fusions",
        choices=CUDA_FUSIONS,
        help="cuda-onnxruntime: the fused ops around the scan (default on; off: none; projected, conv-projected, "
        "merged, folded, packed, narrow: also the scan's input projections rewritten that way, for A/B timing, "
        "docs/cuda-onnxruntime.md)",
    )
    p.add_argument(
        "--cuda-batch1-fusions",
        choices=["none", *(f for f in CUDA_FUSIONS if f != "off")],
        help="cuda-onnxruntime: the fusions of a second graph for batch 1 (model.batch1.onnx), which CUDA-graph runs "
        "of batch-1 inputs replay (every other shape: the main graph); default projected for a classifier with the "
        "default --cuda-fusions (batch 1 fp32 1.97 -> 1.52 ms, fp16 1.00 -> 0.97 ms on an H100), else none",
    )
    add_int8_args(p)
    add_tvm_args(p)
    add_json_flag(p)
    p.set_defaults(func=run)


# models.configs.TASKS spelled out (building the parser must not import torch).
TASK_CHOICES = ("classification", "backbone", "segmentation")
# The bundled segmenter (trained here on generated shapes): the model of `--task segmentation` without --model.
DEFAULT_SEGMENTATION_MODEL = "vmamba_shapes_seg"


def resolve_source(args: argparse.Namespace):
    """The ModelSource to export: resolve_model as the model options say, as a model of `--task` when given (without
    --model and --checkpoint, `--task segmentation` means the bundled segmenter)."""
    from ..model_source import resolve_model

    return resolve_model(**source_args(args), task=getattr(args, "task", None))


def add_int8_args(p: argparse.ArgumentParser) -> None:
    from ..quantize import CALIB_METHODS

    g = p.add_argument_group(
        "int8 (--precision int8; apple-coreml: w8a8): post-training quantization from calibration images"
    )
    g.add_argument(
        "--calib",
        metavar="SOURCE",
        help="calibration images (default: builtin; shapes:calib for the bundled segmenter vmamba_shapes_seg)",
    )
    g.add_argument("--calib-samples", type=positive_int, default=64, metavar="N", help="calibration images to use (64)")
    g.add_argument("--calib-method", choices=CALIB_METHODS, default="minmax", help="activation range method")
    g.add_argument("--exclude", nargs="+", default=[], metavar="NAME", help="layers kept float (name, prefix, glob)")
    g.add_argument("--accuracy", metavar="SOURCE", help="labelled images: measure fp32 vs int8 top-1 on them")
    g.add_argument(
        "--max-drop",
        type=float_range(0.0, 100.0),
        metavar="POINTS",
        help="with --accuracy: keep layers float until the top-1 drop fits",
    )
    g.add_argument(
        "--smooth-quant",
        type=float_range(0.0, 1.0),
        metavar="ALPHA",
        help="cpu-openvino (NNCF): SmoothQuant alpha 0..1 (default off)",
    )
    g.add_argument(
        "--bias-correction",
        choices=("fast", "full", "none"),
        help="cpu-openvino (NNCF): bias correction after quantization (default fast)",
    )


def add_tvm_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("TVM (cpu-tvm): meta-schedule tuning of the graph outside the scan kernels")
    g.add_argument(
        "--tune-budget",
        type=float_range(0.0, above=True),
        metavar="SECONDS",
        help="tune on this machine for up to SECONDS",
    )
    g.add_argument("--tune-trials", type=positive_int, metavar="N", help="tune at most N measured candidates in all")
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
    g.add_argument("--tvm-batch", type=positive_int, metavar="N", help="fixed batch size (tuning's default: 1)")


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
        calib=args.calib or "builtin",
        calib_samples=args.calib_samples,
        calib_method=args.calib_method,
        exclude=tuple(args.exclude),
        accuracy_source=args.accuracy,
        max_drop=args.max_drop,
        extra={"show_progress": not args.json}
        | ({"smooth_quant": args.smooth_quant} if args.smooth_quant is not None else {})
        | ({"bias_correction": args.bias_correction} if args.bias_correction else {})
        | ({"layout": args.layout} if args.layout else {})
        | ({"cuda_fusions": args.cuda_fusions} if args.cuda_fusions else {})
        | ({"cuda_batch1_fusions": args.cuda_batch1_fusions} if args.cuda_batch1_fusions else {})
        | tvm_extra(args),
    )


def validation_accuracy_source(args: argparse.Namespace, target, config, task: str) -> str | None:
    """The labelled source `--validate` measures accuracy on (top-1, or mIoU for a segmenter): --accuracy, else (for
    a precision judged by accuracy, such as int8 segmentation or apple-coreml w8/w8a8) the model's own held-out set.
    Refused before the export when there is none."""
    from ..bundled import default_sources
    from ..errors import VMambaExportError

    if args.accuracy or "max_accuracy_drop_points" not in target.thresholds_for(args.precision, task):
        return args.accuracy
    source = default_sources(config.name)[0]
    if source is None:
        what = (
            "mIoU: labelled images and masks (a folder with images/ and masks/)"
            if task == "segmentation"
            else ("top-1 accuracy: labelled images (e.g. an ImageFolder)")
        )
        raise VMambaExportError(
            f"--validate of {target.name} {args.precision} is judged by {what}: pass --accuracy SOURCE for "
            f"{config.name}, or leave out --validate"
        )
    return source


# What each format's lowering counts in its manifest: (total key, its unit, scan key, its unit).
_GRAPH_COUNTS = {
    "coreml": ("mil_ops_total", "MIL ops", "scan_blocks", "scan blocks"),
    "openvino": ("ov_ops", "OpenVINO ops", "scan_ops", "scan ops"),
    "tvm": ("nodes", "Relax bindings", "scan_nodes", "scan kernel calls"),
}


def graph_summary(manifest: dict) -> str:
    """The size of the exported graph in the units of its format; never fails on a lowering that counts less."""
    lw = manifest["lowering"]
    total, total_unit, scans, scan_unit = _GRAPH_COUNTS.get(
        manifest["target"]["runtime"], ("nodes", "ONNX nodes", "scan_nodes", "scan nodes")
    )
    parts = [f"{lw[key]} {unit}" for key, unit in ((total, total_unit), (scans, scan_unit)) if key in lw]
    return ", ".join(parts) or f"scan lowering {lw.get('scan_lowering', '?')}"


def run(args: argparse.Namespace) -> int:
    from ..exporter import export_artifact
    from ..targets import get_target

    console = Console(stderr=True)
    target = get_target(args.target)
    if args.layout and target.name not in ("cuda-onnxruntime", "cpu-tvm"):
        from ..errors import VMambaExportError

        raise VMambaExportError(
            f"--layout is for cuda-onnxruntime and cpu-tvm; target {target.name} chooses its own layout"
        )
    for flag, value in (("--cuda-fusions", args.cuda_fusions), ("--cuda-batch1-fusions", args.cuda_batch1_fusions)):
        if value and target.name != "cuda-onnxruntime":
            from ..errors import VMambaExportError

            raise VMambaExportError(f"{flag} is for cuda-onnxruntime, not target {target.name}")
    with console.status(f"loading {args.checkpoint or args.model or 'default model'}", spinner="dots"):
        source = resolve_source(args)
    task = source.model.config.task
    accuracy = validation_accuracy_source(args, target, source.model.config, task) if args.validate else None
    options = int8_options(args)
    if args.calib is None and task == "segmentation":  # a segmenter's own scenes where it has them
        from ..bundled import default_sources

        options.calib = default_sources(source.model.config.name)[1]
    options.reference_accuracy_source = args.accuracy  # PyTorch's score recorded there for a device without torch
    if task != "classification":
        options.accuracy_source = None  # for a dense task --accuracy is --validate's labelled set, not int8's top-1
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
            options=options,
            platform=args.platform,
        )
    status = 0
    if args.validate:
        from ..validate import validate_artifact

        if _foreign(manifest):  # built for another platform: its self-check under an emulator, or a clear no
            from ..emulation import validate_emulated

            manifest["validation"] = validate_emulated(args.out, manifest["platform"]["name"], accuracy)
        else:
            manifest["validation"] = validate_artifact(
                args.out, checkpoint=args.checkpoint, accuracy_source=accuracy, show_progress=not args.json, record=True
            )
        status = 0 if manifest["validation"]["status"] == "pass" else 1
    if args.json:
        print_json({"artifact": str(args.out), "manifest": manifest})
    else:
        lw = manifest["lowering"]
        console = Console(soft_wrap=True)  # the result on stdout, unwrapped; the spinners above were on stderr
        console.print(
            f"[green]wrote[/green] {escape(str(args.out))}: {graph_summary(manifest)}, "
            f"inputs {manifest['input']['min_size']}..{manifest['input']['max_size']} px"
        )
        if manifest["output"].get("task"):
            outputs = ", ".join(
                f"{o['name']} ({o['channels']} ch, stride {o['stride']})" for o in manifest["output"]["outputs"]
            )
            console.print(f"task {manifest['output']['task']}: outputs {outputs}")
        tuning = lw.get("tuning")
        if tuning:
            console.print(
                f"tuning: {tuning['tuning_seconds']:.0f} s, {tuning['trials']} trials; {tuning['tasks_covered']} of "
                f"{tuning['tasks']} ops tuned ({tuning['tasks_reused']} from {tuning['database_from'] or '-'}); "
                f"database in {escape(str(args.out))}/{tuning['database']}"
            )
        quant = lw.get("quantization")
        if quant:
            console.print(
                f"{args.precision} {quant['format']} ({quant['method']}, {quant['calibration']['samples']} images "
                f"from {quant['calibration']['source']}): {len(quant['quantized_layers'])} layers quantized, "
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
