"""The selective scan as a chunked composite of plain tensor ops: the form the `apple-coreml` lowering traces.

Why chunked, not a loop: Core ML ML Programs take no custom layers, so the scan has to become MIL ops. A per-step
`while_loop` would run 3136 dependent steps per block at 224x224 (L = 56 * 56 in stage 1), each a tiny kernel launch,
which serialises the GPU / Neural Engine. The chunked form does the same work as a handful of large batched tensor
ops (cumsum, exp, matmul, mul/add) with a structure fixed at trace time.

Structure, per sequence of L positions cut into chunks of T (the SSD "state space duality" decomposition of Mamba-2,
adapted to a per-channel decay):

1. Intra-chunk: with x_l = dt_l * A (<= 0) and b_l = dt_l * B_l * u_l, the state inside a chunk starting from zero is
   h_i = sum_{j <= i} exp(seg[i, j]) * b_j, seg[i, j] = x_{j+1} + ... + x_i, a (T x T) lower-triangular matrix applied
   by one matmul. seg is built by a cumsum over a masked copy of x (the "segsum" form), so every entry is a sum of
   non-positive terms over exactly its range: exp(seg) is in (0, 1] and nothing is divided. The tempting
   "divide by exp(cumsum)" form overflows at these lengths (FIELD-NOTES.md: up to 94% non-finite at L = 3136 in fp32),
   and taking differences of a running cumsum loses precision in fp16 when the cumsum grows large.
2. Inter-chunk: the state at the end of each chunk (from zero) and the chunk's total decay give a linear recurrence
   over the nc = L / T chunks, solved by the log-depth prefix scan of `portable.py` with a fixed number of levels
   (products of decays only). The carried state enters chunk c scaled by exp(cumsum of x up to i) <= 1.

Chunk size and intra-chunk form: the segsum matrices cost L * T values per (channel, state) in memory and work, the
inter-chunk prefix log2(L / T) levels. FIELD-NOTES.md measured the segsum form clean at T = 64 and 256, also in fp16.
- d_state 1 (every v2 model): segsum with T = 64, which keeps the (T x T) matmul large enough to be efficient and the
  chunk count small (49 at 224x224).
- d_state 16 (v0): the decay differs per state, so one (T x T) matrix per (channel, state) would be 16x larger
  (2.4 GB for one stage-1 block of vanilla tiny at T = 16). Inside each chunk the recurrence is instead solved by the
  log-depth prefix of `portable.py` (log2(T) = 4 levels at T = 16, products of decays only), which keeps every
  intermediate at L values per (channel, state) and still needs ~3x fewer full-length passes than the global
  12-level prefix at L = 3136.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .directions import cross_merge, cross_scan, directional
from .portable import linear_recurrence


def default_chunk(d_state: int) -> int:
    """Chunk size for a model's d_state (module docstring)."""
    return 64 if d_state == 1 else 16


def default_intra(d_state: int) -> str:
    """Intra-chunk form for a model's d_state: "segsum" (matmul) or "prefix" (module docstring)."""
    return "segsum" if d_state == 1 else "prefix"


def chunk_levels_for(length: int, chunk: int) -> int:
    """Prefix-scan levels over chunks that cover sequences of `length` positions."""
    chunks = max(1, -(-length // chunk))
    return max(1, math.ceil(math.log2(max(chunks, 2))))


def segsum(x: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (..., T, T) with out[..., i, j] = x_{j+1} + ... + x_i for j < i, 0 on and above the diagonal.

    Each entry sums exactly its own range (a cumsum down the columns of a strictly-lower-masked copy), never a
    difference of two long running sums."""
    t = x.shape[-1]
    strict = torch.ones(t, t, dtype=torch.bool, device=x.device).tril(-1)
    rep = x.unsqueeze(-1).expand(*x.shape, t)  # rep[..., i, j] = x_i
    rep = rep * strict.to(x.dtype)
    return torch.cumsum(rep, dim=rep.dim() - 2)  # a non-negative axis: coremltools' cumsum refuses -2


def chunked_recurrence(
    x: torch.Tensor, b: torch.Tensor, chunk: int, levels: int | None = None, intra: str = "segsum"
) -> torch.Tensor:
    """h_l = exp(x_l) * h_{l-1} + b_l along the last axis (h_{-1} = 0), x <= 0; shapes (..., L), same output shape.

    `levels` fixes the depth of the prefix over chunks (None: just enough for this L). The leading axes are folded
    into one so that no intermediate has more than 4 axes (Core ML's devices prefer rank <= 5)."""
    lead = x.shape[:-1]
    length = x.shape[-1]
    x = x.reshape(-1, length)
    b = b.reshape(-1, length)
    pad = (-length) % chunk
    # Padding at the end (decay 1, input 0) cannot change earlier states; it is sliced off below. Unconditional (a
    # zero pad is a no-op) so that a symbolic length traces without a guard.
    x = F.pad(x, (0, pad))
    b = F.pad(b, (0, pad))
    nc = (length + pad) // chunk
    if levels is None:
        levels = chunk_levels_for(length, chunk)
    xc = x.reshape(-1, nc, chunk)
    bc = b.reshape(-1, nc, chunk)
    if intra == "segsum":
        lower = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).tril().to(x.dtype)
        decay = torch.exp(segsum(xc)) * lower  # (M, nc, T, T), entries in [0, 1]
        h_intra = torch.matmul(decay, bc.unsqueeze(-1)).squeeze(-1)  # (M, nc, T)
    elif intra == "prefix":
        h_intra = linear_recurrence(torch.exp(xc), bc, max(1, math.ceil(math.log2(chunk))))
    else:
        raise ValueError(f"intra must be 'segsum' or 'prefix', got {intra!r}")
    cum = torch.cumsum(xc, dim=2)  # (M, nc, T), <= 0
    chunk_decay = torch.exp(cum[:, :, chunk - 1])  # (M, nc)
    chunk_end = h_intra[:, :, chunk - 1]  # state at each chunk's end, from zero
    carried = linear_recurrence(chunk_decay, chunk_end, levels)  # state at each chunk's end, true
    entering = F.pad(carried, (1, 0))[..., :nc]  # state entering chunk c = carried[c - 1], zero for c = 0
    h = h_intra + torch.exp(cum) * entering.unsqueeze(-1)
    return h.reshape(-1, nc * chunk)[:, :length].reshape(*lead, length)


def selective_scan_chunked(
    u: torch.Tensor,
    delta: torch.Tensor,
    A_logs: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    delta_bias: torch.Tensor,
    chunk: int | None = None,
    levels: int | None = None,
    intra: str | None = None,
) -> torch.Tensor:
    """Same contract as the op (docs/scan-op.md); `chunk` / `intra` None pick the defaults for d_state."""
    bsz, di, h, w = u.shape
    k = delta.shape[1]
    n = A_logs.shape[1]
    chunk = chunk or default_chunk(n)
    intra = intra or default_intra(n)
    us = cross_scan(u)  # (B, K, Di, L)
    dts = F.softplus(directional(delta) + delta_bias.reshape(1, k, di, 1))
    bs = directional(B)  # (B, K, N, L)
    cs = directional(C)
    a = -torch.exp(A_logs).reshape(1, k, di, n, 1)
    x = dts.unsqueeze(3) * a  # (B, K, Di, N, L), <= 0
    drive = (dts * us).unsqueeze(3) * bs.unsqueeze(2)  # (B, K, Di, N, L)
    states = chunked_recurrence(x, drive, chunk, levels, intra)
    ys = (states * cs.unsqueeze(2)).sum(3) + D.reshape(1, k, di, 1) * us
    return cross_merge(ys, h, w)
