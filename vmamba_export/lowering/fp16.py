"""float32 ONNX graph -> float16 graph for GPU targets, keeping float32 at the artifact's boundary.

onnxruntime.transformers.float16.convert_float_to_float16 with keep_io_types=True: the model still takes float32
pixels and returns float32 logits (a Cast at each end), every weight and activation in between is float16. The scan
node (ai.vmamba::SelectiveScan2D, type constraint T = float | float16) becomes a float16 node: its CUDA kernel reads
and writes float16 and keeps the state in float32. ONNX Runtime's CUDA LayerNormalization takes float16 and
accumulates in float32 (stash_type 1), so LayerNorm stays in the float16 region. Ops whose float16 form loses too
much (reductions of many values without float32 accumulation, exponentials that overflow at 65504) are blocked:
they run in float32 between Casts.
"""

from __future__ import annotations

from .onnx_graph import sort_topologically

# Kept in float32 (with Casts around them) on top of the converter's defaults (ML-domain ops, TopK, Range, CumSum,
# Min/Max, Upsample, ...). None of these is on VMamba's hot path; they are here so a graph that has them stays
# accurate: Softplus/Exp overflow float16 above ~11, ReduceSum/ReduceSumSquare over a whole map lose digits.
EXTRA_FP32_OPS = ("Softplus", "Exp", "Log", "Pow", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp")


def fp32_op_block_list() -> list[str]:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

    return sorted(set(DEFAULT_OP_BLOCK_LIST) | set(EXTRA_FP32_OPS))


def convert_model_to_fp16(proto, ir_version: int):
    """The float16 version of ModelProto `proto` (float32 inputs and outputs kept); `proto` is left unchanged."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    copy = type(proto)()
    copy.CopyFrom(proto)  # the converter edits its argument in place
    converted = convert_float_to_float16(
        copy,
        keep_io_types=True,
        op_block_list=fp32_op_block_list(),
        # Shape inference knows no ai.vmamba schema in a fresh process; the converter's own graph walk suffices.
        disable_shape_infer=True,
    )
    converted.ir_version = ir_version
    # The converter appends its input Casts after the nodes that read them; ONNX requires producers first.
    sort_topologically(converted.graph)
    return converted


def fp16_info(converted) -> dict:
    """What the manifest records about a graph `convert_model_to_fp16` made."""
    kept = sorted({n.op_type for n in converted.graph.node if n.op_type in set(fp32_op_block_list())})
    return {
        "converter": "onnxruntime.transformers.float16.convert_float_to_float16",
        "keep_io_types": True,
        "float32_ops": kept,
        "scan_dtype": "float16 tensors, float32 state",
    }
