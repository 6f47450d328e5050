"""TVM backend for `cpu-tvm` / `cuda-tvm` / `metal-tvm` artifacts: the exported library run by the Relax VM.

Two ways to load, tried in order (the one used is in `evaluated_with`, and `validate` records it):

1. Runtime only: the `tvm_ffi` package and `libtvm_runtime.so` (plus `libtvm_runtime_cuda.so` for CUDA), what a
   deployment ships; the TVM compiler is not needed. libtvm_runtime.so is opened with RTLD_GLOBAL so that the
   library's symbols resolve, then `vm_load_executable`, `vm_initialization` and `main` are called through tvm_ffi.
   The runtime library is found at $VMAMBA_TVM_RUNTIME_LIB (a file or folder), else in an installed `tvm` package's
   lib/ folder (located without importing tvm).
2. `import tvm` (the full apache-tvm package): `tvm.runtime.load_module` + `relax.VirtualMachine`.

The library has a fixed height/width and a dynamic batch (or a fixed one: tuned builds; other batches then run in
slices of it, the last one zero-padded). Runs are serialised by a lock: one VM instance keeps
per-call state (registers, the pooled allocator) and is not safe to call from several threads at once.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
import threading
from pathlib import Path

import numpy as np

from ..errors import ArtifactError, InputError, TargetUnavailableError

RUNTIME_LIB_ENV = "VMAMBA_TVM_RUNTIME_LIB"
CPU, CUDA, METAL = 1, 2, 8  # DLDeviceType
POOLED_ALLOCATOR = 2


def _runtime_lib_dir() -> Path | None:
    """Folder holding libtvm_runtime.so: $VMAMBA_TVM_RUNTIME_LIB, else the installed tvm package's lib/."""
    env = os.environ.get(RUNTIME_LIB_ENV)
    if env:
        path = Path(env)
        return path.parent if path.is_file() else path
    spec = importlib.util.find_spec("tvm")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        if (Path(root) / "lib" / "libtvm_runtime.so").is_file():
            return Path(root) / "lib"
    return None


_LOADED_RUNTIME: dict[str, ctypes.CDLL] = {}


def _load_runtime_libraries(device_type: int) -> Path:
    folder = _runtime_lib_dir()
    if folder is None or not (folder / "libtvm_runtime.so").is_file():
        raise OSError(f"libtvm_runtime.so not found (set {RUNTIME_LIB_ENV} or install apache-tvm)")
    names = ["libtvm_runtime.so"] + (["libtvm_runtime_cuda.so"] if device_type == CUDA else [])
    for name in names:
        if name not in _LOADED_RUNTIME:
            _LOADED_RUNTIME[name] = ctypes.CDLL(str(folder / name), mode=ctypes.RTLD_GLOBAL)
    return folder


class _RuntimeOnlyVM:
    """The Relax VM through tvm_ffi + libtvm_runtime.so only."""

    def __init__(self, library: Path, device_type: int, params: list[np.ndarray]):
        import tvm_ffi

        folder = _load_runtime_libraries(device_type)
        self.ffi = tvm_ffi
        self.device_type = device_type
        self.device = tvm_ffi.device("cuda" if device_type == CUDA else "metal" if device_type == METAL else "cpu", 0)
        self.module = tvm_ffi.load_module(str(library))
        self.vm = self.module["vm_load_executable"]()
        init = [device_type, 0, POOLED_ALLOCATOR]
        if device_type != CPU:  # shape functions run on the host: the VM needs the CPU device as well
            init += [CPU, 0, POOLED_ALLOCATOR]
        self.vm["vm_initialization"](*init)
        self.main = self.vm["main"]
        self._alloc = tvm_ffi.get_global_func("runtime.TVMTensorAllocWithScope")
        self._copy = tvm_ffi.get_global_func("runtime.TVMTensorCopyFromTo")
        self.params = [self._to_device(p) for p in params]  # uploaded once, passed on every call
        self.label = f"TVM runtime only (tvm_ffi {tvm_ffi.__version__} + {folder / 'libtvm_runtime.so'})"

    def _to_device(self, array: np.ndarray):
        host = self.ffi.from_dlpack(array)
        if self.device_type == CPU:
            return host
        dev = self._alloc(list(array.shape), "float32", self.device, None)
        self._copy(host, dev)
        return dev

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        out = self.main(self._to_device(batch), *self.params)
        out = out[0] if not hasattr(out, "shape") else out
        if self.device_type != CPU:
            result = np.empty(tuple(out.shape), np.float32)
            self._copy(out, self.ffi.from_dlpack(result))
            return result
        return np.array(np.from_dlpack(out), copy=True)


class _FullTvmVM:
    """The Relax VM through the full `tvm` package (needs the compiler library too)."""

    def __init__(self, library: Path, device_type: int, params: list[np.ndarray]):
        import tvm
        from tvm import relax

        self.tvm = tvm
        self.device = {CPU: tvm.cpu(0), CUDA: tvm.cuda(0), METAL: tvm.metal(0)}[device_type]
        self.vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), self.device)
        self.params = [tvm.runtime.tensor(p, self.device) for p in params]
        self.label = f"TVM {tvm.__version__} (import tvm: runtime.load_module + relax.VirtualMachine)"

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        out = self.vm["main"](self.tvm.runtime.tensor(batch, self.device), *self.params)
        out = out[0] if not hasattr(out, "shape") else out
        return out.numpy()


def _read_params(folder: Path, spec: dict | None) -> list[np.ndarray]:
    """The weights of a library built with them as inputs (entry.params: one raw float32 file), in argument order."""
    if not spec:
        return []
    data = np.fromfile(folder / spec["file"], dtype="<f4")
    out, offset = [], 0
    for t in spec["tensors"]:
        size = int(np.prod(t["shape"], dtype=np.int64))
        out.append(np.ascontiguousarray(data[offset : offset + size].reshape(t["shape"]), dtype=np.float32))
        offset += size
    if offset != data.size:
        raise ArtifactError(f"{folder / spec['file']}: {data.size} floats, the manifest lists {offset}")
    return out


def _serve_cuda_binary(folder: Path, entry: dict) -> None:
    """Answer TVM's `tvm_callback_cuda_compile` with the artifact's precompiled fatbin.

    The library holds CUDA C source (the apache-tvm wheel's compiler has no CUDA); TVM's runtime compiles it on load by
    calling that global function, which only the full `tvm` package defines (NVRTC + CUDA headers). The exporter
    compiled the same source with nvcc (lowering/tvm_relax.py compile_cuda_fatbin): hand that back, after checking the
    source is the one it was compiled from."""
    import hashlib

    import tvm_ffi

    name = entry.get("cuda_binary")
    if not name:
        return  # built without nvcc: needs the full tvm package (its NVRTC callback) on this machine
    binary = (folder / name).read_bytes()
    expected = entry.get("cuda_source_sha256")

    def compile_cuda(code, *_target):
        digest = hashlib.sha256(str(code).encode()).hexdigest()
        if expected and digest != expected:
            raise ArtifactError(f"{folder}: the library's CUDA source does not match the one {name} was compiled from")
        return binary

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_cuda, override=True)


class TvmBackend:
    def __init__(self, folder: Path, manifest: dict, threads: int | None = None):
        entry = manifest["entry"]
        device = entry.get("device", manifest["target"].get("device"))
        device_type = int(entry["vm_device_type"])
        library = Path(folder) / entry["model"]
        if device == "apple" and sys.platform != "darwin":
            raise TargetUnavailableError(
                f"artifact {folder} runs on Apple GPUs (Metal): it needs macOS; its generated Metal source is "
                f"{entry.get('metal_source')}"
            )
        if device == "cuda":
            from .onnxruntime_backend import _cuda_device_count  # asks libcuda directly; imports no framework

            if _cuda_device_count() == 0:
                raise TargetUnavailableError(f"artifact {folder} runs on a CUDA GPU: no CUDA GPU is visible")
        if threads:
            # TVM's thread pool reads TVM_NUM_THREADS when it starts (first parallel call in this process).
            os.environ["TVM_NUM_THREADS"] = str(threads)
        if device == "cuda":
            _serve_cuda_binary(Path(folder), entry)
        self.input_shape = tuple(manifest["lowering"]["input_shape"])
        self.batch_range = tuple(manifest["lowering"].get("batch_range", (1, 1)))
        errors = []
        self._vm = None
        params = _read_params(Path(folder), entry.get("params"))
        for loader in (_RuntimeOnlyVM, _FullTvmVM):
            try:
                self._vm = loader(library, device_type, params)
                break
            except Exception as exc:  # noqa: BLE001 (any failure of one way means: try the other, report both)
                errors.append(f"{loader.__name__}: {type(exc).__name__}: {exc}")
        if self._vm is None:
            raise ArtifactError(f"cannot load the TVM library {library}: " + " | ".join(errors))
        self.evaluated_with = self._vm.label
        self.load_errors = errors  # why the runtime-only path was not used, if it was not
        self._lock = threading.Lock()

    def run(self, batch: np.ndarray) -> np.ndarray:
        expected = tuple(self.input_shape[1:])
        if tuple(batch.shape[1:]) != expected:
            raise InputError(
                f"this TVM artifact takes images of shape {expected} (fixed height/width), got {batch.shape}"
            )
        if len(batch) > self.batch_range[1]:
            # The library was compiled for batches up to the manifest's limit: run larger ones in slices.
            step = self.batch_range[1]
            return np.concatenate([self.run(batch[i : i + step]) for i in range(0, len(batch), step)])
        fixed = self.batch_range[0]
        if len(batch) < fixed:
            # A fixed-batch library (tuned builds): pad with zeros; samples do not interact, so the rows kept are exact.
            pad = np.zeros((fixed - len(batch), *batch.shape[1:]), np.float32)
            return self.run(np.concatenate([batch, pad]))[: len(batch)]
        with self._lock:
            return self._vm(np.ascontiguousarray(batch, dtype=np.float32))
