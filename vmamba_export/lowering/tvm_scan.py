"""The selective scan (docs/scan-op.md) as TIR kernels, scheduled per TVM target kind.

GPUs (cuda, metal): `scan_kernel(di, h, w, d_state)` holds two blocks:

- "scan": one block instance per (batch, direction, channel). Its body runs the recurrence over the L = H*W positions
  of that direction with the state (d_state floats) in local memory; the direction's traversal order is index
  arithmetic on the loop counter, so no cross-scan copies exist. Each direction writes its own slice of a
  (B, K, Di, H, W) scratch buffer: the four directions of one channel then never write the same element, so they run
  in parallel threads without atomics.
- "merge": y = sum over the four directions of that scratch buffer (an elementwise pass).

Scheduled as one thread per (batch, direction, channel), `threads` per block; merge one thread per element.

CPUs (llvm): `scan_kernel_cpu(di, h, w, d_state, lanes)`, the C++ kernel's structure: one block instance per (batch,
group of `lanes` channels) runs the four directions in turn over position-major copies of its u and delta (so each
step loads one contiguous vector of `lanes` channels, in any direction) and sums y in a third such tile. The lane
loops are `T.vectorized(lanes)`: lanes = 16/8/4 channels become one SIMD vector (a vectorised loop with nested serial
loops inside produced wrong results with TVM 0.27's vectoriser, so the lanes are the innermost loops by
construction). Scheduled parallel over (batch, channel group).

d_state, Di, H and W are compile-time constants (local arrays need a constant size on GPUs); the batch is a symbolic
TIR variable, so one compiled kernel takes any batch. Kernels are tagged `tirx.is_scheduled` so that dlight and
meta-schedule leave them alone.

TVM is imported lazily by the callers (lowering/tvm_relax.py): this module imports it at module level, and is only
imported once a TVM target is built.
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

K_DIRECTIONS = 4
GPU_THREADS = 128


def cpu_lanes(d_inner: int) -> int:
    """Channels per SIMD vector on CPU: the widest of 16/8/4 dividing Di (16 fp32 = one AVX-512 register; LLVM splits
    it into narrower registers on CPUs without AVX-512)."""
    for lanes in (16, 8, 4):
        if d_inner % lanes == 0:
            return lanes
    return 1


def _log1p_via_log(x):
    """log(1 + x), for Metal: the Metal Shading Language has no log1p (TVM 0.27 emits `log1pf`, which does not
    compile). Inexact only where exp(x) < 1e-7, i.e. dt < 1e-7, whose contribution to the state is negligible."""
    return tvm.tirx.log(tvm.tirx.const(1.0, "float32") + x)


def _f32(v: float):
    return tvm.tirx.const(v, "float32")


def _let(value, body, name: str = "v"):
    """`body(v)` with v bound once to `value`: keeps the polynomial helpers' expression trees from duplicating."""
    var = tvm.tirx.Var(name, "float32")  # every helper value here is float32
    return tvm.tirx.Let(var, value, body(var))


def fast_exp_nonpos(x):
    """exp(x) for x <= 0 (dt * A, and -|x| in softplus), the Cephes expf polynomial of the C++ CPU kernel
    (kernels/cpu/selective_scan_2d.cpp), about 1 ulp, written with float/int bit casts so that LLVM vectorises it.
    Why: LLVM lowers a vectorised `exp` to one libm call per lane, which made the CPU scan ~20x slower than the C++
    kernel. Below -87 it returns 0 (off by < 2e-38)."""

    def body(xc):
        def with_shift(shifted):
            def with_n(n):
                def with_r(r):
                    p = _f32(1.9875691500e-4)
                    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
                        p = p * r + _f32(c)
                    e = p * (r * r) + r + _f32(1.0)
                    n_int = tvm.tirx.reinterpret("int32", shifted) - tvm.tirx.const(0x4B400000, "int32")
                    bits = tvm.tirx.reinterpret("int32", e) + tvm.tirx.shift_left(n_int, tvm.tirx.const(23, "int32"))
                    return tvm.tirx.Select(xc <= _f32(-87.0), _f32(0.0), tvm.tirx.reinterpret("float32", bits))

                return _let(xc - n * _f32(0.693359375) - n * _f32(-2.12194440e-4), with_r, "r")

            return _let(shifted - _f32(12582912.0), with_n, "n")

        # adding 1.5 * 2^23 rounds x / ln2 to an integer, held in the low mantissa bits
        return _let(xc * _f32(1.44269504088896341) + _f32(12582912.0), with_shift, "shifted")

    return _let(tvm.tirx.max(x, _f32(-87.0)), body, "xc")


def fast_log1p_unit(e):
    """log1p(e) for e in [0, 1]: Cephes logf of u = 1 + e plus the first-order correction for the rounding of 1 + e
    (the C++ kernel's log1p_unit); polynomial only, so it vectorises."""

    def with_u_of(e, u):
        def with_big(big):
            def with_x(x):
                def with_z(z):
                    y = _f32(7.0376836292e-2)
                    for c in (-1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1):
                        y = y * x + _f32(c)
                    for c in (-1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1):
                        y = y * x + _f32(c)
                    y = y * x * z + big * _f32(-2.12194440e-4) - _f32(0.5) * z
                    log_u = x + y + big * _f32(0.693359375)
                    return log_u + (e - (u - _f32(1.0))) * (_f32(1.5) - _f32(0.5) * u)

                return _let(x * x, with_z, "z")

            return _let(tvm.tirx.Select(big > _f32(0.5), u * _f32(0.5), u) - _f32(1.0), with_x, "x")

        return _let(tvm.tirx.Select(u > _f32(1.41421356237), _f32(1.0), _f32(0.0)), with_big, "big")

    # e is bound once: it is itself a Let expression (fast_exp_nonpos), and a Let may be defined only once
    return _let(e, lambda ev: _let(_f32(1.0) + ev, lambda u: with_u_of(ev, u), "u"), "e")


def fast_softplus(x):
    """softplus as PyTorch (x itself above 20), as max(x, 0) + log1p(exp(-|x|)) so that exp never overflows."""
    return tvm.tirx.Select(
        x > _f32(20.0),
        x,
        tvm.tirx.max(x, _f32(0.0)) + fast_log1p_unit(fast_exp_nonpos(_f32(0.0) - tvm.tirx.abs(x))),
    )


def scan_kernel(di: int, h: int, w: int, n: int, lanes: int = 1, has_log1p: bool = True) -> tvm.tirx.PrimFunc:
    """Unscheduled TIR of selective_scan_2d for GPUs: fixed (Di, H, W, d_state), symbolic batch, `lanes` channels per
    block (1 on GPUs). `has_log1p`: False for targets whose language lacks log1p (Metal). The `exp`/`log1p` intrinsics
    (GPU languages have fast ones; the CPU kernel uses the polynomial forms)."""
    if di % lanes:
        raise ValueError(f"lanes {lanes} must divide d_inner {di}")
    K = K_DIRECTIONS  # noqa: N806 (the contract's name)
    L = h * w  # noqa: N806
    kd = K * di
    groups = di // lanes
    log1p = T.log1p if has_log1p else _log1p_via_log

    def softplus(x):
        return T.if_then_else(x > T.float32(20), x, log1p(T.exp(x)))

    exp_nonpos = T.exp

    @T.prim_func(s_tir=True)
    def selective_scan_2d(
        var_u: T.handle,
        var_delta: T.handle,
        A_logs: T.Buffer((kd, n), "float32"),
        var_b: T.handle,
        var_c: T.handle,
        Ds: T.Buffer((kd,), "float32"),
        delta_bias: T.Buffer((kd,), "float32"),
        var_y: T.handle,
    ):
        T.func_attr({"tirx.noalias": True})
        bsz = T.int64()
        u = T.match_buffer(var_u, (bsz, di, h, w), "float32")
        delta = T.match_buffer(var_delta, (bsz, K, di, h, w), "float32")
        Bm = T.match_buffer(var_b, (bsz, K, n, h, w), "float32")
        Cm = T.match_buffer(var_c, (bsz, K, n, h, w), "float32")
        y = T.match_buffer(var_y, (bsz, di, h, w), "float32")
        ys = T.alloc_buffer((bsz, K, di, h, w), "float32")
        for b, k, g in T.grid(bsz, K, groups):
            with T.sblock("scan"):
                vb, vk, vg = T.axis.remap("SSS", [b, k, g])
                T.reads(
                    u[vb, vg * lanes : vg * lanes + lanes, 0:h, 0:w],
                    delta[vb, vk, vg * lanes : vg * lanes + lanes, 0:h, 0:w],
                    A_logs[vk * di + vg * lanes : vk * di + vg * lanes + lanes, 0:n],
                    Bm[vb, vk, 0:n, 0:h, 0:w],
                    Cm[vb, vk, 0:n, 0:h, 0:w],
                    Ds[vk * di + vg * lanes : vk * di + vg * lanes + lanes],
                    delta_bias[vk * di + vg * lanes : vk * di + vg * lanes + lanes],
                )
                T.writes(ys[vb, vk, vg * lanes : vg * lanes + lanes, 0:h, 0:w])
                state = T.sblock_alloc_buffer((n, lanes), "float32", scope="local")
                a = T.sblock_alloc_buffer((n, lanes), "float32", scope="local")
                acc = T.sblock_alloc_buffer((lanes,), "float32", scope="local")
                dt = T.sblock_alloc_buffer((lanes,), "float32", scope="local")
                uu = T.sblock_alloc_buffer((lanes,), "float32", scope="local")
                for i in range(n):
                    for l in T.vectorized(lanes):
                        state[i, l] = T.float32(0)
                        a[i, l] = -T.exp(A_logs[vk * di + vg * lanes + l, i])
                for t in range(L):
                    # Direction k's t-th position: k even row-major, k odd column-major, k >= 2 reversed.
                    tt: T.let[T.int64] = T.if_then_else(vk >= 2, T.int64(L - 1) - t, t)
                    hh: T.let[T.int64] = T.if_then_else(vk % 2 == 0, tt // w, tt % h)
                    ww: T.let[T.int64] = T.if_then_else(vk % 2 == 0, tt % w, tt // h)
                    for l in T.vectorized(lanes):
                        dt[l] = delta[vb, vk, vg * lanes + l, hh, ww] + delta_bias[vk * di + vg * lanes + l]
                        # softplus as PyTorch: x above 20, log1p(exp(x)) below
                        dt[l] = softplus(dt[l])
                        uu[l] = u[vb, vg * lanes + l, hh, ww]
                        acc[l] = Ds[vk * di + vg * lanes + l] * uu[l]
                    for i in range(n):
                        for l in T.vectorized(lanes):
                            state[i, l] = (
                                exp_nonpos(dt[l] * a[i, l]) * state[i, l] + dt[l] * Bm[vb, vk, i, hh, ww] * uu[l]
                            )
                            acc[l] = acc[l] + Cm[vb, vk, i, hh, ww] * state[i, l]
                    for l in T.vectorized(lanes):
                        ys[vb, vk, vg * lanes + l, hh, ww] = acc[l]
        for b, d, i, j in T.grid(bsz, di, h, w):
            with T.sblock("merge"):
                vb, vd, vi, vj = T.axis.remap("SSSS", [b, d, i, j])
                y[vb, vd, vi, vj] = (
                    ys[vb, 0, vd, vi, vj] + ys[vb, 1, vd, vi, vj] + ys[vb, 2, vd, vi, vj] + ys[vb, 3, vd, vi, vj]
                )

    return selective_scan_2d


def scan_kernel_cpu(di: int, h: int, w: int, n: int, lanes: int) -> tvm.tirx.PrimFunc:
    """Unscheduled TIR of selective_scan_2d for CPUs: one block instance per (batch, group of `lanes` channels) runs
    all four directions, as the C++ kernel does. Why not `scan_kernel`'s layout: its lanes are channels H*W apart in
    memory, so every step of every direction gathered u and delta and scattered y lane by lane (scalar loads and
    stores, a cache line per lane; the column-major directions hit a new line every step). Here the group's u, and
    each direction's delta, are first copied into position-major tiles (L, lanes), so a step reads one contiguous
    vector in any direction; y accumulates over the directions in a third tile, copied out once. Polynomial exp and
    softplus (fast_math), as the C++ kernel."""
    if di % lanes:
        raise ValueError(f"lanes {lanes} must divide d_inner {di}")
    K = K_DIRECTIONS  # noqa: N806 (the contract's name)
    L = h * w  # noqa: N806
    kd = K * di
    groups = di // lanes

    @T.prim_func(s_tir=True)
    def selective_scan_2d(
        var_u: T.handle,
        var_delta: T.handle,
        A_logs: T.Buffer((kd, n), "float32"),
        var_b: T.handle,
        var_c: T.handle,
        Ds: T.Buffer((kd,), "float32"),
        delta_bias: T.Buffer((kd,), "float32"),
        var_y: T.handle,
    ):
        T.func_attr({"tirx.noalias": True})
        bsz = T.int64()
        u = T.match_buffer(var_u, (bsz, di, h, w), "float32")
        delta = T.match_buffer(var_delta, (bsz, K, di, h, w), "float32")
        Bm = T.match_buffer(var_b, (bsz, K, n, h, w), "float32")
        Cm = T.match_buffer(var_c, (bsz, K, n, h, w), "float32")
        y = T.match_buffer(var_y, (bsz, di, h, w), "float32")
        for b, g in T.grid(bsz, groups):
            with T.sblock("scan"):
                vb, vg = T.axis.remap("SS", [b, g])
                T.reads(
                    u[vb, vg * lanes : vg * lanes + lanes, 0:h, 0:w],
                    delta[vb, 0:K, vg * lanes : vg * lanes + lanes, 0:h, 0:w],
                    A_logs[0:kd, 0:n],
                    Bm[vb, 0:K, 0:n, 0:h, 0:w],
                    Cm[vb, 0:K, 0:n, 0:h, 0:w],
                    Ds[0:kd],
                    delta_bias[0:kd],
                )
                T.writes(y[vb, vg * lanes : vg * lanes + lanes, 0:h, 0:w])
                u_t = T.sblock_alloc_buffer((L, lanes), "float32")
                d_t = T.sblock_alloc_buffer((L, lanes), "float32")
                y_t = T.sblock_alloc_buffer((L, lanes), "float32")
                state = T.sblock_alloc_buffer((n, lanes), "float32", scope="local")
                a = T.sblock_alloc_buffer((n, lanes), "float32", scope="local")
                acc = T.sblock_alloc_buffer((lanes,), "float32", scope="local")
                dt = T.sblock_alloc_buffer((lanes,), "float32", scope="local")
                uu = T.sblock_alloc_buffer((lanes,), "float32", scope="local")
                # The copies in and out vectorise over the lanes (contiguous in the tiles) and read or write the
                # tensors lane by lane: with the loops the other way round LLVM vectorised them into AVX-512 scatters,
                # slower than the scan itself on AMD cores.
                for i, j in T.grid(h, w):
                    for l in T.vectorized(lanes):
                        u_t[i * w + j, l] = u[vb, vg * lanes + l, i, j]
                        y_t[i * w + j, l] = T.float32(0)
                for k in range(K):
                    for i, j in T.grid(h, w):
                        for l in T.vectorized(lanes):
                            d_t[i * w + j, l] = delta[vb, k, vg * lanes + l, i, j]
                    for i in range(n):
                        for l in T.vectorized(lanes):
                            state[i, l] = T.float32(0)
                            a[i, l] = -T.exp(A_logs[k * di + vg * lanes + l, i])
                    for t in range(L):
                        # Direction k's t-th position: k even row-major, k odd column-major, k >= 2 reversed.
                        tt: T.let[T.int64] = T.if_then_else(k >= 2, T.int64(L - 1) - t, t)
                        hh: T.let[T.int64] = T.if_then_else(k % 2 == 0, tt // w, tt % h)
                        ww: T.let[T.int64] = T.if_then_else(k % 2 == 0, tt % w, tt // h)
                        for l in T.vectorized(lanes):
                            dt[l] = fast_softplus(d_t[hh * w + ww, l] + delta_bias[k * di + vg * lanes + l])
                            uu[l] = u_t[hh * w + ww, l]
                            acc[l] = Ds[k * di + vg * lanes + l] * uu[l]
                        for i in range(n):
                            for l in T.vectorized(lanes):
                                state[i, l] = (
                                    fast_exp_nonpos(dt[l] * a[i, l]) * state[i, l]
                                    + dt[l] * Bm[vb, k, i, hh, ww] * uu[l]
                                )
                                acc[l] = acc[l] + Cm[vb, k, i, hh, ww] * state[i, l]
                        for l in T.vectorized(lanes):
                            y_t[hh * w + ww, l] = y_t[hh * w + ww, l] + acc[l]
                for i, j in T.grid(h, w):
                    for l in T.vectorized(lanes):
                        y[vb, vg * lanes + l, i, j] = y_t[i * w + j, l]

    return selective_scan_2d


def schedule_scan(func: tvm.tirx.PrimFunc, target_kind: str, threads: int = GPU_THREADS) -> tvm.tirx.PrimFunc:
    """Apply the `target_kind` schedule ("llvm", "cuda", "metal") to a `scan_kernel` and tag it scheduled."""
    sch = tvm.s_tir.Schedule(func)
    if target_kind == "llvm":  # scan_kernel_cpu: one block, parallel over (batch, channel group)
        sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock("scan"))))
        return sch.mod["main"].with_attr("tirx.is_scheduled", True)
    scan, merge = sch.get_sblock("scan"), sch.get_sblock("merge")
    if target_kind in ("cuda", "metal"):
        for block in (scan, merge):
            outer, inner = sch.split(sch.fuse(*sch.get_loops(block)), [None, threads])
            sch.bind(outer, "blockIdx.x")
            sch.bind(inner, "threadIdx.x")
    else:
        raise ValueError(f"no scan schedule for TVM target kind {target_kind!r}")
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def scheduled_scan(di: int, h: int, w: int, n: int, target_kind: str) -> tvm.tirx.PrimFunc:
    """The scan kernel for one block's shape, scheduled for `target_kind`."""
    if target_kind == "llvm":
        return schedule_scan(scan_kernel_cpu(di, h, w, n, cpu_lanes(di)), target_kind)
    return schedule_scan(scan_kernel(di, h, w, n, has_log1p=target_kind != "metal"), target_kind)
