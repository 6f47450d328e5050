"""The four traversal orders of a 2-D map as tensor ops (flip and transpose), used by the fast scan forms."""

from __future__ import annotations

import torch


def cross_scan(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4, C, L): row-major, column-major, and both reversed."""
    b, c, h, w = x.shape
    row = x.reshape(b, c, h * w)
    col = x.transpose(2, 3).reshape(b, c, h * w)
    return torch.stack([row, col, row.flip(-1), col.flip(-1)], dim=1)


def directional(x: torch.Tensor) -> torch.Tensor:
    """(B, 4, C, H, W), one map per direction -> (B, 4, C, L), each map read in its own direction's order."""
    b, k, c, h, w = x.shape
    row = x.reshape(b, k, c, h * w)
    col = x.transpose(3, 4).reshape(b, k, c, h * w)
    return torch.stack([row[:, 0], col[:, 1], row[:, 2].flip(-1), col[:, 3].flip(-1)], dim=1)


def cross_merge(y: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, 4, C, L) -> (B, C, H, W): map every direction back to its positions and sum them."""
    b, _, c, _ = y.shape
    row = y[:, 0] + y[:, 2].flip(-1)
    col = y[:, 1] + y[:, 3].flip(-1)
    col = col.reshape(b, c, w, h).transpose(2, 3).reshape(b, c, h * w)
    return (row + col).reshape(b, c, h, w)
