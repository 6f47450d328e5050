"""torch.export -> Relax -> a TVM library, for the `cpu-tvm`, `cuda-tvm` and `metal-tvm` targets (scan lowering
`tvm-tir`).

The model is exported with `torch.export` (the scan op `vmamba::selective_scan_2d` stays one node per block),
imported with `relax.frontend.torch.from_exported_program`, and each scan node becomes a `call_tir` of the hand-written
TIR kernel of lowering/tvm_scan.py, scheduled for the target and tagged `tirx.is_scheduled`. The rest of the graph is
legalized by TVM's default pipeline for the target (CPU: GELU and sigmoid first made polynomial by
lowering/tvm_fast_math.py; plain loops, unless meta-schedule tuned by lowering/tvm_tune.py with options.extra
tune_budget / tune_trials / tune_db; CUDA: dlight default GPU schedules; Metal: the same without
dlight's Matmul rule, which segfaults for Metal in TVM 0.27, FIELD-NOTES.md).

Shapes: height and width are fixed at export (the manifest records min_size = max_size = that side; the scan kernel
has Di, H, W and d_state as constants, which GPU local arrays need); the batch is dynamic (a symbolic TIR variable in
every kernel), 1..MAX_BATCH, except for tuned builds (meta-schedule tunes static shapes): fixed, 1 by default.

Artifacts:
- cpu-tvm, cuda-tvm: `model.so` (`export_library`), loadable with only TVM's runtime (runtime/tvm_backend.py). For
  CUDA the library holds CUDA C source; nvcc here compiles it into `cuda_kernels.fatbin`, which the runtime-only
  loader hands to TVM's runtime in place of a compiler. cuda-tvm keeps the weights outside the library, in
  `params.bin` (raw float32, `main`'s argument order; `separate_params` in options.extra for other targets).
- cpu-tvm tuned: `tuning/` holds the meta-schedule database (best record per op), reusable by later builds.
- metal-tvm: no macOS linker here, so `model.tar` (host object code for arm64 macOS + the packed Metal module; on a Mac
  `tvm.runtime.load_module("model.tar")` links it) and `metal_kernels.metal`, the generated Metal source to inspect.

Another platform (options.platform, cpu-tvm only): the code is generated for the platform's LLVM triple
(CROSS_CPU_TARGETS; linux-aarch64: aarch64-linux-gnu, mcpu generic = the armv8-a baseline, NEON) and the library is
linked by the platform's Debian cross compiler (export_library's cc). The scan kernel's 16-lane vectors become four
128-bit NEON registers there. Nothing can be tuned for it here (meta-schedule measures on this machine).

`tvm` is imported only here and in the runtime backend, when a TVM target is built or run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import torch

from ..errors import TargetUnavailableError
from ..models import SS2D, VMamba
from ..models.channels_last import ChannelsLastVMamba
from ..scan import QUALIFIED_NAME
from .quiet import quiet_toolchain

MAX_BATCH = 4096
TVM_KINDS = {"cpu": "llvm", "cuda": "cuda", "apple": "metal"}
DEVICE_TYPES = {"llvm": 1, "cuda": 2, "metal": 8}  # DLDeviceType, for the runtime's vm_initialization
DEFAULT_CUDA_ARCH = "sm_90"  # H100; options.extra["cuda_arch"] picks another
METAL_HOST = "arm64-apple-macos"
# cpu-tvm for another platform: LLVM target fields, and the compiler that links the library. mcpu "generic" is the
# architecture's baseline (armv8-a: every 64-bit ARM board); options.extra["tvm_mcpu"] names a newer CPU instead.
CROSS_CPU_TARGETS = {
    "linux-aarch64": ({"mtriple": "aarch64-linux-gnu", "mcpu": "generic", "mattr": ["+neon"]}, "aarch64-linux-gnu-g++"),
}


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


def make_target(device: str, extra: dict, platform: str | None = None):
    """The TVM Target for a target file's `device`, as a JSON dict (TVM 0.27 targets are dicts); for a CPU, code for
    `platform` (platforms.py name; None: this machine)."""
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
            mcpu = host_cpu()
        if mcpu:
            spec["mcpu"] = mcpu
        cross = cross_platform(platform)
        if cross is not None:
            if extra.get("tvm_mcpu") == "native":
                raise TargetUnavailableError(f"--tvm-mcpu native names this machine's CPU, not one of platform {cross}")
            spec = {**spec, **CROSS_CPU_TARGETS[cross][0], **({"mcpu": mcpu} if mcpu else {})}
        return tvm.target.Target(spec), spec
    host = {"kind": "llvm"}
    if kind == "cuda":
        spec = {"kind": "cuda", "arch": extra.get("cuda_arch", DEFAULT_CUDA_ARCH)}
    else:
        spec = {"kind": "metal"}
        host = {"kind": "llvm", "mtriple": METAL_HOST}  # the host code runs on the Mac
    return tvm.target.Target(spec, host=host), {**spec, "host": host}


def cross_platform(name: str | None) -> str | None:
    """`name` when it is a platform other than this machine's that cpu-tvm cross-compiles for, None for this machine's
    own platform (or none given); TargetUnavailableError for a platform it cannot build for."""
    from ..platforms import host_platform

    if name is None or name == host_platform():
        return None
    if name not in CROSS_CPU_TARGETS:
        raise TargetUnavailableError(
            f"cpu-tvm cannot be cross-compiled for platform {name!r} (known: {', '.join(CROSS_CPU_TARGETS)})"
        )
    return name


def cross_linker(name: str) -> str:
    """The compiler that links a cpu-tvm library for platform `name` ($VMAMBA_CROSS_CXX overrides), checked present."""
    import shutil

    cc = os.environ.get("VMAMBA_CROSS_CXX") or CROSS_CPU_TARGETS[name][1]
    if shutil.which(cc) is None:
        package = f"g++-{cc.removesuffix('-g++')}" if cc.endswith("-linux-gnu-g++") else "g++"
        raise TargetUnavailableError(
            f"cpu-tvm for {name} links with `{cc}`, not found (Debian: apt-get install {package})"
        )
    return cc


def host_cpu() -> str:
    """LLVM's name for this machine's CPU (e.g. "skylake-avx512"): code built for it uses all its vector features."""
    tvm = import_tvm()
    return str(tvm.target.codegen.llvm_get_system_cpu())


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


def to_relax(model: VMamba, size: int, target_kind: str, batch: int | None = None, keep_params: bool = False):
    """(Relax IRModule, converter, params) for `model` at input side `size`; dynamic batch, or fixed at `batch`.
    `keep_params`: the weights become inputs of `main` after the image (params: [(state_dict name, array)] in that
    order) instead of constants compiled into the library; else params is None."""
    import_tvm()
    from tvm.relax.frontend.torch import from_exported_program

    cfg = model.config
    if batch is None:
        # Batch 2 in the example: torch.export specialises a dimension traced at size 1.
        example = torch.randn(2, cfg.in_chans, size, size)
        dynamic = {"x": {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}}
    else:
        example, dynamic = torch.randn(batch, cfg.in_chans, size, size), None
    with quiet_toolchain(), torch.no_grad():
        ep = torch.export.export(model.eval(), (example,), dynamic_shapes=dynamic)
    converter = _ScanConverter(target_kind)
    op_name = QUALIFIED_NAME.split("::")[1]
    with quiet_toolchain():
        mod = from_exported_program(
            ep, keep_params_as_input=keep_params, custom_convert_map={f"{op_name}.default": converter}
        )
    if not keep_params:
        return mod, converter, None
    from tvm import relax

    mod, detached = relax.frontend.detach_params(mod)
    fqn = dict(ep.graph_signature.inputs_to_parameters) | dict(ep.graph_signature.inputs_to_buffers)
    # state_dict names of the VMamba (a ChannelsLastVMamba holds it as `model`)
    prefix = "model." if isinstance(model, ChannelsLastVMamba) else ""
    names = [fqn.get(v.name, v.name).removeprefix(prefix) for v in mod["main"].params[1:]]
    return mod, converter, list(zip(names, [t.numpy() for t in detached["main"]]))


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
    """Compile the Relax module for the target; returns the Executable. On CPU the graph outside the scan is TVM's
    default legalization, or the schedules tvm_tune applied (then the legalization passes find nothing left)."""
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
    kind = TVM_KINDS[target.device]
    tune = tune_settings(options.extra)
    extra = dict(options.extra)
    cross = cross_platform(options.platform)
    if cross is not None and kind != "llvm":
        raise TargetUnavailableError(f"target {target.name} cannot be cross-compiled for {cross}: cpu-tvm only")
    linker = cross_linker(cross) if cross is not None else None  # checked before minutes of export
    if tune is not None:
        if kind != "llvm":
            raise TargetUnavailableError(f"target {target.name}: meta-schedule tuning is wired for cpu-tvm only")
        if cross is not None:
            raise TargetUnavailableError(
                f"target {target.name} for {cross}: meta-schedule tunes by measuring on this machine; build untuned "
                "(no --tune-budget / --tune-db) or tune on the device"
            )
        # Tuning measures on this machine: build for its CPU, and for one batch size (meta-schedule tunes static
        # shapes; the runtime runs other batches in slices of it).
        extra.setdefault("tvm_mcpu", "native")
        extra["batch"] = int(extra.get("batch") or 1)
    batch = int(extra["batch"]) if extra.get("batch") else None
    tvm_target, target_spec = make_target(target.device, extra, cross)
    # CUDA: weights in a file beside the library, not in it (a 120 MB library of tiny_s1l8 could not travel to the
    # GPU machine; the GPU check regenerates the file there from the seed and the manifest's hash proves it equal).
    separate = bool(extra.get("separate_params", kind == "cuda"))
    # cpu-tvm: v2 models channels-last by default (models/channels_last.py): the 1x1 convolutions become matmuls
    # vectorised over channels; channel-first, the innermost loop is the map's width (14 or 7 in the late stages)
    # and tuned schedules stayed ~2x slower. GPU targets keep the model's layout.
    from . import layout_graph

    graph_model, layout = layout_graph(model, extra.get("layout")) if kind == "llvm" else (model, "model")
    mod, converter, params = to_relax(graph_model, size, kind, batch, keep_params=separate)
    blocks = sum(1 for m in model.modules() if isinstance(m, SS2D))
    if converter.calls != blocks:
        raise RuntimeError(f"{converter.calls} scan nodes were converted for {blocks} SS2D blocks")
    main = mod["main"]
    activations = None
    if kind == "llvm":
        from .tvm_fast_math import polynomial_activations

        mod, activations = polynomial_activations(mod)
    tuning = None
    if tune is not None:
        from .tvm_tune import tune_and_apply

        mod, tuning = tune_and_apply(mod, tvm_target, tune, folder)
    executable = build(mod, tvm_target, kind)
    sources = device_sources(executable)
    if kind == "metal":
        library = "model.tar"  # object files for arm64 macOS; linked on the Mac by tvm.runtime.load_module
        executable.export_library(str(folder / library))
        (folder / "metal_kernels.metal").write_text(sources.get("metal", ""))
    else:
        library = "model.so"
        # Another platform's library is linked by its cross compiler (TVM wrote the objects for its triple).
        executable.export_library(str(folder / library), **({"cc": linker} if linker else {}))
    info = {
        "scan_lowering": "tvm-tir",
        "tvm_version": tvm_version(),
        "tvm_target": target_spec,
        "device": target.device,
        "input_shape": [batch or "batch", cfg.in_chans, size, size],
        "batch_range": [batch, batch] if batch else [1, MAX_BATCH],
        "residual_layout": layout,
        "scan_kernels": sorted("d{}_h{}_w{}_n{}".format(*k) for k in converter.kernels),
        "scan_schedule": _schedule_description(kind),
        "nodes": _count_bindings(main),
        "scan_nodes": converter.calls,
        # CPU: GELU / sigmoid nodes computed with polynomial erf / exp (lowering/tvm_fast_math.py); None elsewhere
        "polynomial_activations": activations,
        "device_source_bytes": {k: len(v) for k, v in sources.items()},
        # None: untuned (TVM's default schedules outside the scan kernels); else what tvm_tune recorded
        "tuning": tuning,
        # Fixed-shape spatial size: the manifest's size range is the one side the library takes.
        "dynamic_axes": None if batch else {"batch": {"min": 1, "max": MAX_BATCH}},
        "min_size": size,
    }
    if cross is not None:
        info["platform"] = cross
        info["linker"] = linker
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
    if params is not None:
        entry["params"] = write_params(params, folder / PARAMS_FILE)
    if kind == "cuda":
        arch = target_spec["arch"]
        binary = compile_cuda_fatbin(sources.get("cuda", ""), arch, folder / CUDA_BINARY)
        entry["cuda_source_sha256"] = hashlib.sha256(sources.get("cuda", "").encode()).hexdigest()
        if binary is not None:
            entry["cuda_binary"] = CUDA_BINARY
        info["cuda_binary"] = binary  # how the kernels were compiled, or None: compiled on the GPU machine (NVRTC)
    json.dumps(info)  # fail here, not in the manifest writer, if something is not serialisable
    return entry, info


CUDA_BINARY = "cuda_kernels.fatbin"
PARAMS_FILE = "params.bin"


def write_params(params: list, path: Path) -> dict:
    """The weights as one raw little-endian float32 file in `main`'s argument order (byte-identical for identical
    weights, unlike a zip); returns the manifest entry naming and shaping each tensor."""
    import numpy as np

    tensors = []
    with open(path, "wb") as fh:
        for name, array in params:
            array = np.ascontiguousarray(array, dtype="<f4")
            fh.write(array.tobytes())
            tensors.append({"name": name, "shape": list(array.shape)})
    return {"file": path.name, "dtype": "float32", "tensors": tensors}


def params_bytes(state_dict: dict, entry: dict) -> bytes:
    """params.bin content for a model's state_dict (torch tensors), in the order the entry lists."""
    import numpy as np

    out = []
    for t in entry["tensors"]:
        array = state_dict[t["name"]].detach().cpu().numpy()
        if list(array.shape) != t["shape"]:
            raise ValueError(f"{t['name']}: shape {list(array.shape)} in the model, {t['shape']} in the manifest")
        out.append(np.ascontiguousarray(array, dtype="<f4").tobytes())
    return b"".join(out)


def compile_cuda_fatbin(source: str, arch: str, out: Path) -> dict | None:
    """Compile the library's CUDA source with nvcc here into `out` (SASS for `arch` + PTX), or None without nvcc.

    Why: the apache-tvm wheel's compiler has no CUDA, so the library stores CUDA C source and TVM's runtime compiles it
    when loaded, through a `tvm_callback_cuda_compile` function that only the full `tvm` package (with NVRTC from
    cuda-bindings, and CUDA headers) provides. The runtime-only loader (runtime/tvm_backend.py) answers that callback
    with this file instead: the GPU machine needs no compiler."""
    import shutil
    import subprocess
    import tempfile

    nvcc = shutil.which("nvcc")
    if nvcc is None or not source:
        return None
    sm = arch.removeprefix("sm_")
    with tempfile.TemporaryDirectory(prefix="vmamba-cuda-") as tmp:
        src = Path(tmp) / "kernels.cu"
        src.write_text(source)
        cmd = [nvcc, "--fatbin", "-O3", f"-gencode=arch=compute_{sm},code=sm_{sm}"]
        cmd += [f"-gencode=arch=compute_{sm},code=compute_{sm}", "-o", str(out), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed on the generated CUDA source: {proc.stderr.strip()[-2000:]}")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return {"file": out.name, "compiler": version, "arch": arch, "ptx": f"compute_{sm}"}


def tune_settings(extra: dict):
    """TuneSettings from the export options (`tune_budget` seconds, `tune_trials`, `tune_db`, `tune_again`), or None:
    no tuning and no database to apply."""
    if not (extra.get("tune_budget") or extra.get("tune_trials") or extra.get("tune_db")):
        return None
    from .tvm_tune import TuneSettings

    return TuneSettings(
        budget_s=float(extra["tune_budget"]) if extra.get("tune_budget") else None,
        max_trials=int(extra["tune_trials"]) if extra.get("tune_trials") else None,
        db=Path(extra["tune_db"]) if extra.get("tune_db") else None,
        retune=bool(extra.get("tune_again")),
        show_progress=bool(extra.get("show_progress", True)),
    )


def _schedule_description(kind: str) -> str:
    if kind == "llvm":
        return "parallel over (batch, direction, channel group), channel group vectorised (lanes 16/8/4)"
    return "one thread per (batch, direction, channel), 128 threads per block, d_state fixed at compile time"


def _count_bindings(func) -> int:
    """Number of bindings (ops) in the Relax main function before legalization."""
    return sum(len(block.bindings) for block in func.body.blocks)
