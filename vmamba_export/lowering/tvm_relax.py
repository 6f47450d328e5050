"""torch.export -> Relax -> a TVM library, for the `cpu-tvm`, `cuda-tvm` and `metal-tvm` targets (scan lowering
`tvm-tir`).

The model is exported with `torch.export` (the scan op `vmamba::selective_scan_2d` stays one node per block),
imported with `relax.frontend.torch.from_exported_program`, and each scan node becomes a `call_tir` of the hand-written
TIR kernel of lowering/tvm_scan.py, scheduled for the target and tagged `tirx.is_scheduled`. The rest of the graph is
legalized by TVM's default pipeline for the target (CPU: plain loops, untuned; CUDA: dlight default GPU schedules;
Metal: the same without dlight's Matmul rule, which segfaults for Metal in TVM 0.27, FIELD-NOTES.md).

Shapes: height and width are fixed at export (the manifest records min_size = max_size = that side; the scan kernel
has Di, H, W and d_state as constants, which GPU local arrays need); the batch is dynamic (a symbolic TIR variable in
every kernel), 1..MAX_BATCH.

Artifacts:
- cpu-tvm, cuda-tvm: `model.so` (`export_library`), loadable with only TVM's runtime (runtime/tvm_backend.py). For
  CUDA the library holds CUDA C source, compiled when the library is loaded on the GPU machine (NVRTC or nvcc).
- metal-tvm: no macOS linker here, so `model.tar` (host object code for arm64 macOS + the packed Metal module; on a Mac
  `tvm.runtime.load_module("model.tar")` links it) and `metal_kernels.metal`, the generated Metal source to inspect.

`tvm` is imported only here and in the runtime backend, when a TVM target is built or run.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

from ..errors import TargetUnavailableError
from ..models import SS2D, VMamba
from ..scan import QUALIFIED_NAME
from .quiet import quiet_toolchain

MAX_BATCH = 4096
TVM_KINDS = {"cpu": "llvm", "cuda": "cuda", "apple": "metal"}
DEVICE_TYPES = {"llvm": 1, "cuda": 2, "metal": 8}  # DLDeviceType, for the runtime's vm_initialization
DEFAULT_CUDA_ARCH = "sm_90"  # H100; options.extra["cuda_arch"] picks another
METAL_HOST = "arm64-apple-macos"


def import_tvm():
    try:
        import tvm
        from tvm import relax  # noqa: F401 (the compiler part, absent from a runtime-only install)
    except ImportError as exc:
        raise TargetUnavailableError(
            f"TVM targets need apache-tvm to build: pip install apache-tvm==0.27.0.post1 "
            f"apache-tvm-ffi==0.1.14.post0 ({exc})"
        ) from None
    return tvm


def tvm_version() -> str | None:
    from importlib import metadata

    with contextlib.suppress(metadata.PackageNotFoundError):
        return metadata.version("apache-tvm")
    return None


def make_target(device: str, extra: dict):
    """The TVM Target for a target file's `device`, as a JSON dict (TVM 0.27 targets are dicts)."""
    tvm = import_tvm()
    kind = TVM_KINDS.get(device)
    if kind is None:
        raise TargetUnavailableError(f"no TVM target kind for device {device!r}")
    if kind == "llvm":
        spec: dict = {"kind": "llvm", "num-cores": int(extra.get("tvm_num_cores") or os.cpu_count() or 1)}
        # Generic x86-64 unless asked: an artifact built for this machine's AVX-512 would die with SIGILL on an older
        # CPU. "native" resolves to this machine's CPU name (recorded in the manifest).
        mcpu = extra.get("tvm_mcpu")
        if mcpu == "native":
            mcpu = tvm.target.codegen.llvm_get_system_cpu_name()
        if mcpu:
            spec["mcpu"] = mcpu
        return tvm.target.Target(spec), spec
    host = {"kind": "llvm"}
    if kind == "cuda":
        spec = {"kind": "cuda", "arch": extra.get("cuda_arch", DEFAULT_CUDA_ARCH)}
    else:
        spec = {"kind": "metal"}
        host = {"kind": "llvm", "mtriple": METAL_HOST}  # the host code runs on the Mac
    return tvm.target.Target(spec, host=host), {**spec, "host": host}


class _ScanConverter:
    """`custom_convert_map` entry: selective_scan_2d node -> call_tir of the scheduled TIR kernel for its shape."""

    def __init__(self, target_kind: str):
        self.target_kind = target_kind
        self.kernels: dict[tuple, object] = {}  # (Di, H, W, N) -> GlobalVar, one kernel per distinct block shape
        self.calls = 0

    def __call__(self, node, importer):
        from tvm import relax

        from .tvm_scan import scheduled_scan

        args = importer.retrieve_args(node)
        u, a_logs = args[0], args[2]
        _, di, h, w = importer.shape_of(u)
        n = importer.shape_of(a_logs)[1]
        key = tuple(int(v) for v in (di, h, w, n))
        bb = importer.block_builder
        if key not in self.kernels:
            name = "selective_scan_2d_d{}_h{}_w{}_n{}".format(*key)
            # Each shape's kernel needs its own global symbol (the TVMScript name is the same for all of them).
            func = scheduled_scan(*key, self.target_kind).with_attr("global_symbol", name)
            self.kernels[key] = bb.add_func(func, name)
        self.calls += 1
        out = relax.TensorType(importer.shape_of(u), "float32")
        return bb.emit(relax.call_tir(self.kernels[key], list(args), out))


def to_relax(model: VMamba, size: int, target_kind: str):
    """(Relax IRModule, converter) for `model` at input side `size`, dynamic batch."""
    import_tvm()
    from tvm.relax.frontend.torch import from_exported_program

    cfg = model.config
    # Batch 2 in the example: torch.export specialises a dimension traced at size 1.
    example = torch.randn(2, cfg.in_chans, size, size)
    dynamic = {"x": {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}}
    with quiet_toolchain(), torch.no_grad():
        ep = torch.export.export(model.eval(), (example,), dynamic_shapes=dynamic)
    converter = _ScanConverter(target_kind)
    op_name = QUALIFIED_NAME.split("::")[1]
    with quiet_toolchain():
        mod = from_exported_program(ep, custom_convert_map={f"{op_name}.default": converter})
    return mod, converter


def gpu_pipeline(target, matmul_rule: bool):
    """TVM's CUDA pipeline (relax/backend/cuda/pipeline.py) with dlight's Matmul rule optional (Metal)."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cuda import pipeline as cuda_pipeline
    from tvm.s_tir import dlight as dl

    rules = [dl.gpu.Matmul()] if matmul_rule else []
    rules += [dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
    finalize = cuda_pipeline.finalize_passes(target)
    if not matmul_rule:  # CUDA graphs are a CUDA feature
        finalize = [p for p in finalize if "CUDAGraph" not in str(p.info.name)]

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod, _ctx):
        with target:
            passes = [
                *cuda_pipeline.library_dispatch_passes(target),
                relax.transform.LegalizeOps(),
                relax.transform.AnnotateTIROpPattern(),
                relax.transform.FoldConstant(),
                relax.transform.FuseOps(),
                relax.transform.FuseTIR(),
                dl.ApplyDefaultSchedule(*rules),
                *cuda_pipeline.dataflow_lower_passes(target),
                *finalize,
            ]
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline


def build(mod, target, target_kind: str):
    """Compile the Relax module for the target; returns the Executable. The CPU graph outside the scan is TVM's
    default legalization, untuned (meta-schedule tuning is not wired in yet)."""
    import tvm

    if target_kind == "llvm":
        return tvm.compile(mod, target=target)
    return tvm.compile(mod, target=target, relax_pipeline=gpu_pipeline(target, matmul_rule=target_kind == "cuda"))


def device_sources(executable) -> dict[str, str]:
    """Generated device source per imported module kind (e.g. {"cuda": ..., "metal": ...})."""
    sources: dict[str, str] = {}
    pending, seen = list(executable.mod.imports), set()
    while pending:  # the device module hangs below the host (llvm) module in the import tree
        module = pending.pop()
        if module.kind in seen:
            continue
        seen.add(module.kind)
        pending.extend(module.imports)
        if module.kind in ("cuda", "metal"):
            sources[module.kind] = module.inspect_source()
    return sources


def lower_tvm(model: VMamba, target, folder: Path, options) -> tuple[dict, dict]:
    """The `tvm-tir` lowering (registered in lowering/__init__.py)."""
    import_tvm()
    if options.precision != "fp32":
        raise TargetUnavailableError(f"target {target.name}: precision {options.precision!r} is not implemented")
    cfg = model.config
    # Fixed spatial size: options.extra["input_size"], else the model's input size capped by --max-size.
    size = int(options.extra.get("input_size") or min(cfg.input.image_size, options.max_size))
    tvm_target, target_spec = make_target(target.device, options.extra)
    kind = TVM_KINDS[target.device]
    mod, converter = to_relax(model, size, kind)
    blocks = sum(1 for m in model.modules() if isinstance(m, SS2D))
    if converter.calls != blocks:
        raise RuntimeError(f"{converter.calls} scan nodes were converted for {blocks} SS2D blocks")
    executable = build(mod, tvm_target, kind)
    sources = device_sources(executable)
    if kind == "metal":
        library = "model.tar"  # object files for arm64 macOS; linked on the Mac by tvm.runtime.load_module
        executable.export_library(str(folder / library))
        (folder / "metal_kernels.metal").write_text(sources.get("metal", ""))
    else:
        library = "model.so"
        executable.export_library(str(folder / library))
    main = mod["main"]
    info = {
        "scan_lowering": "tvm-tir",
        "tvm_version": tvm_version(),
        "tvm_target": target_spec,
        "device": target.device,
        "input_shape": ["batch", cfg.in_chans, size, size],
        "batch_range": [1, MAX_BATCH],
        "scan_kernels": sorted("d{}_h{}_w{}_n{}".format(*k) for k in converter.kernels),
        "scan_schedule": _schedule_description(kind),
        "nodes": _count_bindings(main),
        "scan_nodes": converter.calls,
        "device_source_bytes": {k: len(v) for k, v in sources.items()},
        "tuning": None,  # untuned: TVM's default schedules outside the scan kernels
        # Fixed-shape spatial size: the manifest's size range is the one side the library takes.
        "dynamic_axes": {"batch": {"min": 1, "max": MAX_BATCH}},
        "min_size": size,
    }
    options.max_size = size  # exporter.py records options.max_size after the lowering ran
    entry = {
        "model": library,  # the library the Relax VM loads
        "vm_device_type": DEVICE_TYPES[kind],
        "tvm_version": tvm_version(),
        "device": target.device,
    }
    if kind == "metal":
        entry["metal_source"] = "metal_kernels.metal"
        entry["needs_link"] = "macOS (tvm.runtime.load_module links the .tar with clang)"
    json.dumps(info)  # fail here, not in the manifest writer, if something is not serialisable
    return entry, info


def _schedule_description(kind: str) -> str:
    if kind == "llvm":
        return "parallel over (batch, direction, channel group), channel group vectorised (lanes 16/8/4)"
    return "one thread per (batch, direction, channel), 128 threads per block, d_state fixed at compile time"


def _count_bindings(func) -> int:
    """Number of bindings (ops) in the Relax main function before legalization."""
    return sum(len(block.bindings) for block in func.body.blocks)
