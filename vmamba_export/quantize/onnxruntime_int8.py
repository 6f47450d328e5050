"""Static int8 quantization of an fp32 ONNX export with onnxruntime.quantization.

What is quantized: Conv / MatMul / Gemm (every Linear of VMamba is exported as a 1x1 Conv), weights per output channel.
What stays float: the SelectiveScan2D node (custom op or its portable composite), and the projections whose outputs
feed the scan (x_proj, dt_projs): exp(dt * A) amplifies any rounding of delta, B and C along a sequence of thousands
of positions, and those projections are a small share of the FLOPs. Layers named by `--exclude` stay float too.

Steps:
1. prepare: fold the weight-reshaping nodes the exporter leaves (Unsqueeze/Split/Reshape of parameters) so the
   quantizer sees weights as initializers (otherwise it would quantize them per tensor as activations), and rename
   every quantizable node after the parameter it multiplies (`layers.0.blocks.0.mlp.fc1`), the names `--exclude`,
   the manifest and the report use.
2. calibrate once (minmax / percentile / entropy), in a session that loads our custom-op library (quantize_static
   builds its own session and cannot, FIELD-NOTES.md): CalibraterBase.create_inference_session is patched for the
   duration. The ranges go to a cache file so the accuracy-aware loop and format trials re-quantize without
   re-running calibration.
3. quantize_static with the cached ranges in the chosen format (QDQ or QOperator; u8 or s8 activations).
"""

from __future__ import annotations

import contextlib
import fnmatch
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .accuracy import (
    QuantizationError,
    accuracy_record,
    activation_rounding_error,
    keep_float_until_within_budget,
    labelled_batch,
    weight_rounding_error,
)

QUANTIZABLE_OPS = ("Conv", "MatMul", "Gemm")
# Ops that move or reshape data without computing: walking through them finds what really produces a tensor.
SHAPE_OPS = {"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Identity", "Flatten", "Split", "Slice", "Concat", "Cast"}
# Ops folded when all their inputs are constants (the exporter leaves these on parameters).
FOLDABLE_OPS = SHAPE_OPS | {"Constant"}
SCAN_OPS = {"SelectiveScan2D"}
SCAN_FEEDER_SUFFIXES = ("x_proj.dt", "x_proj.B", "x_proj.C", "dt_projs")

# name -> (quant format, activation type, weight type); measured on x86 in benchmarks/results/int8-onnxruntime.md.
FORMATS: dict[str, tuple[str, str, str]] = {
    "qdq-s8s8": ("QDQ", "QInt8", "QInt8"),
    "qdq-u8s8": ("QDQ", "QUInt8", "QInt8"),
    "qop-u8s8": ("QOperator", "QUInt8", "QInt8"),
    "qop-s8s8": ("QOperator", "QInt8", "QInt8"),
}
# Fastest correct format measured for ONNX Runtime on x86 (VNNI/AMX): QOperator u8s8 (QLinearConv); s8s8 QLinearConv
# was 2-4x slower than fp32 there. QOperator turns Gemm into com.microsoft QGemm, so a graph that must stay standard
# ONNX (onnx-portable, no custom-op library) uses QDQ u8s8, the next fastest.
DEFAULT_FORMAT = "qop-u8s8"
PORTABLE_FORMAT = "qdq-u8s8"

# VMamba's x_proj weight is split into (dt, B, C) projections: name the three 1x1 convs after what they produce.
SPLIT_NAMES = {"x_proj_weight": ("x_proj.dt", "x_proj.B", "x_proj.C")}


@dataclass
class PreparedModel:
    path: Path
    layers: list[str]  # every quantizable node, by layer name, in graph order
    scan_feeders: list[str]  # quantizable nodes whose output reaches a scan input through shape ops only
    input_name: str
    op_types: dict[str, str]  # layer name -> op type


# --------------------------------------------------------------------------------------------------- preparation


def _const_values(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {init.name: numpy_helper.to_array(init) for init in graph.initializer}


def _strip_param(name: str) -> str:
    for suffix in (".weight", "_weight"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _module_scope(node) -> str | None:
    """The torch module a node was traced in (`layers.0.blocks.0.mlp.fc1`), from the dynamo exporter's metadata."""
    import ast

    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            return scopes[-2] if isinstance(scopes, list) and len(scopes) >= 2 and scopes[-2] else None
    return None


def prepare_model(src: Path, dst: Path) -> PreparedModel:
    """Fold constant weight-reshaping nodes, rename quantizable nodes by layer, find the scan feeders; save `dst`."""
    import onnx
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    proto = onnx.load(str(src))
    graph = proto.graph
    consts = _const_values(graph)
    origin: dict[str, str] = {name: name for name in consts}  # tensor -> the parameter it was computed from
    kept_nodes = []
    for node in graph.node:
        inputs = [i for i in node.input if i]
        if node.op_type in FOLDABLE_OPS and all(i in consts for i in inputs) and node.domain in ("", "ai.onnx"):
            outs = ReferenceEvaluator(node).run(None, {i: consts[i] for i in inputs})
            source = origin.get(inputs[0]) if inputs else None
            for k, (name, value) in enumerate(zip(node.output, outs)):
                consts[name] = np.asarray(value)
                if source is not None:
                    base = _strip_param(source)
                    if node.op_type == "Split":
                        short = base.rsplit(".", 1)[-1]
                        parts = SPLIT_NAMES.get(source.rsplit(".", 1)[-1])
                        base = base[: -len(short)] + parts[k] if parts and k < len(parts) else f"{base}.{k}"
                    origin[name] = base
            continue
        kept_nodes.append(node)
    # Rebuild the initializer list: folded outputs become initializers, unused ones go.
    used = {i for n in kept_nodes for i in n.input} | {o.name for o in graph.output}
    new_inits = [numpy_helper.from_array(consts[name], name) for name in consts if name in used]
    del graph.node[:]
    graph.node.extend(kept_nodes)
    del graph.initializer[:]
    graph.initializer.extend(new_inits)

    producer = {o: n for n in graph.node for o in n.output}

    def real_producer(tensor: str):
        """The node computing `tensor`, looking through shape-only ops (first data input)."""
        node = producer.get(tensor)
        while node is not None and node.op_type in SHAPE_OPS and node.input:
            node = producer.get(node.input[0])
        return node

    # Name quantizable nodes after their weight's parameter; unnamed weights (folded by the exporter) after the layer
    # feeding them (dt_projs follows x_proj.dt).
    names: dict[int, str] = {}
    taken: set[str] = set()
    for node in graph.node:
        if node.op_type not in QUANTIZABLE_OPS or len(node.input) < 2:
            continue
        weight = node.input[1]
        base = _strip_param(origin.get(weight, weight))
        if "." not in base:
            feeder = real_producer(node.input[0])
            prev = names.get(id(feeder)) if feeder is not None else None
            module = _module_scope(node)
            if prev is not None and prev.endswith("x_proj.dt"):
                base = prev[: -len("x_proj.dt")] + "dt_projs"
            elif module and module not in taken:
                base = module  # the exporter folded the weight into an unnamed constant; its module path names it
            elif prev is not None:
                base = f"{prev.rsplit('.', 1)[0]}.{node.name or base}"
            else:
                base = node.name or base
        name, k = base, 2
        while name in taken:
            name, k = f"{base}#{k}", k + 1
        taken.add(name)
        names[id(node)] = name
        node.name = name
    # Node names must stay unique after renaming.
    seen: set[str] = set(taken)
    for i, node in enumerate(graph.node):
        if id(node) not in names and node.name in seen:
            node.name = f"{node.name}__{i}"
        seen.add(node.name)

    # Layers computing the scan's inputs, and (recursively) the layers feeding those: delta comes from
    # dt_projs(x_proj.dt(u)), so both stay float; the walk stops at any other op (the SiLU producing u).
    feeders: list[str] = []
    pending = [t for node in graph.node if node.op_type in SCAN_OPS for t in node.input]
    while pending:
        src_node = real_producer(pending.pop())
        if src_node is not None and id(src_node) in names and names[id(src_node)] not in feeders:
            feeders.append(names[id(src_node)])
            pending.append(src_node.input[0])
    feeders.extend(_portable_scan_feeders(graph, names, real_producer, feeders))
    layers = [names[id(n)] for n in graph.node if id(n) in names]
    op_types = {names[id(n)]: n.op_type for n in graph.node if id(n) in names}
    onnx.save_model(proto, str(dst))
    return PreparedModel(Path(dst), layers, feeders, graph.input[0].name, op_types)


def _portable_scan_feeders(graph, names: dict, real_producer, already: list[str]) -> list[str]:
    """In the portable lowering the scan is a composite of standard ops, not one node, so its feeders cannot be found
    by walking back from a scan node: take the layers producing delta, B and C by name (the same layers the
    custom-op lowering keeps float)."""
    suffixes = tuple(f".{s}" for s in SCAN_FEEDER_SUFFIXES)
    return [n for n in names.values() if n.endswith(suffixes) and n not in already]


def restore_float_scan_inputs(path: Path) -> int:
    """Point every scan input that reads a DequantizeLinear(QuantizeLinear(t)) round trip back at the float `t`.

    The QDQ quantizer inserts one Q/DQ pair per quantized tensor and hands its output to every consumer, the scan
    included, when the scan shares an input with a quantized layer. Returns the number of inputs restored."""
    import onnx

    proto = onnx.load(str(path))
    producer = {o: n for n in proto.graph.node for o in n.output}
    restored = 0
    for node in proto.graph.node:
        if node.op_type not in SCAN_OPS:
            continue
        for k, tensor in enumerate(node.input):
            dq = producer.get(tensor)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[k] = q.input[0]
                restored += 1
    if restored:
        onnx.save_model(proto, str(path))
    return restored


def match_layers(patterns: tuple[str, ...] | list[str], layers: list[str]) -> list[str]:
    """Layers named by `patterns`: exact names, a module prefix (`layers.0` covers `layers.0.blocks.1.mlp.fc1`), or
    shell globs (`*.mlp.fc2`). A pattern matching nothing is an error listing examples of valid names."""
    chosen: list[str] = []
    for pattern in patterns:
        hits = [
            name
            for name in layers
            if name == pattern or name.startswith(pattern.rstrip(".") + ".") or fnmatch.fnmatchcase(name, pattern)
        ]
        if not hits:
            examples = ", ".join(layers[:4] + (["..."] if len(layers) > 4 else []))
            raise QuantizationError(
                f"--exclude {pattern!r} names no quantizable layer; layers are named like {examples} "
                "(exact name, module prefix or glob)"
            )
        chosen.extend(h for h in hits if h not in chosen)
    return chosen


# --------------------------------------------------------------------------------------------------- calibration

_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def calibration_session_with_library(library: Path | None):
    """While active, onnxruntime.quantization's calibration sessions load the custom-op library `library`.

    quantize_static/create_calibrator build their InferenceSession in CalibraterBase.create_inference_session with
    fresh SessionOptions and no way to pass ours (onnxruntime 1.32), so that method is replaced for the duration."""
    from onnxruntime.quantization import calibrate

    if library is None:
        yield
        return
    import onnxruntime

    original = calibrate.CalibraterBase.create_inference_session

    def create_inference_session(self) -> None:
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        options.register_custom_ops_library(str(library))
        self.infer_session = onnxruntime.InferenceSession(
            self.augmented_model_path, sess_options=options, providers=self.execution_providers
        )

    with _PATCH_LOCK:
        calibrate.CalibraterBase.create_inference_session = create_inference_session
        try:
            yield
        finally:
            calibrate.CalibraterBase.create_inference_session = original


def _method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    if name not in methods:
        raise QuantizationError(f"unknown calibration method {name!r}; expected one of {', '.join(methods)}")
    return methods[name]


def calibrate(
    prepared: PreparedModel,
    batch: np.ndarray,
    method: str,
    cache: Path,
    library: Path | None,
    show_progress: bool = True,
    batch_size: int = 8,
) -> None:
    """Run the calibration images through the fp32 model and write the activation ranges to `cache`."""
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    from ..progress import progress_bar
    from .calibration import ArrayCalibrationReader

    # Feed the images a few batches at a time and fold each chunk into the ranges (MinMax merges in compute_data,
    # the histogram methods in collect_data), so memory holds one chunk's activations, not all of them.
    # (onnxruntime 1.32's max_intermediate_outputs option drops collected data instead of merging it.)
    chunk = batch_size * 4
    with (
        progress_bar(show_progress) as progress,
        calibration_session_with_library(library),
        _quiet_ort_quantization(),
    ):
        task = progress.add_task(f"calibrating ({method})", total=len(batch))
        calibrator = create_calibrator(
            prepared.path,
            list(QUANTIZABLE_OPS),
            augmented_model_path=str(cache.with_name("augmented.onnx")),
            calibrate_method=_method(method),
        )
        for start in range(0, len(batch), chunk):
            part = batch[start : start + chunk]
            calibrator.collect_data(ArrayCalibrationReader(prepared.input_name, part, batch_size, progress, task))
            if method == "minmax":
                calibrator.compute_data()
                calibrator.clear_collected_data()
        ranges = calibrator.compute_data()
        del calibrator
    save_tensors_data(ranges, cache)


def saturating_u8s8(platform: str | None = None) -> bool:
    """True when ONNX Runtime's u8 x s8 kernels saturate on the CPU the artifact is built to run on: an x86 CPU
    without VNNI (AVX2, AVX-512 without VNNI) multiplies with VPMADDUBSW, whose int16 sums of two u8*s8 products
    clip, which cost 1.7 top-1 points on the digits model on such a CPU. VNNI and AMX (and ARM's dot products)
    accumulate in int32 and do not. For another platform than this machine's (a cross-build) nothing is known of its
    CPU: x86 is assumed to need the safe setting, aarch64 not."""
    from ..platforms import host_platform

    target = platform or host_platform()
    if not target.endswith("x86_64"):
        return False
    if target != host_platform():
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return True
    return not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags)


def quantize_with_cache(
    prepared: PreparedModel,
    out: Path,
    cache: Path,
    method: str,
    fmt: str,
    exclude: list[str],
    reduce_range: bool = False,
) -> None:
    """quantize_static from the cached ranges (no calibration run) into `out`. `reduce_range`: 7-bit weights, so
    u8*s8 products cannot saturate on x86 CPUs without VNNI (see saturating_u8s8)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    if fmt not in FORMATS:
        raise QuantizationError(f"unknown int8 format {fmt!r}; expected one of {', '.join(FORMATS)}")
    qformat, act, weight = FORMATS[fmt]
    with _quiet_ort_quantization():
        quantize_static(
            str(prepared.path),
            str(out),
            calibration_data_reader=None,
            quant_format=getattr(QuantFormat, qformat),
            op_types_to_quantize=list(QUANTIZABLE_OPS),
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=getattr(QuantType, act),
            weight_type=getattr(QuantType, weight),
            nodes_to_exclude=list(exclude),
            calibrate_method=_method(method),
            calibration_cache_path=str(cache),
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
    restore_float_scan_inputs(out)


class _quiet_ort_quantization:
    """quantize_static logs a pre-processing advice warning on every call; keep the CLI output ours."""

    def __enter__(self):
        import logging

        self._logger = logging.getLogger()
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc):
        self._logger.setLevel(self._level)
        return False


# --------------------------------------------------------------------------------------------------- inspection


def quantized_layers(path: Path, layers: list[str]) -> list[str]:
    """Layers of `layers` that are quantized in the model at `path` (QDQ: weight fed by DequantizeLinear of an int8
    initializer; QOperator: a QLinearConv / QLinearMatMul / ...Integer node named `<layer>_quant`)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    producer = {o: n for n in proto.graph.node for o in n.output}
    found: set[str] = set()
    for node in proto.graph.node:
        if node.op_type in QUANTIZABLE_OPS and len(node.input) > 1:
            src = producer.get(node.input[1])
            if src is not None and src.op_type == "DequantizeLinear" and node.name in layers:
                found.add(node.name)
        elif node.op_type.startswith("QLinear") or node.op_type.endswith("Integer"):
            base = node.name[: -len("_quant")] if node.name.endswith("_quant") else node.name
            if base in layers:
                found.add(base)
    return [name for name in layers if name in found]


def scan_inputs_quantized(path: Path) -> list[str]:
    """Scan-node inputs produced by a QuantizeLinear/DequantizeLinear (must be empty: the scan stays float)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    producer = {o: n for n in proto.graph.node for o in n.output}
    bad = []
    for node in proto.graph.node:
        if node.op_type in SCAN_OPS:
            for tensor in node.input:
                src = producer.get(tensor)
                while src is not None and src.op_type in SHAPE_OPS and src.input:
                    src = producer.get(src.input[0])
                if src is not None and src.op_type in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"):
                    bad.append(f"{node.name}:{tensor}")
    return bad


# --------------------------------------------------------------------------------------------------- sensitivity


def layer_sensitivity(
    prepared: PreparedModel, batch: np.ndarray, cache: Path, candidates: list[str], library: Path | None
) -> dict[str, float]:
    """First-order relative output error each quantized layer adds on its own: the int8 rounding error of its input
    activation (with the calibrated range) plus that of its weight (per-channel symmetric) plus that of its output.
    Cheap (one fp32 run exposing the layers' inputs), and independent of the format."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization.calibrate import load_tensors_data

    from ..runtime.onnxruntime_backend import make_session

    ranges = load_tensors_data(cache)
    proto = onnx.load(str(prepared.path))
    inits = {i.name: i for i in proto.graph.initializer}
    nodes = {n.name: n for n in proto.graph.node if n.name in candidates}
    wanted = sorted({t for n in nodes.values() for t in (n.input[0], n.output[0])})
    existing = {o.name for o in proto.graph.output}
    for tensor in wanted:
        if tensor not in existing:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(tensor))
    tmp = cache.with_name("sensitivity.onnx")
    onnx.save_model(proto, str(tmp))
    session = make_session(tmp, library, threads=None)
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(None, {prepared.input_name: batch})))

    def act_error(tensor: str) -> float:
        if tensor not in values or tensor not in ranges:
            return 0.0
        low, high = (np.asarray(v, dtype=np.float64) for v in ranges[tensor].range_value)
        return activation_rounding_error(values[tensor], low.min(), high.max())

    scores = {}
    for name, node in nodes.items():
        w_err = 0.0
        if len(node.input) > 1 and node.input[1] in inits:
            w = numpy_helper.to_array(inits[node.input[1]])
            w_err = weight_rounding_error(
                w.reshape(w.shape[0], -1) if node.op_type == "Conv" else w.reshape(-1, w.shape[-1]).T
            )
        scores[name] = act_error(node.input[0]) + w_err + act_error(node.output[0])
    return scores


# --------------------------------------------------------------------------------------------------- pipeline


def _top1(path: Path, library: Path | None, batch: np.ndarray, labels: np.ndarray, chunk: int = 64) -> float:
    from ..runtime.onnxruntime_backend import make_session
    from .accuracy import top1

    session = make_session(path, library, threads=None)
    name = session.get_inputs()[0].name
    return top1(lambda x: session.run(None, {name: x})[0], batch, labels, chunk)


def quantize_onnx_int8(
    fp32_path: Path,
    out_path: Path,
    input_spec,
    options,
    library: Path | None = None,
    fmt: str | None = None,
    show_progress: bool = True,
    calib_batch: tuple[np.ndarray, list[str]] | None = None,
) -> dict:
    """Quantize the fp32 export at `fp32_path` into `out_path` as `options` (ExportOptions) asks; returns the manifest
    record (`lowering.quantization`): format, method, calibration source and count, every quantized layer, the
    layers kept float and why, and, given an accuracy source, fp32 vs int8 top-1. `calib_batch` (images, names):
    calibration images already loaded (load_calibration_batch), so a caller can fail fast before exporting."""
    import tempfile

    from .calibration import load_calibration_batch

    fmt = fmt or options.extra.get("int8_format") or (DEFAULT_FORMAT if library is not None else PORTABLE_FORMAT)
    if fmt not in FORMATS:
        raise QuantizationError(f"unknown int8 format {fmt!r}; expected one of {', '.join(FORMATS)}")
    _method(options.calib_method)  # fail on a bad method before any work
    nncf_only = [f"--{k.replace('_', '-')}" for k in ("smooth_quant", "bias_correction") if k in options.extra]
    if nncf_only:
        raise QuantizationError(f"{', '.join(nncf_only)}: NNCF settings, only for target cpu-openvino")
    if options.max_drop is not None and not options.accuracy_source:
        raise QuantizationError("--max-drop needs --accuracy SOURCE (labelled images to measure the drop on)")
    # 7-bit weights only where the CPU it will run on would saturate 8-bit ones: they cost accuracy elsewhere.
    reduce_range = saturating_u8s8(options.platform)
    with tempfile.TemporaryDirectory(prefix="vmamba-int8-") as tmp_dir:
        tmp = Path(tmp_dir)
        prepared = prepare_model(Path(fp32_path), tmp / "prepared.onnx")
        excluded = match_layers(tuple(options.exclude), prepared.layers) if options.exclude else []
        batch, names = calib_batch or load_calibration_batch(
            options.calib, input_spec, options.calib_samples, show_progress
        )
        cache = tmp / "ranges.json"
        calibrate(prepared, batch, options.calib_method, cache, library, show_progress)

        float_layers = {name: "feeds the selective scan" for name in prepared.scan_feeders}
        float_layers.update({name: "--exclude" for name in excluded if name not in float_layers})
        quantize_with_cache(prepared, out_path, cache, options.calib_method, fmt, list(float_layers), reduce_range)

        accuracy = None
        if options.accuracy_source:
            acc_batch, labels_arr = labelled_batch(options.accuracy_source, input_spec)
            fp32_top1 = _top1(prepared.path, library, acc_batch, labels_arr)
            int8_top1 = _top1(out_path, library, acc_batch, labels_arr)

            def requantize(kept: list[str]) -> float:
                trial_float = dict(float_layers) | {n: "accuracy budget" for n in kept}
                quantize_with_cache(
                    prepared, out_path, cache, options.calib_method, fmt, list(trial_float), reduce_range
                )
                return _top1(out_path, library, acc_batch, labels_arr)

            int8_top1, kept, trials = keep_float_until_within_budget(
                fp32_top1,
                int8_top1,
                options.max_drop,
                [n for n in prepared.layers if n not in float_layers],
                lambda candidates: layer_sensitivity(prepared, batch[:16], cache, candidates, library),
                requantize,
            )
            float_layers.update({n: "accuracy budget" for n in kept})
            accuracy = accuracy_record(
                options.accuracy_source, labels_arr, fp32_top1, int8_top1, options.max_drop, kept, trials
            )
        quantized = quantized_layers(out_path, prepared.layers)
        bad = scan_inputs_quantized(out_path)
        if bad:
            raise QuantizationError(f"internal: scan inputs were quantized ({', '.join(bad[:3])})")
    qformat, act, weight = FORMATS[fmt]
    return {
        "tool": "onnxruntime.quantization.quantize_static",
        "format": fmt,
        "quant_format": qformat,
        "activation_type": act,
        "weight_type": weight,
        "per_channel": True,
        "reduce_range": reduce_range,  # 7-bit weights: u8*s8 saturates on x86 without VNNI (saturating_u8s8)
        "method": options.calib_method,
        "calibration": {"source": options.calib, "samples": len(names), "first": names[:3]},
        "quantized_layers": quantized,
        "float_layers": float_layers,
        "scan": "float: SelectiveScan2D and the projections feeding it are not quantized",
        "accuracy": accuracy,
    }
