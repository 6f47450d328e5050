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
1. The device's packages, what a board would pip install: openvino, openvino-telemetry, numpy and apache-tvm-ffi as
   aarch64 wheels (pip download --platform ...), installed into OUT/site-aarch64; and TVM's runtime library,
   libtvm_runtime.so, taken alone from the aarch64 apache-tvm wheel (the 240 MB compiler library stays out).
2. For each model and case, two artifacts through the exporter: one for this machine and one with
   ExportOptions.extra["platform"] = "linux-aarch64" (OpenVINO: the same IR with the extension cross-compiled against
   the aarch64 openvino wheel; TVM: code for aarch64-linux-gnu, linked by aarch64-linux-gnu-g++).
3. The reference inputs (the built-in real photos, preprocessed), the PyTorch fp32 logits (scan in plain torch) and
   the x86 artifact's outputs, computed here.
4. This same file, run by the emulated aarch64 Python in `--device` mode: no torch, no compiler, only the runtime
   packages of step 1; it loads each aarch64 artifact with vmamba_export's own backend (files verified against their
   hashes) and writes its outputs.
5. Parity: the aarch64 outputs against the x86 artifact's (fp32 rel L2 within the target's fp32 limit) and against
   PyTorch fp32 (the target's thresholds for the precision: rel L2 for fp32, cosine for bf16 and int8).

Emulation is for correctness only: nothing here times anything (qemu runs hundreds of times slower than hardware).
"""

from __future__ import annotations

import argparse
import copy
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


def _import_runtime_side():
    """vmamba_export's artifact reader and backends without the package's __init__ (which imports the models, hence
    torch, until the runtime is split from the builder): the package and its runtime subpackage are registered as
    bare namespaces, so only the modules named here, and what they import, are loaded."""
    import types

    for name, path in (
        ("vmamba_export", REPO / "vmamba_export"),
        ("vmamba_export.runtime", REPO / "vmamba_export" / "runtime"),
    ):
        module = types.ModuleType(name)
        module.__path__ = [str(path)]
        sys.modules[name] = module
    from vmamba_export.artifact import read_manifest, verify_files
    from vmamba_export.runtime.openvino_backend import OpenVinoBackend
    from vmamba_export.runtime.tvm_backend import TvmBackend

    return read_manifest, verify_files, {"openvino": OpenVinoBackend, "tvm": TvmBackend}


def device_main(jobs_file: Path) -> int:
    import platform
    import warnings

    read_manifest, verify_files, backends = _import_runtime_side()
    jobs = json.loads(jobs_file.read_text())
    results = []
    for job in jobs:
        folder = Path(job["aarch64"])
        record = {"name": job["name"], "machine": platform.machine()}
        try:
            manifest = read_manifest(folder)
            verify_files(folder, manifest)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                backend = backends[manifest["target"]["runtime"]](folder, manifest, threads=2)
            record["warnings"] = [str(w.message) for w in caught]
            batch = np.load(job["inputs"])
            out = np.concatenate([backend.run(batch[i : i + 8]) for i in range(0, len(batch), 8)])
            np.save(job["device_out"], out)
            record["evaluated_with"] = getattr(backend, "evaluated_with", None) or _openvino_label()
            record["ok"] = True
        except Exception as exc:  # noqa: BLE001 (each artifact reports its own failure; the others still run)
            record.update(ok=False, error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:400]}")
        print(json.dumps(record), flush=True)
        results.append(record)
    (jobs_file.parent / "device_results.json").write_text(json.dumps(results, indent=1))
    return 0


def _openvino_label() -> str:
    import openvino as ov

    core = ov.Core()
    return f"OpenVINO {ov.__version__.split('-')[0]} CPU plugin ({core.get_property('CPU', 'FULL_DEVICE_NAME')})"


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
    runtime = [
        f"openvino=={versions['openvino']}",
        "openvino-telemetry",
        "numpy",
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
    """x86 and aarch64 artifacts of every (model, target, precision), the reference inputs, PyTorch fp32 logits and
    the x86 artifacts' outputs; returns one job per pair."""
    import vmamba_export
    from vmamba_export.data.sources import load_batch
    from vmamba_export.exporter import export_artifact
    from vmamba_export.lowering import ExportOptions
    from vmamba_export.model_source import resolve_model
    from vmamba_export.scan.op import torch_scan
    from vmamba_export.targets import get_target
    from vmamba_export.validate import run_predictor, run_torch

    jobs = []
    for model_name in models:
        source = resolve_model(model_name)
        spec = source.model.config.input
        batch, _, _ = load_batch("builtin", spec)
        inputs = out / f"{model_name}-inputs.npy"
        np.save(inputs, batch)
        reference = copy.deepcopy(source.model)  # the exports below need the model's own scan op, untouched
        reference.set_scan(torch_scan)
        torch_out = out / f"{model_name}-torch.npy"
        np.save(torch_out, run_torch(reference, batch))
        for target_name, precision in cases:
            target = get_target(target_name)
            name = f"{model_name}-{target_name}-{precision}"
            folders = {}
            for plat in ("x86_64", "aarch64"):
                folder = out / plat / name
                start = time.perf_counter()
                options = ExportOptions(extra={"show_progress": False})
                if plat == "aarch64":
                    options.extra["platform"] = PLATFORM
                export_artifact(source, target, folder, precision, options=options, overwrite=True)
                if show:
                    print(f"built {plat}/{name} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
                folders[plat] = folder
            x86_out = out / f"{name}-x86_64.npy"
            np.save(x86_out, run_predictor(vmamba_export.load(folders["x86_64"]), batch))
            jobs.append(
                {
                    "name": name,
                    "target": target_name,
                    "precision": precision,
                    "x86_64": str(folders["x86_64"]),
                    "aarch64": str(folders["aarch64"]),
                    "inputs": str(inputs),
                    "torch_out": str(torch_out),
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
    from vmamba_export.validate import parity_metrics, threshold_failures

    rows = []
    for job in jobs:
        record = records.get(job["name"], {"ok": False, "error": "not run"})
        row = {"name": job["name"], "target": job["target"], "precision": job["precision"], **record}
        manifest = read_manifest(Path(job["aarch64"]))
        thresholds = manifest.get("thresholds", {})
        fp32_limit = read_manifest(Path(job["x86_64"]))["thresholds"]  # the target's fp32 limits are for fp32 only
        ir_same = _same_model_files(Path(job["x86_64"]), Path(job["aarch64"]), manifest)
        row["model_files_identical"] = ir_same
        if record.get("ok"):
            device = np.load(job["device_out"])
            x86 = np.load(job["x86_out"])
            torch_ref = np.load(job["torch_out"])
            vs_x86 = parity_metrics(device, x86)
            vs_torch = parity_metrics(device, torch_ref)
            failures = threshold_failures(vs_torch, thresholds)
            if job["precision"] == "fp32":
                failures += [f"vs x86: {f}" for f in threshold_failures(vs_x86, fp32_limit)]
            else:  # bf16/int8 kernels differ per ISA: the precision's bound, as against torch
                failures += [f"vs x86: {f}" for f in threshold_failures(vs_x86, thresholds)]
            row.update(vs_x86=vs_x86, vs_torch=vs_torch, thresholds=thresholds, failures=failures, passed=not failures)
        else:
            row.update(passed=False, failures=[record.get("error", "failed")])
        row["libraries"] = manifest["lowering"].get("platform"), _elf_machines(Path(job["aarch64"]))
        rows.append(row)
    return rows


def _same_model_files(a: Path, b: Path, manifest: dict) -> bool:
    """Whether the two artifacts' files other than native libraries are byte-identical (the OpenVINO IR is
    platform-neutral; TVM's library is all native code, so it has none)."""
    from vmamba_export.artifact import read_manifest

    other = read_manifest(a)["files"]
    names = [n for n in manifest["files"] if not n.endswith(".so")]
    return bool(names) and all(other.get(n, {}).get("sha256") == manifest["files"][n]["sha256"] for n in names)


def _elf_machines(folder: Path) -> dict:
    from vmamba_export.build_kernels import elf_machine

    return {p.name: elf_machine(p) for p in sorted(folder.glob("*.so"))}


def render(rows: list[dict], qemu_cpu: str) -> str:
    lines = [
        f"aarch64 artifacts under qemu ({QEMU}, -cpu {qemu_cpu or 'default'}) vs the x86-64 artifacts and PyTorch fp32",
        "",
        "| artifact | aarch64 run | rel L2 vs x86 | cosine vs x86 | rel L2 vs torch | cosine vs torch | top-1 vs torch "
        "| model files = x86 | result |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("ok"):
            x, t = r["vs_x86"], r["vs_torch"]
            cells = [f"{x['rel_l2']:.2e}", f"{x['cosine_min']:.6f}", f"{t['rel_l2']:.2e}", f"{t['cosine_min']:.6f}"]
            cells.append(f"{t['top1_agreement']:.2f}")
        else:
            cells = ["-"] * 5
        result = "pass" if r["passed"] else "FAIL: " + "; ".join(r["failures"])
        ran = "ran" if r.get("ok") else "failed"
        lines.append(f"| {r['name']} | {ran} | {' | '.join(cells)} | {r['model_files_identical']} | {result} |")
    lines.append("")
    for r in rows:
        if r.get("ok"):
            lines.append(f"- {r['name']}: {r['evaluated_with']}; binaries {r['libraries'][1]}")
            for w in r.get("warnings", []):
                lines.append(f"  - warning: {w}")
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
