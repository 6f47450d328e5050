"""Dense-prediction models: the official `Backbone_VSSM` (four feature maps) and an mmseg-compatible UperNet.

`VMambaBackbone` is the classifier's stem and stages without the classifier, plus one norm per output stage
(`outnorm{i}`): LayerNorm2d ("ln2d", what the official segmentation and detection configs use), LayerNorm ("ln", the
same function over channels) or BatchNorm ("bn"). It returns the maps of stages 0..3 (strides 4, 8, 16, 32), NCHW,
each taken before that stage's downsampling, as the official code does.

`UperNetSegmenter` is mmseg's EncoderDecoder as the official `upernet_vssm_*` configs build it at inference: the
backbone under `backbone.`, UPerHead under `decode_head.` (pyramid pooling over the last map, lateral and FPN
ConvModules = conv without bias + BatchNorm + ReLU, the fused bottleneck, `conv_seg`), logits at 1/4 resolution
upsampled bilinearly (align_corners False) to the input size. The auxiliary FCN head of training files is not part of
it (checkpoint loading drops and reports it). State-dict keys, shapes and order equal
`../shared/vmamba/keys/segmentation/`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configs import VMambaConfig
from .vmamba import LayerNorm2d, ScanFn, Stage, patch_embed_stem, set_scan_fn

OUT_NORMS = ("ln2d", "ln", "bn")
STRIDES = (4, 8, 16, 32)


def out_norm_kind(cfg: VMambaConfig) -> str:
    """The configured out-norm, or the official default: "ln2d" for v2 (channel-first), "ln" for v0."""
    kind = cfg.out_norm or ("ln2d" if cfg.version == "v2" else "ln")
    if kind not in OUT_NORMS:
        raise ValueError(f"out_norm {kind!r}: expected one of {', '.join(OUT_NORMS)}")
    return kind


def _out_norm(kind: str, channels: int) -> nn.Module:
    # "ln" and "ln2d" compute the same function on an NCHW map: LayerNorm2d, which also has OpenVINO's in-place form.
    return nn.BatchNorm2d(channels) if kind == "bn" else LayerNorm2d(channels)


class VMambaBackbone(nn.Module):
    """(B, 3, H, W) -> four NCHW feature maps at strides 4, 8, 16, 32 (channels cfg.widths)."""

    def __init__(self, cfg: VMambaConfig):
        super().__init__()
        self.config = cfg
        self.patch_embed = patch_embed_stem(cfg)
        self.layers = nn.ModuleList([Stage(cfg, i) for i in range(len(cfg.depths))])
        kind = out_norm_kind(cfg)
        for i, width in enumerate(cfg.widths):
            self.add_module(f"outnorm{i}", _out_norm(kind, width))

    @property
    def out_channels(self) -> tuple[int, ...]:
        return self.config.widths

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.patch_embed(x)
        outs = []
        channels_last = self.config.version == "v0"
        for i, layer in enumerate(self.layers):
            o = layer.blocks(x)
            x = layer.downsample(o)
            if channels_last:
                o = o.permute(0, 3, 1, 2)
            outs.append(getattr(self, f"outnorm{i}")(o).contiguous())
        return tuple(outs)

    def set_scan(self, fn: ScanFn) -> VMambaBackbone:
        set_scan_fn(self, fn)
        return self


class ConvModule(nn.Module):
    """mmcv's ConvModule as UPerHead uses it: conv (no bias: a norm follows) -> BatchNorm -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.activate = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


def _bilinear(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def adaptive_avg_pool(x: torch.Tensor, scale: int) -> torch.Tensor:
    """`F.adaptive_avg_pool2d(x, scale)` as two small matmuls with bin matrices built from the map's size.

    Equal to PyTorch's adaptive pooling (bin i covers [floor(i*n/s), ceil((i+1)*n/s))), but made of Range, Mul, Div
    and MatMul, which export for any input size: ONNX has no adaptive pooling, and exporters fix the kernel to the
    example's size."""

    def bins(n: int) -> torch.Tensor:
        i = torch.arange(scale, device=x.device).unsqueeze(1)
        pos = torch.arange(n, device=x.device).unsqueeze(0)
        start = torch.div(i * n, scale, rounding_mode="floor")
        end = torch.div((i + 1) * n + scale - 1, scale, rounding_mode="floor")
        inside = ((pos >= start) & (pos < end)).to(x.dtype)
        return inside / (end - start).to(x.dtype)  # (scale, n), rows sum to 1

    rows, cols = bins(x.shape[2]), bins(x.shape[3])
    return torch.matmul(torch.matmul(rows, x), cols.transpose(0, 1))


class PyramidPoolingBranch(nn.Module):
    """One branch of mmseg's PPM: adaptive average pooling to `scale` x `scale`, then a 1x1 ConvModule. Indexed like
    the official Sequential(AdaptiveAvgPool2d, ConvModule) so the keys read `psp_modules.<i>.1.conv.weight`."""

    def __init__(self, scale: int, cin: int, cout: int):
        super().__init__()
        self.scale = scale
        self.add_module("0", nn.Identity())  # the pooling (no parameters), computed by adaptive_avg_pool
        self.add_module("1", ConvModule(cin, cout, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, "1")(adaptive_avg_pool(x, self.scale))


class UPerHead(nn.Module):
    """mmseg's UPerHead at inference (dropout is the identity there)."""

    def __init__(self, in_channels: tuple[int, ...], channels: int, num_classes: int, pool_scales: tuple[int, ...]):
        super().__init__()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.psp_modules = nn.ModuleList([PyramidPoolingBranch(s, in_channels[-1], channels) for s in pool_scales])
        self.bottleneck = ConvModule(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList([ConvModule(c, channels, 1) for c in in_channels[:-1]])
        self.fpn_convs = nn.ModuleList([ConvModule(channels, channels, 3) for _ in in_channels[:-1]])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3)

    def psp_forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        pooled = [_bilinear(branch(x), size) for branch in self.psp_modules]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))

    def forward(self, features: tuple[torch.Tensor, ...]) -> torch.Tensor:
        laterals = [conv(features[i]) for i, conv in enumerate(self.lateral_convs)]
        laterals.append(self.psp_forward(features[-1]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down: each level plus the coarser one upsampled
            laterals[i - 1] = laterals[i - 1] + _bilinear(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(laterals[i]) for i, conv in enumerate(self.fpn_convs)]
        outs.append(laterals[-1])
        size = outs[0].shape[2:]
        outs = [outs[0]] + [_bilinear(o, size) for o in outs[1:]]
        return self.conv_seg(self.fpn_bottleneck(torch.cat(outs, dim=1)))


class UperNetSegmenter(nn.Module):
    """(B, 3, H, W) -> per-pixel class logits (B, num_classes, H, W)."""

    def __init__(self, cfg: VMambaConfig):
        super().__init__()
        self.config = cfg
        self.backbone = VMambaBackbone(cfg)
        self.decode_head = UPerHead(cfg.widths, cfg.head_channels, cfg.num_classes, cfg.pool_scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.decode_head(self.backbone(x))
        return _bilinear(logits, x.shape[2:])

    def set_scan(self, fn: ScanFn) -> UperNetSegmenter:
        set_scan_fn(self, fn)
        return self


__all__ = [
    "OUT_NORMS",
    "STRIDES",
    "UPerHead",
    "UperNetSegmenter",
    "VMambaBackbone",
    "adaptive_avg_pool",
    "out_norm_kind",
]
