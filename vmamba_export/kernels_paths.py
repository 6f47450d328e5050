"""Where the native libraries built by `python -m vmamba_export.build_kernels` live.

The host's own build goes into vmamba_export/_native/; a cross-build for another platform into
vmamba_export/_native/<platform>/ (`build_kernels --platform linux-aarch64`)."""

from __future__ import annotations

from pathlib import Path

NATIVE_DIR = Path(__file__).resolve().parent / "_native"
SCAN_LIBRARY_NAME = "libvmamba_scan.so"  # C API for the torch op (ctypes), kernels/cpu
ORT_LIBRARY_NAME = "libvmamba_ort.so"  # ONNX Runtime custom-op library, kernels/onnxruntime
ORT_CUDA_LIBRARY_NAME = "libvmamba_ort_cuda.so"  # the same plus the CUDA kernel (kernels/cuda), built on request
OPENVINO_LIBRARY_NAME = "libvmamba_openvino.so"  # OpenVINO extension (kernels/openvino)


def native_dir(platform: str | None = None) -> Path:
    """The folder of `platform`'s libraries (None or this machine's platform: _native/ itself)."""
    from .platforms import host_platform

    if platform is None or platform == host_platform():
        return NATIVE_DIR
    return NATIVE_DIR / platform


def scan_library_path() -> Path | None:
    """The C scan library (torch op's CPU path), or None when it is not built."""
    path = NATIVE_DIR / SCAN_LIBRARY_NAME
    return path if path.is_file() else None


def ort_library_path(platform: str | None = None) -> Path | None:
    """The ONNX Runtime custom-op library (`SessionOptions.register_custom_ops_library`) for `platform` (None: this
    machine's), or None when not built."""
    path = native_dir(platform) / ORT_LIBRARY_NAME
    return path if path.is_file() else None


def ort_cuda_library_path() -> Path | None:
    """The ONNX Runtime custom-op library with the CUDA kernel (`python -m vmamba_export.build_kernels --cuda`), or
    None when it is not built."""
    path = NATIVE_DIR / ORT_CUDA_LIBRARY_NAME
    return path if path.is_file() else None


def openvino_extension_path() -> Path | None:
    """The OpenVINO extension library (`core.add_extension`, `convert_model(extension=...)`), or None when not built."""
    path = NATIVE_DIR / OPENVINO_LIBRARY_NAME
    return path if path.is_file() else None
