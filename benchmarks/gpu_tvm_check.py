"""cuda-tvm on a GPU machine with TVM's runtime only (no TVM compiler): parity, latency, scan-kernel bandwidth.

    python benchmarks/gpu_tvm_check.py [--prepared .tvm-gpu] [--runtime .tvm-rt] [--out DIR]

Needs: torch with CUDA; the folders built here by benchmarks/gpu_tvm_prepare.py (--prepared) and the runtime pieces
(--runtime: site/tvm_ffi for cp312, lib/libtvm_runtime.so, lib/libtvm_runtime_cuda.so, lib/libcudart.so.13). Sections,
each recorded and never fatal:

  params     rebuild the artifact's weights file from the seed (random weights) and compare its sha256 with the
             manifest's: equal means the same weights as the machine that built the reference
  model      load the artifact (runtime-only path), parity at batch 1 and 64 against the reference logits computed
             there by PyTorch (rel L2 <= 1e-4, top-1 agreement), and against PyTorch fp32 here (TF32 off); latency at
             batch 1 and 64, end to end (numpy in/out) and device only (inputs already on the GPU)
  scan       the TIR scan kernel alone (stage-1 shape, batch 64): correctness at batch 2 against the float64 reference,
             then CUDA-event median time, achieved bandwidth over the bytes it must read + write (inputs once, y once),
             against torch's device copy bandwidth (read + write)

Writes gpu_tvm_check.json and gpu_tvm_check.log under --out (else $OUT, else ./gpu_results).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

MAX_REL_L2 = 1e-4
LOG: list[str] = []
RESULTS: dict = {"sections": {}}
OUT_DIR = Path(".")


def log(message: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {message}"
    print(line, flush=True)
    LOG.append(line)


def flush() -> None:
    (OUT_DIR / "gpu_tvm_check.json").write_text(json.dumps(RESULTS, indent=2, default=str))
    (OUT_DIR / "gpu_tvm_check.log").write_text("\n".join(LOG) + "\n")


def section(name: str, fn, *args):
    log(f"== {name}")
    start = time.perf_counter()
    try:
        out = fn(*args) or {}
        RESULTS["sections"][name] = {"ok": True, "seconds": round(time.perf_counter() - start, 1), **out}
    except Exception as exc:  # noqa: BLE001 (every section runs; failures are recorded)
        log(traceback.format_exc())
        RESULTS["sections"][name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    flush()
    return RESULTS["sections"][name]


def setup_runtime(runtime: Path) -> None:
    """tvm_ffi (cp312) first on sys.path, libtvm_runtime*.so from runtime/lib; libcudart.so.13 from torch if it has
    loaded one, else the carried copy (libtvm_runtime_cuda.so needs it)."""
    import torch

    sys.path.insert(0, str(runtime / "site"))
    os.environ["VMAMBA_TVM_RUNTIME_LIB"] = str(runtime / "lib")
    torch.zeros(1, device="cuda")  # loads torch's CUDA runtime
    maps = Path("/proc/self/maps").read_text()
    if "libcudart.so.13" not in maps:
        ctypes.CDLL(str(runtime / "lib" / "libcudart.so.13"), mode=ctypes.RTLD_GLOBAL)
        log("loaded the carried libcudart.so.13 (torch has none loaded)")
    import tvm_ffi

    log(f"torch {torch.__version__} cuda {torch.version.cuda}; tvm_ffi {tvm_ffi.__version__} from {tvm_ffi.__file__}")
    RESULTS["torch"] = torch.__version__
    RESULTS["gpu"] = torch.cuda.get_device_name(0)


def rel_l2(out, ref) -> float:
    import numpy as np

    out64, ref64 = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out64 - ref64) / max(np.linalg.norm(ref64), 1e-300))


def check_params(prepared: Path, info: dict) -> dict:
    import hashlib

    from vmamba_export.lowering.tvm_relax import params_bytes
    from vmamba_export.model_source import resolve_model

    folder = prepared / info["artifact"]
    manifest = json.loads((folder / "manifest.json").read_text())
    model = resolve_model(info["model"], random_weights=True, seed=info["seed"]).model
    data = params_bytes(model.state_dict(), manifest["entry"]["params"])
    (folder / manifest["entry"]["params"]["file"]).write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    same = digest == info["params_sha256"]
    log(f"params.bin rebuilt ({len(data) / 1e6:.0f} MB): {'same weights' if same else 'DIFFERENT weights'} as there")
    return {"same_weights": same, "sha256": digest}


def check_model(prepared: Path, info: dict, same_weights: bool, runs: int) -> dict:
    import numpy as np
    import torch
    from gpu_tvm_prepare import make_input

    from vmamba_export.bench import time_calls
    from vmamba_export.model_source import resolve_model
    from vmamba_export.runtime import load
    from vmamba_export.runtime.tvm_backend import TvmBackend
    from vmamba_export.scan.op import torch_scan

    folder = prepared / info["artifact"]
    if same_weights:
        predictor = load(folder)  # verifies every file's sha256, params.bin included
        backend = predictor.backend
    else:  # different weights: the stored reference does not apply, only the comparison with torch here
        backend = TvmBackend(folder, json.loads((folder / "manifest.json").read_text()))
    log(f"loaded with {backend.evaluated_with}")
    if backend.load_errors:
        log(f"runtime-only path failed first: {backend.load_errors}")
    ref = np.load(prepared / "reference.npz")
    model = resolve_model(info["model"], random_weights=True, seed=info["seed"]).model.eval().set_scan(torch_scan)
    model = model.cuda()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    vm = backend._vm
    for b in (1, 64):
        x = make_input(b, info["size"])
        import hashlib

        same_input = hashlib.sha256(x.tobytes()).hexdigest() == str(ref[f"input_sha256_b{b}"])
        out = backend.run(x)
        with torch.no_grad():
            here = model(torch.from_numpy(x).cuda()).cpu().numpy()
        row = {"batch": b, "same_input_as_reference": same_input, "rel_l2_vs_torch_here": rel_l2(out, here)}
        row["top1_vs_torch_here"] = float((out.argmax(1) == here.argmax(1)).mean())
        if same_input and same_weights:
            stored = ref[f"logits_b{b}"]
            row["rel_l2_vs_reference"] = rel_l2(out, stored)
            row["top1_vs_reference"] = float((out.argmax(1) == stored.argmax(1)).mean())
            row["parity_pass"] = row["rel_l2_vs_reference"] <= MAX_REL_L2 and row["top1_vs_reference"] == 1.0
        row["end_to_end_ms"] = time_calls(lambda x=x: backend.run(x), 3, runs)["median_ms"]
        dev_in = vm._to_device(x)

        def device_only(dev_in=dev_in):
            vm.main(dev_in, *vm.params)
            torch.cuda.synchronize()

        row["device_ms"] = time_calls(device_only, 3, runs)["median_ms"]
        row["images_per_s"] = b / row["device_ms"] * 1e3
        log(json.dumps(row))
        rows.append(row)
    return {"rows": rows, "evaluated_with": backend.evaluated_with}


def check_scan(prepared: Path, info: dict) -> dict:
    import torch
    import tvm_ffi
    from gpu_check import scan_inputs

    from vmamba_export.bench import cuda_time_ms
    from vmamba_export.runtime.tvm_backend import CUDA, _load_runtime_libraries, _serve_cuda_binary
    from vmamba_export.scan.reference import selective_scan_reference

    s = info["scan"]
    folder = prepared / f"scan_b{s['batch']}"
    _load_runtime_libraries(CUDA)
    _serve_cuda_binary(folder, {"cuda_binary": "scan.fatbin", "cuda_source_sha256": info["cuda_source_sha256"]})
    lib = tvm_ffi.load_module(str(folder / "scan.so"))
    fn = lib["main"]
    di, h, w, n = s["d_inner"], s["h"], s["w"], s["d_state"]

    def run(ins, y):
        fn(*[tvm_ffi.from_dlpack(t) for t in ins], tvm_ffi.from_dlpack(y))

    small = scan_inputs(2, di, n, h, w, torch.float32, "cuda", 1)
    y = torch.empty_like(small[0])
    run(small, y)
    torch.cuda.synchronize()
    ref = selective_scan_reference(*[t.cpu().double() for t in small]).numpy()
    err = rel_l2(y.cpu().numpy(), ref)
    log(f"scan batch 2 vs float64 reference: rel L2 {err:.2e}")

    size = 1 << 28  # 1 GiB copy, read + written
    src = torch.randn(size, device="cuda")
    dst = torch.empty_like(src)
    copy_gbs = 2 * size * 4 / cuda_time_ms(lambda s=src, d=dst: d.copy_(s), runs=20, warmup=5) / 1e6
    del src, dst
    ins = scan_inputs(s["batch"], di, n, h, w, torch.float32, "cuda", 0)
    y = torch.empty_like(ins[0])
    ms = cuda_time_ms(lambda: run(ins, y), runs=30, warmup=5)
    must = sum(t.numel() * 4 for t in ins) + y.numel() * 4
    scratch = 2 * s["batch"] * 4 * di * h * w * 4  # per-direction outputs written, then read by the merge pass
    gbs = must / ms / 1e6
    out = {
        "rel_l2_vs_float64": err,
        "kernel_ok": err <= 1e-5,
        "batch": s["batch"],
        "shape": [di, h, w, n],
        "ms": ms,
        "mbytes_must_move": must / 1e6,
        "gbs": gbs,
        "copy_gbs": copy_gbs,
        "fraction_of_copy": gbs / copy_gbs,
        "gbs_with_scratch": (must + scratch) / ms / 1e6,
    }
    log(json.dumps(out))
    return out


def main() -> int:
    global OUT_DIR
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", type=Path, default=ROOT / ".tvm-gpu")
    parser.add_argument("--runtime", type=Path, default=ROOT / ".tvm-rt")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_results"))
    args = parser.parse_args()
    OUT_DIR = args.out
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    info = json.loads((args.prepared / "prepare.json").read_text())
    RESULTS["prepared"] = info
    setup_runtime(args.runtime)
    params = section("params", check_params, args.prepared, info)
    section("model", check_model, args.prepared, info, bool(params.get("same_weights")), args.runs)
    section("scan", check_scan, args.prepared, info)
    log("== summary")
    for name, sec in RESULTS["sections"].items():
        log(f"{name}: {'ok' if sec.get('ok') else 'FAILED ' + sec.get('error', '')}")
    for row in RESULTS["sections"].get("model", {}).get("rows", []):
        log(
            f"batch {row['batch']}: rel L2 vs reference {row.get('rel_l2_vs_reference', float('nan')):.2e} "
            f"(vs torch here {row['rel_l2_vs_torch_here']:.2e}), device {row['device_ms']:.2f} ms, "
            f"end to end {row['end_to_end_ms']:.2f} ms"
        )
    scan = RESULTS["sections"].get("scan", {})
    if scan.get("ok"):
        log(
            f"scan b{scan['batch']}: {scan['ms']:.3f} ms, {scan['gbs']:.0f} GB/s = "
            f"{100 * scan['fraction_of_copy']:.0f}% of copy ({scan['copy_gbs']:.0f} GB/s)"
        )
    flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
