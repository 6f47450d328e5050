"""cpu-openvino and cpu-tvm for linux-aarch64, built on this x86-64 machine and run under qemu user-mode emulation,
against the same artifacts built for x86-64 (issue #21, items 3 and 4).

    python benchmarks/arm64_ov_tvm_check.py --root ARM64_ROOT [--models vmamba_digits_v2,vmamba_digits_v0]
        [--cases cpu-openvino:fp32,cpu-openvino:bf16,cpu-openvino:int8,cpu-tvm:fp32] [--qemu-cpu max]
        [--out DIR] [--json]

ARM64_ROOT is an arm64 Debian tree holding python3.11 (debootstrap --arch=arm64 --foreign --variant=minbase
--include=python3 bookworm ARM64_ROOT, then `dpkg -x` of every downloaded .deb: FIELD-NOTES.md "ARM64"); qemu runs
its Python with `qemu-aarch64-static -L ARM64_ROOT`, which also serves ARM64_ROOT/proc/cpuinfo in place of the host's
x86 one (written here if absent: OpenVINO's and ONNX Runtime's CPU probes read it and crash on an x86 file).

Steps:
1. The device's packages, what a board would pip install: the runtime install (numpy, pillow, rich) plus openvino,
   openvino-telemetry and apache-tvm-ffi as aarch64 wheels (pip download --platform ...), installed into
   OUT/site-aarch64; and TVM's runtime library, libtvm_runtime.so, taken alone from the aarch64 apache-tvm wheel
   (the 240 MB compiler library stays out). No torch, no onnx, no compiler.
2. For each model and case, two artifacts through the exporter: one for this machine and one for linux-aarch64
   (export_artifact(platform=...); OpenVINO: the same IR, the extension cross-compiled against the aarch64 openvino
   wheel; TVM: code for aarch64-linux-gnu, linked by aarch64-linux-gnu-g++). Each carries its reference inputs and
   PyTorch fp32 logits (references.npz); the x86 artifact's self-check and outputs are computed here.
3. This same file, run by the emulated aarch64 Python in `--device` mode, with this package from its source tree and
   only the packages of step 1: for each aarch64 artifact, the self-check `vmamba-export validate DIR` runs (against
   the references it carries, thresholds of its target and precision), and its outputs on the reference inputs are
   written for step 4.
4. Parity of the aarch64 outputs with the x86 artifact's: fp32 within the target's fp32 rel L2 limit; bf16 and int8
   (whose kernels differ per instruction set) within the precision's cosine bound.

Emulation is for correctness only: nothing here times anything (qemu runs hundreds of times slower than hardware).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
PLATFORM = "linux-aarch64"
QEMU = "qemu-aarch64-static"
DEFAULT_MODELS = ("vmamba_digits_v2", "vmamba_digits_v0")
DEFAULT_CASES = ("cpu-openvino:fp32", "cpu-openvino:bf16", "cpu-openvino:int8", "cpu-tvm:fp32")
WHEEL_TAGS = ("manylinux_2_35_aarch64", "manylinux_2_28_aarch64", "manylinux2014_aarch64")
DEVICE_PYTHON = "3.11"  # Debian bookworm's
# A Neoverse-N1 (armv8.2-a: fp16, dot product), two cores: what qemu's default CPU model runs.
FAKE_CPUINFO = "".join(
    f"processor\t: {i}\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp "
    "asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs\nCPU implementer\t: 0x41\nCPU architecture: 8\n"
    "CPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n\n"
    for i in range(2)
)


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
    for job in jobs:
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


def _pip(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: pip {' '.join(args[:2])} failed: {(proc.stderr or proc.stdout).strip()[-800:]}")


def _platform_args() -> list[str]:
    args = [a for tag in WHEEL_TAGS for a in ("--platform", tag)]
    return [*args, "--only-binary=:all:", "--python-version", DEVICE_PYTHON, "--implementation", "cp"]


def prepare_site(work: Path) -> tuple[Path, Path]:
    """(site-packages for the emulated Python, folder holding the aarch64 libtvm_runtime.so), made once."""
    from importlib import metadata

    site, tvm_lib = work / "site-aarch64", work / "tvm-runtime-aarch64"
    wheels = work / "wheels-aarch64"
    versions = {d: metadata.version(d) for d in ("openvino", "apache-tvm-ffi", "apache-tvm")}
    stamp = site / ".versions.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == versions and (tvm_lib / "libtvm_runtime.so").is_file():
        return site, tvm_lib
    # the runtime install (scripts/arm64_env.sh: numpy, pillow, rich) plus the two runtimes checked here
    runtime = [
        "numpy",
        "pillow>=10",
        "rich>=13",
        f"openvino=={versions['openvino']}",
        "openvino-telemetry",
        f"apache-tvm-ffi=={versions['apache-tvm-ffi']}",
    ]
    _pip("download", "--quiet", *_platform_args(), *runtime, "-d", str(wheels))
    if site.exists():
        shutil.rmtree(site)
    _pip(
        "install",
        "--quiet",
        "--no-index",
        "--find-links",
        str(wheels),
        "--target",
        str(site),
        *_platform_args(),
        *runtime,
    )
    _pip(
        "download",
        "--quiet",
        "--no-deps",
        *_platform_args(),
        f"apache-tvm=={versions['apache-tvm']}",
        "-d",
        str(wheels),
    )
    found = sorted(wheels.glob(f"apache_tvm-{versions['apache-tvm']}-*aarch64*.whl"))
    if not found:
        raise SystemExit(f"error: no aarch64 apache-tvm {versions['apache-tvm']} wheel in {wheels}")
    tvm_lib.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(found[-1]) as wheel:  # the runtime library alone: a deployment needs no compiler
        (tvm_lib / "libtvm_runtime.so").write_bytes(wheel.read("tvm/lib/libtvm_runtime.so"))
    stamp.write_text(json.dumps(versions))
    return site, tvm_lib


def ensure_cpuinfo(root: Path) -> None:
    path = root / "proc" / "cpuinfo"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(FAKE_CPUINFO)


def build_artifacts(models: list[str], cases: list[tuple[str, str]], out: Path, show: bool) -> list[dict]:
    """x86 and aarch64 artifacts of every (model, target, precision), the x86 one's self-check and its outputs on the
    reference inputs; returns one job per pair."""
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
        for target_name, precision in cases:
            target = get_target(target_name)
            name = f"{model_name}-{target_name}-{precision}"
            folders = {}
            for plat in ("linux-x86_64", PLATFORM):
                folder = out / plat / name
                start = time.perf_counter()
                options = ExportOptions(extra={"show_progress": False})
                export_artifact(source, target, folder, precision, options=options, overwrite=True, platform=plat)
                if show:
                    print(f"built {plat}/{name} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
                folders[plat] = folder
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


def run_emulated(root: Path, site: Path, tvm_lib: Path, jobs_file: Path, qemu_cpu: str, timeout: int) -> dict:
    """Run the device side under qemu; {job name: its record}."""
    qemu = shutil.which(QEMU)
    if qemu is None:
        raise SystemExit(f"error: {QEMU} not found (Debian: apt-get install qemu-user-static)")
    python = root / "usr" / "bin" / "python3.11"
    if not python.is_file():
        raise SystemExit(f"error: {python} is missing: --root must be an arm64 Debian tree with python3.11")
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(site),
        "PYTHONDONTWRITEBYTECODE": "1",
        "VMAMBA_TVM_RUNTIME_LIB": str(tvm_lib),
        "HOME": str(jobs_file.parent),
    }
    cmd = [qemu, "-L", str(root), *(["-cpu", qemu_cpu] if qemu_cpu else []), str(python), str(Path(__file__).resolve())]
    proc = subprocess.run([*cmd, "--device", str(jobs_file)], env=env, capture_output=True, text=True, timeout=timeout)
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
        record = records.get(job["name"], {"ok": False, "error": "not run"})
        row = {**job, **record}
        manifest = read_manifest(Path(job["aarch64"]))
        x86_manifest = read_manifest(Path(job["x86_64"]))
        row["model_files_identical"] = _same_model_files(x86_manifest, manifest)
        row["binaries"] = manifest["platform"]["binaries"]
        failures = []
        if record.get("ok"):
            x86_inputs = read_references(Path(job["x86_64"]), x86_manifest)[0]
            if not np.array_equal(x86_inputs, read_references(Path(job["aarch64"]), manifest)[0]):
                failures.append("the two artifacts carry different reference inputs")
            vs_x86 = parity_metrics(np.load(job["device_out"]), np.load(job["x86_out"]))
            # fp32: the target's fp32 limits; bf16/int8 kernels differ per instruction set: the precision's bound
            limits = read_manifest(Path(job["x86_64"]))["thresholds"] if job["precision"] == "fp32" else None
            limits = limits or manifest["thresholds"]
            failures += [f"vs x86: {f}" for f in threshold_failures(vs_x86, limits)]
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


def _same_model_files(x86: dict, aarch64: dict) -> bool:
    """Whether the two artifacts' model files other than native libraries and references are byte-identical (the
    OpenVINO IR is platform-neutral; a TVM library is all native code, so False there)."""
    names = [n for n in aarch64["files"] if not n.endswith((".so", ".npz"))]
    return bool(names) and all(x86["files"].get(n, {}).get("sha256") == aarch64["files"][n]["sha256"] for n in names)


def render(rows: list[dict], qemu_cpu: str) -> str:
    lines = [
        f"aarch64 artifacts under qemu ({QEMU}, -cpu {qemu_cpu or 'default (armv8.2-a+)'}; torch-free runtime), "
        "against the x86-64 artifacts built in the same run",
        "",
        "| artifact | self-check x86 | self-check aarch64 (rel L2 / cosine / top-1 vs PyTorch fp32) | vs x86: rel L2 "
        "| vs x86: cosine | IR = x86 | result |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
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
        if r.get("ok"):
            lines.append(f"- {r['name']}: {r['self_check']['evaluated_with']}; torch importable there: {r['torch']}")
            lines += [f"  - warning there: {w}" for w in r.get("warnings", [])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="arm64 Debian tree holding usr/bin/python3.11")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES), help="target:precision,...")
    parser.add_argument("--qemu-cpu", default="", help="qemu -cpu model (default: qemu's, armv8.2+); e.g. cortex-a53")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "arm64_ov_tvm")
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
    root = args.root.resolve()
    ensure_cpuinfo(root)
    site, tvm_lib = prepare_site(out)
    jobs = build_artifacts([m for m in args.models.split(",") if m], cases, out, show=not args.json)
    jobs_file = out / "jobs.json"
    jobs_file.write_text(json.dumps(jobs, indent=1))
    records = run_emulated(root, site, tvm_lib, jobs_file, args.qemu_cpu, args.timeout)
    rows = compare(jobs, records)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print(json.dumps(rows, indent=1) if args.json else render(rows, args.qemu_cpu))
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
