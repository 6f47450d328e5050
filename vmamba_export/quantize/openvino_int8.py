"""Static int8 quantization of the cpu-openvino model with NNCF (`nncf.quantize` on the OpenVINO model).

Input: the fp32 ONNX export holding one `ai.vmamba::SelectiveScan2D` node per block. The same preparation as the ONNX
Runtime path (onnxruntime_int8.prepare_model: weight-reshaping nodes folded, every Conv/MatMul/Gemm renamed after its
module, `layers.0.blocks.0.mlp.fc1`) runs first, so OpenVINO's ops carry the module names (a Convolution with a bias
becomes `<name>/WithoutBiases` + Add): `--exclude`, the manifest and the report use the same names on both backends.

What NNCF quantizes: the inputs and weights of Convolution, GroupConvolution (the depthwise conv) and MatMul, as
FakeQuantize on activations (per tensor) and int8 weights (per output channel, stored as i8 constants); the CPU
plugin turns FakeQuantize + Convolution into int8 kernels (VNNI/AMX). What stays float, through one
`nncf.IgnoredScope`: every `SelectiveScan2D` op (by type), the projections feeding it (x_proj.dt/B/C, dt_projs: why in
onnxruntime_int8.py), the layers `--exclude` names, and, in accuracy-aware mode, the layers kept for the budget.

Settings (measured on the bundled digits models and vmamba_tiny_s1l8, docs/int8.md): model_type TRANSFORMER (fewer
FakeQuantize ops than the CNN default: no quantizers on the residual Adds), SmoothQuant off (NNCF's default alpha
0.95 on the classifier MatMul took s1l8's cosine from 0.997 to 0.96), fast bias correction.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import TargetUnavailableError
from .accuracy import (
    QuantizationError,
    accuracy_record,
    activation_rounding_error,
    keep_float_until_within_budget,
    labelled_batch,
    top1,
    weight_rounding_error,
)

NNCF_INSTALL_HINT = "pip install nncf==3.4.*"
SCAN_OP_TYPE = "SelectiveScan2D"
WEIGHTED_TYPES = ("Convolution", "GroupConvolution", "MatMul")
# Ops that move data without computing: walking through them finds what really produces (or quantizes) a tensor.
SHAPE_TYPES = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Concat", "Split", "VariadicSplit", "Gather"}
# How NNCF stores an int8 weight in the model it returns: i8 Constant -> Convert -> (Subtract) -> Multiply.
WEIGHT_PATH_TYPES = SHAPE_TYPES | {"Convert", "Subtract", "Multiply", "FakeQuantize"}
BIAS_SUFFIX = "/WithoutBiases"  # OpenVINO's ONNX frontend splits Conv/Gemm bias into an Add

BIAS_CORRECTIONS = ("fast", "full", "none")
DEFAULT_BIAS_CORRECTION = "fast"
DEFAULT_SMOOTH_QUANT: float | None = None  # off; `--smooth-quant ALPHA` turns it on for Convolution and MatMul
# --calib-method -> NNCF range estimator. NNCF has no entropy (KL divergence) estimator.
UNSUPPORTED_METHODS = {
    "entropy": "NNCF has no entropy (KL-divergence) calibration; use --calib-method minmax or percentile",
}
PERCENTILE_OUTLIER_PROB = 1e-5  # the 99.999th percentile, as onnxruntime's Percentile method


def import_nncf():
    """The nncf module, or TargetUnavailableError with the install command."""
    try:
        import nncf
    except ImportError:
        raise TargetUnavailableError(f"cpu-openvino int8 needs NNCF: {NNCF_INSTALL_HINT}") from None
    return nncf


def layer_of(friendly_name: str) -> str:
    """The module name of a weighted op (`layers.0.blocks.0.mlp.fc1/WithoutBiases` -> `layers.0.blocks.0.mlp.fc1`)."""
    return friendly_name[: -len(BIAS_SUFFIX)] if friendly_name.endswith(BIAS_SUFFIX) else friendly_name


def weighted_ops(model) -> dict[str, object]:
    """layer name -> its Convolution / GroupConvolution / MatMul op, in the model's topological order."""
    return {
        layer_of(op.get_friendly_name()): op for op in model.get_ordered_ops() if op.get_type_name() in WEIGHTED_TYPES
    }


def _producer(port_source, through: set[str]):
    node = port_source.get_node()
    while node.get_type_name() in through and node.get_input_size() > 0:
        node = node.input(0).get_source_output().get_node()
    return node


def _weight_is_int8(op) -> bool:
    """Whether the weight input of `op` comes from an int8 constant or a FakeQuantize (NNCF's two weight forms)."""
    node = op.input(1).get_source_output().get_node()
    while node.get_type_name() in WEIGHT_PATH_TYPES and node.get_input_size() > 0:
        if node.get_type_name() == "FakeQuantize":
            return True
        node = node.input(0).get_source_output().get_node()
    return node.get_type_name() == "Constant" and node.get_element_type().get_type_name() in ("i8", "u8")


def quantized_layers(model, layers: list[str]) -> list[str]:
    """Layers of `layers` that run in int8: activation input from a FakeQuantize (through shape ops) and an int8
    weight. A layer with only one of the two is not counted (the CPU plugin would run it in float)."""
    ops = weighted_ops(model)
    found = set()
    for name, op in ops.items():
        act = _producer(op.input(0).get_source_output(), SHAPE_TYPES)
        if act.get_type_name() == "FakeQuantize" and _weight_is_int8(op):
            found.add(name)
    return [name for name in layers if name in found]


def int8_kernels(model, layers: list[str]) -> list[str]:
    """Layers of `layers` that the CPU plugin of this machine compiles to int8 kernels (runtime precision u8/i8).

    NNCF may quantize a layer the plugin then runs in float on dequantized values (seen: v0's depthwise conv with a
    bias); the manifest lists both, so a reader sees which layers are int8 in the IR and which really run int8."""
    found = set()
    for op in compile_f32(model).get_runtime_model().get_ops():
        info = op.get_rt_info()
        if info["runtimePrecision"].astype(str) in ("u8", "i8") and info["layerType"].astype(str) in (
            "Convolution",
            "FullyConnected",
            "MatMul",
            "Deconvolution",
        ):
            found.update(layer_of(n) for n in info["originalLayersNames"].astype(str).split(","))
    return [name for name in layers if name in found]


def scan_inputs_quantized(model) -> list[str]:
    """Scan-op inputs that are not float32 or are produced by a FakeQuantize (must be empty: the scan stays float)."""
    bad = []
    for op in model.get_ops():
        if op.get_type_name() != SCAN_OP_TYPE:
            continue
        for k, port in enumerate(op.inputs()):
            src = _producer(port.get_source_output(), SHAPE_TYPES)
            if port.get_element_type().get_type_name() != "f32" or src.get_type_name() == "FakeQuantize":
                bad.append(f"{op.get_friendly_name()}:{k}")
    return bad


def _range_estimator(method: str):
    from nncf.quantization.range_estimator import (
        AggregatorType,
        RangeEstimatorParameters,
        RangeEstimatorParametersSet,
        StatisticsCollectorParameters,
        StatisticsType,
    )

    if method in UNSUPPORTED_METHODS:
        raise QuantizationError(f"--calib-method {method}: {UNSUPPORTED_METHODS[method]} (target cpu-openvino)")
    if method == "minmax":  # global min and max over every calibration image, as onnxruntime's MinMax
        return RangeEstimatorParametersSet.MINMAX
    if method == "percentile":  # per-image 0.001% / 99.999% quantiles, averaged over the images
        quantile = dict(statistics_type=StatisticsType.QUANTILE, aggregator_type=AggregatorType.MEAN)
        return RangeEstimatorParameters(
            min=StatisticsCollectorParameters(**quantile, quantile_outlier_prob=PERCENTILE_OUTLIER_PROB),
            max=StatisticsCollectorParameters(**quantile, quantile_outlier_prob=PERCENTILE_OUTLIER_PROB),
        )
    known = ", ".join(["minmax", "percentile"])
    raise QuantizationError(f"unknown calibration method {method!r} for cpu-openvino; expected one of {known}")


def nncf_settings(options) -> dict:
    """The NNCF settings an ExportOptions asks for (checked), as recorded in the manifest."""
    method = options.calib_method
    _range_estimator(method)  # fail on a method NNCF lacks before any work
    bias = options.extra.get("bias_correction") or DEFAULT_BIAS_CORRECTION
    if bias not in BIAS_CORRECTIONS:
        raise QuantizationError(f"--bias-correction {bias!r}: expected one of {', '.join(BIAS_CORRECTIONS)}")
    alpha = options.extra.get("smooth_quant", DEFAULT_SMOOTH_QUANT)
    if alpha is not None and not 0.0 <= float(alpha) <= 1.0:
        raise QuantizationError(f"--smooth-quant {alpha}: the SmoothQuant alpha must be within 0..1")
    return {
        "model_type": "transformer",
        "preset": "mixed (weights symmetric int8 per channel, activations asymmetric uint8 per tensor)",
        "range_estimator": method,
        "smooth_quant_alpha": None if alpha is None else float(alpha),
        "bias_correction": bias,
    }


@contextlib.contextmanager
def _quiet_nncf(show_progress: bool) -> Iterator[None]:
    """NNCF logs a line per ignored node and draws its progress bars on stdout: keep stdout ours (--json) by sending
    the bars to stderr when progress is wanted, nowhere otherwise; warnings and INFO lines go."""
    logger = logging.getLogger("nncf")
    level = logger.level
    logger.setLevel(logging.ERROR)
    target = sys.stderr if show_progress and sys.stderr.isatty() else io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(target):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


# Op types ignored for dense (backbone, segmentation) models besides the scan. UPerHead concatenates maps of
# different origins (a LayerNorm2d output with ReLU outputs, the pyramid pooling's and the FPN's); NNCF puts one
# unified-scale quantizer group across a Concat's inputs and fails when their configs differ ("QConfigs for unified
# scale group ... are not equal", NNCF 3.x). Ignoring the Concats quantizes the convolution after each on its own.
DENSE_IGNORED_TYPES = ("Concat",)
# Op types kept float in every model: LayerNorm2d's NormalizeL2 (models/vmamba.py, channel_axis_norm). Its earlier
# mean/variance form was never quantized by NNCF; around NormalizeL2 NNCF placed quantizers, and the bundled digits
# model's int8 rel L2 went from 0.0091 to 0.0152. Ignored, it is 0.0091 again.
FLOAT_OP_TYPES = ("NormalizeL2",)


def quantize_model(
    model,
    batch: np.ndarray,
    float_layers: list[str],
    settings: dict,
    show_progress: bool = False,
    ignored_types: tuple[str, ...] = (),
):
    """`nncf.quantize` of the fp32 OpenVINO `model` on the calibration images `batch` (one image per sample), with
    the scan ops, the FLOAT_OP_TYPES, `float_layers` and the ops of `ignored_types` ignored. Returns the quantized
    ov.Model (the input model is left as it was)."""
    nncf = import_nncf()
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    ops = weighted_ops(model)
    missing = [name for name in float_layers if name not in ops]
    if missing:
        raise QuantizationError(f"internal: float layers not in the OpenVINO model: {', '.join(missing[:3])}")
    alpha = settings["smooth_quant_alpha"]
    smooth = AdvancedSmoothQuantParameters(
        convolution=-1 if alpha is None else alpha, matmul=-1 if alpha is None else alpha
    )
    advanced = AdvancedQuantizationParameters(
        smooth_quant_alphas=smooth,
        disable_bias_correction=settings["bias_correction"] == "none",
        activations_range_estimator_params=_range_estimator(settings["range_estimator"]),
    )
    # validate=False: the names were checked against the model above, and a model without scan ops (the ConvNeXt peer
    # of the benchmarks) must not fail on the scan type.
    ignored = nncf.IgnoredScope(
        types=[SCAN_OP_TYPE, *FLOAT_OP_TYPES, *ignored_types],
        names=[ops[name].get_friendly_name() for name in float_layers],
        validate=False,
    )
    # One image per sample: NNCF's per-sample statistics (and bias correction) assume batch 1.
    dataset = nncf.Dataset([np.ascontiguousarray(batch[i : i + 1]) for i in range(len(batch))])
    try:
        with _quiet_nncf(show_progress):
            return nncf.quantize(
                model,
                dataset,
                preset=nncf.QuantizationPreset.MIXED,
                model_type=nncf.ModelType.TRANSFORMER,
                subset_size=len(batch),
                fast_bias_correction=settings["bias_correction"] != "full",
                ignored_scope=ignored,
                advanced_parameters=advanced,
            )
    except nncf.errors.ValidationError as exc:  # e.g. an ignored name NNCF cannot find
        raise QuantizationError(f"NNCF refused the ignored scope: {exc}") from None


def compile_f32(model, threads: int | None = None):
    """An ov.CompiledModel of an in-memory model for the CPU, everything not quantized in f32 (not the bf16 default)."""
    import openvino as ov

    from ..runtime.openvino_backend import compile_config

    return ov.Core().compile_model(model, "CPU", compile_config("f32", threads))


def model_top1(model, batch: np.ndarray, labels: np.ndarray) -> float:
    compiled = compile_f32(model)
    return top1(lambda x: compiled(x)[0], batch, labels)


def layer_sensitivity(model, batch: np.ndarray, candidates: list[str]) -> dict[str, float]:
    """First-order relative output error each layer adds when quantized alone (the same measure as the ONNX Runtime
    path): uint8 rounding of its input and output over their min..max on `batch`, plus per-channel int8 rounding of
    its weight. The fp32 model runs one image at a time, twice (ranges, then errors), so memory holds one image's
    activations."""
    ops = weighted_ops(model)
    probe = model.clone()
    probe_ops = weighted_ops(probe)
    # One extra output per distinct tensor (a layer's output is often the next layer's input).
    slots: dict[tuple[str, int], int] = {}
    outputs = []
    where: dict[tuple[str, str], int] = {}
    for name in candidates:
        op = probe_ops[name]
        for side, port in (("in", op.input(0).get_source_output()), ("out", op.output(0))):
            key = (port.get_node().get_friendly_name(), port.get_index())
            if key not in slots:
                slots[key] = len(outputs)
                outputs.append(port)
            where[(name, side)] = slots[key]
    first = len(probe.outputs)
    probe.add_outputs(outputs)
    if len(probe.outputs) != first + len(outputs):  # add_outputs appends in order, one per port
        raise QuantizationError("internal: could not expose the layers' activations for the sensitivity ranking")
    compiled = compile_f32(probe)

    def run(image: np.ndarray) -> list[np.ndarray]:
        result = compiled(image)
        return [result[compiled.outputs[first + k]] for k in range(len(outputs))]

    lows = np.full(len(outputs), np.inf)
    highs = np.full(len(outputs), -np.inf)
    images = [batch[i : i + 1] for i in range(len(batch))]
    for image in images:
        for k, value in enumerate(run(image)):
            lows[k], highs[k] = min(lows[k], float(value.min())), max(highs[k], float(value.max()))
    err2 = np.zeros(len(outputs))
    ref2 = np.zeros(len(outputs))
    for image in images:
        for k, value in enumerate(run(image)):
            rel = activation_rounding_error(value, lows[k], highs[k])
            norm2 = float(np.square(value.astype(np.float64)).sum())
            err2[k] += rel * rel * norm2
            ref2[k] += norm2
    act_err = {key: float(np.sqrt(err2[k] / max(ref2[k], 1e-30))) for key, k in where.items()}
    scores = {}
    for name in candidates:
        scores[name] = act_err[(name, "in")] + _weight_error(ops[name]) + act_err[(name, "out")]
    return scores


def _weight_error(op) -> float:
    node = op.input(1).get_source_output().get_node()
    while node.get_type_name() in SHAPE_TYPES | {"Convert"} and node.get_input_size() > 0:
        node = node.input(0).get_source_output().get_node()
    if node.get_type_name() != "Constant":
        return 0.0
    w = node.get_data().astype(np.float64)
    if op.get_type_name() == "GroupConvolution":  # (groups, out/groups, in/groups, kh, kw)
        flat = w.reshape(w.shape[0] * w.shape[1], -1)
    elif op.get_type_name() == "MatMul":
        flat = w.reshape(-1, w.shape[-1]) if op.get_attributes().get("transpose_b") else w.reshape(-1, w.shape[-1]).T
    else:  # Convolution: (out, in, kh, kw)
        flat = w.reshape(w.shape[0], -1)
    return weight_rounding_error(flat)


def quantize_openvino_int8(
    fp32_onnx: Path,
    library: Path,
    input_spec,
    options,
    show_progress: bool = True,
    calib_batch: tuple[np.ndarray, list[str]] | None = None,
    task: str = "classification",
):
    """Quantize the fp32 ONNX export at `fp32_onnx` for cpu-openvino as `options` (ExportOptions) asks. A dense
    `task` (backbone, segmentation) also leaves DENSE_IGNORED_TYPES unquantized and takes no accuracy options.

    Returns (quantized ov.Model, the manifest record `lowering.quantization`): tool and settings, method, calibration
    source and count, every quantized layer, the float layers and why, and, given an accuracy source, fp32 vs int8
    top-1. `calib_batch` (images, names): calibration images already loaded, so a caller can fail fast."""
    import openvino as ov

    from .calibration import load_calibration_batch
    from .onnxruntime_int8 import match_layers, prepare_model

    nncf = import_nncf()
    settings = nncf_settings(options)
    if options.max_drop is not None and not options.accuracy_source:
        raise QuantizationError("--max-drop needs --accuracy SOURCE (labelled images to measure the drop on)")
    batch, names = calib_batch or load_calibration_batch(
        options.calib, input_spec, options.calib_samples, show_progress
    )
    with tempfile.TemporaryDirectory(prefix="vmamba-ov-int8-") as tmp:
        prepared = prepare_model(Path(fp32_onnx), Path(tmp) / "prepared.onnx")
        fp32_model = ov.convert_model(str(prepared.path), extension=str(library))
    ops = weighted_ops(fp32_model)
    layers = [n for n in prepared.layers if n in ops] + [n for n in ops if n not in prepared.layers]
    excluded = match_layers(tuple(options.exclude), layers) if options.exclude else []

    float_layers = {name: "feeds the selective scan" for name in prepared.scan_feeders if name in ops}
    float_layers.update({name: "--exclude" for name in excluded if name not in float_layers})
    ignored_types = DENSE_IGNORED_TYPES if task != "classification" else ()
    if ignored_types and options.accuracy_source:
        raise QuantizationError(f"accuracy-aware int8 (top-1) does not apply to task {task}")
    int8_model = quantize_model(fp32_model, batch, list(float_layers), settings, show_progress, ignored_types)

    accuracy = None
    if options.accuracy_source:
        acc_batch, labels_arr = labelled_batch(options.accuracy_source, input_spec)
        fp32_top1 = model_top1(fp32_model, acc_batch, labels_arr)
        int8_top1 = model_top1(int8_model, acc_batch, labels_arr)
        trial: dict = {}

        def requantize(kept: list[str]) -> float:
            trial["model"] = quantize_model(fp32_model, batch, list(float_layers) + kept, settings, show_progress)
            return model_top1(trial["model"], acc_batch, labels_arr)

        int8_top1, kept, trials = keep_float_until_within_budget(
            fp32_top1,
            int8_top1,
            options.max_drop,
            [n for n in layers if n not in float_layers],
            lambda candidates: layer_sensitivity(fp32_model, batch[:16], candidates),
            requantize,
        )
        if kept:
            int8_model = trial["model"]
            float_layers.update({n: "accuracy budget" for n in kept})
        accuracy = accuracy_record(
            options.accuracy_source, labels_arr, fp32_top1, int8_top1, options.max_drop, kept, trials
        )
    bad = scan_inputs_quantized(int8_model)
    if bad:
        raise QuantizationError(f"internal: scan inputs were quantized ({', '.join(bad[:3])})")
    quantized = quantized_layers(int8_model, layers)
    record = {
        "tool": "nncf.quantize (OpenVINO)",
        "format": "openvino-fq",
        "quant_format": "FakeQuantize activations + int8 weights in the IR; the CPU plugin runs int8 kernels",
        "activation_type": "QUInt8",
        "weight_type": "QInt8",
        "per_channel": True,
        "method": options.calib_method,
        "nncf": {"version": nncf.__version__, **settings},
        "calibration": {"source": options.calib, "samples": len(names), "first": names[:3]},
        "quantized_layers": quantized,
        "int8_kernels_here": int8_kernels(int8_model, quantized),
        "float_layers": float_layers,
        "scan": "float: SelectiveScan2D (ignored by type) and the projections feeding it are not quantized",
        "ignored_types": list(ignored_types),
        "accuracy": accuracy,
    }
    return int8_model, record
