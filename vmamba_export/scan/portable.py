"""The selective scan written with plain tensor ops only: no loop, no custom op, no division.

This is the form the `onnx-portable` lowering exports and the CPU fallback of the torch op when the C++ kernel is not
built. The recurrence h_l = a_l * h_{l-1} + b_l is solved by a log-depth (Hillis-Steele) prefix scan: at level j
every position combines with the one 2^j steps back. Only products of decays a_l = exp(delta * A) in (0, 1] and sums
appear, so nothing overflows at any length or delta (the "divide by exp(cumsum)" form overflows at L = 3136 in fp32),
and the graph has a fixed number of levels, which is what lets an exported graph take any height and width up to
2^levels positions per stage.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .directions import cross_merge, cross_scan, directional


def levels_for(length: int) -> int:
    """Number of prefix-scan levels that covers sequences of `length` positions."""
    return max(1, math.ceil(math.log2(max(length, 2))))


def linear_recurrence(a: torch.Tensor, b: torch.Tensor, levels: int) -> torch.Tensor:
    """h_l = a_l * h_{l-1} + b_l along the last axis with h_{-1} = 0, for sequences up to 2^levels long."""
    length = a.shape[-1]
    for level in range(levels):
        shift = 1 << level
        # Shift right by `shift` with zero fill; padding then slicing keeps the length right even when shift > L.
        b_prev = F.pad(b, (shift, 0))[..., :length]
        a_prev = F.pad(a, (shift, 0))[..., :length]
        b = b + a * b_prev
        a = a * a_prev
    return b


def selective_scan_portable(
    u: torch.Tensor,
    delta: torch.Tensor,
    A_logs: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    delta_bias: torch.Tensor,
    levels: int | None = None,
) -> torch.Tensor:
    """Same contract as the op; `levels` fixes the prefix-scan depth (None: just enough for this input)."""
    bsz, di, h, w = u.shape
    k = delta.shape[1]
    n = A_logs.shape[1]
    if levels is None:
        levels = levels_for(h * w)
    us = cross_scan(u)  # (B, K, Di, L)
    # Each direction reads its own delta/B/C map in its own order: scanning all four maps of a direction and keeping
    # the one that belongs to it is the same as indexing, and stays within plain ops.
    dts = directional(delta)  # (B, K, Di, L)
    bs = directional(B)  # (B, K, N, L)
    cs = directional(C)
    dts = F.softplus(dts + delta_bias.reshape(1, k, di, 1))
    a = -torch.exp(A_logs).reshape(1, k, di, n, 1)
    decay = torch.exp(dts.unsqueeze(3) * a)  # (B, K, Di, N, L)
    drive = (dts * us).unsqueeze(3) * bs.unsqueeze(2)  # (B, K, Di, N, L)
    states = linear_recurrence(decay, drive, levels)
    ys = (states * cs.unsqueeze(2)).sum(3) + D.reshape(1, k, di, 1) * us
    return cross_merge(ys, h, w)


def selective_scan_sequential(
    u: torch.Tensor,
    delta: torch.Tensor,
    A_logs: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    delta_bias: torch.Tensor,
) -> torch.Tensor:
    """One step per position, vectorised over batch, directions, channels and state: the torch fallback for
    d_state > 1, where the log-depth form does log2(L) times the work of the state size (3x slower at N = 16)."""
    bsz, di, h, w = u.shape
    k = delta.shape[1]
    n = A_logs.shape[1]
    us = cross_scan(u)
    dts = F.softplus(directional(delta) + delta_bias.reshape(1, k, di, 1))
    a = -torch.exp(A_logs).reshape(1, k, di, 1, n)
    decay = torch.exp(dts.unsqueeze(-1) * a).movedim(3, 0)  # (L, B, K, Di, N), position-major for the loop
    drive = ((dts * us).unsqueeze(-1) * directional(B).transpose(2, 3).unsqueeze(2)).movedim(3, 0).contiguous()
    state = torch.zeros_like(drive[0])
    for pos in range(h * w):
        state = torch.addcmul(drive[pos], decay[pos], state)
        drive[pos] = state
    ys = torch.einsum("lbkdn,bknl->bkdl", drive, directional(C)) + D.reshape(1, k, di, 1) * us
    return cross_merge(ys, h, w)
