"""Graph changes for ONNX Runtime's CPU provider (the cpu-onnxruntime target), applied to the artifact's graph: the
exported one, or for int8 the quantized one. Each is the same function, computed with fewer or cheaper kernels; the
manifest records what each changed (`lowering.rewrites`). The LayerNorm2d rewrite (channel_norm.py) is not here: it
applies to float graphs only, before the LayerNorm count is taken (`lowering.layer_norms`). The others: the x_proj
as one convolution (sibling_convs.py), the small-rank dt projections inside the scan op (dt_projection.py), SiLU as
one node (silu_fusion.py), a convolution of a Concat as convolutions of its parts (concat_convs.py: UperNet's
bottleneck), a segmenter's final bilinear upsampling as the library's planar kernel (output_resize.py) and the one
below.

The LayerNormalizations left over the last axis (all of them in int8 graphs, where ORT runs the quantized
convolutions channels-last and the norms between them without Transposes; v0's; a classifier's final norm) become
`ai.vmamba::LastAxisLayerNorm`, the library's row kernel (kernels/cpu/channel_layer_norm.cpp): ORT's CPU
LayerNormalization takes several times the memory traffic's time on VMamba's narrow rows. The Transposes around
them in the file stay where they were, so ORT cancels them against its channels-last convolutions as before.
"""

from __future__ import annotations

import onnx

from .concat_convs import split_concat_convs
from .cuda_graph import use_last_axis_layer_norms
from .dt_projection import fuse_dt_projections
from .onnx_graph import static_shapes
from .output_resize import use_bilinear_resize_for_outputs
from .sibling_convs import merge_sibling_pointwise_convs
from .silu_fusion import fuse_silu


def onnxruntime_cpu_rewrites(model: onnx.ModelProto, layer_norms: bool = True) -> dict:
    """Apply the cpu-onnxruntime rewrites to `model` in place; returns {rewrite: count} for the manifest.
    `layer_norms` False keeps ORT's LayerNormalization (the lowering's layer_norm="onnxruntime", for A/B timing)."""
    shapes = static_shapes(model)  # first: shape inference knows no ai.vmamba norm
    merged = merge_sibling_pointwise_convs(model, shapes)
    dt_projections = fuse_dt_projections(model, shapes)
    fused = fuse_silu(model)
    split = split_concat_convs(model, shapes)
    resized = use_bilinear_resize_for_outputs(model, shapes)
    norms = use_last_axis_layer_norms(model)["replaced"] if layer_norms else 0
    return {
        "merged_pointwise_convs": merged,
        "fused_dt_projections": dt_projections,
        "fused_silu": fused,
        "split_concat_convs": split,
        "bilinear_resize_outputs": resized,
        "last_axis_layer_norms": norms,
    }
