"""Dense prediction on cuda-onnxruntime, in one run on a GPU machine: parity, mIoU and batch-1 latency.

    ORT_GPU_SITE=~/site python benchmarks/gpu_dense_check.py [--size 512] [--runs 20] [--out DIR]

Needs onnxruntime-gpu first on PYTHONPATH and vmamba_export/_native/libvmamba_ort_cuda.so (built elsewhere with
`python -m vmamba_export.build_kernels --cuda`, carried). Sections, each recorded and never fatal:

  bundled    the bundled segmenter vmamba_shapes_seg exported to cuda-onnxruntime fp32 and fp16 and validated as a
             user would (`vmamba-export validate`): self-check against its references (rel L2, pixel agreement) and
             mIoU on shapes:holdout against the ground-truth masks, the PyTorch model's mIoU beside it
  upernet    vmamba_tiny_s1l8 UperNet (UPerHead 512, 150 classes, random weights, seed 0) exported to
             cuda-onnxruntime fp32 and fp16, parity against PyTorch fp32 (CPU, the scan op's C++ kernel) on one
             real photo at --size, and batch-1
             latency through `vmamba_export.load` + `predictor(batch)` (numpy in, logits at the input size out);
             the peer, ConvNeXt-T UperNet of the same head (benchmarks/segmentation_speed.py), exported by the same
             exporter (fp16: the same float16 conversion, float32 I/O) and run by the same ONNX Runtime CUDA provider
             with the same options (TF32 off for fp32), timed in the same rounds; ratio ours / peer

Writes gpu_dense_check.json under --out (default $OUT or ./gpu_results) and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402

TARGET = "cuda-onnxruntime"


def section(results: dict, name: str, fn) -> None:
    t0 = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as exc:  # recorded, never fatal: the other sections still run
        results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    print(f"[{name}] {time.perf_counter() - t0:.0f} s", flush=True)


def bundled_section(work: Path) -> dict:
    from vmamba_export.exporter import export_artifact
    from vmamba_export.model_source import resolve_model
    from vmamba_export.targets import get_target
    from vmamba_export.validate import validate_artifact

    source = resolve_model("vmamba_shapes_seg")
    out = {}
    for precision in ("fp32", "fp16"):
        folder = work / f"shapes-{precision}"
        export_artifact(source, get_target(TARGET), folder, precision, overwrite=True)
        self_check = validate_artifact(folder, show_progress=False)
        labelled = validate_artifact(folder, accuracy_source="shapes:holdout", show_progress=False, recompute=True)
        out[precision] = {"self_check": self_check, "labelled": labelled}
        acc = labelled.get("accuracy") or {}
        print(
            f"  shapes {precision}: self-check {self_check['status']}, labelled {labelled['status']}, "
            f"mIoU artifact {acc.get('artifact_miou')} torch {acc.get('torch_miou')}",
            flush=True,
        )
    return out


def _ort_session(path: Path, precision: str, library: Path | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if library is not None:
        options.register_custom_ops_library(str(library))
    cuda = {"use_tf32": "0"} if precision == "fp32" else {}
    return ort.InferenceSession(str(path), options, providers=[("CUDAExecutionProvider", cuda), "CPUExecutionProvider"])


def upernet_section(work: Path, size: int, runs: int, rounds: int) -> dict:
    import onnx
    import torch
    from segmentation_speed import export_peer_onnx, our_model

    from vmamba_export import load
    from vmamba_export.bench import time_calls
    from vmamba_export.data.sources import load_batch
    from vmamba_export.exporter import export_artifact
    from vmamba_export.lowering.fp16 import convert_model_to_fp16
    from vmamba_export.lowering.onnx_export import INPUT_NAME, IR_VERSION
    from vmamba_export.model_source import ModelSource
    from vmamba_export.targets import get_target

    torch.manual_seed(0)
    model = our_model()
    source = ModelSource(model, {"kind": "random", "name": "vmamba_tiny_s1l8", "seed": 0})
    spec = model.config.input
    import dataclasses

    x = load_batch("builtin:1", dataclasses.replace(spec, image_size=size, crop=True, resize=size))[0]
    t0 = time.perf_counter()
    with torch.no_grad():  # the scan op's CPU kernel: plain torch's step loop would take minutes at 128 x 128
        ref = model(torch.from_numpy(x)).numpy()
    print(f"  upernet: PyTorch fp32 reference {time.perf_counter() - t0:.0f} s", flush=True)
    peer32 = export_peer_onnx(work / "peer_fp32.onnx", size, fixed=False)
    peer16 = work / "peer_fp16.onnx"
    onnx.save_model(convert_model_to_fp16(onnx.load(str(peer32)), IR_VERSION), str(peer16))
    out: dict = {"size": size, "rows": {}}
    for precision, peer_path in (("fp32", peer32), ("fp16", peer16)):
        folder = work / f"upernet-{precision}"
        t0 = time.perf_counter()
        export_artifact(source, get_target(TARGET), folder, precision, max_size=max(size, 512), overwrite=True)
        print(f"  upernet {precision}: exported in {time.perf_counter() - t0:.0f} s", flush=True)
        predictor = load(folder)
        got = predictor(x)
        diff = got.astype(np.float64) - ref
        parity = {
            "rel_l2": float(np.linalg.norm(diff) / np.linalg.norm(ref)),
            "pixel_agreement": float((got.argmax(1) == ref.argmax(1)).mean()),
        }
        peer = _ort_session(peer_path, precision)
        ours_ms, peer_ms = [], []
        for _ in range(rounds):  # interleaved: the peer in the same rounds
            ours_ms.append(time_calls(lambda p=predictor: p(x), 3, runs))
            peer_ms.append(time_calls(lambda s=peer: s.run(None, {INPUT_NAME: x}), 3, runs))
        ratios = [o["median_ms"] / p["median_ms"] for o, p in zip(ours_ms, peer_ms)]
        out["rows"][precision] = {
            "parity": parity,
            "ours": ours_ms,
            "peer": peer_ms,
            "ratio_median": float(np.median(ratios)),
            "providers": predictor.backend.session.get_providers(),
        }
        print(
            f"  upernet {precision}: rel L2 {parity['rel_l2']:.2e}, pixel agreement {parity['pixel_agreement']:.4f}, "
            f"ours {np.median([o['median_ms'] for o in ours_ms]):.2f} ms, peer "
            f"{np.median([p['median_ms'] for p in peer_ms]):.2f} ms, ratio {np.median(ratios):.2f}",
            flush=True,
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], choices=("bundled", "upernet"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_results")))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import onnxruntime as ort

    results: dict = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers()}
    try:
        import torch

        results["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception as exc:
        results["gpu"] = f"unknown ({exc})"
    print(f"onnxruntime {ort.__version__} {results['providers']}; GPU {results['gpu']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="vmamba-gpu-dense-") as tmp:
        work = Path(tmp)
        if "bundled" not in args.skip:
            section(results, "bundled", lambda: bundled_section(work))
        if "upernet" not in args.skip:
            section(results, "upernet", lambda: upernet_section(work, args.size, args.runs, args.rounds))
    (args.out / "gpu_dense_check.json").write_text(json.dumps(results, indent=1, default=str))
    print("\nsection  | row  | figures")
    for name in ("bundled", "upernet"):
        res = results.get(name)
        if not isinstance(res, dict):
            continue
        if "error" in res:
            print(f"{name:8s} | -    | ERROR {res['error']}")
            continue
        rows = res.get("rows", res)
        for precision, row in rows.items():
            if name == "bundled":
                acc = row["labelled"].get("accuracy") or {}
                print(
                    f"{name:8s} | {precision} | self-check {row['self_check']['status']}, mIoU "
                    f"{acc.get('artifact_miou')} (torch {acc.get('torch_miou')}), labelled {row['labelled']['status']}"
                )
            else:
                print(
                    f"{name:8s} | {precision} | rel L2 {row['parity']['rel_l2']:.2e}, agreement "
                    f"{row['parity']['pixel_agreement']:.4f}, ours/peer batch 1 {row['ratio_median']:.2f}"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
