"""cuda-onnxruntime on a GPU machine in one run: kernel correctness, kernel bandwidth, model parity and speed.

    python benchmarks/gpu_check.py [--onnx-dir DIR] [--quick] [--out DIR]

Needs: torch with CUDA, onnxruntime-gpu (CUDAExecutionProvider) first on PYTHONPATH, and
vmamba_export/_native/libvmamba_ort_cuda.so (`python -m vmamba_export.build_kernels --cuda`, built elsewhere and
carried: the machine needs no compiler). Sections, each recorded and never fatal:

  kernel     the CUDA scan (C launcher through ctypes, torch CUDA tensors) against the float64 reference
             (vmamba_export.scan.selective_scan_reference, CPU) at small shapes: d_state 1 and 16, float32 and
             float16, both kernel paths, plus the ORT CUDA op in one-node models
  bandwidth  the scan kernel alone at the stage-1 shapes (56x56) of vmamba_tiny_s1l8 (Di 96, N 1) and
             vanilla_vmamba_tiny (Di 192, N 16), batch 128 and 1: bytes it must move (inputs read once, y written
             once) over CUDA-event median time (batch 1: per call inside a CUDA graph, so GPU time and not the
             launch), against the device's copy bandwidth (torch copy_, read + write), with the other kernel
             variants swept; then vmamba_tiny_s1l8's later-stage shapes (LATER_STAGE_SHAPES), automatic path against
             the block and line kernels forced
  floor      the d_state-16 scan's arithmetic floor (kernels/cuda/scan_floor.cu: the per-state work of one scan
             step on registers, exponentials split between the special-function units and an FMA-pipe polynomial
             at the best measured mix) at the vanilla_vmamba_tiny stage-1 shape, batch 128, against the time the
             70% bandwidth target allows
  model      vmamba_tiny_s1l8 (random weights, seed 0) exported to cuda-onnxruntime fp32 and fp16 (or the artifacts
             in --onnx-dir/<row>), plus fp16 without the channels-last graph and our LayerNorm kernel for
             comparison (MODEL_VARIANTS), and vanilla_vmamba_tiny fp16 (OTHER_MODEL_ROWS); `--rows` picks some.
             Parity against PyTorch fp32 (TF32 off), plain and through the predictor's CUDA-graph path (also after
             a change of input shape); throughput at batch 128 and latency at batch 1 (IO binding, inputs already
             on the GPU), each plain and replaying a CUDA graph; the predictor's batch-1 call on a numpy batch as a
             user makes it, with and without graphs. The peer: ConvNeXt-T fp16 and fp32 through the same ONNX
             Runtime, measured the same ways (benchmarks/convnext.py; --onnx-dir/convnext_<precision>.onnx if
             present); ratios per row against the peer of the same precision.

Writes gpu_check.json and gpu_check.log under $OUT (else ./gpu_results) and prints a short table last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from vmamba_export.bench import cuda_time_ms  # noqa: E402

# Targets of the issue.
MIN_BANDWIDTH_FRACTION = 0.70

LOG: list[str] = []
RESULTS: dict = {"sections": {}, "errors": []}
OUT_DIR: Path | None = None


def flush_results() -> None:
    """Write what is known so far: a run cut off by the device's time limit still leaves its results."""
    if OUT_DIR is None:
        return
    (OUT_DIR / "gpu_check.json").write_text(json.dumps(RESULTS, indent=2, default=str))
    (OUT_DIR / "gpu_check.log").write_text("\n".join(LOG) + "\n")


def log(message: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {message}"
    print(line, flush=True)
    LOG.append(line)


def section(name: str):
    """Decorator: run a section, record its result or its traceback, never raise."""

    def wrap(fn):
        def run(*args, **kwargs):
            log(f"== {name}")
            start = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
                RESULTS["sections"][name] = {
                    "ok": True,
                    "seconds": round(time.perf_counter() - start, 1),
                    **(out or {}),
                }
            except Exception as exc:  # record and go on
                tb = traceback.format_exc()
                log(f"{name} FAILED: {exc!r}\n{tb}")
                RESULTS["sections"][name] = {"ok": False, "error": repr(exc), "traceback": tb}
                RESULTS["errors"].append(f"{name}: {exc!r}")
            flush_results()
            return RESULTS["sections"][name]

        return run

    return wrap


def scan_inputs(batch, di, n, h, w, dtype, device, seed):
    """Realistic ranges: dt = softplus(delta + bias) around 0.1..2, A = -(1..16) (v0 init) or -exp(N(0, 0.5))."""
    g = torch.Generator().manual_seed(seed)
    k = 4
    u = torch.randn(batch, di, h, w, generator=g)
    delta = torch.randn(batch, k, di, h, w, generator=g) * 0.5 - 1.0
    if n == 1:
        a_logs = torch.randn(k * di, n, generator=g) * 0.5
    else:
        a_logs = torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(k * di, 1)
        a_logs += torch.randn(k * di, n, generator=g) * 0.1
    b = torch.randn(batch, k, n, h, w, generator=g)
    c = torch.randn(batch, k, n, h, w, generator=g)
    d = torch.randn(k * di, generator=g)
    bias = torch.randn(k * di, generator=g) * 0.5
    return tuple(t.to(device=device, dtype=dtype).contiguous() for t in (u, delta, a_logs, b, c, d, bias))


def rel_l2(out, ref) -> float:
    out64, ref64 = np.asarray(out, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(out64 - ref64) / max(np.linalg.norm(ref64), 1e-300))


KERNEL_SHAPES = [  # (batch, d_inner, d_state, H, W): odd sizes, chunking (lines > 32), partial channel tiles
    (2, 5, 1, 7, 9),
    (1, 3, 1, 40, 40),
    (2, 3, 1, 70, 66),
    (2, 4, 1, 80, 70),  # two segments of the block kernel
    (2, 4, 1, 56, 56),  # quad-vectorised staging (width % 4 == 0)
    (2, 5, 16, 7, 9),
    (1, 3, 16, 40, 36),
    (1, 2, 16, 56, 56),
    (1, 2, 1, 16, 20),  # line kernel: 8-step chunks, partial ones at the row ends
    (3, 7, 1, 14, 14),  # line kernel: several channels a block, a partial tile
]


def one_node_session(dtype, library: Path, shapes):
    import onnxruntime as ort

    from vmamba_export.lowering.onnx_export import SCAN_INPUTS, one_node_scan_model

    names = list(SCAN_INPUTS)
    model = one_node_scan_model(shapes=shapes, float16=dtype == torch.float16)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # The library also has a float32 CPU kernel: fail instead of quietly running the node there.
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    options.register_custom_ops_library(str(library))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CUDAExecutionProvider"])
    return session, names


def scan_node_providers(folder: Path) -> dict:
    """{execution provider: number of scan node runs} from one profiled batch-1 run of the artifact (SelectiveScan2D,
    and SelectiveScan2DPacked or SelectiveScan2DMerged where a projection rewrite replaced it)."""
    import onnxruntime as ort

    manifest = json.loads((folder / "manifest.json").read_text())
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.gettempdir()) / "gpu_check_profile")
    options.register_custom_ops_library(str(folder / manifest["entry"]["custom_op_library"]))
    session = ort.InferenceSession(
        str(folder / manifest["entry"]["model"]), options, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
    session.run(None, {session.get_inputs()[0].name: x})
    profile = Path(session.end_profiling())
    counts: dict = {}
    for event in json.loads(profile.read_text()):
        args = event.get("args", {})
        if (
            event.get("cat") == "Node"
            and args.get("op_name") in ("SelectiveScan2D", "SelectiveScan2DPacked", "SelectiveScan2DMerged")
            and event["name"].endswith("_kernel_time")
        ):
            counts[args.get("provider", "?")] = counts.get(args.get("provider", "?"), 0) + 1
    profile.unlink(missing_ok=True)
    return counts


@section("kernel")
def check_kernel(quick: bool) -> dict:
    from vmamba_export import cuda_kernel
    from vmamba_export.kernels_paths import ort_cuda_library_path
    from vmamba_export.scan import selective_scan_reference

    rows = []
    failures = []
    shapes = KERNEL_SHAPES[:2] + KERNEL_SHAPES[3:5] if quick else KERNEL_SHAPES
    for seed, (batch, di, n, h, w) in enumerate(shapes):
        cpu = scan_inputs(batch, di, n, h, w, torch.float32, "cpu", seed)
        for dtype, limit in ((torch.float32, 2e-5), (torch.float16, 3e-3)):
            ins = tuple(t.to(dtype) for t in cpu)
            ref = selective_scan_reference(*[t.to(torch.float64) for t in ins]).numpy()
            gpu = tuple(t.cuda() for t in ins)
            for path in cuda_kernel.KERNEL_VARIANTS:
                if path.startswith(("block", "lines", "warps")) and n != 1:
                    continue  # the block, line and warp kernels are d_state-1 paths
                cuda_kernel.apply_variant(path)
                y = torch.full_like(gpu[0], float("nan"))  # poison: every element must be written
                try:
                    cuda_kernel.selective_scan_2d_cuda(*gpu, out=y)
                except RuntimeError as exc:
                    if path.startswith(("lines", "warps")) and "kernel takes maps" in str(exc):
                        continue  # map too large for the line or warp kernel
                    raise
                torch.cuda.synchronize()
                config = cuda_kernel.last_config()
                out = y.float().cpu().numpy()
                err = rel_l2(out, ref)
                finite = bool(np.isfinite(out).all())
                ok = finite and err <= limit
                row = {
                    "shape": [batch, di, n, h, w],
                    "dtype": str(dtype)[6:],
                    "path": path,
                    "rel_l2": err,
                    "finite": finite,
                    "ok": ok,
                    "config": config,
                }
                rows.append(row)
                log(
                    f"kernel {row['shape']} {row['dtype']} {path}: rel_l2 {err:.2e} {'ok' if ok else 'FAIL'} [{config}]"
                )
                if not ok:
                    failures.append(row)
            cuda_kernel.apply_variant("auto")
            # The same through ONNX Runtime's CUDA EP (one-node model, GPU-resident inputs via IO binding).
            try:
                import onnxruntime as ort

                session, names = one_node_session(dtype, ort_cuda_library_path(), [t.shape for t in ins])
                binding = session.io_binding()
                np_dtype = np.float16 if dtype == torch.float16 else np.float32
                for name, t in zip(names, ins):
                    binding.bind_ortvalue_input(
                        name, ort.OrtValue.ortvalue_from_numpy(t.numpy().astype(np_dtype), "cuda", 0)
                    )
                binding.bind_output("y", "cuda")
                session.run_with_iobinding(binding)
                out = binding.copy_outputs_to_cpu()[0].astype(np.float32)
                err = rel_l2(out, ref)
                providers = session.get_providers()
                ok = bool(np.isfinite(out).all()) and err <= limit and providers[0] == "CUDAExecutionProvider"
                row = {
                    "shape": [batch, di, n, h, w],
                    "dtype": str(dtype)[6:],
                    "path": "ort-cuda",
                    "rel_l2": err,
                    "ok": ok,
                    "providers": providers,
                }
            except Exception as exc:
                row = {
                    "shape": [batch, di, n, h, w],
                    "dtype": str(dtype)[6:],
                    "path": "ort-cuda",
                    "ok": False,
                    "error": repr(exc),
                }
            rows.append(row)
            log(
                f"kernel {row['shape']} {row['dtype']} ort-cuda: {row.get('rel_l2', row.get('error'))} "
                f"{'ok' if row['ok'] else 'FAIL'}"
            )
            if not row["ok"]:
                failures.append(row)
    # A d_state the kernel does not compile must be refused with a message, not crash.
    try:
        bad = scan_inputs(1, 2, 3, 4, 4, torch.float32, "cuda", 0)
        cuda_kernel.selective_scan_2d_cuda(*bad)
        refused = "accepted d_state 3 (unexpected)"
        failures.append({"error": refused})
    except RuntimeError as exc:
        refused = str(exc)
    log(f"d_state 3: {refused}")
    return {"rows": rows, "failures": len(failures), "pass": not failures, "d_state_3": refused}


def copy_bandwidth_gbs() -> float:
    """The device's copy bandwidth: 1 GiB device-to-device, bytes read + written (measured once a run)."""
    if "copy_gbs" not in RESULTS:
        n = 1 << 28
        src = torch.randn(n, device="cuda")
        dst = torch.empty_like(src)
        copy_ms = cuda_time_ms(lambda s=src, d=dst: d.copy_(s), runs=20)
        RESULTS["copy_gbs"] = 2 * n * 4 / copy_ms / 1e6
        del src, dst
        log(f"copy bandwidth: {RESULTS['copy_gbs']:.0f} GB/s")
    return RESULTS["copy_gbs"]


def scan_bytes(batch: int, di: int, n_state: int, side: int, itemsize: int) -> int:
    """Bytes the scan op must move: u, delta, B, C read once, y written once (A_logs, D, bias: negligible, counted)."""
    positions = batch * side * side
    per_position = di + 4 * di + 2 * 4 * n_state + di
    return (positions * per_position + 4 * di * (n_state + 2)) * itemsize


@section("floor")
def check_floor(quick: bool) -> dict:
    """The d_state-16 scan's arithmetic floor (kernels/cuda/scan_floor.cu) against the 70% bandwidth target at the
    vanilla_vmamba_tiny stage-1 shape, batch 128: the fewest exponentials any scan evaluates (one per state element,
    a single pass) at the best measured mix of special-function-unit and FMA-pipe exponentials."""
    from vmamba_export import cuda_kernel

    copy_gbs = copy_bandwidth_gbs()
    batch, di, n_state, side = 128, 192, 16, 56
    elements = batch * 4 * di * side * side * n_state
    rates = {}
    for poly in cuda_kernel.FLOOR_POLY_STATES:
        rates[poly] = cuda_kernel.scan_floor_rate(poly, steps=512 if quick else 2048)
        log(f"  floor step, {poly:2d}/16 exponentials on the FMA pipes: {rates[poly] / 1e12:.2f} T state elements/s")
    best = max(rates, key=rates.get)
    out = {"elements": elements, "rates_per_s": rates, "best_poly_states": best, "copy_gbs": copy_gbs}
    for dtype, itemsize in (("float32", 4), ("float16", 2)):
        nbytes = scan_bytes(batch, di, n_state, side, itemsize)
        floor_ms = elements / rates[best] * 1e3
        target_ms = nbytes / (MIN_BANDWIDTH_FRACTION * copy_gbs * 1e6)
        out[dtype] = {
            "mbytes": nbytes / 1e6,
            "floor_ms": floor_ms,
            "target_ms": target_ms,
            "best_fraction_of_copy": nbytes / floor_ms / 1e6 / copy_gbs,
        }
        log(
            f"vanilla stage 1 b128 {dtype}: arithmetic floor {floor_ms:.3f} ms (best mix {best}/16 polynomial) vs "
            f"{target_ms:.3f} ms for {100 * MIN_BANDWIDTH_FRACTION:.0f}% of copy: at most "
            f"{100 * out[dtype]['best_fraction_of_copy']:.0f}% of copy reachable"
        )
    x = torch.linspace(-126.0, 0.0, 1 << 20, device="cuda")
    rel = ((cuda_kernel.exp2_poly(x).double() - torch.exp2(x.double())) / torch.exp2(x.double())).abs().max().item()
    out["exp2_poly_max_rel_error"] = rel
    log(f"FMA-pipe exp2 polynomial: max relative error {rel:.2e} on [-126, 0]")
    return out


def graph_time_ms(fn, calls: int = 20, runs: int = 10) -> float:
    """GPU time of one fn() from a CUDA graph of `calls` back-to-back calls (median replay / calls): a batch-1 scan
    takes microseconds, less than the host needs to launch it, so cuda_time_ms would time the launch."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return cuda_time_ms(graph.replay, runs=runs) / calls


# vmamba_tiny_s1l8's scans after stage 1 at 224 (d_inner, side): 2, 8 and 2 of them per inference.
LATER_STAGE_SHAPES = ((192, 28), (384, 14), (768, 7))


def scan_stage_rows(quick: bool) -> list[dict]:
    """The d_state-1 scan at the later stages' shapes, batch 128 and 1: the automatic path against the block and
    line kernels forced (the model runs 12 of its 14 scans at these shapes)."""
    from vmamba_export import cuda_kernel

    rows = []
    for di, side in LATER_STAGE_SHAPES:
        for dtype in (torch.float32, torch.float16):
            for bsz in (128, 1):
                ins = scan_inputs(bsz, di, 1, side, side, dtype, "cuda", 0)
                y = torch.empty_like(ins[0])
                row = {"d_inner": di, "side": side, "batch": bsz, "dtype": str(dtype)[6:], "ms": {}}
                for variant in ("auto", "block2", "lines-noprefetch"):
                    cuda_kernel.apply_variant(variant)
                    row["ms"][variant] = graph_time_ms(
                        lambda a=ins, o=y: cuda_kernel.selective_scan_2d_cuda(*a, out=o), runs=5 if quick else 10
                    )
                    if variant == "auto":
                        row["config"] = cuda_kernel.last_config()
                cuda_kernel.apply_variant("auto")
                rows.append(row)
                log(
                    f"scan {di}x{side}x{side} b{bsz} {row['dtype']}: "
                    + ", ".join(f"{k} {v:.4f} ms" for k, v in row["ms"].items())
                    + f" [{row['config']}]"
                )
                del ins, y
    return rows


@section("bandwidth")
def packed_scan_row(ins: tuple, batch1: bool, quick: bool) -> dict:
    """The packed scan (SelectiveScan2DPacked) at the same shape, rank 6 (stage 1): its time, the bytes it must move
    (u, the packed projections, y) and their rate against copy, and the unpacked path it replaces: the dt projection
    (a batched matmul writing delta) plus the scan."""
    from vmamba_export import cuda_kernel

    u, _, a_logs, _, _, d, delta_bias = ins
    bsz, di, height, width = u.shape
    rank, n_state = 6, a_logs.shape[1]
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(bsz, 4 * rank + 8 * n_state, height, width, device="cuda", generator=g).to(u.dtype)
    w = (torch.randn(4, di, rank, device="cuda", generator=g) * 0.3).to(u.dtype)
    y = torch.empty_like(u)
    b_mat = x[:, 4 * rank : 4 * rank + 4 * n_state].reshape(bsz, 4, n_state, height, width).contiguous()
    c_mat = x[:, 4 * rank + 4 * n_state :].reshape(bsz, 4, n_state, height, width).contiguous()
    dt_in = x[:, : 4 * rank].reshape(bsz, 4, rank, height * width)

    def packed():
        cuda_kernel.selective_scan_2d_packed_cuda(u, x, w, a_logs, d, delta_bias, out=y)

    def unpacked():
        delta = torch.matmul(w, dt_in).reshape(bsz, 4, di, height, width)
        cuda_kernel.selective_scan_2d_cuda(u, delta, a_logs, b_mat, c_mat, d, delta_bias, out=y)

    timer = graph_time_ms if batch1 else cuda_time_ms
    runs = 10 if quick else 30
    packed_ms = timer(packed, runs=runs)
    config = cuda_kernel.last_config()
    nbytes = (2 * u.numel() + x.numel()) * u.element_size()
    return {
        "packed_ms": packed_ms,
        "packed_config": config,
        "packed_mbytes": nbytes / 1e6,
        "packed_fraction_of_copy": nbytes / packed_ms / 1e6 / copy_bandwidth_gbs(),
        "projection_plus_scan_ms": timer(unpacked, runs=runs),
    }


def check_bandwidth(quick: bool) -> dict:
    from vmamba_export import cuda_kernel

    copy_gbs = copy_bandwidth_gbs()
    rows = []
    batch = 128
    shapes = [("vmamba_tiny_s1l8", 96, 1), ("vanilla_vmamba_tiny", 192, 16)]
    for name, di, n_state in shapes:
        for dtype in (torch.float32, torch.float16):
            for bsz in (batch, 1):
                ins = scan_inputs(bsz, di, n_state, 56, 56, dtype, "cuda", 0)
                y = torch.empty_like(ins[0])
                nbytes = scan_bytes(bsz, di, n_state, 56, ins[0].element_size())
                ms = cuda_time_ms(
                    lambda a=ins, o=y: cuda_kernel.selective_scan_2d_cuda(*a, out=o), runs=10 if quick else 30
                )
                # batch 1: the bandwidth from the GPU time in a CUDA graph (a lone call also times its launch)
                gpu_ms = (
                    graph_time_ms(lambda a=ins, o=y: cuda_kernel.selective_scan_2d_cuda(*a, out=o)) if bsz == 1 else ms
                )
                gbs = nbytes / gpu_ms / 1e6
                row = {
                    "model": name,
                    "d_inner": di,
                    "d_state": n_state,
                    "batch": bsz,
                    "dtype": str(dtype)[6:],
                    "ms": ms,
                    "mbytes": nbytes / 1e6,
                    "gbs": gbs,
                    "fraction_of_copy": gbs / copy_gbs,
                    "config": cuda_kernel.last_config(),
                    "tile_sweep_ms": {},
                }
                if bsz == 1:
                    row["graph_ms"] = gpu_ms
                if n_state == 1:
                    row.update(packed_scan_row(ins, bsz == 1, quick))
                rows.append(row)
                # The other variants, for tuning: block-kernel steps, chunked-kernel tiles (batch 1: the state split)
                variants = [("smem-nosplit", 0, 0)] if n_state > 1 else [("block2", 0, 0), ("lines-noprefetch", 0, 0)]
                if bsz == batch:
                    variants = (
                        [
                            ("lines", 1, 0),
                            ("lines", 2, 0),
                            ("lines", 4, 0),
                            ("lines-noprefetch", 0, 0),
                            ("block2", 0, 0),
                            ("block1", 0, 0),
                            ("block2s", 0, 0),
                            ("block2odd", 0, 0),
                            ("block2r", 0, 0),
                            ("smem", 0, 0),
                        ]
                        if n_state == 1
                        else []
                    )
                    variants += [
                        ("smem", 2, 0),
                        ("smem", 4, 0),
                        ("smem", 8, 28),
                        ("smem", 8, 0),
                        ("smem", 0, 16),
                        ("smem-chmajor", 0, 0),
                    ]
                    if n_state > 1:
                        variants += [("smem-nosplit", 0, 0), ("smem-nosplit", 8, 0)]
                if variants:
                    for variant, tile, chunks in variants:
                        cuda_kernel.apply_variant(variant)
                        cuda_kernel.set_tuning(tile, chunks)
                        key = variant if not (tile or chunks) else f"{variant}-ct{tile or 'auto'}-nch{chunks or 'auto'}"
                        timer = graph_time_ms if bsz == 1 else cuda_time_ms  # batch 1: GPU time, not launches
                        row["tile_sweep_ms"][key] = timer(
                            lambda a=ins, o=y: cuda_kernel.selective_scan_2d_cuda(*a, out=o), runs=5 if quick else 10
                        )
                    cuda_kernel.apply_variant("auto")
                    log(f"  variants (ms): {row['tile_sweep_ms']}")
                in_graph = f" ({row['graph_ms']:.4f} ms a call in a CUDA graph)" if "graph_ms" in row else ""
                log(
                    f"scan {name} b{bsz} {row['dtype']}: {ms:.3f} ms{in_graph}, {gbs:.0f} GB/s = "
                    f"{100 * gbs / copy_gbs:.0f}% of copy [{row['config']}]"
                )
                if "packed_ms" in row:
                    log(
                        f"  packed scan (rank 6): {row['packed_ms']:.4f} ms, "
                        f"{100 * row['packed_fraction_of_copy']:.0f}% of copy for its {row['packed_mbytes']:.0f} MB, "
                        f"against {row['projection_plus_scan_ms']:.4f} ms for the dt projection + scan "
                        f"[{row['packed_config']}]"
                    )
                del ins, y
    torch.cuda.empty_cache()
    stage_rows = scan_stage_rows(quick)
    target_rows = [r for r in rows if r["batch"] == batch and r["dtype"] == "float32"]
    return {
        "copy_gbs": copy_gbs,
        "rows": rows,
        "stage_rows": stage_rows,
        "pass": all(r["fraction_of_copy"] >= MIN_BANDWIDTH_FRACTION for r in target_rows),
    }


# (row name, precision, export settings): the default graph in both precisions, with the scan projections packed
# (X by cuDNN or by NarrowPointwiseConv), merged or folded (lowering/cuda_fusions.py), the default graph without its
# batch-1 graph (entry.batch1_model, "projected" by default: batch-1 graphs replay it) or with a narrow or a
# conv-projected one (DepthwiseConvProjections) instead,
# then fp16 without each of its GPU-specific choices, to show what each gains: the fused ops
# (lowering/cuda_fusions.py), the v2 models' own channel-first layout instead of the channels-last graph
# (models/channels_last.py), and ONNX Runtime's LayerNormalization instead of ours (lowering/cuda_graph.py).
MODEL_VARIANTS = (
    ("fp32", "fp32", {}),
    ("fp16", "fp16", {}),
    ("fp16-unfused", "fp16", {"cuda_fusions": "off"}),
    ("fp16-projected", "fp16", {"cuda_fusions": "projected"}),
    ("fp32-projected", "fp32", {"cuda_fusions": "projected"}),
    ("fp16-packed", "fp16", {"cuda_fusions": "packed"}),
    ("fp32-packed", "fp32", {"cuda_fusions": "packed"}),
    ("fp16-narrow", "fp16", {"cuda_fusions": "narrow"}),
    ("fp32-narrow", "fp32", {"cuda_fusions": "narrow"}),
    ("fp16-batch1-none", "fp16", {"cuda_batch1_fusions": "none"}),
    ("fp32-batch1-none", "fp32", {"cuda_batch1_fusions": "none"}),
    ("fp16-batch1-narrow", "fp16", {"cuda_batch1_fusions": "narrow"}),
    ("fp32-batch1-narrow", "fp32", {"cuda_batch1_fusions": "narrow"}),
    ("fp16-batch1-conv-projected", "fp16", {"cuda_batch1_fusions": "conv-projected"}),
    ("fp32-batch1-conv-projected", "fp32", {"cuda_batch1_fusions": "conv-projected"}),
    ("fp16-merged", "fp16", {"cuda_fusions": "merged"}),
    ("fp32-merged", "fp32", {"cuda_fusions": "merged"}),
    ("fp16-folded", "fp16", {"cuda_fusions": "folded"}),
    ("fp32-folded", "fp32", {"cuda_fusions": "folded"}),
    ("fp32-unfused", "fp32", {"cuda_fusions": "off"}),
    ("fp16-ort-layernorm", "fp16", {"layer_norm": "onnxruntime"}),
    ("fp16-channels-first-ort-layernorm", "fp16", {"layout": "channels-first", "layer_norm": "onnxruntime"}),
)
# Rows of other models (name, row, precision): the d_state-16 model against the same peer.
OTHER_MODEL_ROWS = (("vanilla_vmamba_tiny", "vanilla-fp16", "fp16"),)


def export_or_load(name: str, row: str, precision: str, settings: dict, onnx_dir: Path | None, work: Path) -> Path:
    """An artifact folder: --onnx-dir/<row> when given, else exported here with `settings` (ExportOptions.extra)."""
    if onnx_dir is not None:
        folder = onnx_dir / row
        if not (folder / "manifest.json").is_file():
            raise FileNotFoundError(f"{folder} is not an artifact folder (no manifest.json)")
        return folder
    from vmamba_export.exporter import export_artifact
    from vmamba_export.lowering import ExportOptions
    from vmamba_export.model_source import resolve_model
    from vmamba_export.targets import get_target

    source = resolve_model(name, random_weights=True, seed=0)
    folder = work / f"{name}-{row}"
    start = time.perf_counter()
    options = ExportOptions(extra=dict(settings))
    export_artifact(
        source,
        get_target("cuda-onnxruntime"),
        folder,
        precision=precision,
        max_size=512,
        overwrite=True,
        options=options,
    )
    log(f"exported {name} {row} in {time.perf_counter() - start:.0f} s -> {folder}")
    return folder


def ort_speed(session, input_name: str, output_name: str, batch: int, runs: int) -> float:
    """Median wall ms of one run with the input already on the GPU and the output left there."""
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
    binding = session.io_binding()
    binding.bind_ortvalue_input(input_name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
    binding.bind_output(output_name, "cuda")
    from vmamba_export.bench import time_calls

    return time_calls(lambda: session.run_with_iobinding(binding), warmup=5, runs=runs)["median_ms"]


def graph_speed(make_session, probe_session, batch: int, runs: int) -> float:
    """The same as ort_speed through a captured CUDA graph (runtime/cuda_graphs.py): input already on the GPU,
    output left there, one graph replay per call."""
    from vmamba_export.bench import time_calls
    from vmamba_export.runtime.cuda_graphs import CudaGraphRunner

    runner = CudaGraphRunner(make_session, probe_session)
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
    runner.run_numpy(x)  # creates the session and its buffers
    graph = runner._graph_for(x.shape)
    return time_calls(graph.replay, warmup=5, runs=runs)["median_ms"]


def speed_rows(rec: dict, session, make_graph_session, quick: bool) -> None:
    """Batch 128 and batch 1, plain I/O binding and CUDA graph, into `rec`."""
    inp, outp = session.get_inputs()[0].name, session.get_outputs()[0].name
    for batch, runs in ((128, 5 if quick else 20), (1, 20 if quick else 200)):
        plain = ort_speed(session, inp, outp, batch, runs=runs)
        graphed = graph_speed(make_graph_session, session, batch, runs=runs)
        rec[f"batch{batch}_ms"], rec[f"batch{batch}_graph_ms"] = plain, graphed
        rec[f"batch{batch}_img_s"], rec[f"batch{batch}_graph_img_s"] = batch * 1e3 / plain, batch * 1e3 / graphed


def predictor_call_ms(predictor, batch: int, runs: int) -> float:
    """Median wall ms of `predictor(numpy batch)` as a user calls it: host copy in and out included."""
    from vmamba_export.bench import time_calls

    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
    return time_calls(lambda: predictor(x), warmup=5, runs=runs)["median_ms"]


def graph_parity_after_shape_changes(predictor, x: np.ndarray, ref: np.ndarray, x_other: np.ndarray) -> dict:
    """Parity of the CUDA-graph predictor on `x` (batches of 8), after a run at another shape and back, and on its
    first 8 images one at a time through the batch-1 graph (an artifact's batch1_model where it has one)."""
    from vmamba_export.validate import parity_metrics

    first = np.concatenate([predictor(x[i : i + 8]) for i in range(0, len(x), 8)])
    predictor(x_other)
    predictor(x[:1])
    again = np.concatenate([predictor(x[i : i + 8]) for i in range(0, len(x), 8)])
    single = np.concatenate([predictor(x[i : i + 1]) for i in range(8)])  # x[:1] ran above: graphs from the first
    return {
        "first": parity_metrics(first, ref),
        "after_shape_change": parity_metrics(again, ref),
        "batch1": parity_metrics(single, ref[:8]),
    }


@section("model")
def check_model(quick: bool, onnx_dir: Path | None, work: Path, only_rows: list[str] | None = None) -> dict:
    from vmamba_export import load
    from vmamba_export.model_source import resolve_model
    from vmamba_export.runtime.onnxruntime_backend import CUDA_PROVIDER, dim_overrides_for, make_session
    from vmamba_export.scan.op import torch_scan
    from vmamba_export.validate import parity_metrics, threshold_failures

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    x = np.random.default_rng(1).standard_normal((8 if quick else 32, 3, 224, 224), dtype=np.float32)
    x_other = np.random.default_rng(2).standard_normal((3, 3, 192, 160), dtype=np.float32)
    references: dict[str, np.ndarray] = {}

    def reference(name: str) -> np.ndarray:
        if name not in references:
            model = resolve_model(name, random_weights=True, seed=0).model.eval().set_scan(torch_scan).cuda()
            with torch.no_grad():
                references[name] = np.concatenate(
                    [model(torch.from_numpy(x[i : i + 8]).cuda()).cpu().numpy() for i in range(0, len(x), 8)]
                )
            del model
            torch.cuda.empty_cache()
        return references[name]

    out: dict = {"precisions": {}}
    RESULTS["sections"]["model"] = out  # partial results reach the JSON as they come
    rows = [("vmamba_tiny_s1l8", row, precision, settings) for row, precision, settings in MODEL_VARIANTS]
    rows += [(name, row, precision, {}) for name, row, precision in OTHER_MODEL_ROWS]
    rows = [r for r in rows if not only_rows or r[1] in only_rows]
    for name, row, precision, settings in rows:
        rec: dict = {"model": name, "precision": precision, "settings": settings}
        out["precisions"][row] = rec
        try:
            folder = export_or_load(name, row, precision, settings, onnx_dir, work)
            predictor = load(folder, cuda_graph=False)
            session = predictor.backend.session
            rec["providers"] = session.get_providers()
            rec["scan_node_providers"] = scan_node_providers(folder)
            log(f"{name} {row}: scan nodes ran on {rec['scan_node_providers']}")
            ref = reference(name)
            logits = np.concatenate([predictor(x[i : i + 8]) for i in range(0, len(x), 8)])
            metrics = parity_metrics(logits, ref)
            thresholds = predictor.manifest["thresholds"]
            fails = threshold_failures(metrics, thresholds)
            rec.update({"parity": metrics, "thresholds": thresholds, "parity_failures": fails, "parity_ok": not fails})
            log(
                f"{name} {row}: rel_l2 {metrics['rel_l2']:.2e} cos_min {metrics['cosine_min']:.6f} "
                f"top1 {metrics['top1_agreement']:.3f} {'ok' if not fails else 'FAIL ' + '; '.join(fails)}"
            )
            graphed = load(folder)
            graph_parity = graph_parity_after_shape_changes(graphed, x, ref, x_other)
            graph_fails = [f for m in graph_parity.values() for f in threshold_failures(m, thresholds)]
            rec.update({"graph_parity": graph_parity, "graph_parity_ok": not graph_fails})
            log(
                f"{name} {row} CUDA graph: rel_l2 {graph_parity['first']['rel_l2']:.2e}, after a shape change "
                f"{graph_parity['after_shape_change']['rel_l2']:.2e}, batch 1 {graph_parity['batch1']['rel_l2']:.2e} "
                f"{'ok' if not graph_fails else 'FAIL'}"
            )
            backend = graphed.backend
            rec["predictor_b1_numpy_ms"] = predictor_call_ms(predictor, 1, 20 if quick else 200)
            rec["predictor_b1_numpy_graph_ms"] = predictor_call_ms(graphed, 1, 20 if quick else 200)
            del graphed
            speed_rows(rec, session, backend.graphs.make_session, quick)
            log(
                f"{name} {row}: batch 128 {rec['batch128_img_s']:.0f} img/s, graph {rec['batch128_graph_img_s']:.0f}; "
                f"batch 1 {rec['batch1_ms']:.2f} ms, graph {rec['batch1_graph_ms']:.2f} ms; predictor(numpy) b1 "
                f"{rec['predictor_b1_numpy_ms']:.2f} ms, graph {rec['predictor_b1_numpy_graph_ms']:.2f} ms"
            )
        except Exception as exc:
            record_error(rec, f"{name} {row}", f"model {row}", exc)
        flush_results()
    # ConvNeXt-T, same runtime, same measurements (plain I/O binding and CUDA graph), fp16 and fp32.
    for precision in ("fp16", "fp32"):
        conv: dict = {}
        out[f"convnext_{precision}"] = conv
        try:
            path = convnext_onnx(precision, onnx_dir, work)
            cuda_options = {"use_tf32": "0"} if precision == "fp32" else {}
            session = make_session(path, None, None, [(CUDA_PROVIDER, cuda_options), "CPUExecutionProvider"])
            graph_providers = [(CUDA_PROVIDER, {**cuda_options, "enable_cuda_graph": "1"}), "CPUExecutionProvider"]
            conv["providers"] = session.get_providers()
            speed_rows(
                conv,
                session,
                lambda shape, p=path, g=graph_providers, s=session: make_session(
                    p, None, None, g, dim_overrides_for(s, shape)
                ),
                quick,
            )
            log(
                f"convnext_tiny {precision}: batch 128 {conv['batch128_img_s']:.0f} img/s, graph "
                f"{conv['batch128_graph_img_s']:.0f}; batch 1 {conv['batch1_ms']:.2f} ms, graph "
                f"{conv['batch1_graph_ms']:.2f} ms"
            )
        except Exception as exc:
            record_error(conv, f"convnext {precision}", f"convnext {precision}", exc)
    out["ratios"] = ratios(out)
    return out


def record_error(rec: dict, what: str, label: str, exc: Exception) -> None:
    """A failed row of the model section: its error and traceback in the row, the log and the run's error list."""
    rec["error"] = repr(exc)
    rec["traceback"] = traceback.format_exc()
    log(f"{what} FAILED: {exc!r}\n{rec['traceback']}")
    RESULTS["errors"].append(f"{label}: {exc!r}")


def convnext_onnx(precision: str, onnx_dir: Path | None, work: Path) -> Path:
    """ConvNeXt-T exported as benchmarks/convnext.py does (fixed opset, dynamic batch), fp16 converted like ours."""
    import onnx

    from vmamba_export.lowering.fp16 import convert_model_to_fp16

    path = onnx_dir / f"convnext_{precision}.onnx" if onnx_dir is not None else None
    if path is not None and path.is_file():
        return path
    from convnext import export_convnext_onnx

    fp32_path = work / "convnext_fp32.onnx"
    if not fp32_path.is_file():
        export_convnext_onnx(str(fp32_path))
    if precision == "fp32":
        return fp32_path
    path = work / "convnext_fp16.onnx"
    onnx.save_model(convert_model_to_fp16(onnx.load(str(fp32_path)), 10), str(path))
    return path


def ratios(out: dict) -> dict:
    """VMamba over ConvNeXt-T of the same precision, per row: batch-1 latency (lower is better for us) and batch-128
    throughput (higher is better), plain and with CUDA graphs on both sides."""
    result = {}
    for row, rec in out["precisions"].items():
        conv = out.get(f"convnext_{rec['precision']}", {})
        if "batch1_ms" not in rec or "batch1_ms" not in conv:
            continue
        result[row] = {
            "batch1_latency": rec["batch1_ms"] / conv["batch1_ms"],
            "batch1_latency_graph": rec["batch1_graph_ms"] / conv["batch1_graph_ms"],
            "batch128_throughput": rec["batch128_img_s"] / conv["batch128_img_s"],
            "batch128_throughput_graph": rec["batch128_graph_img_s"] / conv["batch128_graph_img_s"],
        }
    return result


def environment() -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update({"gpu": props.name, "sms": props.multi_processor_count, "memory_gb": props.total_memory / 1e9})
    try:
        import onnxruntime as ort

        env.update(
            {
                "onnxruntime": ort.__version__,
                "onnxruntime_file": ort.__file__,
                "providers": ort.get_available_providers(),
            }
        )
    except Exception as exc:
        env["onnxruntime_error"] = repr(exc)
    from vmamba_export.kernels_paths import ort_cuda_library_path

    env["cuda_library"] = str(ort_cuda_library_path())
    return env


def fmt(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def summary_table() -> str:
    s = RESULTS["sections"]
    lines = ["", "=== gpu_check summary ==="]
    k = s.get("kernel")
    if k is None:
        lines.append("kernel parity        : skipped")
    else:
        lines.append(
            f"kernel parity        : {'PASS' if k.get('pass') else 'FAIL'} "
            f"({len(k.get('rows', []))} checks, {k.get('failures', '?')} failed){'' if k.get('ok') else ' ERROR'}"
        )
    b = s.get("bandwidth", {})
    if "bandwidth" in s:
        lines.append(f"copy bandwidth       : {fmt(b.get('copy_gbs'), '.0f')} GB/s")
    for r in b.get("rows", []):
        if r["batch"] == 128:
            lines.append(
                f"scan {r['model']:<20} {r['dtype']:<8} b128: {r['ms']:.3f} ms {r['gbs']:.0f} GB/s "
                f"{100 * r['fraction_of_copy']:.0f}% (target {100 * MIN_BANDWIDTH_FRACTION:.0f}%)"
            )
    f = s.get("floor", {})
    for dtype in ("float32", "float16"):
        if dtype in f:
            lines.append(
                f"vanilla b128 {dtype:<8}: arithmetic floor {f[dtype]['floor_ms']:.3f} ms, "
                f"{f[dtype]['target_ms']:.3f} ms for 70%: "
                f"at most {100 * f[dtype]['best_fraction_of_copy']:.0f}% of copy reachable"
            )
    m = s.get("model", {})
    for row, rec in m.get("precisions", {}).items():
        p = rec.get("parity", {})
        lines.append(
            f"{rec.get('model', '?'):<20} {row:<33} : parity {'PASS' if rec.get('parity_ok') else 'FAIL'} "
            f"rel_l2 {fmt(p.get('rel_l2'), '.1e')} cos {fmt(p.get('cosine_min'), '.5f')} "
            f"top1 {fmt(p.get('top1_agreement'), '.2f')} graph {'PASS' if rec.get('graph_parity_ok') else 'FAIL'} "
            f"| b128 {fmt(rec.get('batch128_img_s'), '.0f')} / graph {fmt(rec.get('batch128_graph_img_s'), '.0f')} "
            f"img/s | b1 {fmt(rec.get('batch1_ms'), '.2f')} / graph {fmt(rec.get('batch1_graph_ms'), '.2f')} ms"
            + (f" | ERROR {rec['error']}" if "error" in rec else "")
        )
    for precision in ("fp16", "fp32"):
        c = m.get(f"convnext_{precision}", {})
        lines.append(
            f"convnext_t {precision:<43} : b128 {fmt(c.get('batch128_img_s'), '.0f')} / graph "
            f"{fmt(c.get('batch128_graph_img_s'), '.0f')} img/s | b1 {fmt(c.get('batch1_ms'), '.2f')} / graph "
            f"{fmt(c.get('batch1_graph_ms'), '.2f')} ms" + (f" | ERROR {c['error']}" if "error" in c else "")
        )
    for row, r in m.get("ratios", {}).items():
        lines.append(
            f"vs ConvNeXt-T {row:<33}: b1 latency {r['batch1_latency']:.2f}x, graph {r['batch1_latency_graph']:.2f}x"
            f" (goal <= 1.0); b128 throughput {r['batch128_throughput']:.2f}x, graph "
            f"{r['batch128_throughput_graph']:.2f}x (goal >= 1.0)"
        )
    lines.append(f"errors               : {len(RESULTS['errors'])}")
    return "\n".join(lines)


def export_only(folder: Path) -> int:
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    rows = [("vmamba_tiny_s1l8", row, precision, settings) for row, precision, settings in MODEL_VARIANTS]
    rows += [(name, row, precision, {}) for name, row, precision in OTHER_MODEL_ROWS]
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        for name, row, precision, settings in rows:
            built = export_or_load(name, row, precision, settings, None, Path(tmp))
            target = folder / row
            if target.exists():
                shutil.rmtree(target)
            built.rename(target)
            log(f"wrote {target}")
        for precision in ("fp32", "fp16"):
            shutil.copyfile(convnext_onnx(precision, None, Path(tmp)), folder / f"convnext_{precision}.onnx")
            log(f"wrote {folder / f'convnext_{precision}.onnx'}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--onnx-dir", type=Path, help="pre-exported artifacts: DIR/fp32, DIR/fp16 (+ convnext_fp16.onnx)"
    )
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_results"))
    parser.add_argument("--skip", action="append", default=[], choices=["kernel", "bandwidth", "floor", "model"])
    parser.add_argument(
        "--rows",
        nargs="+",
        choices=[row for row, _, _ in MODEL_VARIANTS] + [row for _, row, _ in OTHER_MODEL_ROWS],
        help="model rows to measure (default: all)",
    )
    parser.add_argument(
        "--export-only",
        type=Path,
        metavar="DIR",
        help="no GPU needed: write DIR/<row> (the artifacts of every model row) and DIR/convnext_{fp32,fp16}.onnx, for "
        "--onnx-dir on a machine that cannot export",
    )
    args = parser.parse_args(argv)
    if args.export_only:
        return export_only(args.export_only)
    args.out.mkdir(parents=True, exist_ok=True)
    global OUT_DIR
    OUT_DIR = args.out
    try:
        import onnxruntime as ort

        if hasattr(ort, "preload_dlls"):  # onnxruntime-gpu >= 1.21: CUDA/cuDNN from the nvidia-* wheels torch uses
            ort.preload_dlls()
    except Exception as exc:
        log(f"onnxruntime preload: {exc!r}")
    RESULTS["environment"] = environment()
    log(json.dumps(RESULTS["environment"]))
    if not torch.cuda.is_available():
        log("no CUDA GPU visible to torch: nothing to check")
    else:
        with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
            if "kernel" not in args.skip:
                check_kernel(args.quick)
            if "bandwidth" not in args.skip:
                check_bandwidth(args.quick)
            if "floor" not in args.skip:
                check_floor(args.quick)
            if "model" not in args.skip:
                check_model(args.quick, args.onnx_dir, Path(tmp), args.rows)
    table = summary_table()
    (args.out / "gpu_check.json").write_text(json.dumps(RESULTS, indent=2, default=str))
    (args.out / "gpu_check.log").write_text("\n".join(LOG) + "\n" + table + "\n")
    print(table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
