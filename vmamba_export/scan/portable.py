"""The selective scan written with plain tensor ops only: no loop, no custom op, no division.

The CPU fallback of the torch op when the C++ kernel is not built (d_state 1), and the specification of the scan the
`onnx-portable` lowering exports: vmamba_export/lowering/onnx_portable_scan.py builds the same algorithm op by op as
an ONNX function, in a layout chosen for ONNX Runtime (tests hold both to the float64 reference). The recurrence
h_l = a_l * h_{l-1} + b_l (a_l = exp(dt_l * A) in (0, 1]) is solved by a work-efficient blocked scan
(`selective_scan_portable`, `blocked_recurrence`):

1. Pad L to a multiple of the chunk size T and view every sequence as (L/T chunks) x (T steps), step-major, so that
   "step t of every chunk" is one contiguous slice of 1/T of the data.
2. Pass 1: T explicit steps over those slices give each chunk's end state from a zero start. The chunk's total decay
   is exp(A * sum of dt over the chunk) (one small exp, no product of T factors).
3. Carry: the chunk-end states obey the same recurrence over the L/T chunks; it is solved by the same blocked scheme
   one level down (1/T of the data), recursively until one chunk covers the sequence. The recursion depth is fixed in
   the graph by the longest sequence the export must take (`blocked_depth`).
4. Pass 2: the T steps again, now starting from the true state entering each chunk, give every state; y sums C * h
   over the state axis at each step, so no (B, K, Di, N, L) state tensor is ever assembled, only 1/T slices.

Only products of decays in (0, 1] and sums appear: nothing overflows at any length or delta (the "divide by
exp(cumsum)" form overflows at L = 3136 in fp32, FIELD-NOTES.md). The work is O(L): about a dozen passes over the
data in all, against ~3 per level x log2(L) levels for the log-depth (Hillis-Steele) prefix scan kept below as
`selective_scan_prefix`, which also materialised every level's (B, K, Di, N, L) tensors (7 GB for vanilla VMamba-T).
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


# Chunk size T, the same for every d_state. Each step of a pass is a handful of ops over 1/T of the data; the carry
# recursion shrinks the data by T per level and the graph carries enough levels for the longest sequence it takes
# (4 at T = 16 for a 1024 x 1024 input). Smaller T means more levels (more padding waste on the small late-stage
# maps), larger T more nodes and slices that fall out of cache. Measured with the ONNX form in ONNX Runtime, 2 threads,
# whole models at 224 (benchmarks/portable_model.py, benchmarks/portable_scan.py): d_state 1, T = 8 and 16 within
# the machine's noise of each other (1.8-2.0x and 1.5-2.2x the custom-op model); d_state 16, T = 16 beat 32 and 64
# by 20% (the scan alone: 4.1 s vs 5.0 s per vanilla VMamba-T image on a loaded machine).
DEFAULT_CHUNK = 16


def blocked_depth(max_length: int, chunk: int = DEFAULT_CHUNK) -> int:
    """Recursion levels of the blocked scan that cover sequences of up to `max_length` positions: the top level must
    see at most one chunk."""
    depth, covered = 1, chunk
    while covered < max_length:
        depth += 1
        covered *= chunk
    return depth


def _to_steps(x: torch.Tensor, chunk: int, fill: float = 0.0) -> list[torch.Tensor]:
    """(..., L) -> T tensors (..., ceil(L / T)): element c of step t is position c * T + t.

    The padding at the end (fill 1 for decays, 0 for inputs and dt) cannot change any earlier state and is sliced
    off by `_from_steps`. It is unconditional (a zero pad is a no-op) so that a symbolic L traces without a guard."""
    length = x.shape[-1]
    pad = (-length) % chunk
    x = F.pad(x, (0, pad), value=fill)
    x = x.reshape(*x.shape[:-1], (length + pad) // chunk, chunk)
    return list(x.movedim(-1, 0).unbind(0))


def _from_steps(steps: list[torch.Tensor], length: int) -> torch.Tensor:
    """Inverse of `_to_steps`: T tensors (..., nc) -> (..., L)."""
    x = torch.stack(steps, dim=-1)
    return x.reshape(*x.shape[:-2], -1)[..., :length]


def _chunk_states(
    decays: list[torch.Tensor],
    drives: list[torch.Tensor],
    chunk_decay: torch.Tensor,
    chunk: int,
    depth: int,
) -> list[torch.Tensor]:
    """All states, step by step (T tensors (..., nc)), of h = a * h + b run along each chunk, from the true state
    entering the chunk. `chunk_decay` (..., nc) is the product of a over each chunk."""
    state = drives[0]
    states = [state]
    for a, b in zip(decays[1:], drives[1:], strict=True):
        state = a * state + b
        states.append(state)
    if depth <= 1:
        return states  # one chunk covers the sequence: the zero start is the true one
    # The state at each chunk's end obeys the same recurrence over chunks: solve it one level down (1/T of the data).
    ends = blocked_recurrence(chunk_decay, state, chunk, depth - 1)
    entering = F.pad(ends[..., :-1], (1, 0))  # chunk c starts from the end of chunk c - 1; chunk 0 from zero
    states = []
    state = entering
    for a, b in zip(decays, drives, strict=True):
        state = a * state + b
        states.append(state)
    return states


def blocked_recurrence(a: torch.Tensor, b: torch.Tensor, chunk: int = DEFAULT_CHUNK, depth: int = 4) -> torch.Tensor:
    """h_l = a_l * h_{l-1} + b_l along the last axis with h_{-1} = 0, for a in [0, 1] and sequences up to
    chunk ** depth long (`blocked_depth`). Same shape as b."""
    length = a.shape[-1]
    decays = _to_steps(a, chunk, fill=1.0)
    drives = _to_steps(b, chunk)
    # The product of a over each chunk: one reduction over the T steps, all factors in [0, 1].
    chunk_decay = torch.stack(decays, dim=-1).prod(-1)
    return _from_steps(_chunk_states(decays, drives, chunk_decay, chunk, depth), length)


def selective_scan_portable(
    u: torch.Tensor,
    delta: torch.Tensor,
    A_logs: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    delta_bias: torch.Tensor,
    chunk: int = DEFAULT_CHUNK,
    max_length: int | None = None,
) -> torch.Tensor:
    """Same contract as the op, by the blocked scan (module docstring). `max_length` fixes the recursion depth the
    graph carries: sequences up to that many positions (None: just enough for this input)."""
    bsz, di, h, w = u.shape
    k = delta.shape[1]
    n = A_logs.shape[1]
    length = h * w
    depth = blocked_depth(max_length or length, chunk)
    us = cross_scan(u)  # (B, K, Di, L)
    # Each direction reads its own delta/B/C map in its own order: scanning all four maps of a direction and keeping
    # the one that belongs to it is the same as indexing, and stays within plain ops.
    dts = F.softplus(directional(delta) + delta_bias.reshape(1, k, di, 1))  # (B, K, Di, L)
    dt_steps = _to_steps(dts, chunk)  # T x (B, K, Di, nc); padded dt = 0: decay 1, drive 0
    x_steps = _to_steps(dts * us, chunk)
    b_steps = _to_steps(directional(B), chunk)  # T x (B, K, N, nc)
    c_steps = _to_steps(directional(C), chunk)
    # dt summed over each chunk: the chunk's total decay is one exp of it (the exponent is <= 0).
    dt_chunk = torch.stack(dt_steps, dim=-1).sum(-1)  # (B, K, Di, nc)
    a = -torch.exp(A_logs)
    if n == 1:
        # d_state 1 (every v2 model): no state axis at all; B and C broadcast over the channels.
        a = a.reshape(1, k, di, 1)
        decays = [torch.exp(dt * a) for dt in dt_steps]
        drives = [x * b_t for x, b_t in zip(x_steps, b_steps, strict=True)]
        states = _chunk_states(decays, drives, torch.exp(dt_chunk * a), chunk, depth)
        y_steps = [c_t * s for c_t, s in zip(c_steps, states, strict=True)]
    else:
        # State slices (B, K, Di, N, nc): chunk index innermost, so every op streams whole contiguous slices.
        a = a.reshape(1, k, di, n, 1)
        decays = [torch.exp(dt.unsqueeze(3) * a) for dt in dt_steps]
        drives = [x.unsqueeze(3) * b_t.unsqueeze(2) for x, b_t in zip(x_steps, b_steps, strict=True)]
        states = _chunk_states(decays, drives, torch.exp(dt_chunk.unsqueeze(3) * a), chunk, depth)
        # Sum over the state right away: only (B, K, Di, nc) per step leaves the scan.
        y_steps = [(c_t.unsqueeze(2) * s).sum(3) for c_t, s in zip(c_steps, states, strict=True)]
    ys = _from_steps(y_steps, length) + D.reshape(1, k, di, 1) * us
    return cross_merge(ys, h, w)


def selective_scan_prefix(
    u: torch.Tensor,
    delta: torch.Tensor,
    A_logs: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    delta_bias: torch.Tensor,
    levels: int | None = None,
) -> torch.Tensor:
    """Same contract as the op by the log-depth prefix scan (the portable form before the blocked scan, kept for
    comparison); `levels` fixes the prefix-scan depth (None: just enough for this input)."""
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
