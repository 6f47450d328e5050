"""Graph changes for ONNX Runtime's CPU provider (the cpu-onnxruntime target), applied to the artifact's graph: the
exported one, or for int8 the quantized one. Each is the same function, computed with fewer or cheaper kernels; the
manifest records what each changed (`lowering.rewrites`). The LayerNorms' rewrite (channel_norm.py) is not here: it
applies to float graphs only, before the LayerNorm count is taken (`lowering.layer_norms`)."""

from __future__ import annotations

import onnx

from .sibling_convs import merge_sibling_pointwise_convs
from .silu_fusion import fuse_silu


def onnxruntime_cpu_rewrites(model: onnx.ModelProto) -> dict:
    """Apply the cpu-onnxruntime rewrites to `model` in place; returns {rewrite: count} for the manifest."""
    return {"merged_pointwise_convs": merge_sibling_pointwise_convs(model), "fused_silu": fuse_silu(model)}
