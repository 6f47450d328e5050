"""What a backend builds once per input shape (an ONNX Runtime session specialised to it, a captured CUDA graph, an
OpenVINO compile), kept for the last few shapes. `wants` is the policy of the ONNX Runtime backends: build only for a
shape seen before, since a stream of one-off sizes (a folder of photos of all sizes through a segmenter) would
otherwise pay a session's creation on every image; those calls run on the backend's general session instead. The
OpenVINO backend has no general compiled model for calls and builds at a shape's first call (`get` alone)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
REMEMBERED_SHAPES = 64  # shapes seen once, most recent kept


class ShapeCache(Generic[T]):
    """`build(shape)` per input shape, least recently used dropped first beyond `max_shapes`; thread-safe."""

    def __init__(self, build: Callable[[tuple[int, ...]], T], max_shapes: int):
        self._build = build
        self._max_shapes = max_shapes
        self._built: OrderedDict[tuple[int, ...], T] = OrderedDict()
        self._seen: OrderedDict[tuple[int, ...], None] = OrderedDict()
        self._lock = threading.Lock()

    def wants(self, shape: tuple[int, ...]) -> bool:
        """Whether a call at `shape` should use the per-shape object: yes for a shape built already or seen once
        before; no (and remembered) the first time."""
        with self._lock:
            if shape in self._built or shape in self._seen:
                return True
            self._seen[shape] = None
            if len(self._seen) > REMEMBERED_SHAPES:
                self._seen.popitem(last=False)
            return False

    @property
    def cached_shapes(self) -> list[tuple[int, ...]]:
        return list(self._built)

    def get(self, shape: tuple[int, ...]) -> T:
        """The object of `shape`, built now if it is not cached (raises what `build` raises)."""
        with self._lock:
            built = self._built.get(shape)
            if built is None:
                if len(self._built) >= self._max_shapes:
                    self._built.popitem(last=False)
                built = self._build(shape)
                self._built[shape] = built
            self._built.move_to_end(shape)
            return built
