"""build: export + validate + bench one model for several targets and precisions, and a combined report.

What CI runs per hardware target. A target this machine cannot run is still built where possible and marked
"not validated here"; a failure of one artifact is recorded and the others go on; `fail_on_parity` turns parity
failures into a failing exit status for CI.

With a platform other than this machine's (`--platform linux-aarch64` on x86-64), the artifacts are cross-built;
targets that cannot be built for it are listed with the reason (platforms.py). Each artifact is then validated by
its self-check under an emulator when one is set up (emulation.py; scripts/arm64_env.sh), else an artifact without
native code (onnx-portable) is validated here and the rest are marked "built for <platform>, not run here".
Nothing is benchmarked off its own platform: an emulator's speed says nothing about the hardware.
"""

from __future__ import annotations

import json
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from .artifact import write_json_atomic, write_text_atomic
from .bundled import default_sources
from .errors import ArtifactError, VMambaExportError
from .lowering import ExportOptions
from .model_source import ModelSource
from .progress import progress_bar
from .targets import Target, list_targets


@dataclass
class BuildPlan:
    targets: list[Target]
    precisions: list[str] | None = None  # None: every precision each target offers
    images: str = "builtin"
    sizes: list[int] | None = None
    accuracy_source: str | None = None
    calib: str | None = None
    calib_samples: int = 64
    batches: list[int] = field(default_factory=lambda: [1])
    threads: list[int] = field(default_factory=lambda: [2])
    runs: int = 20
    warmup: int = 5
    bench: bool = True
    platform: str | None = None  # platforms.py name; None: this machine's

    def precisions_for(self, target: Target) -> list[str]:
        if self.precisions is None:
            return list(target.precisions)
        return [p for p in self.precisions if p in target.precisions]


def default_targets() -> list[Target]:
    """Every target this machine can build."""
    return [t for t in list_targets() if t.can_build()[0]]


BUILD_FORMAT = "vmamba-export-build"  # report.json["format"]: marks a build folder `build` may write into again


def build(source: ModelSource, plan: BuildPlan, out: Path, overwrite: bool = False, show_progress: bool = True) -> dict:
    from .bench import bench_artifact, machine_description
    from .emulation import emulated_python, emulator_description, validate_emulated
    from .exporter import DENSE_LOWERINGS, export_artifact
    from .platforms import cannot_build_reason, host_platform
    from .validate import validate_artifact

    out = Path(out)
    prepare_build_folder(out)
    name = source.model.config.name
    model_task = source.model.config.task  # "classification", "backbone" or "segmentation"
    accuracy_default, calib_default = default_sources(name)
    accuracy_source = plan.accuracy_source or accuracy_default
    jobs = [(t, p) for t in plan.targets for p in plan.precisions_for(t)]
    platform = plan.platform or host_platform()
    cross = platform != host_platform()
    rows = []
    with progress_bar(show_progress) as progress:
        task = progress.add_task("build", total=len(jobs))
        for target, precision in jobs:
            folder = out / f"{name}-{target.name}-{precision}"
            row = {"target": target.name, "precision": precision, "artifact": str(folder), "status": "built"}
            progress.update(task, description=f"{target.name} {precision}")
            why_not = cannot_build_reason(target.name, platform) if cross else None
            if model_task != "classification" and target.scan_lowering not in DENSE_LOWERINGS:
                row.update(status=f"not built for {model_task}", note=f"{target.name} has no {model_task} lowering yet")
            elif why_not:
                row.update(status=f"not built for {platform}", note=why_not)
            if row["status"] != "built":
                rows.append(row)
                progress.advance(task)
                continue
            try:
                options = ExportOptions(
                    calib=plan.calib or calib_default or "builtin",
                    calib_samples=plan.calib_samples,
                    # Accuracy-aware int8 (layers kept float until the top-1 drop fits) is for classifiers only.
                    accuracy_source=accuracy_source if model_task == "classification" else None,
                    reference_accuracy_source=accuracy_source,
                )
                manifest = export_artifact(
                    source, target, folder, precision, overwrite=overwrite, options=options, platform=plan.platform
                )
                can_run, why = target.can_run()
                if cross and emulated_python(platform) is not None:
                    # Emulation is slow: score the labelled set only where the precision is judged by it.
                    judged = "max_accuracy_drop_points" in manifest["thresholds"]
                    validation = validate_emulated(folder, platform, accuracy_source if judged else None)
                    row["parity"] = validation["status"]
                    row["runs"] = validation["runs"]
                    row["accuracy"] = validation["accuracy"]
                    row["note"] = f"self-check on {emulator_description(platform)}"
                    row["status"] = "validated" if validation["status"] == "pass" else "parity failed"
                elif cross and not manifest["platform"]["runs_anywhere"]:
                    row["status"] = f"built for {platform}, not run here"
                    row["note"] = "no emulator set up (bash scripts/arm64_env.sh)"
                elif not can_run:
                    row["status"] = "not validated here"
                    row["note"] = why
                else:
                    validation = validate_artifact(
                        folder,
                        checkpoint=source.checkpoint_path,
                        images=plan.images,
                        sizes=plan.sizes,
                        accuracy_source=accuracy_source,
                        show_progress=False,
                        record=True,
                    )
                    row["parity"] = validation["status"]
                    row["runs"] = validation["runs"]
                    row["accuracy"] = validation["accuracy"]
                    if cross:
                        row["note"] = f"no native code: validated on {host_platform()}"
                    if plan.bench and not cross:
                        bench = bench_artifact(
                            folder,
                            plan.batches,
                            plan.threads,
                            warmup=plan.warmup,
                            runs=plan.runs,
                            show_progress=False,
                            record=True,
                        )
                        row["latency"] = bench["results"]
                    row["status"] = "validated" if validation["status"] == "pass" else "parity failed"
            except VMambaExportError as exc:
                row["status"] = "error"
                row["note"] = str(exc)
            except Exception as exc:  # one broken target must not stop the others; the trace goes to the report
                row["status"] = "error"
                row["note"] = f"{type(exc).__name__}: {exc}"
                row["trace"] = traceback.format_exc(limit=8)
            rows.append(row)
            progress.advance(task)
    summary = {
        "format": BUILD_FORMAT,
        "model": name,
        "task": model_task,
        "weights": source.weights,
        "machine": machine_description(),
        "platform": platform,
        "accuracy_source": accuracy_source,
        "images": plan.images,
        "artifacts": rows,
    }
    from .report import render_build_chart, render_build_report

    write_json_atomic(out / "report.json", summary)
    write_text_atomic(out / "report.md", render_build_report(summary))
    render_build_chart(summary, out / "report.png")
    return summary


def build_folder_problem(out: Path) -> str | None:
    """Why `build` may not write into the existing folder `out`, or None: it may if the folder is empty or holds a
    report.json of an earlier build (`build` replaces its report.* files and, with overwrite, only artifacts of ours:
    atomic_artifact checks each). Reports written before the format marker count by their own keys."""
    if out.is_symlink() or not out.is_dir():
        return "it is not a folder" if out.exists() or out.is_symlink() else None
    if not any(out.iterdir()):
        return None
    try:
        report = json.loads((out / "report.json").read_text())
    except FileNotFoundError:
        return "it is not empty and holds no report.json of an earlier build"
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return f"its report.json cannot be read as JSON ({type(exc).__name__})"
    if isinstance(report, dict) and (
        report.get("format") == BUILD_FORMAT
        or ("format" not in report and isinstance(report.get("artifacts"), list) and "machine" in report)
    ):
        return None
    return f"its report.json does not say format {BUILD_FORMAT!r}"


def check_build_folder(out: Path) -> None:
    """Refuse an existing `out` that `build` may not write into (see build_folder_problem)."""
    problem = build_folder_problem(out)
    if problem:
        raise ArtifactError(
            f"{out} already exists and is not a vmamba-export build folder ({problem}); refusing to write into it: "
            "choose a new or empty folder"
        )


def prepare_build_folder(out: Path) -> None:
    """Create the build folder (and its parents), or check that an existing one is ours to write into."""
    check_build_folder(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ArtifactError(f"cannot create {out}: a file is in the way") from None
    except OSError as exc:
        raise ArtifactError(f"cannot create {out}: {exc.strerror or exc}") from None


def exit_status(summary: dict, fail_on_parity: bool) -> int:
    statuses = [r["status"] for r in summary["artifacts"]]
    if "error" in statuses:
        return 1
    if fail_on_parity and "parity failed" in statuses:
        return 1
    return 0
