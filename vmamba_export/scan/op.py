"""The `vmamba::selective_scan_2d` torch custom op: one node per SS2D block in every traced graph."""

from __future__ import annotations

import torch

from . import native
from .portable import selective_scan_portable, selective_scan_sequential

OP_NAMESPACE = "vmamba"
OP_NAME = "selective_scan_2d"
QUALIFIED_NAME = f"{OP_NAMESPACE}::{OP_NAME}"


@torch.library.custom_op(QUALIFIED_NAME, mutates_args=())
def selective_scan_2d(
    u: torch.Tensor,
    delta: torch.Tensor,
    A_logs: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    delta_bias: torch.Tensor,
) -> torch.Tensor:
    check_scan_inputs(u, delta, A_logs, B, C, D, delta_bias)
    args = [t.contiguous().float() for t in (u, delta, A_logs, B, C, D, delta_bias)]
    if u.device.type == "cpu" and native.available():
        return native.selective_scan_2d(*args).to(u.dtype)
    return torch_scan(*args).to(u.dtype)


@selective_scan_2d.register_fake
def _(u, delta, A_logs, B, C, D, delta_bias):
    return torch.empty_like(u)


def check_scan_inputs(
    u: torch.Tensor,
    delta: torch.Tensor,
    A_logs: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    delta_bias: torch.Tensor,
) -> None:
    """Raise ValueError naming the argument whose shape breaks the op contract."""
    if u.dim() != 4:
        raise ValueError(f"selective_scan_2d: u must be (B, Di, H, W), got shape {tuple(u.shape)}")
    bsz, di, h, w = u.shape
    if delta.dim() != 5:
        raise ValueError(f"selective_scan_2d: delta must be (B, K, Di, H, W), got shape {tuple(delta.shape)}")
    k = delta.shape[1]
    n = A_logs.shape[-1] if A_logs.dim() == 2 else -1
    expected = {
        "delta": (delta, (bsz, k, di, h, w)),
        "A_logs": (A_logs, (k * di, n)),
        "B": (B, (bsz, k, n, h, w)),
        "C": (C, (bsz, k, n, h, w)),
        "D": (D, (k * di,)),
        "delta_bias": (delta_bias, (k * di,)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"selective_scan_2d: {name} must have shape {shape}, got {tuple(tensor.shape)}")


def torch_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A_logs: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    delta_bias: torch.Tensor,
) -> torch.Tensor:
    """The scan in plain torch, independent of the C++ kernel: the op's fallback, and the reference `validate` uses
    so that an artifact running the C++ kernel is compared against code that shares nothing with it."""
    if A_logs.shape[1] > 1:
        return selective_scan_sequential(u, delta, A_logs, B, C, D, delta_bias)
    return selective_scan_portable(u, delta, A_logs, B, C, D, delta_bias)
