"""OpenVINO backend: loads the artifact's extension library, compiles its IR for the CPU with the recorded inference
precision, and runs it; safe to call from several threads at once (one infer request per concurrent call).

The extension library is linked against one OpenVINO release's versioned libraries, so the release recorded in the
manifest must be the installed one: checked before anything is loaded, with both versions in the error.
"""

from __future__ import annotations

import functools
import threading
import warnings
from pathlib import Path

import numpy as np

from ..errors import ArtifactError, TargetUnavailableError
from .shape_cache import ShapeCache

INSTALL_HINT = "pip install openvino==2026.4.1"


def import_openvino():
    """The openvino module, or TargetUnavailableError with the install command."""
    try:
        import openvino
    except ImportError:
        raise TargetUnavailableError(f"this artifact needs OpenVINO: {INSTALL_HINT}") from None
    return openvino


def installed_openvino_version() -> str:
    """The installed release as "2026.4.1" (the wheel's version; openvino.__version__ adds a build suffix)."""
    from importlib import metadata

    try:
        return metadata.version("openvino")
    except metadata.PackageNotFoundError:  # an OpenVINO not installed from a wheel: use its build string
        return import_openvino().__version__.split("-", 1)[0]


def extension_built_for(library: Path) -> str:
    """The OpenVINO release the extension library was compiled against (its exported vmamba_openvino_version()).

    Loading the library needs that release's libopenvino already in the process; `import openvino` first."""
    import ctypes

    import_openvino()
    try:
        lib = ctypes.CDLL(str(library))
    except OSError as exc:
        raise ArtifactError(
            f"cannot load the OpenVINO extension {library} into OpenVINO {installed_openvino_version()}: {exc}"
        ) from None
    fn = lib.vmamba_openvino_version
    fn.restype = ctypes.c_char_p
    return fn().decode()


def check_version(built_for: str | None, what: str) -> str:
    """Refuse an extension compiled for another OpenVINO release than the installed one; returns the installed one."""
    installed = installed_openvino_version()
    if built_for != installed:
        raise ArtifactError(
            f"{what} was built for OpenVINO {built_for}, but OpenVINO {installed} is installed: install "
            f"openvino=={built_for} or re-export the artifact with this OpenVINO"
        )
    return installed


def compile_config(precision_hint: str, threads: int | None, profile: bool = False) -> dict:
    """CPU plugin properties: the inference precision must be explicit, since on CPUs with AMX/AVX512-BF16 the
    plugin defaults to bf16 (FIELD-NOTES.md), which would break fp32 parity."""
    config: dict = {"INFERENCE_PRECISION_HINT": precision_hint, "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    if profile:
        config["PERF_COUNT"] = True
    return config


def compile_ir(
    xml: Path,
    library: Path | None,
    precision_hint: str,
    threads: int | None = None,
    profile: bool = False,
    shape: tuple[int, ...] | None = None,
):
    """An ov.CompiledModel for the CPU (extension `library` loaded first, if any), for one fixed input `shape` when
    given (the IR's dynamic dimensions made static: the CPU plugin plans memory and picks kernels once for it);
    errors become ArtifactError with OpenVINO's first line."""
    ov = import_openvino()
    core = ov.Core()
    try:
        if library is not None:
            core.add_extension(str(library))
    except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
        raise ArtifactError(
            f"cannot load the OpenVINO extension {library}: {str(exc).strip().splitlines()[0]}"
        ) from None
    try:
        model = core.read_model(str(xml))
        if shape is not None:
            model.reshape({model.inputs[0]: ov.PartialShape(list(shape))})
        return core.compile_model(model, "CPU", compile_config(precision_hint, threads, profile))
    except Exception as exc:
        raise ArtifactError(f"OpenVINO cannot compile {xml}: {str(exc).strip().splitlines()[0]}") from None


def cpu_capabilities() -> list[str]:
    """The CPU plugin's OPTIMIZATION_CAPABILITIES here ("BF16" only where the CPU has AVX512-BF16 or AMX)."""
    return list(import_openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def bf16_fallback_note(runs_in: str) -> str:
    if runs_in.startswith("bf"):
        # Correct but slow: without AVX512-BF16/AMX but with AVX-512 the plugin emulates bf16 (seen 20x slower).
        return (
            "this CPU has no native bf16 (no AVX512-BF16 or AMX): OpenVINO emulates it, far slower than the fp32 "
            "artifact"
        )
    return f"this CPU has no native bf16 (no AVX512-BF16 or AMX): OpenVINO runs this bf16 artifact in {runs_in}"


class OpenVinoBackend:
    """Compiles the IR once per input shape (static shapes run faster in the CPU plugin than the IR's dynamic ones),
    keeping the last MAX_SHAPES shapes; calls may come from several threads."""

    MAX_SHAPES = 4

    def __init__(self, folder: Path, manifest: dict, threads: int | None = None):
        import_openvino()
        entry = manifest["entry"]
        for key in ("model", "extension_library", "inference_precision"):
            if key not in entry:
                raise ArtifactError(f"artifact {folder}: manifest entry lacks {key!r} (not an OpenVINO artifact?)")
        check_version(entry.get("openvino_version"), f"artifact {folder}")
        self.precision_hint = entry["inference_precision"]
        self._compile = functools.partial(
            compile_ir, folder / entry["model"], folder / entry["extension_library"], self.precision_hint, threads
        )
        # Compiled once here with the IR's own (dynamic) shapes: a broken artifact fails at load, not at first call.
        self.compiled = self._compile()
        if self.precision_hint == "bf16" and "BF16" not in cpu_capabilities():
            warnings.warn(bf16_fallback_note(self.runs_in), RuntimeWarning, stacklevel=4)
        # Recorded by validate: which plugin and CPU ran it (e.g. "ARM (0xd0c)" for an aarch64 Neoverse-N1), and the
        # precision it really ran in (a bf16 artifact runs in f32 on a CPU without bf16 kernels).
        core = import_openvino().Core()
        self.evaluated_with = (
            f"OpenVINO {installed_openvino_version()} CPU plugin ({core.get_property('CPU', 'FULL_DEVICE_NAME')}), "
            f"inference precision {self.runs_in}"
        )
        # Per input shape: the compiled model and its idle infer requests. A request holds its input/output buffers
        # and is not re-entrant, so each concurrent call takes its own (created on demand) and gives it back.
        self._shapes: ShapeCache[tuple[object, list]] = ShapeCache(
            lambda shape: (self._compile(shape=shape), []), self.MAX_SHAPES
        )
        self._lock = threading.Lock()  # guards the idle lists

    @property
    def runs_in(self) -> str:
        """The precision the CPU plugin actually runs in ("bf16" or "f32"): a CPU with neither AVX-512 nor AMX has no
        bf16 kernels, and the plugin then runs a bf16 artifact in f32."""
        return self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()

    def _request_for(self, shape: tuple[int, ...]):
        compiled, idle = self._shapes.get(shape)  # compiled at a shape's first call (no general model runs calls)
        with self._lock:
            return (idle.pop() if idle else compiled.create_infer_request()), idle

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.run_outputs(batch, first_only=True)[0]

    def run_outputs(self, batch: np.ndarray, first_only: bool = False) -> list[np.ndarray]:
        """Every output of the model, in its order (a backbone's four feature maps), or only the first."""
        request, idle = self._request_for(tuple(batch.shape))
        try:
            # share_inputs: the batch is contiguous float32 (Predictor.check_input) and outlives the call;
            # the outputs are copied out of the request's buffers (share_outputs defaults to False).
            result = request.infer({0: batch}, share_inputs=True)
            count = 1 if first_only else len(result)
            return [result[i] for i in range(count)]
        finally:
            with self._lock:
                idle.append(request)
