"""What an artifact outputs, by task: names, symbolic shapes, strides and channels (the manifest's `output` section).

Classification: one `logits` (N, num_classes), and the manifest's output section stays as it always was (no `task`
key: an artifact without `output.task` is a classifier). Backbone: `features_0` .. `features_<S-1>`, one NCHW map
per stage at strides 4, 8, 16, 32 (channels cfg.widths; sides ceil(side / stride) for v2 models, see
models/shapes.py). Segmentation: one `logits` (N, num_classes, H, W) at the input size, stride 1.

Runtime side: imports nothing but the standard library (the predictor reads these names back from the manifest).
"""

from __future__ import annotations

TASKS = ("classification", "backbone", "segmentation")
DENSE_TASKS = ("backbone", "segmentation")
LOGITS = "logits"
FEATURE_PREFIX = "features_"


def feature_name(stage: int) -> str:
    return f"{FEATURE_PREFIX}{stage}"


def output_names(task: str, num_stages: int = 4) -> list[str]:
    """The graph's output names, in order, for a model of `task` with `num_stages` stages."""
    if task == "backbone":
        return [feature_name(i) for i in range(num_stages)]
    if task in ("classification", "segmentation"):
        return [LOGITS]
    raise ValueError(f"task {task!r}: expected one of {', '.join(TASKS)}")


def output_records(task: str, widths: tuple[int, ...] | list[int], num_classes: int) -> list[dict]:
    """The manifest's `output.outputs` for a dense task: one {name, shape, stride, channels} per output."""
    if task == "backbone":
        records = []
        for i, channels in enumerate(widths):
            stride = 4 * 2**i
            shape = ["batch", int(channels), f"height/{stride}", f"width/{stride}"]
            records.append({"name": feature_name(i), "shape": shape, "stride": stride, "channels": int(channels)})
        return records
    if task == "segmentation":
        shape = ["batch", int(num_classes), "height", "width"]
        return [{"name": LOGITS, "shape": shape, "stride": 1, "channels": int(num_classes)}]
    raise ValueError(f"task {task!r} has no dense outputs")


def output_section(cfg, labels_source: str | None) -> dict:
    """The manifest's `output` section for a model config (duck-typed: task, widths, num_classes, version)."""
    task = getattr(cfg, "task", "classification")
    if task == "classification":
        return {
            "name": LOGITS,
            "shape": ["batch", cfg.num_classes],
            "num_classes": cfg.num_classes,
            # "config", a label file's name, "given" (Python list), or null: unknown, numbered class_0, ...
            "labels_source": labels_source,
        }
    outputs = output_records(task, cfg.widths, cfg.num_classes)
    section = {
        "name": outputs[0]["name"],
        "shape": outputs[0]["shape"],
        "task": task,
        "outputs": outputs,
        # A backbone has no classes (and no labels); a segmenter's classes are its channels.
        "num_classes": cfg.num_classes if task == "segmentation" else 0,
        "labels_source": labels_source if task == "segmentation" else None,
    }
    if task == "backbone":
        rule = "floor(side/4), then ceil(/2) per stage" if cfg.version == "v0" else "ceil(side/stride)"
        section["spatial_size"] = f"{rule} (models/shapes.py stage_sizes)"
    else:
        section["spatial_size"] = "the input's height and width (bilinear upsampling inside the graph)"
    return section


def manifest_task(manifest: dict) -> str:
    """The task of an artifact: `output.task`, or classification when absent (artifacts from before dense tasks)."""
    return str((manifest.get("output") or {}).get("task") or "classification")


def manifest_output_names(manifest: dict) -> list[str]:
    """The output names of an artifact, in graph order."""
    output = manifest["output"]
    if "outputs" in output:
        return [str(o["name"]) for o in output["outputs"]]
    return [str(output.get("name", LOGITS))]
