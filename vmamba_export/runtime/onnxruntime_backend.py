"""ONNX Runtime backend: registers the artifact's custom-op library (if it has one) and runs the session."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ArtifactError, TargetUnavailableError
from .shape_cache import ShapeCache


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise TargetUnavailableError(
            "this artifact needs ONNX Runtime: pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA)"
        ) from None
    return onnxruntime


CUDA_PROVIDER = "CUDAExecutionProvider"


def _cuda_device_count() -> int:
    """GPUs the CUDA driver sees (0 without a driver): asked of libcuda directly, so no framework is imported."""
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def cuda_unavailable_reason() -> str | None:
    """None when ONNX Runtime can run on a CUDA GPU here, else why not (one line for the user)."""
    ort = import_onnxruntime()
    if CUDA_PROVIDER not in ort.get_available_providers():
        return (
            f"this ONNX Runtime ({ort.__version__}) has no {CUDA_PROVIDER}: pip uninstall onnxruntime && "
            "pip install onnxruntime-gpu (a build matching your CUDA major version)"
        )
    if _cuda_device_count() == 0:
        return "no CUDA GPU is visible (no NVIDIA driver, or CUDA_VISIBLE_DEVICES hides every GPU)"
    return None


def make_session(
    model_path: Path,
    library: Path | None,
    threads: int | None,
    providers=None,
    dim_overrides: dict[str, int] | None = None,
):
    """An InferenceSession of the model (custom-op `library` registered first). `dim_overrides` fixes the input's
    symbolic dimensions by name ({"batch": 1, "height": 512, ...}): ONNX Runtime then infers every shape, folds the
    shape arithmetic into constants and optimises for that one shape (see OnnxRuntimeBackend)."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    for name, value in (dim_overrides or {}).items():
        options.add_free_dimension_override_by_name(name, int(value))
    if library is not None:
        try:
            options.register_custom_ops_library(str(library))
        except Exception as exc:  # onnxruntime raises its own Fail/RuntimeException types
            raise ArtifactError(f"cannot load the custom-op library {library}: {exc}") from None
    try:
        return ort.InferenceSession(str(model_path), options, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:
        raise ArtifactError(f"ONNX Runtime cannot open {model_path}: {str(exc).splitlines()[0]}") from None


def dim_overrides_for(session, shape: tuple[int, ...]) -> dict[str, int]:
    """The free-dimension overrides that fix `session`'s first input to `shape` (its symbolic dimensions by name)."""
    dims = session.get_inputs()[0].shape
    return {dim: size for dim, size in zip(dims, shape, strict=True) if isinstance(dim, str)}


class OnnxRuntimeBackend:
    """Runs an artifact's ONNX model. The artifact's graph takes any input size (symbolic batch, height, width); a
    shape seen more than once runs on a session specialised to it (`specialize_shapes`, default on; shape_cache.py):
    with the dimensions fixed, ONNX Runtime folds the graph's shape arithmetic (the segmentation head's resize sizes,
    its pooling masks) into constants, which lets the CPU provider run the bilinear upsampling in its blocked NCHWc
    layout (docs/cpu-latency.md). On a CUDA artifact, `cuda_graph` (default on) replays one captured CUDA graph per
    input shape (runtime/cuda_graphs.py) instead of launching every kernel from the host, for every task (a
    classifier's logits, a backbone's feature maps, a segmenter's per-pixel logits); its sessions are specialised
    the same way."""

    MAX_SHAPES = 4  # specialised CPU sessions kept (each holds its own copy of the weights)

    def __init__(
        self,
        folder: Path,
        manifest: dict,
        threads: int | None = None,
        cuda_graph: bool | None = None,
        specialize_shapes: bool = True,
    ):
        entry = manifest["entry"]
        library = entry.get("custom_op_library")
        providers = entry.get("providers")
        self.on_cuda = bool(providers and CUDA_PROVIDER in providers)
        cuda_options: dict = {}
        if self.on_cuda:
            why = cuda_unavailable_reason()
            if why:
                raise TargetUnavailableError(f"artifact {folder} runs on a CUDA GPU: {why}")
            # ORT's CUDA provider runs fp32 convolutions and matmuls in TF32 by default (10-bit mantissa): off for
            # fp32 artifacts, whose parity bound (rel L2 1e-4) TF32 alone exceeds.
            cuda_options = {"use_tf32": "0"} if manifest.get("precision") == "fp32" else {}
            providers = [(CUDA_PROVIDER, cuda_options), "CPUExecutionProvider"]
        model_path, library_path = folder / entry["model"], folder / library if library else None
        self.session = make_session(model_path, library_path, threads, providers)
        if self.on_cuda and CUDA_PROVIDER not in self.session.get_providers():
            raise TargetUnavailableError(
                f"ONNX Runtime could not start {CUDA_PROVIDER} for {folder} (see its log: CUDA/cuDNN libraries "
                "missing or not matching onnxruntime-gpu?)"
            )
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.output_name = self.output_names[0]

        def specialised(shape: tuple[int, ...], session_providers=providers, path: Path = model_path):
            overrides = dim_overrides_for(self.session, shape) if specialize_shapes else None
            return make_session(path, library_path, threads, session_providers, overrides)

        self.model_path = model_path
        batch1 = entry.get("batch1_model")
        self.batch1_model_path = folder / batch1 if batch1 else None

        # CPU: a specialised session per shape (on CUDA the graph sessions below are the specialised ones).
        self.shape_sessions = (
            ShapeCache(specialised, self.MAX_SHAPES) if specialize_shapes and not self.on_cuda else None
        )
        self.graphs = None
        if self.on_cuda and cuda_graph is not False:
            from .cuda_graphs import CudaGraphRunner

            graph_providers = [(CUDA_PROVIDER, {**cuda_options, "enable_cuda_graph": "1"}), "CPUExecutionProvider"]
            self.graphs = CudaGraphRunner(
                lambda shape: specialised(shape, graph_providers, self.graph_model_path(shape)), self.session
            )
        # Why graphs are off, once ONNX Runtime has refused to capture this model (set on first use, see _graphed).
        self.cuda_graph_note: str | None = None
        # Dense outputs (feature maps, per-pixel logits) are large: copying one out of a graph's device buffer into
        # numpy costs more than the launches the graph saves (UperNet 512 on an H200, run 19: 56 ms through the graph
        # against 27 ms plain; the ConvNeXt-T UperNet through the same runner 53 against 24). Numpy calls of a dense
        # artifact therefore run the plain session; device-resident calls, whose outputs stay on the GPU, replay graphs.
        from ..outputs import manifest_task

        self.graphs_for_numpy = manifest_task(manifest) == "classification"
        if self.graphs is not None and not self.graphs_for_numpy:
            self.cuda_graph_note = "device-resident calls only (numpy calls of a dense artifact run the plain session)"

    def graph_model_path(self, shape: tuple[int, ...]) -> Path:
        """The graph a CUDA-graph session of `shape` is made of: a CUDA artifact may carry a second graph made for
        batch 1 (entry.batch1_model: other fusions around the scan, docs/cuda-onnxruntime.md), replayed for batch-1
        inputs; every other shape replays the main graph."""
        return self.batch1_model_path if self.batch1_model_path is not None and shape[0] == 1 else self.model_path

    def _session_for(self, shape) -> object:
        """The session for a plain (not graphed) run at `shape`: its specialised one from the shape's second call."""
        if self.shape_sessions is None:
            return self.session
        shape = tuple(int(d) for d in shape)
        return self.shape_sessions.get(shape) if self.shape_sessions.wants(shape) else self.session

    def _graphed(self, shape) -> bool:
        """Whether this call replays a CUDA graph: graphs on, and the shape not seen for the first time (a new shape
        runs the plain session once, so one-off sizes never pay for a graph's session; cuda_graphs.py). A model that
        ONNX Runtime will not capture (a node it places on the CPU, e.g. the UperNet pooling's mask arithmetic)
        turns graphs off for good, with the reason in `cuda_graph_note`, and runs on the plain session."""
        shape = tuple(int(d) for d in shape)
        if self.graphs is None or not self.graphs.wants(shape):
            return False
        try:
            self.graphs.prepare(shape)
        except ArtifactError as exc:
            if "graph capture" not in str(exc):
                raise
            self.graphs, self.cuda_graph_note = None, f"off: {exc}"
            return False
        return True

    def run(self, batch: np.ndarray) -> np.ndarray:
        if self.graphs_for_numpy and self._graphed(batch.shape):
            return self._graph_outputs(batch)[0]
        return self._session_for(batch.shape).run(self.output_names[:1], {self.input_name: batch})[0]

    def run_outputs(self, batch: np.ndarray) -> list[np.ndarray]:
        """Every output of the graph, in its order (a backbone's four feature maps)."""
        if self.graphs_for_numpy and self._graphed(batch.shape):
            return self._graph_outputs(batch)
        return self._session_for(batch.shape).run(self.output_names, {self.input_name: batch})

    def _graph_outputs(self, batch: np.ndarray) -> list[np.ndarray]:
        outputs = self.graphs.run_numpy(batch)
        return outputs if isinstance(outputs, list) else [outputs]

    def run_device(self, batch):
        """A device-resident batch (DLPack) in, a device OrtValue out (`torch.from_dlpack(out)` takes it), with no
        host round trip; a list of them, in output order, for a graph with several outputs (a backbone)."""
        if not self.on_cuda:
            raise TargetUnavailableError("device-resident inputs need a cuda-onnxruntime artifact")
        if self._graphed(batch.shape):
            return self.graphs.run_device(batch)
        from .cuda_graphs import device_ortvalue

        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input_name, device_ortvalue(batch))
        for name in self.output_names:
            binding.bind_output(name, "cuda", 0)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        # One output (logits): the OrtValue, as before; several (a backbone's maps): the list, in graph order.
        return outputs[0] if len(outputs) == 1 else list(outputs)
