"""The onnx-portable selective scan written directly as an ONNX function of standard ops, in two forms:
`blocked_scan_function` (the blocked scan of vmamba_export/scan/portable.py; exported for d_state 16) and
`cumsum_scan_function` (d_state 1 only; exported for every v2 model; described at its constants below).

Why not trace the torch form: the blocked scan unrolls T steps per pass and per recursion level (~500 ops per block),
and torch.export's symbolic-shape reasoning over dynamic batch/height/width took 4-6 minutes for it. Built here with
`onnx.helper` it takes a fraction of a second, and every op is picked for what ONNX Runtime's CPU kernels do fast
(measured on the project machine; benchmarks/portable_scan.py times the whole function):

- At d_state 16 time goes into passes over memory, not into node count (a node costs a few us of overhead with 2
  threads; a pass over a stage-1 state tensor 0.4-1 ms), so the layout work is done by as few full-size ops as
  possible. (At d_state 1 the balance tips the other way: the cumsum form, below.)
- Gathers put the inputs in step layout directly: each input goes channels last once, (B, [4 *] L, C), and one Gather
  per step t reads slice t, (B, 4, 1, L/T, C), of every direction. The gather indices (4, T, L/T) are computed in the
  graph from H and W and encode the four traversal orders and the chunking at once, so no transpose/flip/concat
  chain runs per direction and no Split pass copies the full tensors. Another Gather maps the four directions'
  outputs back to the map and one ReduceSum merges them. Positions past L (the last chunk's padding) gather a real
  element: they come after every real position, so whatever finite state they hold reaches no output.
- Each step's whole elementwise chain (gather, softplus, decay, drive, update) then runs on a 1/T slice that stays in
  cache. Pass 2 reuses pass 1's decays and drives (rebuilding them from dt, dt * u and B instead was 7% slower for
  vanilla VMamba-T and saved 3% of peak memory: ORT's arena holds about as much either way).
- Channels innermost: ORT's broadcasting kernels loop over inner spans, and with the chunk index innermost (L/T = 4
  at stage 4, 1 in the carry recursion) a Mul cost 3-40 ns per element instead of 0.4. dt and B get their broadcast
  axes by Reshape, so a step's decay exp(dt * A) and drive dt * u * B are one broadcasting Mul (and an Exp) each,
  straight into the (B, 4, 1, L/T, N, Di) state slice.
- The carry recursion takes dt summed over each chunk (channel-sized) rather than the chunk decays (state-sized): a
  level's decays are exp(A * dt_sum), and the next level's sums are one ReduceSum. No ReduceProd (slow in ORT), and
  the padding and splitting of decays move 1/N of the data.
- y = sum_n C * h is a Mul and a ReduceSum per step, so only (B, 4, 1, L/T, Di) per step leaves the scan (d_state 1:
  no state axis and no reduction). No MatMul anywhere: the int8 lowering quantizes every MatMul it finds.
- softplus without the Softplus op: ORT evaluates Softplus (and Log) one element at a time, 35-45 ns per element,
  more than all the scan's other work for d_state 1. softplus(x) = max(x, 0) + log1p(exp(-|x|)) with
  log1p(e) = 2 atanh(z), z = e / (2 + e) in [0, 1/3], and atanh(z) / z a cubic in z^2 (Chebyshev fit): relative
  error <= 6e-7 for every x > -80 against float64, from vectorised ops only (Exp, Div, Mul, Add).
- The skip term sum_k D[k] * u is added once after the merge (every direction maps u[p] back to p).

The blocked form's numerics are those of `selective_scan_portable`; tests compare both forms against the float64
reference. The graph is fixed by (d_state, chunk, depth); batch, channels, height and width are dynamic, for
sequences up to chunk ** depth.

Why a second form for d_state 1: there a step's slice is channel-sized, so the blocked form's ~900 nodes a block
(softplus, gathers, decay, drive and update per step, at chunk 16) cost more in per-node overhead than in arithmetic
(2-3 ms a block at vmamba_tiny_s1l8's 14 x 14 and 7 x 7 stages, against 0.1-0.3 ms for the custom op). The cumsum
form runs each of its ~35 elementwise passes once over the whole (B, 4, nc, T, Di) tensors: 341 nodes a block,
16% less time for vmamba_tiny_s1l8 whole (benchmarks/portable_model.py, docs/scan-op.md). At d_state 16 it would
need more state-sized passes than the blocked form's 9 a step, over tensors 16x larger that no longer stay in cache.
"""

from __future__ import annotations

import numpy as np
from onnx import FunctionProto, helper, numpy_helper

K = 4
# 2 atanh(z) / z as a cubic in z^2 on [0, 1/9], highest power first (numpy Chebyshev fit of degree 3). The softplus
# built from it is within 6e-7 (relative) of float64 for x > -80; float32 rounding alone gives ~1e-7.
SOFTPLUS_POLY = (0.342119969, 0.395793854, 0.666772782, 1.9999994)


class _Builder:
    """Appends nodes with fresh output names; constants are shared."""

    def __init__(self) -> None:
        self.nodes: list = []
        self._count = 0
        self._consts: dict[tuple, str] = {}

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs) -> str | list[str]:
        names = [f"_{op_type.lower()}{self._count}_{i}" for i in range(outputs)]
        self._count += 1
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names

    def ints(self, *values: int) -> str:
        return self._const(np.array(values, dtype=np.int64))

    def scalar(self, value: float) -> str:
        return self._const(np.array(value, dtype=np.float32))

    def int_scalar(self, value: int) -> str:
        return self._const(np.array(value, dtype=np.int64))

    def _const(self, array: np.ndarray) -> str:
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            name = f"_const{len(self._consts)}"
            tensor = numpy_helper.from_array(array, name=name + "_value")
            self.nodes.append(helper.make_node("Constant", [], [name], value=tensor))
            self._consts[key] = name
        return self._consts[key]

    def dims(self, x: str, start: int, end: int | None = None) -> str:
        """Shape(x)[start:end] as an int64 vector."""
        return self.op("Shape", x, start=start) if end is None else self.op("Shape", x, start=start, end=end)

    def softplus(self, x: str) -> str:
        """log(1 + exp(x)) from vectorised ops (module docstring)."""
        e = self.op("Exp", self.op("Neg", self.op("Abs", x)))  # (0, 1]
        z = self.op("Div", e, self.op("Add", e, self.scalar(2.0)))  # [0, 1/3]
        s = self.op("Mul", z, z)
        acc = self.scalar(SOFTPLUS_POLY[0])
        for c in SOFTPLUS_POLY[1:]:
            acc = self.op("Add", self.op("Mul", acc, s), self.scalar(c))
        return self.op("Add", self.op("Relu", x), self.op("Mul", acc, z))


def _step_indices(g: _Builder, h: str, w: str, chunk: int, chunk_major: bool = False) -> tuple[str, str]:
    """Gather indices for the four directions (docs/scan-op.md) from H and W (int64 [1] each).

    Returns (forward, backward): forward (4, T, nc) holds, for direction k, step t and chunk c, the map position
    (h * W + w) that direction k visits at sequence position q = c * T + t (past L: position L - 1, padding);
    backward (4, L) holds, for direction k and map position p, the flat index k * T * nc + t * nc + c of that
    position in the gathered (4, T, nc) layout. `chunk_major`: the layout is (4, nc, T) instead, so forward is
    (4, nc, T) and the flat index k * T * nc + q."""
    t = g.ints(chunk)
    length = g.op("Mul", h, w)
    last = g.op("Sub", length, g.ints(1))
    nc = g.op("Div", g.op("Add", length, g.ints(chunk - 1)), t)
    zero = g.ints(0)

    def transposed(q: str, rows: str, cols: str) -> str:
        # q walks a (cols x rows) grid column by column: the row-major index of the same cell.
        return g.op("Add", g.op("Mul", g.op("Mod", q, rows), cols), g.op("Div", q, rows))

    start, step = g.int_scalar(0), g.int_scalar(1)
    steps = g.op("Range", start, g.int_scalar(chunk), step)
    chunks = g.op("Range", start, g.op("Squeeze", nc, zero), step)
    if chunk_major:
        steps, chunks = g.op("Unsqueeze", steps, zero), g.op("Unsqueeze", chunks, g.ints(1))  # (1, T), (nc, 1)
    else:
        steps, chunks = g.op("Unsqueeze", steps, g.ints(1)), g.op("Unsqueeze", chunks, zero)  # (T, 1), (1, nc)
    seq = g.op("Min", g.op("Add", g.op("Mul", chunks, t), steps), last)  # padding clamped to L - 1
    seq_rev = g.op("Sub", last, seq)
    forward = [seq, transposed(seq, h, w), seq_rev, transposed(seq_rev, h, w)]
    forward = g.op("Concat", *[g.op("Unsqueeze", f, zero) for f in forward], axis=0)  # (4, T, nc) / (4, nc, T)

    pos = g.op("Range", start, g.op("Squeeze", length, zero), step)  # (L,)
    col_seq = transposed(pos, w, h)  # where column-major order visits map position p
    seqs = [pos, col_seq, g.op("Sub", last, pos), g.op("Sub", last, col_seq)]
    block = g.op("Mul", t, nc)
    backward = []
    for k, q in enumerate(seqs):
        flat = q if chunk_major else g.op("Add", g.op("Mul", g.op("Mod", q, t), nc), g.op("Div", q, t))
        backward.append(g.op("Unsqueeze", g.op("Add", flat, g.op("Mul", block, g.ints(k))), zero))
    return forward, g.op("Concat", *backward, axis=0)  # (4, L)


def _recurrence(g: _Builder, dt_sum: str, b: str, a: str, chunk: int, depth: int) -> str:
    """h = exp(A * dt_sum) * h + b along axis 2 of (B, 4, n, ...) tensors (h_{-1} = 0), by the blocked
    scheme: pad n, view (B, 4, n/T, T, ...), split the T steps, run them, recurse on the chunk ends."""
    # Padding dt with 0 and b with 0 (decay 1, no input) keeps the padded tail's states finite.
    blocked, unblocked = _chunk_views(g, g.dims(b, 2, 3), chunk)
    dt_blocked = blocked(dt_sum)
    dt_steps = g.op("Split", dt_blocked, axis=3, num_outputs=chunk, outputs=chunk)  # (B, 4, n/T, 1, ...)
    b_steps = g.op("Split", blocked(b), axis=3, num_outputs=chunk, outputs=chunk)
    decays = [g.op("Exp", g.op("Mul", d, a)) for d in dt_steps]

    def chunk_dt() -> str:
        return g.op("ReduceSum", dt_blocked, g.ints(3), keepdims=0)

    states = _chunk_states(g, decays, b_steps, chunk_dt, a, chunk, depth, step_axis=3)
    return unblocked(g.op("Concat", *states, axis=3))  # from (B, 4, n/T, T, ...)


def _chunk_views(g: _Builder, length: str, chunk: int):
    """(blocked, unblocked) for tensors whose axis 2 holds `length` positions: blocked pads axis 2 with zeros to
    whole chunks and views (B, 4, n, ...) as (B, 4, n/T, T, ...); unblocked views that back and drops the padding."""
    t = g.ints(chunk)
    pads = g.op("Concat", g.ints(0), g.op("Mod", g.op("Sub", t, g.op("Mod", length, t)), t), axis=0)

    def blocked(x: str) -> str:
        padded = g.op("Pad", x, pads, g.scalar(0.0), g.ints(2), mode="constant")
        return g.op("Reshape", padded, g.op("Concat", g.ints(0, 0, -1, chunk), g.dims(x, 3), axis=0))

    def unblocked(x: str) -> str:
        flat = g.op("Reshape", x, g.op("Concat", g.ints(0, 0, -1), g.dims(x, 4), axis=0))
        return g.op("Slice", flat, g.ints(0), length, g.ints(2))

    return blocked, unblocked


def _chunk_states(
    g: _Builder, decays, drives, chunk_dt, a: str, chunk: int, depth: int, step_axis: int, rebuild=None
) -> list[str]:
    """All states of h = a_t * h + b_t along each chunk, from the true state entering it (scan/portable.py
    `_chunk_states`). Slices have a unit `step_axis` and the chunks on the axis after it (top level) or before it
    (recursion); `chunk_dt()` builds dt summed over each chunk, (B, 4, nc, ...), for the carry recursion.
    `rebuild(t)`, if given, makes pass 2's decay and drive of step t afresh instead of reusing pass 1's."""
    state = drives[0]
    states = [state]
    for decay, drive in zip(decays[1:], drives[1:], strict=True):
        state = g.op("Add", g.op("Mul", decay, state), drive)
        states.append(state)
    if depth <= 1:
        return states  # one chunk covers the sequence: the zero start is the true one
    ends = _recurrence(g, chunk_dt(), g.op("Squeeze", state, g.ints(step_axis)), a, chunk, depth - 1)
    # Chunk c starts from the end of chunk c - 1, chunk 0 from zero: shift right by one along the chunks.
    shifted = g.op("Slice", ends, g.ints(0), g.ints(-1), g.ints(2))
    shifted = g.op("Pad", shifted, g.ints(1, 0), g.scalar(0.0), g.ints(2), mode="constant")
    state = g.op("Unsqueeze", shifted, g.ints(step_axis))
    states = []
    for t, (decay, drive) in enumerate(zip(decays, drives, strict=True)):
        if rebuild is not None:
            decay, drive = rebuild(t)
        state = g.op("Add", g.op("Mul", decay, state), drive)
        states.append(state)
    return states


class _Operands:
    """The scan's inputs in the layout both forms gather from (channels last, directions flattened into the
    position axis), A, the offsets of each direction's map, and the merge of the directions' outputs into y."""

    def __init__(self, g: _Builder, inputs: tuple[str, ...], d_state: int) -> None:
        u, delta, a_logs, b_map, c_map, d_skip, delta_bias = inputs
        self.h, self.w = g.dims(u, 2, 3), g.dims(u, 3, 4)
        self.channels = g.dims(u, 1, 2)
        # Direction k reads its own map: offset k * L into a (4 * L) axis.
        self.offsets = g.op("Reshape", g.op("Mul", g.op("Mul", self.h, self.w), g.ints(0, 1, 2, 3)), g.ints(K, 1, 1))

        def channels_last(x: str) -> str:
            """(B, 4, C, H, W) -> (B, 4 * L, C)."""
            last = g.op("Transpose", x, perm=[0, 1, 3, 4, 2])
            return g.op("Reshape", last, g.op("Concat", g.ints(0, -1), g.dims(x, 2, 3), axis=0))

        self.u_last = g.op("Transpose", u, perm=[0, 2, 3, 1])  # (B, H, W, Di), also for the skip term
        self.u_flat = g.op("Reshape", self.u_last, g.op("Concat", g.ints(0, -1), self.channels, axis=0))  # (B, L, Di)
        self.delta_flat, self.b_flat, self.c_flat = channels_last(delta), channels_last(b_map), channels_last(c_map)
        self.bias = g.op("Reshape", delta_bias, g.ints(1, K, 1, 1, -1))
        self.d_skip = d_skip
        a = g.op("Neg", g.op("Exp", a_logs))  # (4 * Di, N)
        if d_state == 1:
            self.a = g.op("Reshape", a, g.ints(1, K, 1, 1, -1))  # broadcasts over (B, 4, ., ., Di)
        else:
            a = g.op("Transpose", g.op("Reshape", a, g.ints(K, -1, d_state)), perm=[0, 2, 1])  # (4, N, Di)
            self.a = g.op("Reshape", a, g.ints(1, K, 1, 1, d_state, -1))

    def merge(self, g: _Builder, ys: str, backward: str) -> None:
        """y from the four directions' outputs ys (B, 4, T, nc, Di) or (B, 4, nc, T, Di), laid out as `backward`
        indexes them: map each direction back to the map, sum them, add the skip term, back to (B, Di, H, W)."""
        ys = g.op("Reshape", ys, g.op("Concat", g.ints(0, -1), self.channels, axis=0))  # (B, 4 * T * nc, Di)
        merged = g.op("ReduceSum", g.op("Gather", ys, backward, axis=1), g.ints(1), keepdims=0)  # (B, L, Di)
        d_sum = g.op("ReduceSum", g.op("Reshape", self.d_skip, g.ints(K, -1)), g.ints(0), keepdims=0)  # (Di,)
        merged = g.op("Add", merged, g.op("Mul", d_sum, self.u_flat))
        merged = g.op("Reshape", merged, g.op("Shape", self.u_last))  # (B, H, W, Di)
        g.nodes.append(helper.make_node("Transpose", [merged], ["y"], perm=[0, 3, 1, 2]))


def blocked_scan_function(
    domain: str,
    name: str,
    opset: int,
    d_state: int,
    chunk: int,
    depth: int,
    inputs: tuple[str, ...],
    keep_decays: bool = True,
) -> FunctionProto:
    """The scan op contract (docs/scan-op.md) as an ONNX function of standard ops: inputs named `inputs`
    (u, delta, A_logs, B, C, D, delta_bias), output y; sequences up to chunk ** depth positions per direction.

    `keep_decays`: pass 2 reuses pass 1's decays and drives (True, measured faster) or rebuilds them from dt, dt * u
    and B (False: three more state-sized ops per step, for runtimes short of memory)."""
    g = _Builder()
    n = d_state
    ops = _Operands(g, inputs, n)
    forward, backward = _step_indices(g, ops.h, ops.w, chunk)
    fwd = g.op("Split", forward, axis=1, num_outputs=chunk, outputs=chunk)  # T x (4, 1, nc)
    fwd_own = g.op("Split", g.op("Add", forward, ops.offsets), axis=1, num_outputs=chunk, outputs=chunk)
    a = ops.a
    if n == 1:
        # d_state 1: slices (B, 4, 1, nc, Di); B and C (B, 4, 1, nc, 1) broadcast over the channels.
        chan_units = state_units = None
    else:
        # Slices (B, 4, 1, nc, N, Di): dt and dt * u get a unit state axis, B and C a unit channel axis.
        chan_units, state_units = g.ints(0, 0, 0, 0, 1, -1), g.ints(0, 0, 0, 0, n, 1)

    def shaped(x: str, units: str | None) -> str:
        return x if units is None else g.op("Reshape", x, units)

    # Every step's elementwise chain (gather, softplus, decay, drive, update) runs on one 1/T slice, which stays in
    # cache, and the gathers write the slices directly (no Split pass over the full tensors).
    dt_steps, x_steps, b_steps, decays, drives = [], [], [], [], []
    for own, plain in zip(fwd_own, fwd, strict=True):
        dt = g.softplus(g.op("Add", g.op("Gather", ops.delta_flat, own, axis=1), ops.bias))  # (B, 4, 1, nc, Di)
        x = g.op("Mul", dt, g.op("Gather", ops.u_flat, plain, axis=1))
        b = shaped(g.op("Gather", ops.b_flat, own, axis=1), state_units)
        dt, x = shaped(dt, chan_units), shaped(x, chan_units)
        dt_steps.append(dt)
        x_steps.append(x)
        b_steps.append(b)
        decays.append(g.op("Exp", g.op("Mul", dt, a)))  # in (0, 1]
        drives.append(g.op("Mul", x, b))

    def chunk_dt() -> str:
        total = dt_steps[0]
        for dt in dt_steps[1:]:
            total = g.op("Add", total, dt)
        return g.op("Squeeze", total, g.ints(2))  # (B, 4, nc, [1,] Di)

    def rebuild(t: int) -> tuple[str, str]:
        return g.op("Exp", g.op("Mul", dt_steps[t], a)), g.op("Mul", x_steps[t], b_steps[t])

    states = _chunk_states(
        g, decays, drives, chunk_dt, a, chunk, depth, step_axis=2, rebuild=None if keep_decays else rebuild
    )
    y_steps = []
    for own, state in zip(fwd_own, states, strict=True):
        c = g.op("Gather", ops.c_flat, own, axis=1)  # (B, 4, 1, nc, N)
        if n == 1:
            y_steps.append(g.op("Mul", c, state))
        else:
            # Mul and ReduceSum, not a MatMul: the int8 lowering quantizes every MatMul (quantize/onnxruntime_int8.py)
            # and must not touch the scan.
            c = g.op("Reshape", c, g.ints(0, 0, 0, 0, n, 1))
            y_steps.append(g.op("ReduceSum", g.op("Mul", c, state), g.ints(4), keepdims=0))  # (B, 4, 1, nc, Di)
    ops.merge(g, g.op("Concat", *y_steps, axis=2), backward)  # (B, 4, T, nc, Di)
    return helper.make_function(domain, name, list(inputs), ["y"], g.nodes, [helper.make_opsetid("", opset)])


# The cumsum form (d_state 1): within a chunk, h_t = exp(s_t) * (h_in + sum_{j <= t} exp(-s_j) x_j) with s the
# running sum of the log-decays dt * A. exp(-s) grows without bound over a long sequence (FIELD-NOTES.md: the global
# form overflows); over a chunk of T steps, with s taken from the chunk's middle and every step's log-decay clamped
# at LOG_DECAY_FLOOR, every exponent stays within (T / 2) * 17.5 = 70 (chunk 8) and exp(+-70) is finite in float32
# with room for the sums. The clamp replaces a decay below e^-17.5 = 2.5e-8 by 2.5e-8: the state is forgotten either
# way, and the change to h is under 2.5e-8 of the state before that step.
LOG_DECAY_FLOOR = -17.5
CUMSUM_MAX_EXPONENT = 70.0
CUMSUM_MAX_CHUNK = int(2 * CUMSUM_MAX_EXPONENT / -LOG_DECAY_FLOOR)  # (T / 2) * 17.5 <= 70: T <= 8


def _cumsum_recurrence(g: _Builder, log_decay: str, x: str, chunk: int, depth: int) -> str:
    """h = exp(log_decay) * h + x along the (nc, T) axes 2 and 3 of (B, 4, nc, T, Di) tensors, h_{-1} = 0, sequences
    up to chunk ** depth long: within each chunk by two CumSums (comment above), the chunk ends by the same scheme
    one level down (over nc, a 1/T-sized tensor), then the state entering each chunk is added in."""
    log_decay = g.op("Max", log_decay, g.scalar(LOG_DECAY_FLOOR))
    s = g.op("CumSum", log_decay, g.int_scalar(3))
    ref = g.op("Slice", s, g.ints(chunk // 2 - 1), g.ints(chunk // 2), g.ints(3))  # (B, 4, nc, 1, Di)
    s_mid = g.op("Sub", s, ref)  # |s_mid| <= (T / 2) * 17.5
    z = g.op("CumSum", g.op("Mul", g.op("Exp", g.op("Neg", s_mid)), x), g.int_scalar(3))
    grow = g.op("Exp", s_mid)
    if depth > 1:
        last = g.ints(chunk - 1), g.ints(chunk), g.ints(3)
        # Each chunk's state at its end from a zero start, and its total log-decay, (B, 4, nc, Di): the same
        # recurrence over the chunks gives the state at every chunk's end.
        end_state = g.op("Mul", g.op("Slice", grow, *last), g.op("Slice", z, *last))
        end_log_decay = g.op("Slice", s, *last)
        ends = _cumsum_levels(
            g, g.op("Squeeze", end_log_decay, g.ints(3)), g.op("Squeeze", end_state, g.ints(3)), chunk, depth - 1
        )
        # Chunk c starts from the end of chunk c - 1, chunk 0 from zero; exp(s_t) = exp(s_mid_t) * exp(ref).
        entering = g.op(
            "Pad",
            g.op("Slice", ends, g.ints(0), g.ints(-1), g.ints(2)),
            g.ints(0, 0, 1, 0, 0, 0, 0, 0),
            g.scalar(0.0),
            mode="constant",
        )
        z = g.op("Add", z, g.op("Mul", g.op("Exp", ref), g.op("Unsqueeze", entering, g.ints(3))))
    return g.op("Mul", grow, z)


def _cumsum_levels(g: _Builder, log_decay: str, x: str, chunk: int, depth: int) -> str:
    """`_cumsum_recurrence` along axis 2 of (B, 4, n, Di) tensors: pad n to whole chunks (log-decay 0 and input 0
    keep the padded tail finite and reach no real position), view (B, 4, n/T, T, Di), solve, back to (B, 4, n, Di)."""
    blocked, unblocked = _chunk_views(g, g.dims(x, 2, 3), chunk)
    return unblocked(_cumsum_recurrence(g, blocked(log_decay), blocked(x), chunk, depth))


def cumsum_scan_function(
    domain: str, name: str, opset: int, chunk: int, depth: int, inputs: tuple[str, ...]
) -> FunctionProto:
    """The d_state-1 scan contract as an ONNX function of standard ops (same inputs and output as
    `blocked_scan_function`), in the cumsum form: every op runs on whole (B, 4, nc, T, Di) tensors, 341 nodes a
    block at chunk 8 and depth 6 against the blocked form's ~900 per-step ones, which cost more than their
    arithmetic at d_state 1."""
    if not 2 <= chunk <= CUMSUM_MAX_CHUNK or chunk % 2:
        raise ValueError(f"cumsum scan: chunk {chunk} must be even and in 2..{CUMSUM_MAX_CHUNK}")
    g = _Builder()
    ops = _Operands(g, inputs, 1)
    forward, backward = _step_indices(g, ops.h, ops.w, chunk, chunk_major=True)  # (4, nc, T)
    own = g.op("Add", forward, ops.offsets)
    dt = g.softplus(g.op("Add", g.op("Gather", ops.delta_flat, own, axis=1), ops.bias))  # (B, 4, nc, T, Di)
    x = g.op(
        "Mul", g.op("Mul", dt, g.op("Gather", ops.u_flat, forward, axis=1)), g.op("Gather", ops.b_flat, own, axis=1)
    )
    h = _cumsum_recurrence(g, g.op("Mul", dt, ops.a), x, chunk, depth)
    ops.merge(g, g.op("Mul", g.op("Gather", ops.c_flat, own, axis=1), h), backward)
    return helper.make_function(domain, name, list(inputs), ["y"], g.nodes, [helper.make_opsetid("", opset)])
