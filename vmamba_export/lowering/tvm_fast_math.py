"""GELU and sigmoid as polynomial expressions in the cpu-tvm graph.

Why: TVM 0.27's LLVM backend lowers `erf` and `exp` to one libm call per element (no vector form), so the GELUs of
the MLPs and the SiLU gates ran as scalar loops: in a tuned vmamba_tiny_s1l8 the four stages' GELU passes took
~14 ms of ~65 (`benchmarks/tvm_profile.py`), 30x the same pass with a polynomial erf. `relax.nn.gelu` and
`relax.sigmoid` are replaced, before legalization, by TE functions on TVM's own `fast_erf` (rational approximation,
max abs error ~1.5e-6 in GELU) and `fast_exp` (polynomial, a few ulp), which vectorise; FuseOps then fuses them with
their neighbours as it did the originals. GPU targets keep the intrinsics (CUDA's erff/expf are vector code already).
"""

from __future__ import annotations

import tvm
from tvm import relax, topi

_INV_SQRT2 = 0.7071067811865476


def _gelu(x):
    return x * (0.5 + 0.5 * topi.fast_erf(x * _INV_SQRT2))


def _sigmoid(x):
    return 1.0 / (1.0 + topi.fast_exp(0.0 - x))


_REPLACEMENTS = {"relax.nn.gelu": (_gelu, "gelu_fast_erf"), "relax.sigmoid": (_sigmoid, "sigmoid_fast_exp")}


@relax.expr_functor.mutator
class _PolynomialActivations(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.source = mod
        self.replaced: dict[str, int] = {}

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op) and call.op.name in _REPLACEMENTS:
            if call.ty.dtype == "float32":
                fn, name = _REPLACEMENTS[call.op.name]
                self.replaced[call.op.name] = self.replaced.get(call.op.name, 0) + 1
                return self.builder_.call_te(fn, call.args[0], primfunc_name_hint=name)
        return call

    def run(self) -> tvm.IRModule:
        for gvar, func in self.source.functions_items():
            if isinstance(func, relax.Function):
                self.builder_.update_func(gvar, self.visit_expr(func))
        return self.builder_.get()


def polynomial_activations(mod: tvm.IRModule) -> tuple[tvm.IRModule, dict[str, int]]:
    """`mod` with every float32 GELU and sigmoid as a vectorisable polynomial; also the count replaced per op."""
    mutator = _PolynomialActivations(mod)
    return mutator.run(), dict(mutator.replaced)
