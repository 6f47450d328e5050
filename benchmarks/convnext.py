"""ConvNeXt-T (depths 3-3-9-3, widths 96-768, about 4.5 GFLOPs at 224): the CNN a user would deploy instead of
VMamba-T, defined here so the benchmarks time a peer through the same runtime in the same run. Random weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNormChannelsFirst(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, 1e-6).permute(
            0, 3, 1, 2
        )


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtTiny(nn.Module):
    def __init__(self, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), num_classes: int = 1000):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, dims[0], 4, stride=4), LayerNormChannelsFirst(dims[0])]
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            if i > 0:
                layers += [LayerNormChannelsFirst(dims[i - 1]), nn.Conv2d(dims[i - 1], dim, 2, stride=2)]
            layers += [ConvNeXtBlock(dim) for _ in range(depth)]
        self.features = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.features(x).mean(dim=(2, 3))))


def export_peer_module(model: torch.nn.Module, example: torch.Tensor, dynamic, path: str, opset: int | None = None):
    """A peer model to ONNX the way our models go (vmamba_export/lowering/onnx_export.py): dynamo exporter, same
    opset (20: GELU as one Gelu node, which ONNX Runtime runs faster than its Erf decomposition), optimize, same
    input/output names and IR version; `dynamic`: torch.export dynamic shapes of input "x", or None (fixed)."""
    import contextlib
    import io
    import warnings

    import onnx

    from vmamba_export.lowering.onnx_export import INPUT_NAME, IR_VERSION, OPSET, OUTPUT_NAME

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            dynamic_shapes=dynamic,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset or OPSET,
            optimize=True,
            verbose=False,
        )
    proto = program.model_proto
    proto.ir_version = IR_VERSION
    onnx.save_model(proto, str(path))


def export_convnext_onnx(path: str, opset: int | None = None, fixed_batch: int | None = None) -> None:
    """ConvNeXt-T to ONNX with a dynamic batch (or a fixed one: `fixed_batch`), as export_peer_module says."""
    torch.manual_seed(0)
    model = ConvNeXtTiny().eval()
    x = torch.randn(fixed_batch or 2, 3, 224, 224)
    dynamic = None if fixed_batch else {"x": {0: torch.export.Dim("batch", min=1, max=4096)}}
    export_peer_module(model, x, dynamic, path, opset)
