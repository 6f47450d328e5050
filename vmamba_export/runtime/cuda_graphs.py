"""Batch-1 latency on a CUDA GPU: ONNX Runtime CUDA graphs, one captured graph per input shape.

At batch 1 a VMamba is a chain of ~300 small kernels, so launch and host overhead decide its time; ONNX Runtime's
CUDA graph (`enable_cuda_graph`) replays the whole chain with one launch. A captured graph reads its input from, and
writes its outputs to, the device addresses it saw at capture, so each input shape gets its own session with a fixed
input buffer and fixed output buffers (any number: a classifier's logits, a backbone's four feature maps, a segmenter's
per-pixel logits) bound through I/O binding; calls copy into and out of those buffers. Sessions are kept for
the last few shapes seen (each holds its own copy of the weights on the GPU).

The custom scan op is capture-safe: it launches on ONNX Runtime's stream, never synchronises, and its only scratch
memory is stream-ordered (cudaMallocAsync / cudaFreeAsync), which graph capture records as memory nodes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .shape_cache import ShapeCache

# ONNX tensor element types of the artifact's input and output -> numpy dtypes (cuda-onnxruntime keeps float32 I/O).
_ONNX_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
MAX_CACHED_SHAPES = 4


def device_ortvalue(array_like):
    """An OrtValue sharing the memory of a device-resident array (torch/cupy/..., anything with `__dlpack__`)."""
    import onnxruntime as ort

    return ort.OrtValue.from_dlpack(array_like)


def is_device_array(batch) -> bool:
    """True for an array that lives on a GPU and can be handed over without a host copy (DLPack / CUDA interface)."""
    if isinstance(batch, np.ndarray):
        return False
    if hasattr(batch, "__dlpack_device__"):
        device_type, _ = batch.__dlpack_device__()
        return int(device_type) == 2  # kDLCUDA
    return hasattr(batch, "__cuda_array_interface__")


class _GraphSession:
    """One session, one input shape, one captured graph, with the input and output buffers it was captured on."""

    def __init__(self, session, shape: tuple[int, ...], probe_session):
        import onnxruntime as ort

        self.session = session
        inp, outputs = session.get_inputs()[0], session.get_outputs()
        dtype = _ONNX_TO_NUMPY[inp.type]
        self.input = ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, "cuda", 0)
        self.binding = session.io_binding()
        self.binding.bind_ortvalue_input(inp.name, self.input)
        # The output shapes come from one ordinary run at this shape of `probe_session`, a session of the same model
        # without graphs: no rule to keep in step with the model (a backbone's maps are floor(side / 4) then
        # ceil(/ 2) per stage for v0 but ceil(side / stride) for v2, so 193 x 161 has no one formula; ONNX shape
        # inference leaves such sides symbolic). Not a run of the graph session itself: ONNX Runtime captures within
        # that session's first run, so the graph would keep the probe's own output buffers (seen on an H100 with
        # onnxruntime-gpu 1.31.1: the bound buffers were never written, every later call read zeros).
        probe = probe_session.run(None, {probe_session.get_inputs()[0].name: np.zeros(shape, dtype=dtype)})
        shapes = [tuple(value.shape) for value in probe]
        self.output_dtypes = [_ONNX_TO_NUMPY[out.type] for out in outputs]
        self.outputs = []
        for out, out_shape, dtype in zip(outputs, shapes, self.output_dtypes, strict=True):
            value = ort.OrtValue.ortvalue_from_shape_and_type(out_shape, dtype, "cuda", 0)
            self.binding.bind_ortvalue_output(out.name, value)
            self.outputs.append(value)

    def replay(self) -> None:
        # The first run does ONNX Runtime's warm-up runs and the capture, every later one replays the graph.
        self.session.run_with_iobinding(self.binding)


def _one_or_all(values: list):
    """A single output as itself (a classifier's logits, a segmenter's per-pixel logits), several as the list."""
    return values[0] if len(values) == 1 else values


class CudaGraphRunner:
    """Runs an artifact's model through CUDA graphs, one per input shape (least recently used dropped first). Any
    number of outputs, of shapes that follow the input's (a backbone's four maps, a segmenter's logits)."""

    def __init__(
        self,
        make_session: Callable[[tuple[int, ...]], object],
        probe_session,
        max_shapes: int = MAX_CACHED_SHAPES,
    ):
        """`make_session(shape)`: a new session of the model with `enable_cuda_graph`, specialised to that input
        shape; `probe_session`: an ordinary session of the same model, run once per new shape for the output shapes
        (see _GraphSession)."""
        self.make_session = make_session
        self._graphs: ShapeCache[_GraphSession] = ShapeCache(
            lambda shape: _GraphSession(make_session(shape), shape, probe_session), max_shapes
        )

    def wants(self, shape: tuple[int, ...]) -> bool:
        """Whether a call at `shape` should go through a graph: from a shape's second call on (shape_cache.py). A
        graph costs a session of its own (weights, cuDNN set-up, warm-up runs, capture); the caller runs its plain
        session on first calls."""
        return self._graphs.wants(shape)

    @property
    def cached_shapes(self) -> list[tuple[int, ...]]:
        return self._graphs.cached_shapes

    def prepare(self, shape: tuple[int, ...]) -> None:
        """Make the graph session of `shape` now (raises what the session's creation raises)."""
        self._graphs.get(shape)

    def _graph_for(self, shape: tuple[int, ...]) -> _GraphSession:
        return self._graphs.get(shape)

    def run_numpy(self, batch: np.ndarray):
        """numpy in; the output as a numpy array, or the list of them, in graph order, when there are several."""
        graph = self._graph_for(tuple(batch.shape))
        graph.input.update_inplace(batch)
        graph.replay()
        return _one_or_all([value.numpy() for value in graph.outputs])

    def run_device(self, batch):
        """Device array in, a new device OrtValue out (it supports `__dlpack__`), or the list of them when there are
        several: the graph's own output buffers are overwritten by the next call, so results are copied on the GPU."""
        import onnxruntime as ort

        source = device_ortvalue(batch)
        graph = self._graph_for(tuple(source.shape()))
        graph.input.update_inplace(source)
        graph.replay()
        results = []
        for value, dtype in zip(graph.outputs, graph.output_dtypes, strict=True):
            copy = ort.OrtValue.ortvalue_from_shape_and_type(value.shape(), dtype, "cuda", 0)
            copy.update_inplace(value)
            results.append(copy)
        return _one_or_all(results)
