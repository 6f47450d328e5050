"""Dense prediction on cuda-onnxruntime, in one run on a GPU machine: parity, mIoU and batch-1 latency.

    ORT_GPU_SITE=~/site python benchmarks/gpu_dense_check.py [--size 512] [--runs 20] [--out DIR]

Needs onnxruntime-gpu first on PYTHONPATH and vmamba_export/_native/libvmamba_ort_cuda.so (built elsewhere with
`python -m vmamba_export.build_kernels --cuda`, carried). Sections, each recorded and never fatal:

  bundled    the bundled segmenter vmamba_shapes_seg exported to cuda-onnxruntime fp32 and fp16 and validated as a
             user would (`vmamba-export validate`, CUDA graphs on, the loader's default): self-check against its
             references (rel L2, pixel agreement) and mIoU on shapes:holdout against the ground-truth masks, the
             PyTorch model's mIoU beside it; then graph-path parity: the artifact loaded with and without CUDA graphs
             at 64 x 64, 193 x 161 and back (3 calls each: plain first call, capture, replays), rel L2 graph vs plain
             and each vs PyTorch fp32
  upernet    vmamba_tiny_s1l8 UperNet (UPerHead 512, 150 classes, random weights, seed 0) exported to
             cuda-onnxruntime fp32 and fp16, parity against PyTorch fp32 (CPU, the scan op's C++ kernel) on one
             real photo at --size, with and without CUDA graphs, and batch-1 latency through `vmamba_export.load` +
             `predictor(batch)`: `cuda_graph=False` with numpy in and logits out, and the default (graphs) with the
             batch already on the GPU and the logits left there (a dense artifact's numpy calls run the plain
             session: run 19 measured the graph path with numpy out at twice the plain time, the copy of the logits
             out of the graph's buffer); the peer, ConvNeXt-T UperNet of the same head
             (benchmarks/segmentation_speed.py), exported by the same exporter (fp16: the same float16 conversion,
             float32 I/O) and run by the same ONNX Runtime CUDA provider with the same options (TF32 off for fp32):
             plain `session.run` (numpy in and out), and with `enable_cuda_graph` + I/O binding through the same
             runner as ours (runtime/cuda_graphs.py `run_device`, sessions specialised to the shape as the loader's);
             all four timed in the same rounds;
             ratios ours / peer without graphs and with graphs

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
        try:
            out[precision]["graph_parity"] = graph_parity(folder, source.model)
        except Exception as exc:  # recorded beside the validation, which stands on its own
            out[precision]["graph_parity"] = {"error": f"{type(exc).__name__}: {exc}"}
        gp = out[precision]["graph_parity"]
        acc = labelled.get("accuracy") or {}
        print(
            f"  shapes {precision}: self-check {self_check['status']}, labelled {labelled['status']}, "
            f"mIoU artifact {acc.get('artifact_miou')} torch {acc.get('torch_miou')}; graph path: {_graph_line(gp)}",
            flush=True,
        )
    return out


GRAPH_SHAPES = ((1, 3, 64, 64), (1, 3, 193, 161), (1, 3, 64, 64))  # an odd size, and back


def graph_parity(folder: Path, model) -> dict:
    """The artifact with CUDA graphs (the loader's default) against the same artifact without, and both against the
    PyTorch fp32 model: largest rel L2 over GRAPH_SHAPES, three calls each (first call plain, then capture, replays)."""
    import torch

    from vmamba_export import load
    from vmamba_export.references import torch_reference

    plain, graphed = load(folder, cuda_graph=False), load(folder)
    rng = np.random.default_rng(0)
    worst = {"graph_vs_plain": 0.0, "graph_vs_torch": 0.0, "plain_vs_torch": 0.0}
    for shape in GRAPH_SHAPES:
        for _ in range(3):
            x = rng.standard_normal(shape, dtype=np.float32)
            # A dense artifact replays graphs for device-resident calls (its numpy calls run the plain session).
            on_device = graphed(torch.from_numpy(x).cuda())
            got = [
                torch.from_dlpack(v).cpu().numpy() for v in (on_device if isinstance(on_device, list) else [on_device])
            ]
            want, ref = plain_outputs(plain(x)), torch_reference(model, x, 1)
            for g, w, r in zip(got, want, ref, strict=True):
                if not g.shape == w.shape == r.shape:
                    raise AssertionError(f"shapes at {shape}: graph {g.shape}, plain {w.shape}, torch {r.shape}")
                for key, a, b in (("graph_vs_plain", g, w), ("graph_vs_torch", g, r), ("plain_vs_torch", w, r)):
                    worst[key] = max(worst[key], _rel_l2(a, b))
    backend = graphed.backend  # graphs None: ORT would not capture this model, the reason in cuda_graph_note
    cached = backend.graphs.cached_shapes if backend.graphs is not None else []
    return {"shapes": [list(s) for s in GRAPH_SHAPES], "cached": cached, "note": backend.cuda_graph_note, **worst}


def plain_outputs(out) -> list[np.ndarray]:
    return list(out.values()) if isinstance(out, dict) else [out]


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def _graph_line(gp: dict) -> str:
    if "error" in gp:
        return f"ERROR {gp['error']}"
    return (
        f"rel L2 graph/plain {gp['graph_vs_plain']:.1e}, graph/torch {gp['graph_vs_torch']:.1e}, "
        f"plain/torch {gp['plain_vs_torch']:.1e}" + (f" (graphs {gp['note']})" if gp.get("note") else "")
    )


def _ort_session(
    path: Path, precision: str, library: Path | None = None, graph: bool = False, overrides: dict | None = None
):
    """A CUDA session as the loader makes one (`overrides`: the input's symbolic dimensions fixed, as the loader's
    graph sessions have them)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    for name, value in (overrides or {}).items():
        options.add_free_dimension_override_by_name(name, int(value))
    if library is not None:
        options.register_custom_ops_library(str(library))
    cuda = {"use_tf32": "0"} if precision == "fp32" else {}
    if graph:
        cuda["enable_cuda_graph"] = "1"
    return ort.InferenceSession(str(path), options, providers=[("CUDAExecutionProvider", cuda), "CPUExecutionProvider"])


def upernet_section(work: Path, size: int, runs: int, rounds: int) -> dict:
    import onnx
    import torch
    from segmentation_speed import export_peer_onnx, our_model

    from vmamba_export.data.sources import load_batch
    from vmamba_export.exporter import export_artifact
    from vmamba_export.lowering.fp16 import convert_model_to_fp16
    from vmamba_export.lowering.onnx_export import IR_VERSION
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
        out["rows"][precision] = upernet_row(folder, precision, peer_path, x, ref, runs, rounds)
    return out


def upernet_row(folder: Path, precision: str, peer_path: Path, x: np.ndarray, ref: np.ndarray, runs: int, rounds: int):
    """One precision of the upernet section: parity with and without graphs, then ours and the peer, each without and
    with CUDA graphs, timed in the same rounds."""
    import torch

    from vmamba_export import load
    from vmamba_export.bench import time_calls
    from vmamba_export.lowering.onnx_export import INPUT_NAME
    from vmamba_export.runtime.cuda_graphs import CudaGraphRunner
    from vmamba_export.runtime.onnxruntime_backend import dim_overrides_for

    plain, graphed = load(folder, cuda_graph=False), load(folder)
    # A dense artifact replays graphs for device-resident calls only (numpy calls run the plain session: copying
    # the 150 x S x S logits out of a graph's buffer cost more than the graph saved, run 19), so the graph rows
    # take a batch already on the GPU and leave the logits there, for ours and for the peer's runner alike.
    x_device = torch.from_numpy(x).cuda()
    parity = {}
    for path_name, predictor in (("plain", plain), ("graph", graphed)):
        for _ in range(3):  # the graph path: first call plain, then ORT's warm-up and capture; the last a graph's
            got = predictor(x) if path_name == "plain" else torch.from_dlpack(predictor(x_device)).cpu().numpy()
        diff = got.astype(np.float64) - ref
        parity[path_name] = {
            "rel_l2": float(np.linalg.norm(diff) / np.linalg.norm(ref)),
            "pixel_agreement": float((got.argmax(1) == ref.argmax(1)).mean()),
        }
    peer = _ort_session(peer_path, precision)
    peer_graph = CudaGraphRunner(
        lambda shape: _ort_session(peer_path, precision, graph=True, overrides=dim_overrides_for(peer, shape)), peer
    )
    calls = {
        "ours": lambda: plain(x),
        "ours_graph": lambda: graphed(x_device),
        "peer": lambda: peer.run(None, {INPUT_NAME: x}),
        "peer_graph": lambda: peer_graph.run_device(x_device),
    }
    times: dict = {k: [] for k in calls}
    errors: dict = {}
    for _ in range(rounds):  # interleaved: all four in the same rounds
        for key, call in calls.items():
            if key in errors:
                continue
            try:  # 5 warm-up calls: our graph path's first call is plain, the next ones ORT's warm-up and capture
                times[key].append(time_calls(call, 5, runs))
            except Exception as exc:  # one path failing leaves the others' figures
                errors[key] = f"{type(exc).__name__}: {exc}"
    med = {k: float(np.median([t["median_ms"] for t in v])) if v else None for k, v in times.items()}
    row = {
        "parity": parity["plain"],
        "parity_graph": parity["graph"],
        **times,
        "median_ms": med,
        "ratio_median": _paired_ratio(times["ours"], times["peer"]),
        "ratio_median_graph": _paired_ratio(times["ours_graph"], times["peer_graph"]),
        "graph_speedup_ours": _paired_ratio(times["ours"], times["ours_graph"]),
        "graph_speedup_peer": _paired_ratio(times["peer"], times["peer_graph"]),
        "errors": errors,
        # None while our graph path replays graphs; ORT's refusal when it would not capture (then "ours_graph" times
        # the plain session it falls back to)
        "ours_graph_note": graphed.backend.cuda_graph_note,
        "providers": plain.backend.session.get_providers(),
    }
    print(
        f"  upernet {precision}: rel L2 {parity['plain']['rel_l2']:.2e} (graph {parity['graph']['rel_l2']:.2e}), "
        f"pixel agreement {parity['plain']['pixel_agreement']:.4f} (graph {parity['graph']['pixel_agreement']:.4f}); "
        f"{_ms_line(med)}; ratio {_num(row['ratio_median'])}, with graphs {_num(row['ratio_median_graph'])}"
        + (f"; our graph path {row['ours_graph_note']}" if row["ours_graph_note"] else "")
        + (f"; errors {errors}" if errors else ""),
        flush=True,
    )
    return row


def _paired_ratio(ours: list[dict], theirs: list[dict]) -> float | None:
    """Median over rounds of ours / theirs (median ms of the same round); None when either has no rounds."""
    pairs = list(zip(ours, theirs))
    return float(np.median([o["median_ms"] / p["median_ms"] for o, p in pairs])) if pairs else None


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ms_line(med: dict) -> str:
    return (
        f"ours {_num(med['ours'])} ms (graph {_num(med['ours_graph'])}), "
        f"peer {_num(med['peer'])} ms (graph {_num(med['peer_graph'])})"
    )


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
                    f"{acc.get('artifact_miou')} (torch {acc.get('torch_miou')}), "
                    f"labelled {row['labelled']['status']}; "
                    f"graph path {_graph_line(row.get('graph_parity') or {'error': 'not run'})}"
                )
            else:
                print(
                    f"{name:8s} | {precision} | rel L2 {row['parity']['rel_l2']:.2e} (graph "
                    f"{row['parity_graph']['rel_l2']:.2e}), agreement {row['parity']['pixel_agreement']:.4f}; batch 1 "
                    f"{_ms_line(row['median_ms'])}; ours/peer {_num(row['ratio_median'])}, with graphs "
                    f"{_num(row['ratio_median_graph'])}"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
