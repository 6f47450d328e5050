"""Batch-1 latency on a CUDA GPU: ONNX Runtime CUDA graphs, one captured graph per input shape.

At batch 1 a VMamba is a chain of ~300 small kernels, so launch and host overhead decide its time; ONNX Runtime's
CUDA graph (`enable_cuda_graph`) replays the whole chain with one launch. A captured graph reads its input from, and
writes its output to, the device addresses it saw at capture, so each input shape gets its own session with a fixed
input and output buffer bound through I/O binding; calls copy into and out of those buffers. Sessions are kept for
the last few shapes seen (each holds its own copy of the weights on the GPU).

The custom scan op is capture-safe: it launches on ONNX Runtime's stream, never synchronises, and its only scratch
memory is stream-ordered (cudaMallocAsync / cudaFreeAsync), which graph capture records as memory nodes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import numpy as np

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

    def __init__(self, session, shape: tuple[int, ...], num_outputs_per_item: int):
        import onnxruntime as ort

        self.session = session
        inp, out = session.get_inputs()[0], session.get_outputs()[0]
        self.input = ort.OrtValue.ortvalue_from_shape_and_type(shape, _ONNX_TO_NUMPY[inp.type], "cuda", 0)
        self.output_shape = (shape[0], num_outputs_per_item)
        self.output_dtype = _ONNX_TO_NUMPY[out.type]
        self.output = ort.OrtValue.ortvalue_from_shape_and_type(self.output_shape, self.output_dtype, "cuda", 0)
        self.binding = session.io_binding()
        self.binding.bind_ortvalue_input(inp.name, self.input)
        self.binding.bind_ortvalue_output(out.name, self.output)

    def replay(self) -> None:
        # The first run captures (after ONNX Runtime's own warm-up runs), every later one replays the graph.
        self.session.run_with_iobinding(self.binding)


class CudaGraphRunner:
    """Runs an artifact's model through CUDA graphs, one per input shape (least recently used dropped first)."""

    def __init__(
        self, make_session: Callable[[], object], num_outputs_per_item: int, max_shapes: int = MAX_CACHED_SHAPES
    ):
        self._make_session = make_session
        self._per_item = num_outputs_per_item
        self._max_shapes = max_shapes
        self._graphs: OrderedDict[tuple[int, ...], _GraphSession] = OrderedDict()

    @property
    def cached_shapes(self) -> list[tuple[int, ...]]:
        return list(self._graphs)

    def _graph_for(self, shape: tuple[int, ...]) -> _GraphSession:
        graph = self._graphs.get(shape)
        if graph is None:
            if len(self._graphs) >= self._max_shapes:
                self._graphs.popitem(last=False)
            graph = _GraphSession(self._make_session(), shape, self._per_item)
            self._graphs[shape] = graph
        self._graphs.move_to_end(shape)
        return graph

    def run_numpy(self, batch: np.ndarray) -> np.ndarray:
        graph = self._graph_for(tuple(batch.shape))
        graph.input.update_inplace(batch)
        graph.replay()
        return graph.output.numpy()

    def run_device(self, batch):
        """Device array in, a new device OrtValue out (it supports `__dlpack__`): the graph's own output buffer is
        overwritten by the next call, so the result is copied on the GPU."""
        import onnxruntime as ort

        source = device_ortvalue(batch)
        graph = self._graph_for(tuple(source.shape()))
        graph.input.update_inplace(source)
        graph.replay()
        result = ort.OrtValue.ortvalue_from_shape_and_type(graph.output_shape, graph.output_dtype, "cuda", 0)
        result.update_inplace(graph.output)
        return result
