"""Float64 sequential reference of the fused 2-D selective scan: the truth every other form is tested against.

The contract (shapes, directions, numerics) is documented in ``vmamba_export/scan/__init__.py``. This file spells
the four traversal orders out as explicit position lists, independently of the flip/transpose tensor forms used
by the fast implementations, so a mistake in those cannot hide here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

K_DIRECTIONS = 4


def traversal_orders(h: int, w: int) -> list[list[int]]:
    """Flat map positions (h * W + w) in the order each of the four directions visits them."""
    row_major = [i * w + j for i in range(h) for j in range(w)]
    col_major = [i * w + j for j in range(w) for i in range(h)]
    return [row_major, col_major, row_major[::-1], col_major[::-1]]


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A_logs: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    delta_bias: torch.Tensor,
) -> torch.Tensor:
    """Sequential scan in float64, one step per position. Returns y (B, Di, H, W) in float64."""
    bsz, di, h, w = u.shape
    k = delta.shape[1]
    n = A_logs.shape[1]
    f64 = torch.float64
    u_flat = u.to(f64).reshape(bsz, di, h * w)
    dt_flat = delta.to(f64).reshape(bsz, k, di, h * w) + delta_bias.to(f64).reshape(1, k, di, 1)
    dt_flat = F.softplus(dt_flat)
    b_flat = B.to(f64).reshape(bsz, k, n, h * w)
    c_flat = C.to(f64).reshape(bsz, k, n, h * w)
    a = -torch.exp(A_logs.to(f64)).reshape(k, di, n)
    d = D.to(f64).reshape(k, di)
    y = torch.zeros(bsz, di, h * w, dtype=f64)
    for direction, order in enumerate(traversal_orders(h, w)):
        state = torch.zeros(bsz, di, n, dtype=f64)
        for pos in order:
            dt = dt_flat[:, direction, :, pos].unsqueeze(-1)  # (B, Di, 1)
            u_pos = u_flat[:, :, pos]
            state = torch.exp(dt * a[direction]) * state + dt * b_flat[:, None, direction, :, pos] * u_pos.unsqueeze(-1)
            y[:, :, pos] += (state * c_flat[:, None, direction, :, pos]).sum(-1) + d[direction] * u_pos
    return y.reshape(bsz, di, h, w)
