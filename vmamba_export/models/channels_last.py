"""A v2 VMamba evaluated with its residual stream channels-last, (B, H, W, C), for GPU runtimes.

The v2 models are channel-first: every LayerNorm2d is permute -> layer_norm -> permute and every projection a 1x1
convolution. Through ONNX Runtime's CUDA provider that costs, per batch-128 fp16 inference of vmamba_tiny_s1l8 on an
H200 (benchmarks/results/gpu/gpu_profile_h200_fp16_b128.txt): 2.7 ms of Transposes around the norms, 2.0 ms of cuDNN
NHWC<->NCHW conversions around the 1x1 convolutions, 4.2 ms of cuDNN bias additions and 2.7 ms of unfused GELU, out of
33 ms. Channels-last, the norms need no permutes, the projections are MatMuls (cuBLAS, no layout conversion) and ONNX
Runtime fuses bias + GELU; only the depthwise convolution and the scan stay channel-first, with one permute on each
side of them per block, as ConvNeXt does around its depthwise convolution. The dt projection, whose (B, 4*Di, H, W)
output is the largest tensor of a block, is a batched MatMul rather than a grouped convolution (cuDNN ran that in
NHWC and converted the output back: 0.6 ms per stage-1 block at batch 128).

Same parameters (the wrapped model's), same function: only the layout of the intermediate tensors differs, and the
float results agree to rounding (tests/test_channels_last.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .vmamba import SS2D, LayerNorm2d, Linear2d, Mlp, VMamba


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


def _nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


def _norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _linear(layer: Linear2d, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, layer.weight, layer.bias)


def _ss2d(op: SS2D, x: torch.Tensor) -> torch.Tensor:
    x = F.silu(op.conv2d(_nchw(_linear(op.in_proj, x))))
    return _linear(op.out_proj, _norm(op.out_norm, _nhwc(op.scan_core(x, dt_matmul=True))))


def _mlp(mlp: Mlp, x: torch.Tensor) -> torch.Tensor:
    return _linear(mlp.fc2, mlp.act(_linear(mlp.fc1, x)))


def _layer_norm_step(module: nn.Module, x: torch.Tensor, channels_last: bool) -> tuple[torch.Tensor, bool]:
    """Run one module of a v2 Sequential (patch embedding, downsampling) in whichever layout suits it: LayerNorm2d on
    a channels-last tensor, everything else (convolutions, GELU, Identity) on a channel-first one."""
    if isinstance(module, LayerNorm2d):
        x = x if channels_last else _nhwc(x)
        return _norm(module, x), True
    if isinstance(module, nn.Conv2d):
        x = _nchw(x) if channels_last else x
        return module(x), False
    return module(x), channels_last  # elementwise or identity: any layout


class ChannelsLastVMamba(nn.Module):
    """`model` (a v2 VMamba) evaluated channels-last: (B, 3, H, W) float32 -> (B, num_classes) logits, as `model`."""

    def __init__(self, model: VMamba):
        super().__init__()
        if model.config.version != "v2":
            raise ValueError(
                f"channels-last evaluation is for v2 models; {model.config.name} is {model.config.version} (its "
                "residual stream is channels-last already)"
            )
        self.model = model
        self.config = model.config

    def _sequential(self, seq: nn.Module, x: torch.Tensor, channels_last: bool) -> torch.Tensor:
        for module in seq:
            x, channels_last = _layer_norm_step(module, x, channels_last)
        return x if channels_last else _nhwc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = self._sequential(m.patch_embed, x, channels_last=False)
        for stage in m.layers:
            for block in stage.blocks:
                x = x + _ss2d(block.op, _norm(block.norm, x))
                x = x + _mlp(block.mlp, _norm(block.norm2, x))
            if not isinstance(stage.downsample, nn.Identity):
                x = self._sequential(stage.downsample, x, channels_last=True)
        return m.classifier.head(_norm(m.classifier.norm, x).mean(dim=(1, 2)))
