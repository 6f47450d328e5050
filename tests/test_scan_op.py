"""The `vmamba::selective_scan_2d` op against the float64 reference, in models, and in exported graphs.

Also the spatial-size helpers (models/shapes.py) against real forward shapes and torch.export's dynamic-shape limits.
"""

from __future__ import annotations

import pytest
import torch
from torch.export import Dim

from vmamba_export.models import VMamba, build_model, get_config, list_configs
from vmamba_export.models.shapes import export_min_size, stage_sizes
from vmamba_export.scan import native, selective_scan_portable, selective_scan_reference
from vmamba_export.scan import selective_scan_2d as scan_op
from vmamba_export.scan.portable import (
    blocked_depth,
    blocked_recurrence,
    selective_scan_prefix,
    selective_scan_sequential,
)

K = 4
OP = torch.ops.vmamba.selective_scan_2d
BACKEND = "native" if native.available() else "torch"


def scan_inputs(bsz: int, di: int, n: int, h: int, w: int, delta_shift: float = 0.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(bsz, di, h, w, generator=g)
    delta = torch.randn(bsz, K, di, h, w, generator=g) + delta_shift
    a_logs = torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(K * di, 1)
    a_logs = a_logs + 0.3 * torch.randn(K * di, n, generator=g)
    b = torch.randn(bsz, K, n, h, w, generator=g)
    c = torch.randn(bsz, K, n, h, w, generator=g)
    d = torch.randn(K * di, generator=g)
    delta_bias = 0.5 * torch.randn(K * di, generator=g)
    return u, delta, a_logs, b, c, d, delta_bias


def rel_l2(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(y.double() - ref.double()) / torch.linalg.vector_norm(ref.double()))


# (batch, Di, d_state, H, W, delta shift). The reference is a Python loop over 4 * L positions: tiny Di at L = 3136.
CASES = [
    (2, 3, 1, 1, 1, 0.0),
    (2, 3, 16, 1, 1, 0.0),
    (2, 5, 1, 7, 9, 0.0),
    (3, 4, 16, 6, 5, 0.0),
    (2, 2, 1, 1, 13, 10.0),  # H = 1: column-major equals row-major
    (2, 2, 16, 11, 1, -10.0),  # W = 1
    (2, 4, 1, 14, 14, 10.0),  # large deltas: the state forgets at once
    (2, 4, 16, 14, 14, -10.0),  # tiny deltas: the state barely moves
    (2, 1, 1, 56, 56, 0.0),  # L = 3136, stage 1 at 224x224
    (2, 1, 16, 56, 56, -10.0),
    (2, 1, 1, 56, 56, 10.0),
]
CASE_IDS = [f"b{b}-di{di}-n{n}-{h}x{w}-shift{s:+g}" for b, di, n, h, w, s in CASES]


@pytest.fixture(scope="module")
def references():
    return {case: selective_scan_reference(*scan_inputs(*case)) for case in CASES}


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_op_matches_reference(case, references):
    args = scan_inputs(*case)
    y = OP(*args)
    assert y.dtype == torch.float32 and y.shape == args[0].shape
    assert rel_l2(y, references[case]) <= 1e-5, f"backend {BACKEND}"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_torch_forms_match_reference(case, references):
    args = scan_inputs(*case)
    assert rel_l2(selective_scan_portable(*args), references[case]) <= 1e-5
    # A recursion deeper than needed (what an exported graph carries) and other chunk sizes change nothing.
    for chunk in (4, 16, 32):
        assert rel_l2(selective_scan_portable(*args, chunk=chunk, max_length=256 * 256), references[case]) <= 1e-5
    assert rel_l2(selective_scan_prefix(*args, levels=13), references[case]) <= 1e-5
    if case[3] * case[4] <= 196:  # one Python step per position: keep it to the small maps
        assert rel_l2(selective_scan_sequential(*args), references[case]) <= 1e-5


@pytest.mark.parametrize("length", [1, 15, 16, 17, 255, 256, 257, 1000])
@pytest.mark.parametrize("chunk", [4, 16])
def test_blocked_recurrence_against_a_loop(length, chunk):
    """h_l = a_l * h_{l-1} + b_l in float64 one step at a time, against the blocked scheme at several depths,
    including sequences that are not a multiple of the chunk and decays that reach 0 and 1."""
    g = torch.Generator().manual_seed(length)
    a = torch.rand(3, 2, length, generator=g, dtype=torch.float64)
    a[0, 0, ::7] = 0.0
    a[0, 1, ::5] = 1.0
    b = torch.randn(3, 2, length, generator=g, dtype=torch.float64)
    want = torch.empty_like(b)
    state = torch.zeros(3, 2, dtype=torch.float64)
    for pos in range(length):
        state = a[..., pos] * state + b[..., pos]
        want[..., pos] = state
    depth = blocked_depth(length, chunk)
    for extra in (0, 2):
        got = blocked_recurrence(a, b, chunk, depth + extra)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert blocked_depth(chunk**3, chunk) == 3 and blocked_depth(chunk**3 + 1, chunk) == 4


def test_reference_by_hand():
    """The reference itself, against the recurrence written out for one channel of a 1x3 map (direction order is
    the same for k = 0 and 1 when H = 1, and reversed for k = 2 and 3)."""
    u, delta, a_logs, b, c, d, bias = scan_inputs(1, 1, 1, 1, 3, seed=3)
    want = torch.zeros(3, dtype=torch.float64)
    for k in range(K):
        order = [0, 1, 2] if k < 2 else [2, 1, 0]
        state = 0.0
        for p in order:
            dt = torch.nn.functional.softplus(delta[0, k, 0, 0, p].double() + bias[k].double())
            a = -torch.exp(a_logs[k, 0].double())
            state = torch.exp(dt * a) * state + dt * b[0, k, 0, 0, p].double() * u[0, 0, 0, p].double()
            want[p] += c[0, k, 0, 0, p].double() * state + d[k].double() * u[0, 0, 0, p].double()
    got = selective_scan_reference(u, delta, a_logs, b, c, d, bias)
    torch.testing.assert_close(got.reshape(3), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["vmamba_test_v0", "vmamba_test_v2"])
@pytest.mark.parametrize("size", [(64, 48), (45, 37)], ids=["64x48", "45x37"])
def test_model_with_op_equals_reference_scan(name, size):
    torch.manual_seed(0)
    model = build_model(name)
    assert all(m.scan_fn is scan_op for m in model.modules() if hasattr(m, "scan_fn"))
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        got = model(x)
        model.set_scan(lambda *a: selective_scan_reference(*a).float())
        want = model(x)
    assert rel_l2(got, want) <= 1e-5


@pytest.mark.parametrize(
    "arg,bad",
    [
        ("u", lambda a: a["u"][0]),
        ("delta", lambda a: a["delta"][:, :, :, :-1]),
        ("A_logs", lambda a: a["A_logs"][:-1]),
        ("B", lambda a: a["B"][:, :, :, :, :-1]),
        ("C", lambda a: a["C"][:1]),
        ("D", lambda a: a["D"][:-1]),
        ("delta_bias", lambda a: a["delta_bias"].reshape(K, -1)),
    ],
)
def test_wrong_shapes_name_the_argument(arg, bad):
    names = ["u", "delta", "A_logs", "B", "C", "D", "delta_bias"]
    args = dict(zip(names, scan_inputs(2, 3, 2, 4, 5), strict=True))
    args[arg] = bad(args)
    with pytest.raises(ValueError, match=rf"selective_scan_2d: {arg} must"):
        OP(*args.values())


# ---------------------------------------------------------------------------------------------------------- export


def count_scan_nodes(ep) -> int:
    return sum(1 for n in ep.graph.nodes if n.op == "call_function" and n.target is OP.default)


@pytest.mark.parametrize("cfg", list_configs(), ids=lambda c: c.name)
def test_export_keeps_one_scan_node_per_block(cfg):
    # Full-size models on the meta device: the graph is the same, and no weights are allocated or computed.
    with torch.device("meta"):
        model = VMamba(cfg).eval()
        x = torch.empty(1, cfg.in_chans, 64, 64)
    ep = torch.export.export(model, (x,))
    assert count_scan_nodes(ep) == sum(cfg.depths)
    # Nothing of the scan leaks out of the op (no flips, no prefix-scan pads).
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("flip" in t or "constant_pad" in t for t in targets), targets


def observed_stage_sizes(model: VMamba, h: int, w: int) -> list[tuple[int, int]]:
    """(H, W) each stage's blocks see, from a meta-device forward."""
    sizes = []

    def hook(module, args):
        x = args[0]
        sizes.append(tuple(x.shape[1:3]) if model.config.version == "v0" else tuple(x.shape[2:4]))

    handles = [layer.blocks.register_forward_pre_hook(hook) for layer in model.layers]
    with torch.no_grad():
        model(torch.empty(1, 3, h, w, device="meta"))
    for handle in handles:
        handle.remove()
    return sizes


@pytest.mark.parametrize("name", ["vmamba_test_v0", "vmamba_test_v2", "vmamba_digits_v0", "vmamba_digits_v2"])
def test_stage_sizes_and_export_min_size_match_the_model(name):
    cfg = get_config(name)
    with torch.device("meta"):
        model = VMamba(cfg).eval()
    for h, w in [(224, 224), (64, 48), (45, 37), (33, 36), (35, 17), (7, 5), (4, 4)]:
        assert stage_sizes(cfg, h, w) == observed_stage_sizes(model, h, w), (h, w)
    # Independently: the smallest square input whose every stage keeps >= 2 positions a side, by forward passes.
    side = next(
        s for s in range(cfg.min_input_size, 200) if min(min(hw) for hw in observed_stage_sizes(model, s, s)) >= 2
    )
    assert export_min_size(cfg) == side


def test_export_min_size_released():
    assert {export_min_size(get_config(n)) for n in ("vmamba_tiny_s1l8", "vmamba_base_s2l15")} == {33}
    assert {export_min_size(get_config(n)) for n in ("vanilla_vmamba_tiny", "vanilla_vmamba_base")} == {36}


@pytest.mark.parametrize("name", ["vmamba_test_v0", "vmamba_test_v2"])
def test_dynamic_export_from_min_size(name):
    """export_min_size is exactly torch.export's limit: it exports from there, and not from one pixel less."""
    torch.manual_seed(0)
    model = build_model(name)
    lo = export_min_size(model.config)
    example = (torch.randn(1, 3, 64, 48),)

    def spec(low):
        return ({2: Dim("h", min=low, max=256), 3: Dim("w", min=low, max=256)},)

    ep = torch.export.export(model, example, dynamic_shapes=spec(lo))
    assert count_scan_nodes(ep) == sum(model.config.depths)
    with torch.no_grad():
        for size in [(lo, lo), (lo + 5, 70)]:
            x = torch.randn(1, 3, *size)  # the batch of the example (1) is static
            torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="(?i)constraint"):
        torch.export.export(model, example, dynamic_shapes=spec(lo - 1))


# ------------------------------------------------------------------------------------------- portable ONNX function


def portable_scan_model(
    d_state: int, max_length: int, chunk: int = 16, keep_decays: bool = True, form: str = "blocked"
):
    """A graph holding one SelectiveScan2D node (every dimension symbolic) with the onnx-portable scan inlined."""
    from vmamba_export.lowering.onnx_export import inline_portable_scan, one_node_scan_model

    proto = one_node_scan_model(d_state)
    return inline_portable_scan(proto, max_length, d_state, form, chunk, keep_decays)


SCAN_NAMES = ("u", "delta", "A_logs", "B", "C", "D", "delta_bias")
# (batch, Di, d_state, H, W, delta shift) on top of CASES: odd sizes, H != W, and a map that needs a recursion.
ONNX_CASES = CASES + [(2, 3, 16, 33, 47, 10.0), (1, 2, 1, 37, 19, -10.0), (3, 2, 16, 9, 4, 0.0)]


# (form, chunk, max_length) per d_state: 256 * 256 is the default max_size 1024 (blocked: depth 4 at chunk 16;
# cumsum: depth 6 at chunk 8); 64 * 64 at chunk 64 (blocked: depth 2) and 8 x 8 at chunk 2 (cumsum: depth 6).
PORTABLE_FORMS = {
    1: [("blocked", 16, 256 * 256), ("blocked", 64, 64 * 64), ("cumsum", 8, 256 * 256), ("cumsum", 2, 64)],
    16: [("blocked", 16, 256 * 256), ("blocked", 64, 64 * 64)],
}


@pytest.fixture(scope="module")
def portable_sessions():
    import onnxruntime as ort

    return {
        (n, form, chunk, max_length): ort.InferenceSession(
            portable_scan_model(n, max_length, chunk, form=form).SerializeToString()
        )
        for n, forms in PORTABLE_FORMS.items()
        for form, chunk, max_length in forms
    }


@pytest.mark.parametrize("case", ONNX_CASES, ids=lambda c: "b{}-di{}-n{}-{}x{}-shift{:+g}".format(*c))
def test_portable_onnx_function_matches_reference(case, portable_sessions):
    args = scan_inputs(*case)
    ref = selective_scan_reference(*args)
    feeds = {name: t.numpy() for name, t in zip(SCAN_NAMES, args, strict=True)}
    for form, chunk, max_length in PORTABLE_FORMS[case[2]]:
        if case[3] * case[4] > max_length:
            continue
        (y,) = portable_sessions[(case[2], form, chunk, max_length)].run(None, feeds)
        assert y.shape == tuple(args[0].shape)
        assert rel_l2(torch.from_numpy(y), ref) <= 1e-5, (form, chunk, max_length)


@pytest.mark.parametrize("seed", [0, 1])
def test_portable_cumsum_form_keeps_precision_across_mixed_decays(seed, portable_sessions):
    """The cumsum form's exponents are differences of running sums: positions with near-1 decays right after
    decays clamped at e^-17.5 in the same chunk are its worst case (rounding of sums near (T / 2) * 17.5). A third of
    the positions get dt ~ 12 against |A| up to ~70, the rest dt ~ e^-6."""
    args = list(scan_inputs(2, 4, 1, 30, 30, seed=seed))
    mask = torch.rand(args[1].shape, generator=torch.Generator().manual_seed(seed + 10)) < 0.3
    args[1] = torch.where(mask, args[1] + 12.0, args[1] - 6.0)
    args[2] = args[2] + 1.5
    ref = selective_scan_reference(*args)
    feeds = {name: t.numpy() for name, t in zip(SCAN_NAMES, args, strict=True)}
    for form, chunk, max_length in PORTABLE_FORMS[1]:
        if max_length < 30 * 30:
            continue
        (y,) = portable_sessions[(1, form, chunk, max_length)].run(None, feeds)
        assert rel_l2(torch.from_numpy(y), ref) <= 1e-5, (form, chunk)  # measured: cumsum 1.3e-6, blocked 1e-7


@pytest.mark.parametrize("d_state, form", [(1, "blocked"), (16, "blocked"), (1, "cumsum")])
def test_portable_onnx_function_is_standard_and_agrees_with_reference_evaluator(d_state, form):
    import onnx
    from onnx.reference import ReferenceEvaluator

    proto = portable_scan_model(d_state, 32 * 32, chunk=4, form=form)
    onnx.checker.check_model(proto, full_check=True)
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    assert not {"Loop", "Scan", "If", "Softplus"} & {n.op_type for n in proto.graph.node}
    args = scan_inputs(2, 3, d_state, 7, 5, delta_shift=-3.0, seed=2)
    feeds = {name: t.numpy() for name, t in zip(SCAN_NAMES, args, strict=True)}
    (y,) = ReferenceEvaluator(proto).run(None, feeds)
    assert rel_l2(torch.from_numpy(y), selective_scan_reference(*args)) <= 1e-5


def test_portable_softplus_is_accurate():
    """The Softplus-free softplus of the ONNX function against float64, from -80 to 80 and around 0."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from vmamba_export.lowering.onnx_portable_scan import _Builder

    g = _Builder()
    out = g.softplus("x")
    g.nodes.append(helper.make_node("Identity", [out], ["y"]))
    graph = helper.make_graph(
        g.nodes,
        "softplus",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    x = np.concatenate([np.linspace(-80, 80, 100001), np.logspace(-9, 1, 2001), -np.logspace(-9, 1, 2001)])
    x = x.astype(np.float32)
    (y,) = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})
    want = np.logaddexp(0.0, x.astype(np.float64))
    assert np.max(np.abs(y - want) / want) <= 1e-6


@pytest.mark.parametrize("case", [(2, 3, 1, 33, 47, 10.0), (2, 3, 16, 37, 19, -10.0)], ids=["n1", "n16"])
def test_portable_onnx_function_rebuilding_decays_matches_reference(case):
    import onnxruntime as ort

    args = scan_inputs(*case)
    proto = portable_scan_model(case[2], 64 * 64, 16, keep_decays=False)
    feeds = {name: t.numpy() for name, t in zip(SCAN_NAMES, args, strict=True)}
    (y,) = ort.InferenceSession(proto.SerializeToString()).run(None, feeds)
    assert rel_l2(torch.from_numpy(y), selective_scan_reference(*args)) <= 1e-5
