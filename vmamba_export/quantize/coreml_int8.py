"""W8A8 for the `apple-coreml` target: activation ranges calibrated in torch, quantize/dequantize written into the
torch program before conversion, so the ML Program carries them as MIL ops.

Why not coremltools' own tools: Core ML's activation calibration (`linear_quantize_activations`) runs the model
through Core ML, which predicts only on macOS; the torch-side `LinearQuantizer` needs an FX trace, and SS2D's shape
arithmetic (`b, di, h, w = x.shape`) does not FX-trace ("Proxy object cannot be iterated"). Neither is needed:

1. calibrate: forward pre-hooks on every `nn.Linear` / `nn.Conv2d` record the range of its input over the
   calibration images, run through the same chunked scan the program will hold;
2. wrap: each such layer is swapped (for the duration of the conversion only) for a module that quantizes its input
   per tensor (`quantized_decomposed.quantize_per_tensor` + `dequantize_per_tensor`) and holds its weight as int8
   per output channel (`dequantize_per_channel` of an int8 buffer);
3. convert: torch.export keeps those ops, and coremltools' torch.export frontend turns them into iOS17 `quantize` /
   `dequantize` (activations) and `constexpr_affine_dequantize` (weights, dequantized at load).

Symmetric int8 everywhere (zero point 0): activations in [-128, 127] with scale = range / 127, weights in
[-127, 127] per output channel. What stays float: the selective scan and the projections feeding it (x_proj,
dt_projs; functional convolutions inside SS2D.scan_core, not modules): exp(dt * A) amplifies any rounding of delta,
B and C along thousands of positions. LayerNorms, activations, residual adds stay in the program's fp16.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import VMambaExportError

COREML_CALIB_METHODS = ("minmax", "percentile")
PERCENTILE = 99.99  # of |x|, for --calib-method percentile
_QUANTILE_MAX_ELEMENTS = 1 << 24  # torch.quantile's input limit: larger activations are strided down to this
FLOAT_SCAN_FEEDERS = {
    "x_proj": "feeds the selective scan (dt, B, C projections)",
    "dt_projs": "feeds the selective scan (delta projection)",
}


class CoreMLQuantizationError(VMambaExportError):
    """W8A8 for apple-coreml cannot be done as asked (unknown method, layer pattern, or an unusable range)."""


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of the modules whose input gets int8: every nn.Linear (Linear2d included) and nn.Conv2d, model order."""
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def select_layers(model: nn.Module, exclude: tuple[str, ...] = ()) -> tuple[list[str], dict[str, str]]:
    """(layers to quantize, {float layer: why}); `exclude` holds fnmatch patterns over layer names."""
    layers = quantizable_layers(model)
    excluded: set[str] = set()
    for pattern in exclude:
        hits = [n for n in layers if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise CoreMLQuantizationError(
                f"--exclude {pattern!r} names no quantizable layer; layers are named like {', '.join(layers[:3])}"
            )
        excluded.update(hits)
    floats = {f"*.op.{name}": why for name, why in FLOAT_SCAN_FEEDERS.items()}
    floats.update({name: "--exclude" for name in layers if name in excluded})
    return [n for n in layers if n not in excluded], floats


def _abs_range(x: torch.Tensor, method: str) -> float:
    a = x.detach().abs().flatten().float()
    if method == "minmax":
        return float(a.max())
    if a.numel() > _QUANTILE_MAX_ELEMENTS:
        a = a[:: -(-a.numel() // _QUANTILE_MAX_ELEMENTS)]
    return float(torch.quantile(a, PERCENTILE / 100))


def calibrate_ranges(
    model: nn.Module, layers: list[str], batch: np.ndarray, method: str = "minmax", batch_size: int = 8
) -> dict[str, float]:
    """Largest |input| of each layer in `layers` over `batch` (N, C, H, W) float32.

    minmax: the maximum over every value; percentile: the PERCENTILE-th percentile of |x| per batch of images,
    averaged over batches (one outlier image then cannot set the range)."""
    if method not in COREML_CALIB_METHODS:
        raise CoreMLQuantizationError(
            f"--calib-method {method!r} is not offered for apple-coreml; "
            f"expected one of {', '.join(COREML_CALIB_METHODS)}"
        )
    seen: dict[str, list[float]] = {name: [] for name in layers}

    def hook(name):
        def record(_module, args):
            seen[name].append(_abs_range(args[0], method))

        return record

    handles = [model.get_submodule(name).register_forward_pre_hook(hook(name)) for name in layers]
    try:
        with torch.no_grad():
            for start in range(0, len(batch), batch_size):
                model(torch.from_numpy(np.ascontiguousarray(batch[start : start + batch_size])))
    finally:
        for handle in handles:
            handle.remove()
    ranges = {}
    for name, values in seen.items():
        if not values:
            raise CoreMLQuantizationError(f"layer {name} was never called during calibration")
        r = max(values) if method == "minmax" else float(np.mean(values))
        if not np.isfinite(r):
            raise CoreMLQuantizationError(f"layer {name}: non-finite calibration range {r}")
        ranges[name] = r
    return ranges


def activation_scale(abs_range: float) -> float:
    """Symmetric int8 scale for inputs in [-abs_range, abs_range]; an all-zero input gets a harmless tiny scale."""
    return max(abs_range, 1e-8) / 127.0


class QDQLayer(nn.Module):
    """`module` with its input fake-quantised per tensor (int8) and its weight stored int8 per output channel.

    Written with torch's `quantized_decomposed` ops because coremltools' torch.export frontend converts exactly
    those into MIL quantize / dequantize / constexpr_affine_dequantize."""

    def __init__(self, module: nn.Module, scale: float):
        super().__init__()
        import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)

        w = module.weight.detach().float()
        if isinstance(module, nn.Conv2d):
            self.kind = "conv"
        elif type(module).__name__ == "Linear2d":  # a 1x1 conv over a (B, C, H, W) map, weight stored (out, in)
            self.kind, w = "conv", w[:, :, None, None]
        else:
            self.kind = "linear"
        w_scale = w.reshape(w.shape[0], -1).abs().amax(1).clamp(min=1e-12) / 127.0
        q = torch.round(w / w_scale.reshape(-1, *[1] * (w.ndim - 1))).clamp(-127, 127)
        self.register_buffer("weight_int8", q.to(torch.int8))
        self.register_buffer("weight_scale", w_scale)
        self.register_buffer("weight_zero_point", torch.zeros(w.shape[0], dtype=torch.int32))
        self.bias = None if module.bias is None else module.bias.detach()
        self.stride = getattr(module, "stride", 1)
        self.padding = getattr(module, "padding", 0)
        self.dilation = getattr(module, "dilation", 1)
        self.groups = getattr(module, "groups", 1)
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qd = torch.ops.quantized_decomposed
        x = qd.dequantize_per_tensor(
            qd.quantize_per_tensor(x, self.scale, 0, -128, 127, torch.int8), self.scale, 0, -128, 127, torch.int8
        )
        w = qd.dequantize_per_channel(
            self.weight_int8, self.weight_scale, self.weight_zero_point, 0, -127, 127, torch.int8
        )
        if self.kind == "linear":
            return F.linear(x, w, self.bias)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


@contextlib.contextmanager
def qdq_inserted(model: nn.Module, scales: dict[str, float]) -> Iterator[nn.Module]:
    """Run with each layer named in `scales` replaced by its QDQLayer, restoring the float modules afterwards
    (swapped in place because the model holds the scan op, which cannot be deep-copied)."""
    saved = []
    try:
        for name, scale in scales.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            original = getattr(parent, child)
            saved.append((parent, child, original))
            setattr(parent, child, QDQLayer(original, scale))
        yield model
    finally:
        for parent, child, original in reversed(saved):
            setattr(parent, child, original)


def quantization_record(
    layers: list[str],
    floats: dict[str, str],
    ranges: dict[str, float],
    method: str,
    calib_source: str,
    calib_names: list[str],
) -> dict:
    """`lowering.quantization` of a w8a8 manifest (rendered into report.md by quantize/report.py)."""
    return {
        "tool": "vmamba_export torch-side calibration + coremltools torch.export frontend (quantized_decomposed ops)",
        "format": "MIL quantize/dequantize (iOS17) + constexpr_affine_dequantize weights",
        "quant_format": "QDQ",
        "activation_type": "int8 symmetric, per tensor",
        "weight_type": "int8 symmetric [-127, 127]",
        "per_channel": True,
        "method": method if method == "minmax" else f"{method} ({PERCENTILE:g}th of |x|)",
        "calibration": {"source": calib_source, "samples": len(calib_names), "first": calib_names[:3]},
        "quantized_layers": layers,
        "activation_scales": {name: activation_scale(ranges[name]) for name in layers},
        "float_layers": floats,
        "scan": "float (program fp16): the selective scan and the x_proj / dt_projs projections feeding it",
    }
