"""cpu-openvino and cpu-tvm for linux-aarch64, built on this x86-64 machine and run under qemu user-mode emulation,
against the same artifacts built for x86-64 (issue #21, items 3 and 4).

    python benchmarks/arm64_ov_tvm_check.py [--models vmamba_digits_v2,vmamba_digits_v0]
        [--cases cpu-openvino:fp32,cpu-openvino:bf16,cpu-openvino:int8,cpu-tvm:fp32] [--qemu-cpu neoverse-n1]
        [--env DIR] [--out DIR] [--reuse] [--json]

The emulated side is the test bench of scripts/arm64_env.sh (DIR: $VMAMBA_ARM64_ENV, else .arm64 in the repository):
an arm64 Debian Python 3.11 run by qemu-aarch64-static, with a fake aarch64 /proc/cpuinfo in its root (OpenVINO's and
ONNX Runtime's CPU probes crash on the host's x86 one) and, as its only packages, the aarch64 wheels of the runtime:
numpy, pillow, rich, onnxruntime, openvino + openvino-telemetry, apache-tvm-ffi, and libtvm_runtime.so taken alone
from the aarch64 apache-tvm wheel (VMAMBA_TVM_RUNTIME_LIB). No torch, no onnx, no compiler.

Steps:
1. scripts/arm64_env.sh DIR (idempotent) sets up or checks the emulated side.
2. For each model and case, two artifacts through the exporter: one for this machine and one for linux-aarch64
   (export_artifact(platform=...); OpenVINO: the same IR, the extension cross-compiled against the aarch64 openvino
   wheel; TVM: code for aarch64-linux-gnu, linked by aarch64-linux-gnu-g++). Each carries its reference inputs and
   PyTorch fp32 logits (references.npz); the x86 artifact's self-check and outputs are computed here.
3. This same file, run by the emulated aarch64 Python in `--device` mode, with this package from its source tree and
   only the packages of step 1: for each aarch64 artifact, the self-check `vmamba-export validate DIR` runs (against
   the references it carries, thresholds of its target and precision), and its outputs on the reference inputs are
   written for step 4.
4. Parity of the aarch64 outputs with the x86 artifact's: fp32 within the target's fp32 rel L2 limit (a failure
   otherwise); for int8 (whose kernels differ per instruction set) the figures are reported, and each end is judged
   against PyTorch fp32 by its own self-check.

Emulation is for correctness only: nothing here times anything (qemu runs hundreds of times slower than hardware).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
PLATFORM = "linux-aarch64"
QEMU = "qemu-aarch64-static"
DEFAULT_MODELS = ("vmamba_digits_v2", "vmamba_digits_v0")
# The CPU qemu emulates: the Neoverse-N1 that the bench's fake /proc/cpuinfo describes (armv8.2-a, dot product, fp16,
# no SVE), so that what OpenVINO reads there and what getauxval(AT_HWCAP) says agree. On qemu's own default ("max":
# SVE2, i8mm, ...) OpenVINO's ARM plugin picks other int8 kernels: one artifact (vmamba_digits_v0 int8 calibrated on
# the built-in photos) came out wrong there (cosine 0.66 against PyTorch) and right on neoverse-n1 (0.9965); whether
# qemu 7.2's emulation or those kernels are at fault needs hardware to tell. `--qemu-cpu max` runs that way.
DEFAULT_QEMU_CPU = "neoverse-n1"
DEFAULT_CASES = ("cpu-openvino:fp32", "cpu-openvino:bf16", "cpu-openvino:int8", "cpu-tvm:fp32")


# ---------------------------------------------------------------------------------------------------------------
# Device side: runs under qemu in the aarch64 Python, with numpy + openvino / tvm_ffi only (no torch).


def device_main(jobs_file: Path) -> int:
    """The emulated side: self-check and outputs of every aarch64 artifact, one JSON line each."""
    import platform
    import warnings

    sys.path.insert(0, str(REPO))
    from vmamba_export.references import read_references
    from vmamba_export.runtime import load
    from vmamba_export.validate import run_predictor, validate_artifact

    jobs = json.loads(jobs_file.read_text())
    results = []
    for job in [j for j in jobs if "not_built" not in j]:
        folder = Path(job["aarch64"])
        record = {"name": job["name"], "machine": platform.machine(), "torch": _importable("torch")}
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                # the self-check, as `vmamba-export validate DIR` runs it (recorded in the artifact's manifest)
                validation = validate_artifact(folder, show_progress=False)
                predictor = load(folder, threads=2)
            record["warnings"] = sorted({str(w.message) for w in caught})
            record["self_check"] = {k: validation[k] for k in ("mode", "status", "runs", "evaluated_with")}
            inputs, _, _ = read_references(folder, predictor.manifest)
            np.save(job["device_out"], run_predictor(predictor, inputs))
            record["ok"] = True
        except Exception as exc:  # noqa: BLE001 (each artifact reports its own failure; the others still run)
            record.update(ok=False, error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:400]}")
        print(json.dumps(record), flush=True)
        results.append(record)
    return 0


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ---------------------------------------------------------------------------------------------------------------
# Host side.


def ensure_env(env: Path) -> Path:
    """The emulated Python of the test bench in `env` (scripts/arm64_env.sh run first: it is idempotent)."""
    script = REPO / "scripts" / "arm64_env.sh"
    proc = subprocess.run(["bash", str(script), str(env)], capture_output=True, text=True, env=_host_env())
    if proc.returncode != 0:
        raise SystemExit(f"error: {script} {env} failed: {(proc.stderr or proc.stdout).strip()[-800:]}")
    return env / "python"


def _host_env() -> dict:
    """Environment for scripts/arm64_env.sh: pip of this Python downloads the wheels."""
    return {**os.environ, "PYTHON": sys.executable}


def build_artifacts(models: list[str], cases: list[tuple[str, str]], out: Path, show: bool) -> list[dict]:
    """x86 and aarch64 artifacts of every (model, target, precision), the x86 one's self-check and its outputs on the
    reference inputs; returns one job per pair."""
    from vmamba_export.bundled import default_sources
    from vmamba_export.errors import TargetUnavailableError
    from vmamba_export.exporter import export_artifact
    from vmamba_export.lowering import ExportOptions
    from vmamba_export.model_source import resolve_model
    from vmamba_export.references import read_references
    from vmamba_export.runtime import load
    from vmamba_export.targets import get_target
    from vmamba_export.validate import run_predictor, validate_artifact

    jobs = []
    for model_name in models:
        source = resolve_model(model_name)
        _, calib = default_sources(model_name)  # what `build` calibrates int8 with (digits:calib for the digits models)
        for target_name, precision in cases:
            target = get_target(target_name)
            name = f"{model_name}-{target_name}-{precision}"
            folders = {}
            for plat in ("linux-x86_64", PLATFORM):
                folder = out / plat / name
                start = time.perf_counter()
                options = ExportOptions(calib=calib or "builtin", extra={"show_progress": False})
                try:
                    export_artifact(source, target, folder, precision, options=options, overwrite=True, platform=plat)
                except TargetUnavailableError as exc:
                    if plat == "linux-x86_64":
                        raise
                    folders[plat] = None
                    jobs.append({"name": name, "target": target_name, "precision": precision, "not_built": str(exc)})
                    break
                if show:
                    print(f"built {plat}/{name} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
                folders[plat] = folder
            if folders.get(PLATFORM) is None:
                continue
            x86_check = validate_artifact(folders["linux-x86_64"], show_progress=False)
            predictor = load(folders["linux-x86_64"])
            inputs, _, _ = read_references(folders["linux-x86_64"], predictor.manifest)
            x86_out = out / f"{name}-x86_64.npy"
            np.save(x86_out, run_predictor(predictor, inputs))
            jobs.append(
                {
                    "name": name,
                    "target": target_name,
                    "precision": precision,
                    "x86_64": str(folders["linux-x86_64"]),
                    "aarch64": str(folders[PLATFORM]),
                    "x86_self_check": {k: x86_check[k] for k in ("status", "runs")},
                    "x86_out": str(x86_out),
                    "device_out": str(out / f"{name}-aarch64.npy"),
                }
            )
    return jobs


def run_emulated(python: Path, jobs_file: Path, qemu_cpu: str, timeout: int) -> dict:
    """Run the device side under qemu (`python`: scripts/arm64_env.sh's wrapper); {job name: its record}."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    if qemu_cpu:
        env["QEMU_CPU"] = qemu_cpu  # qemu-aarch64-static reads it: the CPU model it emulates
    cmd = [str(python), str(Path(__file__).resolve()), "--device", str(jobs_file)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    records = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            records[record["name"]] = record
    if proc.returncode != 0 or not records:
        tail = (proc.stderr or proc.stdout).strip()[-1500:]
        raise SystemExit(f"error: the emulated run exited {proc.returncode}:\n{tail}")
    return records


def compare(jobs: list[dict], records: dict) -> list[dict]:
    from vmamba_export.artifact import read_manifest
    from vmamba_export.references import read_references
    from vmamba_export.validate import parity_metrics, threshold_failures

    rows = []
    for job in jobs:
        if "not_built" in job:  # the build refused it, with the reason: reported, not a parity failure
            rows.append({**job, "passed": True, "failures": []})
            continue
        record = records.get(job["name"], {"ok": False, "error": "not run"})
        row = {**job, **record}
        manifest = read_manifest(Path(job["aarch64"]))
        x86_manifest = read_manifest(Path(job["x86_64"]))
        folders = (Path(job["x86_64"]), Path(job["aarch64"]))
        row["model_files_identical"] = _same_model_files(x86_manifest, manifest, folders)
        row["binaries"] = manifest["platform"]["binaries"]
        failures = []
        if record.get("ok"):
            x86_inputs = read_references(Path(job["x86_64"]), x86_manifest)[0]
            if not np.array_equal(x86_inputs, read_references(Path(job["aarch64"]), manifest)[0]):
                failures.append("the two artifacts carry different reference inputs")
            vs_x86 = parity_metrics(np.load(job["device_out"]), np.load(job["x86_out"]))
            # fp32: the same arithmetic on both ends, within the target's fp32 limits. bf16/int8: each end is judged
            # against PyTorch by its self-check (their kernels differ per instruction set); vs x86 is reported only.
            if job["precision"] == "fp32":
                failures += [f"vs x86: {f}" for f in threshold_failures(vs_x86, manifest["thresholds"])]
            if record["self_check"]["status"] != "pass":
                failures += [f"self-check: {f}" for r in record["self_check"]["runs"] for f in r["failures"]]
            row["vs_x86"] = vs_x86
        else:
            failures.append(record.get("error", "failed"))
        if any(machine != "aarch64" for machine in row["binaries"].values()):
            failures.append(f"binaries not all aarch64: {row['binaries']}")
        row.update(failures=failures, passed=not failures)
        rows.append(row)
    return rows


def _same_model_files(x86: dict, aarch64: dict, folders: tuple[Path, Path]) -> bool:
    """Whether the two artifacts hold the same model apart from native libraries (the OpenVINO IR is platform-neutral:
    model.bin byte-identical, model.xml identical but for the numbers OpenVINO appends to generated node names, which
    count up within a process). A TVM library is all native code: False there."""
    import re

    names = [n for n in aarch64["files"] if not n.endswith((".so", ".npz"))]
    if not names:
        return False
    for name in names:
        if x86["files"].get(name, {}).get("sha256") == aarch64["files"][name]["sha256"]:
            continue
        if not name.endswith(".xml"):
            return False
        texts = [re.sub(r'name="([A-Za-z]+)_\d+"', r'name="\1_N"', (f / name).read_text()) for f in folders]
        if texts[0] != texts[1]:
            return False
    return True


def render(rows: list[dict], qemu_cpu: str) -> str:
    lines = [
        f"aarch64 artifacts under qemu ({QEMU}, -cpu {qemu_cpu or 'max'}; torch-free runtime), "
        "against the x86-64 artifacts built in the same run",
        "",
        "| artifact | self-check x86 | self-check aarch64 (rel L2 / cosine / top-1 vs PyTorch fp32) | vs x86: rel L2 "
        "| vs x86: cosine | IR = x86 | result |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "not_built" in r:
            lines.append(f"| {r['name']} | - | not built: {r['not_built']} | - | - | - | not built |")
            continue
        x86 = r["x86_self_check"]["status"]
        if r.get("ok"):
            run = r["self_check"]["runs"][0]
            device = f"{r['self_check']['status']} ({run['rel_l2']:.2e} / {run['cosine_min']:.6f} / "
            device += f"{run['top1_agreement']:.2f})"
            x = [f"{r['vs_x86']['rel_l2']:.2e}", f"{r['vs_x86']['cosine_min']:.6f}"]
        else:
            device, x = "did not run", ["-", "-"]
        same = "yes" if r["model_files_identical"] else "no"
        result = "pass" if r["passed"] else "FAIL: " + "; ".join(r["failures"])
        lines.append(f"| {r['name']} | {x86} | {device} | {x[0]} | {x[1]} | {same} | {result} |")
    lines.append("")
    for r in rows:
        if r.get("ok") and "not_built" not in r:
            lines.append(f"- {r['name']}: {r['self_check']['evaluated_with']}; torch importable there: {r['torch']}")
            lines += [f"  - warning there: {w}" for w in r.get("warnings", [])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES), help="target:precision,...")
    parser.add_argument(
        "--qemu-cpu",
        default=DEFAULT_QEMU_CPU,
        help=f"qemu CPU model (default {DEFAULT_QEMU_CPU}; max, cortex-a53, ...)",
    )
    parser.add_argument("--env", type=Path, default=Path(os.environ.get("VMAMBA_ARM64_ENV") or REPO / ".arm64"))
    parser.add_argument("--out", type=Path, default=REPO / "out" / "arm64_ov_tvm")
    parser.add_argument("--reuse", action="store_true", help="run the artifacts of OUT/jobs.json again, no rebuild")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds for the emulated run")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--device", type=Path, help=argparse.SUPPRESS)  # the emulated side (internal)
    args = parser.parse_args(argv)
    if args.device:
        return device_main(args.device)
    sys.path.insert(0, str(REPO))
    cases = [tuple(c.split(":", 1)) for c in args.cases.split(",") if c]
    if any(len(c) != 2 for c in cases):
        raise SystemExit(f"error: --cases {args.cases!r}: expected target:precision,...")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    python = ensure_env(args.env.resolve())
    jobs_file = out / "jobs.json"
    if args.reuse:
        if not jobs_file.is_file():
            raise SystemExit(f"error: --reuse: {jobs_file} is missing (run once without --reuse)")
        jobs = json.loads(jobs_file.read_text())
    else:
        jobs = build_artifacts([m for m in args.models.split(",") if m], cases, out, show=not args.json)
        jobs_file.write_text(json.dumps(jobs, indent=1))
    records = run_emulated(python, jobs_file, args.qemu_cpu, args.timeout)
    rows = compare(jobs, records)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print(json.dumps(rows, indent=1) if args.json else render(rows, args.qemu_cpu))
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
