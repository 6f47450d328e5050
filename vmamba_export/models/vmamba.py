"""VMamba classification models, state-dict compatible with the official `classification/models/vmamba.py`.

The function follows ../shared/vmamba/ARCHITECTURE.md. Module and parameter registration order is chosen so that
`state_dict()` lists keys in the same order as the released checkpoints. The selective scan is the custom op
`vmamba::selective_scan_2d` (docs/scan-op.md); the x and dt projections run as 1x1 convolutions on the 2-D map, so
no cross-scan copies are made outside the op.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..scan import selective_scan_2d
from .configs import VMambaConfig

K_DIRECTIONS = 4
ScanFn = Callable[..., torch.Tensor]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of a (B, C, H, W) map, in one of two equal forms chosen per export target:
    permute -> layer_norm -> permute (default: ONNX Runtime fuses it into one LayerNormalization between Transposes,
    its fastest form), or computed over the channel axis in place (`channel_axis_stats`, see
    `channel_axis_layer_norms`; the expression is `channel_axis_norm`), which OpenVINO's CPU plugin runs in its own
    layouts: on vmamba_tiny_s1l8 its compiled graph drops from 95 Transposes and 194 layout Reorders to 1 and 74.
    Measured there (fp32, 2 threads): ONNX Runtime 31.3 ms permuted against 33.8 ms in place; OpenVINO 36.0 ms
    against 32.5 ms."""

    channel_axis_stats = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channel_axis_stats:
            return self.channel_axis_norm(x)
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)

    def channel_axis_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The in-place form, written as an L2 normalisation of the centred map c over channels so that OpenVINO fuses
        it: mean(c^2) + eps = (sum(c^2) + C * eps) / C, hence c / sqrt(mean(c^2) + eps) = sqrt(C) * c / sqrt(sum(c^2)
        + C * eps). OpenVINO's NormalizeL2Fusion turns Div(c, Sqrt(Add(ReduceSum(Pow(c, 2)), eps))) into one
        NormalizeL2 over axis 1, which the CPU plugin runs as one node with the affine (sqrt(C) * weight, bias) folded
        in; the mean stays a ReduceMean and a Subtract: 3 nodes per norm where the mean/variance form ran 4 (2
        ReduceMeans, 2 elementwise Subgraphs). On vmamba_tiny_s1l8 at 224 (2 threads, per-node counters) the norms
        went from 5.6 to 4.6 ms in fp32, 4.5 to 4.0 in bf16, 6.1 to 5.5 in int8; in its UperNet at 512 (fp32), 35 to 27.

        No single node covers the whole norm over axis 1 of a 4-D map in the CPU plugin (2026.4): its MVN and RMS nodes
        take trailing axes only (MVN [2, 3] or [1, 2, 3], RMS the last), so the MVN over [1] that MVNFusion makes of
        (x - mean) / sqrt(mean((x - mean)^2) + eps) is decomposed back into the 4 nodes above, and the permuted form
        becomes ReduceMean, Subtract and RMS behind a Transpose and a Reorder that cost more than they save."""
        channels = self.normalized_shape[0]
        centred = x - x.mean(1, keepdim=True)
        normed = centred / torch.sqrt(centred.pow(2).sum(1, keepdim=True) + channels * self.eps)
        scale = self.weight * math.sqrt(channels)
        return normed * scale[:, None, None] + self.bias[:, None, None]


@contextlib.contextmanager
def channel_axis_layer_norms(model: nn.Module) -> Iterator[nn.Module]:
    """Within: every LayerNorm2d of `model` computes its statistics over the channel axis in place (see LayerNorm2d)."""
    norms = [m for m in model.modules() if isinstance(m, LayerNorm2d)]
    try:
        for norm in norms:
            norm.channel_axis_stats = True
        yield model
    finally:
        for norm in norms:
            del norm.channel_axis_stats  # back to the class default


class Linear2d(nn.Linear):
    """A 1x1 convolution over a (B, C, H, W) map whose weight is stored 2-D, (out, in), as the official Linear2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight[:, :, None, None], self.bias)


class ToChannelsLast(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


class SS2D(nn.Module):
    """The 2-D selective-scan mixer of one block.

    v0: channel-last input, in_proj C -> 2*Di (x and gate z), conv with bias, output gated by SiLU(z).
    v2: channel-first input, in_proj C -> Di (no gate), conv without bias.
    """

    def __init__(self, dim: int, d_inner: int, d_state: int, dt_rank: int, version: str):
        super().__init__()
        self.version = version
        self.d_inner, self.d_state, self.dt_rank = d_inner, d_state, dt_rank
        k = K_DIRECTIONS
        # Own parameters first, in the checkpoints' order.
        self.x_proj_weight = nn.Parameter(torch.empty(k, dt_rank + 2 * d_state, d_inner))
        self.A_logs = nn.Parameter(torch.empty(k * d_inner, d_state))
        self.Ds = nn.Parameter(torch.empty(k * d_inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(k, d_inner, dt_rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(k, d_inner))
        if version == "v0":
            self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
            self.conv2d = nn.Conv2d(d_inner, d_inner, 3, padding=1, groups=d_inner, bias=True)
            self.out_norm = nn.LayerNorm(d_inner)
            self.out_proj = nn.Linear(d_inner, dim, bias=False)
        else:
            self.out_norm = LayerNorm2d(d_inner)
            self.in_proj = Linear2d(dim, d_inner, bias=False)
            self.conv2d = nn.Conv2d(d_inner, d_inner, 3, padding=1, groups=d_inner, bias=False)
            self.out_proj = Linear2d(d_inner, dim, bias=False)
        self.scan_fn: ScanFn = selective_scan_2d
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mamba-style initialisation (ARCHITECTURE.md), for training from scratch."""
        k, di, n, r = K_DIRECTIONS, self.d_inner, self.d_state, self.dt_rank
        bound = r**-0.5
        nn.init.uniform_(self.x_proj_weight, -(di**-0.5), di**-0.5)
        nn.init.uniform_(self.dt_projs_weight, -bound, bound)
        dt = torch.exp(torch.rand(k, di) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_logs.copy_(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(k * di, 1))
        self.Ds.fill_(1.0)

    def scan_core(self, x: torch.Tensor, dt_matmul: bool = False) -> torch.Tensor:
        """(B, Di, H, W) after conv+SiLU -> merged scan output (B, Di, H, W). `dt_matmul`: the dt projection as one
        batched MatMul, (4, Di, R) @ (B, 4, R, H*W), instead of a grouped 1x1 convolution: the same sums, but on
        GPUs cuBLAS writes the (B, 4*Di, H, W) result in place where cuDNN converts it from NHWC
        (models/channels_last.py)."""
        b, di, h, w = x.shape
        k, r, n = K_DIRECTIONS, self.dt_rank, self.d_state
        # Three 1x1 convolutions rather than one split: each output is contiguous by construction, which keeps
        # torch.export from guarding on strides (a split view's contiguity depends on whether H == 1).
        w_dt, w_b, w_c = (part.reshape(-1, di, 1, 1) for part in self.x_proj_weight.split([r, n, n], dim=1))
        dt_low = F.conv2d(x, w_dt)
        if dt_matmul:
            dts = torch.matmul(self.dt_projs_weight, dt_low.reshape(b, k, r, h * w))
        else:
            dts = F.conv2d(dt_low, self.dt_projs_weight.reshape(k * di, r, 1, 1), groups=k)
        bs = F.conv2d(x, w_b)
        cs = F.conv2d(x, w_c)
        return self.scan_fn(
            x,
            dts.reshape(b, k, di, h, w),
            self.A_logs,
            bs.reshape(b, k, n, h, w),
            cs.reshape(b, k, n, h, w),
            self.Ds,
            self.dt_projs_bias.reshape(k * di),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.version == "v0":  # x: (B, H, W, C)
            x, z = self.in_proj(x).chunk(2, dim=-1)
            x = F.silu(self.conv2d(x.permute(0, 3, 1, 2)))
            y = self.out_norm(self.scan_core(x).permute(0, 2, 3, 1))
            return self.out_proj(y * F.silu(z))
        x = F.silu(self.conv2d(self.in_proj(x)))  # x: (B, C, H, W)
        return self.out_proj(self.out_norm(self.scan_core(x)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear2d(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = Linear2d(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VSSBlock(nn.Module):
    def __init__(self, dim: int, cfg: VMambaConfig, stage: int):
        super().__init__()
        v2 = cfg.version == "v2"
        self.norm = LayerNorm2d(dim) if v2 else nn.LayerNorm(dim)
        self.op = SS2D(dim, cfg.d_inner[stage], cfg.d_state, cfg.dt_rank[stage], cfg.version)
        if v2:
            self.norm2 = LayerNorm2d(dim)
            self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.op(self.norm(x))
        if hasattr(self, "mlp"):
            x = x + self.mlp(self.norm2(x))
        return x


class PatchMerging2D(nn.Module):
    """v0 downsampling (Swin patch merging) on a channel-last map; odd sides are zero-padded as the official code."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        h2, w2 = (h + 1) // 2, (w + 1) // 2
        x = F.pad(x, (0, 0, 0, 2 * w2 - w, 0, 2 * h2 - h))
        # A reshape instead of four strided slices: equal halves are then evident to torch.export's shape solver.
        # Channel blocks in the official order: (h even, w even), (h odd, w even), (h even, w odd), (h odd, w odd).
        x = x.reshape(b, h2, 2, w2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(b, h2, w2, 4 * c)
        return self.reduction(self.norm(x))


class Stage(nn.Module):
    def __init__(self, cfg: VMambaConfig, stage: int):
        super().__init__()
        dim = cfg.widths[stage]
        self.blocks = nn.Sequential(*[VSSBlock(dim, cfg, stage) for _ in range(cfg.depths[stage])])
        last = stage == len(cfg.depths) - 1
        if last:
            self.downsample = nn.Identity()
        elif cfg.version == "v0":
            self.downsample = PatchMerging2D(dim)
        else:
            self.downsample = nn.Sequential(
                nn.Identity(), nn.Conv2d(dim, 2 * dim, 3, stride=2, padding=1), nn.Identity(), LayerNorm2d(2 * dim)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.blocks(x))


class Classifier(nn.Module):
    def __init__(self, dim: int, num_classes: int, channels_last: bool):
        super().__init__()
        self.channels_last = channels_last
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.channels_last:
            x = x.permute(0, 2, 3, 1)
        return self.head(self.norm(x).mean(dim=(1, 2)))


def patch_embed_stem(cfg: VMambaConfig) -> nn.Sequential:
    """The stem (`patch_embed`): v0 a 4x4 patch convolution and LayerNorm, channel-last out; v2 two stride-2
    convolutions with LayerNorm2d and GELU, channel-first out. Identity slots keep the official key indices."""
    c = cfg.dims
    if cfg.version == "v0":
        return nn.Sequential(nn.Conv2d(cfg.in_chans, c, 4, stride=4), ToChannelsLast(), nn.LayerNorm(c))
    return nn.Sequential(
        nn.Conv2d(cfg.in_chans, c // 2, 3, stride=2, padding=1),
        nn.Identity(),
        LayerNorm2d(c // 2),
        nn.Identity(),
        nn.GELU(),
        nn.Conv2d(c // 2, c, 3, stride=2, padding=1),
        nn.Identity(),
        LayerNorm2d(c),
    )


def set_scan_fn(model: nn.Module, fn: ScanFn) -> None:
    """Replace the scan in every block of `model`."""
    for module in model.modules():
        if isinstance(module, SS2D):
            module.scan_fn = fn


class VMamba(nn.Module):
    """A VMamba image classifier: (B, 3, H, W) float32 -> (B, num_classes) logits, any H, W >= min_input_size."""

    def __init__(self, cfg: VMambaConfig):
        super().__init__()
        self.config = cfg
        self.patch_embed = patch_embed_stem(cfg)
        self.layers = nn.ModuleList([Stage(cfg, i) for i in range(len(cfg.depths))])
        self.classifier = Classifier(cfg.widths[-1], cfg.num_classes, channels_last=cfg.version == "v0")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.classifier(x)

    def set_scan(self, fn: ScanFn) -> VMamba:
        """Replace the scan in every block (the reference in tests, the portable form for onnx-portable)."""
        set_scan_fn(self, fn)
        return self
