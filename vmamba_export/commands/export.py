"""`vmamba-export export`: one artifact for one model, target and precision."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from ..cli import add_json_flag, print_json
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
    add_int8_args(p)
    add_tvm_args(p)
    add_json_flag(p)
    p.set_defaults(func=run)


# models.configs.TASKS spelled out (building the parser must not import torch).
TASK_CHOICES = ("classification", "backbone", "segmentation")
# The bundled segmenter (trained here on generated shapes): the model of `--task segmentation` without --model.
DEFAULT_SEGMENTATION_MODEL = "vmamba_shapes_seg"


def resolve_source(args: argparse.Namespace):
    """The ModelSource to export: resolve_model as the model options say, as the model of `--task` when given.

    Without --model and --checkpoint, `--task segmentation` means the bundled segmenter DEFAULT_SEGMENTATION_MODEL
    (an error naming it where this install does not bundle it). Another task than the weights' own is built here
    for seeded random weights only (build_model(name, task=...)); converting trained weights between tasks is
    resolve_model's (the load helper's `task=`)."""
    from ..errors import VMambaExportError
    from ..model_source import bundled_names, resolve_model

    kwargs = source_args(args)
    task = getattr(args, "task", None)
    if task == "segmentation" and not args.model and not args.checkpoint:
        from ..models.configs import list_configs

        known = {c.name for c in list_configs()}
        if DEFAULT_SEGMENTATION_MODEL not in known or (
            not args.random_weights and DEFAULT_SEGMENTATION_MODEL not in bundled_names()
        ):
            raise VMambaExportError(
                f"--task segmentation without --model uses the bundled segmenter {DEFAULT_SEGMENTATION_MODEL}, which "
                "this install does not have: pass --model NAME (e.g. upernet_vssm_tiny) with --checkpoint PATH or "
                "--random-weights"
            )
        kwargs["model_name"] = DEFAULT_SEGMENTATION_MODEL
    # MERGE POINT (load helper): once resolve_model takes `task=`, this call becomes resolve_model(**kwargs,
    # task=task) and with_task() below goes.
    source = resolve_model(**kwargs)
    if task is not None and source.model.config.task != task:
        source = with_task(source, task, args)
    return source


def with_task(source, task: str, args: argparse.Namespace):
    """`source` rebuilt as a `task` model: seeded random weights only (the same seed, the config's other fields)."""
    import torch

    from ..errors import VMambaExportError
    from ..model_source import ModelSource, apply_labels, state_dict_digest
    from ..models import build_model

    own = source.model.config.task
    if source.weights.get("kind") != "random":
        raise VMambaExportError(
            f"--task {task}: the {source.weights.get('kind')} weights of {source.model.config.name} are a {own} "
            f"model's; this version exports them as {own} only (pass --task {own}, a {task} checkpoint, or "
            "--random-weights)"
        )
    name = source.weights["name"]
    torch.manual_seed(source.weights.get("seed", 0))
    model = build_model(name, task=task)
    labels_source = apply_labels(model, args.labels) if task != "backbone" else None
    # Recorded as the load helper's resolve_model(task=) records config overrides of random weights.
    weights = {k: v for k, v in source.weights.items() if k != "state_digest"}
    weights["overrides"] = {**weights.get("overrides", {}), "task": task}
    weights["state_digest"] = state_dict_digest(model)
    return ModelSource(model=model, weights=weights, labels_source=labels_source)


def add_int8_args(p: argparse.ArgumentParser) -> None:
    from ..quantize import CALIB_METHODS

    g = p.add_argument_group(
        "int8 (--precision int8; apple-coreml: w8a8): post-training quantization from calibration images"
    )
    g.add_argument("--calib", default="builtin", metavar="SOURCE", help="calibration images (default: builtin)")
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


def validation_accuracy_source(args: argparse.Namespace, target, model_name: str) -> str | None:
    """The labelled source `--validate` measures top-1 on: --accuracy, else (for a precision judged by accuracy, such
    as apple-coreml w8/w8a8) the model's own held-out set. Refused before the export when there is none."""
    from ..build import default_sources
    from ..errors import VMambaExportError

    if args.accuracy or "max_accuracy_drop_points" not in target.thresholds_for(args.precision):
        return args.accuracy
    source = default_sources(model_name)[0]
    if source is None:
        raise VMambaExportError(
            f"--validate of {target.name} {args.precision} is judged by top-1 accuracy: pass --accuracy SOURCE "
            f"(labelled images for {model_name}, e.g. an ImageFolder), or leave out --validate"
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
    with console.status(f"loading {args.checkpoint or args.model or 'default model'}", spinner="dots"):
        source = resolve_source(args)
    accuracy = validation_accuracy_source(args, target, source.model.config.name) if args.validate else None
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
