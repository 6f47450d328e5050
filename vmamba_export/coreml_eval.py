"""A numpy evaluator for the MIL programs the `apple-coreml` lowering writes: a numeric check of a `.mlpackage` on
machines where Core ML cannot run (coremltools predicts only on macOS).

It reads the saved package (not the in-memory conversion result): the spec's `mlProgram` with its weight blob,
turned into a MIL program by coremltools' own proto loader, then executes the main function op by op. Only the ops
our programs contain are implemented, each from the MIL op definition (coremltools.converters.mil.mil.ops.defs);
any other op raises `UnsupportedMILOpError` naming it, so a check can never pass by skipping work.

Precision: every op's result is rounded to the dtype the program declares for it. An fp16 program therefore stores
every intermediate in float16, as Core ML does; inside one op the arithmetic runs in float32 (numpy's float16 ufuncs
do the same, and the GPU and Neural Engine accumulate matmuls, convolutions and reductions in float32). What this
cannot show: Core ML's own kernels, op fusions and device placement. It checks that the program the converter wrote
computes the model; a Mac is still needed to check Core ML runs it the same way.

    python -m vmamba_export.coreml_eval path/to/model.mlpackage   # op counts and a run on random input
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np

from .errors import VMambaExportError
from .lowering.coreml import mil_op_counts


class UnsupportedMILOpError(VMambaExportError):
    """The program holds an op this evaluator does not implement."""


def load_program(path: str | Path):
    """The MIL program stored in a saved `.mlpackage` (weights read from its blob file)."""
    from .lowering.coreml import import_coremltools
    from .lowering.quiet import quiet_toolchain

    ct = import_coremltools()
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    path = Path(path)
    if not path.exists():
        raise VMambaExportError(f"no Core ML package at {path}")
    with quiet_toolchain("coremltools"):
        model = ct.models.MLModel(str(path), skip_model_load=True)
        spec = model.get_spec()
        if spec.WhichOneof("Type") != "mlProgram":
            raise VMambaExportError(f"{path} is not an ML Program (found {spec.WhichOneof('Type')})")
        return milproto_load(spec, spec.specificationVersion, model.weights_dir)


def _np_dtype(builtin) -> np.dtype:
    from coremltools.converters.mil.mil import types

    return np.dtype(types.nptype_from_builtin(builtin))


def _f32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) if x.dtype in (np.float16, np.float64) else x


# ---------------------------------------------------------------------------------------------------- op kernels
# Each takes the op's inputs by name (numpy arrays, Python values for string/bool params, None when absent) and
# returns its output(s), later rounded to the declared output dtype.


def _axes(axes, rank: int) -> tuple[int, ...]:
    return tuple(int(a) % rank for a in np.atleast_1d(axes))


def _conv(x, weight, bias=None, strides=None, pad_type="valid", pad=None, dilations=None, groups=1):
    x, weight = _f32(x), _f32(weight)
    n, c, h, w = x.shape
    o, cg, kh, kw = weight.shape
    sh, sw = (int(s) for s in (strides if strides is not None else (1, 1)))
    dh, dw = (int(d) for d in (dilations if dilations is not None else (1, 1)))
    groups = int(groups)
    if pad_type == "custom":
        top, bottom, left, right = (int(p) for p in pad)
    elif pad_type == "valid":
        top = bottom = left = right = 0
    elif pad_type == "same":
        eh, ew = (kh - 1) * dh + 1, (kw - 1) * dw + 1
        ph = max((math.ceil(h / sh) - 1) * sh + eh - h, 0)
        pw = max((math.ceil(w / sw) - 1) * sw + ew - w, 0)
        top, bottom, left, right = ph // 2, ph - ph // 2, pw // 2, pw - pw // 2
    else:
        raise UnsupportedMILOpError(f"conv pad_type {pad_type!r} is not implemented")
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    eh, ew = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    win = np.lib.stride_tricks.sliding_window_view(xp, (eh, ew), axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]
    ho, wo = win.shape[2], win.shape[3]
    win = win.reshape(n, groups, c // groups, ho, wo, kh, kw)
    wg = weight.reshape(groups, o // groups, cg, kh, kw)
    if kh == kw == 1:
        out = np.einsum("ngchw,goc->ngohw", win[..., 0, 0], wg[..., 0, 0], optimize=True)
    else:
        out = np.einsum("ngchwij,gocij->ngohw", win, wg, optimize=True)
    out = out.reshape(n, o, ho, wo)
    return out if bias is None else out + _f32(bias).reshape(1, o, 1, 1)


def _layer_norm(x, axes=None, gamma=None, beta=None, epsilon=1e-5):
    x = _f32(x)
    ax = _axes(axes, x.ndim) if axes is not None else tuple(range(x.ndim))
    mean = x.mean(axis=ax, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=ax, keepdims=True)
    y = (x - mean) / np.sqrt(var + np.float32(epsilon))
    if gamma is not None:
        y = y * _f32(gamma)
    if beta is not None:
        y = y + _f32(beta)
    return y


def _erf(x: np.ndarray) -> np.ndarray:
    try:
        from scipy.special import erf  # scipy comes with scikit-learn / scikit-image (requirements.txt)
    except ImportError:  # pragma: no cover
        return np.vectorize(math.erf, otypes=[np.float64])(x)
    return erf(x)


def _gelu(x, mode="EXACT"):
    x = _f32(x).astype(np.float64)
    if mode == "EXACT":
        return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x / (1 + np.exp(-1.702 * x))
    raise UnsupportedMILOpError(f"gelu mode {mode!r} is not implemented")


def _slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    rank = x.ndim
    stride = np.ones(rank, int) if stride is None else np.asarray(stride)
    begin_mask = np.zeros(rank, bool) if begin_mask is None else np.asarray(begin_mask)
    end_mask = np.zeros(rank, bool) if end_mask is None else np.asarray(end_mask)
    squeeze_mask = np.zeros(rank, bool) if squeeze_mask is None else np.asarray(squeeze_mask)
    index = []
    for i in range(rank):
        s = int(stride[i])
        b = None if begin_mask[i] else int(begin[i])
        e = None if end_mask[i] else int(end[i])
        if squeeze_mask[i]:
            index.append(int(begin[i]))
        else:
            index.append(slice(b, e, s))
    return x[tuple(index)]


def _pad(x, pad, mode="constant", constant_val=0.0):
    pad = [int(p) for p in np.asarray(pad).reshape(-1)]
    k = len(pad) // 2
    widths = [(0, 0)] * (x.ndim - k) + [(pad[2 * i], pad[2 * i + 1]) for i in range(k)]
    if mode == "constant":
        return np.pad(x, widths, mode="constant", constant_values=constant_val)
    return np.pad(x, widths, mode={"reflect": "reflect", "replicate": "edge"}[mode])


def _cumsum(x, axis=0, exclusive=False, reverse=False):
    x = _f32(x)
    axis = int(axis) % x.ndim
    if reverse:
        x = np.flip(x, axis)
    out = np.cumsum(x, axis=axis, dtype=np.float32)
    if exclusive:
        head = np.zeros_like(np.take(out, [0], axis=axis))
        out = np.concatenate([head, np.take(out, range(out.shape[axis] - 1), axis=axis)], axis=axis)
    return np.flip(out, axis) if reverse else out


def _matmul(x, y, transpose_x=False, transpose_y=False):
    x, y = _f32(x), _f32(y)
    if transpose_x:
        x = np.swapaxes(x, -1, -2)
    if transpose_y:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


def _reduce(fn):
    def kernel(x, axes=None, keep_dims=False):
        x = _f32(x)
        ax = None if axes is None else _axes(axes, x.ndim)
        return fn(x, axis=ax, keepdims=bool(keep_dims))

    return kernel


def _per_axis(t, x, axis):
    """A scale / zero point broadcast along `axis` of `x` (a scalar, or a vector of x.shape[axis] values)."""
    t = np.asarray(t, np.float32)
    if t.size == 1:
        return t.reshape(())
    if axis is None or t.ndim != 1 or t.size != x.shape[int(axis)]:
        raise UnsupportedMILOpError(
            f"per-axis quantization parameter of shape {t.shape} does not fit input {x.shape} along axis {axis}"
        )
    shape = [1] * x.ndim
    shape[int(axis)] = -1
    return t.reshape(shape)


def _affine_dequantize(quantized_data, zero_point, scale, axis):
    """iOS16 constexpr: scale * (quantized_data - zero_point), each a scalar or a vector along `axis`."""
    q = quantized_data.astype(np.float32)
    return (q - _per_axis(zero_point, q, axis)) * _per_axis(scale, q, axis)


def _blockwise_shift_scale(data, scale, offset=None):
    """iOS18 constexpr: (data - offset) * scale, scale/offset broadcast block-wise along every axis."""
    d = data.astype(np.float32)
    for name, t in (("offset", offset), ("scale", scale)):
        if t is None:
            continue
        t = np.asarray(t, np.float32)
        for ax in range(d.ndim):
            t = np.repeat(t, d.shape[ax] // t.shape[ax], axis=ax)
        d = d - t if name == "offset" else d * t
    return d


_INT_RANGES = {"int8": (-128, 127, np.int8), "uint8": (0, 255, np.uint8)}


def _quantize(input, scale, zero_point=None, axis=None, output_dtype="uint8"):
    """iOS17 quantize: clip(round(input / scale) + zero_point) into int8 / uint8.

    round() is round-half-to-even (numpy's rint), as torch's quantize_per_tensor and the IEEE default; the clip
    saturates, so an input beyond the calibrated range maps to -128 / 127 (0 / 255) rather than wrapping."""
    if output_dtype not in _INT_RANGES:
        raise UnsupportedMILOpError(f"quantize output_dtype {output_dtype!r} is not implemented")
    lo, hi, dtype = _INT_RANGES[output_dtype]
    x = _f32(input)
    q = np.rint(x / _per_axis(scale, x, axis))
    if zero_point is not None:
        q = q + _per_axis(zero_point, x, axis)
    return np.clip(q, lo, hi).astype(dtype)


def _dequantize(input, scale, zero_point=None, axis=None):
    """iOS17 dequantize: scale * (input - zero_point), in float32 before the declared output dtype."""
    q = input.astype(np.float32)
    if zero_point is not None:
        q = q - _per_axis(zero_point, q, axis)
    return q * _per_axis(scale, q, axis)


def _binary(fn):
    return lambda x, y: fn(_f32(np.asarray(x)), _f32(np.asarray(y)))


def _unary(fn):
    return lambda x, **_: fn(_f32(x))


KERNELS = {
    "add": _binary(np.add),
    "sub": _binary(np.subtract),
    "mul": _binary(np.multiply),
    "real_div": _binary(np.divide),
    "maximum": _binary(np.maximum),
    "minimum": _binary(np.minimum),
    "pow": _binary(np.power),
    "exp": _unary(np.exp),
    "sqrt": _unary(np.sqrt),
    "rsqrt": lambda x, epsilon=1e-12: 1.0 / np.sqrt(_f32(x) + np.float32(epsilon)),
    "tanh": _unary(np.tanh),
    "sigmoid": _unary(lambda x: 1.0 / (1.0 + np.exp(-x))),
    "silu": _unary(lambda x: x / (1.0 + np.exp(-x))),
    "relu": _unary(lambda x: np.maximum(x, 0)),
    "softplus": _unary(lambda x: np.logaddexp(np.float32(0), x)),
    "gelu": _gelu,
    "conv": _conv,
    "linear": lambda x, weight, bias=None: _f32(x) @ _f32(weight).T + (0 if bias is None else _f32(bias)),
    "matmul": _matmul,
    "layer_norm": _layer_norm,
    "reduce_sum": _reduce(np.sum),
    "reduce_mean": _reduce(np.mean),
    "reduce_max": _reduce(np.max),
    "cumsum": _cumsum,
    "reshape": lambda x, shape: x.reshape([int(s) for s in shape]),
    "transpose": lambda x, perm: np.transpose(x, [int(p) for p in perm]),
    "expand_dims": lambda x, axes: np.expand_dims(x, _axes(axes, x.ndim + len(np.atleast_1d(axes)))),
    "squeeze": lambda x, axes=None: np.squeeze(x, None if axes is None else _axes(axes, x.ndim)),
    "reverse": lambda x, axes=None: np.flip(x, None if axes is None else _axes(axes, x.ndim)),
    "stack": lambda values, axis: np.stack(values, axis=int(axis)),
    "concat": lambda values, axis, interleave=False: _concat(values, int(axis), bool(interleave)),
    "tile": lambda x, reps: np.tile(x, [int(r) for r in reps]),
    "slice_by_index": _slice_by_index,
    "slice_by_size": lambda x, begin, size: x[
        tuple(slice(int(b), None if int(s) == -1 else int(b) + int(s)) for b, s in zip(begin, size))
    ],
    "pad": _pad,
    "split": lambda x, num_splits=None, split_sizes=None, axis=0: _split(x, num_splits, split_sizes, int(axis)),
    "cast": lambda x, dtype: x,  # the declared output dtype does the conversion
    "identity": lambda x: x,
    "constexpr_affine_dequantize": _affine_dequantize,
    "constexpr_blockwise_shift_scale": _blockwise_shift_scale,
    "quantize": _quantize,
    "dequantize": _dequantize,
}


def _concat(values, axis, interleave):
    if interleave:
        raise UnsupportedMILOpError("concat with interleave=True is not implemented")
    return np.concatenate(values, axis=axis)


def _split(x, num_splits, split_sizes, axis):
    if split_sizes is not None:
        bounds = np.cumsum([int(s) for s in split_sizes])[:-1]
        return tuple(np.split(x, bounds, axis=axis))
    return tuple(np.split(x, int(num_splits), axis=axis))


# ---------------------------------------------------------------------------------------------------- evaluator


class MILEvaluator:
    """Executes the main function of a saved ML Program with numpy. `__call__(array) -> logits`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.program = load_program(self.path)
        self.function = self.program.functions["main"]
        self.op_counts = mil_op_counts(self.program)
        unknown = sorted(t for t in self.op_counts if t != "const" and t not in KERNELS)
        if unknown:
            raise UnsupportedMILOpError(
                f"{self.path}: MIL ops with no numpy implementation: {', '.join(unknown)} "
                "(vmamba_export/coreml_eval.py KERNELS)"
            )
        self.input_names = list(self.function.inputs)
        self.input_shapes = {name: tuple(var.shape) for name, var in self.function.inputs.items()}
        self.output_names = [v.name for v in self.function.outputs]
        self.dtypes = Counter(str(_np_dtype(op.outputs[0].dtype)) for op in self.function.operations if op.outputs)
        # Values no later op reads are dropped as the run goes: a 224x224 program's intermediates (segsum tiles of
        # hundreds of MB) would not all fit in memory at once.
        self._dead_after = self._liveness()

    def _liveness(self) -> list[list[str]]:
        last_use: dict[str, int] = {}
        for i, op in enumerate(self.function.operations):
            for var in op.inputs.values():
                for v in var if isinstance(var, (list, tuple)) else (var,):
                    last_use[v.name] = i
        keep = set(self.output_names)
        dead: list[list[str]] = [[] for _ in self.function.operations]
        for name, i in last_use.items():
            if name not in keep:
                dead[i].append(name)
        return dead

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        env: dict[str, object] = {}
        for name, var in self.function.inputs.items():
            if name not in inputs:
                raise VMambaExportError(f"missing input {name!r}")
            value = np.asarray(inputs[name])
            if tuple(value.shape) != tuple(var.shape):
                raise VMambaExportError(f"input {name!r} must have shape {tuple(var.shape)}, got {value.shape}")
            env[name] = value.astype(_np_dtype(var.dtype))
        for op, dead in zip(self.function.operations, self._dead_after):
            self._execute(op, env)
            for name in dead:
                env.pop(name, None)
        return {v.name: np.asarray(env[v.name]) for v in self.function.outputs}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run({self.input_names[0]: x})[self.output_names[0]].astype(np.float32)

    @staticmethod
    def _value(var, env):
        if var.name in env:
            return env[var.name]
        if var.val is not None:  # constants (and values coremltools folded at load)
            val = var.val
            return val.item() if isinstance(val, np.ndarray) and val.dtype.kind in "USO" else val
        raise VMambaExportError(f"MIL variable {var.name!r} used before it is computed")

    def _execute(self, op, env) -> None:
        if op.op_type == "const":
            env[op.outputs[0].name] = self._value(op.outputs[0], env)
            return
        kernel = KERNELS.get(op.op_type)
        if kernel is None or op.blocks:
            raise UnsupportedMILOpError(f"MIL op {op.op_type!r} ({op.name}) has no numpy implementation")
        args = {}
        for name, var in op.inputs.items():
            if isinstance(var, (list, tuple)):
                args[name] = [self._value(v, env) for v in var]
            else:
                args[name] = self._value(var, env)
        try:
            result = kernel(**args)
        except TypeError as exc:  # an input name this kernel does not know: refuse rather than guess
            raise UnsupportedMILOpError(
                f"MIL op {op.op_type!r} ({op.name}) with inputs {sorted(args)}: {exc}"
            ) from None
        results = result if isinstance(result, tuple) else (result,)
        if len(results) != len(op.outputs):
            raise VMambaExportError(f"MIL op {op.op_type!r} ({op.name}) gave {len(results)} outputs")
        for var, value in zip(op.outputs, results):
            value = np.asarray(value).astype(_np_dtype(var.dtype), copy=False)
            if var.shape and all(isinstance(s, int) for s in var.shape) and tuple(value.shape) != tuple(var.shape):
                raise VMambaExportError(
                    f"MIL op {op.op_type!r} ({op.name}) produced shape {value.shape}, program says {tuple(var.shape)}"
                )
            env[var.name] = value


def package_bytes(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package")
    args = parser.parse_args(argv)
    evaluator = MILEvaluator(args.package)
    print(f"{args.package}: {package_bytes(args.package) / 1e6:.2f} MB")
    print("ops:", dict(sorted(evaluator.op_counts.items())))
    print("output dtypes:", dict(evaluator.dtypes))
    shape = evaluator.input_shapes[evaluator.input_names[0]]
    out = evaluator(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    print("output on random input:", out.shape, "finite:", bool(np.isfinite(out).all()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
