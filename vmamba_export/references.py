"""Reference inputs and outputs inside an artifact, so that a device can check it with nothing but the artifact.

At export (builder side, torch) a few real photographs from the built-in set are preprocessed at the artifact's
input size and run through the PyTorch fp32 model with the scan in plain torch (scan/op.py `torch_scan`, sharing no
code with the C++ kernels); both go into `references.npz` (hashed in the manifest's files like any payload) and the
manifest's `references` section says what they are. `vmamba-export validate DIR` (runtime side: numpy only) runs the
artifact on the stored inputs and compares with the stored logits.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from .errors import ArtifactError

REFERENCES_FILE = "references.npz"
REFERENCE_SOURCE = "builtin"
# Real photos: enough for top-1 agreement to mean something; half as many above 64 px, where the PyTorch run at export
# costs seconds per image on a small CPU and the file grows (4 images at 224 px: 2.4 MB).
REFERENCE_COUNT = 8


def write_references(
    folder: Path, model, spec, min_size: int | None = None, max_size: int | None = None, count: int | None = None
) -> dict:
    """Write `references.npz` into the artifact folder being built; returns the manifest's `references` section.

    `spec` is the model's InputSpec; the size is its image_size, brought within [min_size, max_size] (what the
    artifact takes: a fixed-size TVM build may differ from the config's size)."""
    import dataclasses

    from .data.sources import load_batch

    if getattr(model.config, "task", "classification") != "classification":
        return write_dense_references(folder, model, spec, min_size, max_size, count)
    size = spec.image_size
    if max_size is not None:
        size = min(size, max_size)
    if min_size is not None:
        size = max(size, min_size)
    if size != spec.image_size:
        resize = max(size, round(size * spec.resize / spec.image_size))
        spec = dataclasses.replace(spec, image_size=size, resize=resize)
    count = count or (REFERENCE_COUNT if size <= 64 else REFERENCE_COUNT // 2)
    source = f"{REFERENCE_SOURCE}:{count}"
    inputs, _, names = load_batch(source, spec)
    (logits,) = torch_reference(model, inputs, 8)
    return save_references(
        folder,
        inputs,
        names,
        {"logits": logits},
        source=source,
        size=size,
        inputs="preprocessed as input.preprocessing says (float32 NCHW)",
        logits="PyTorch fp32 model, scan in plain torch (independent of the C++ kernel), computed at export",
    )


def torch_reference(model, inputs: np.ndarray, batch: int) -> list[np.ndarray]:
    """The PyTorch fp32 model's outputs for `inputs` (a list: one array per output, in order), in batches of `batch`,
    with the scan in plain torch; every block's own scan is put back afterwards (the model is the caller's)."""
    import torch

    from .scan.op import torch_scan

    blocks = [m for m in model.modules() if hasattr(m, "scan_fn")]
    saved = [b.scan_fn for b in blocks]
    parts: list[list[np.ndarray]] = []
    try:
        model.eval().set_scan(torch_scan)
        with torch.no_grad():
            for start in range(0, len(inputs), batch):
                result = model(torch.from_numpy(inputs[start : start + batch]))
                result = result if isinstance(result, (tuple, list)) else (result,)
                parts = parts or [[] for _ in result]
                for part, value in zip(parts, result, strict=True):
                    part.append(value.numpy().astype(np.float32))
    finally:
        for block, scan in zip(blocks, saved):
            block.scan_fn = scan
    return [np.concatenate(part) for part in parts]


def save_references(
    folder: Path, images: np.ndarray, names: list[str], arrays: dict[str, np.ndarray], **record
) -> dict:
    """Write references.npz (`images` as `inputs`, `names` and `arrays`); returns the manifest's `references`
    section: the file, the images, `record` (source, size, what the arrays are) and the torch that computed them."""
    import torch

    np.savez(
        Path(folder) / REFERENCES_FILE, inputs=images.astype(np.float32), names=np.asarray(names, dtype=str), **arrays
    )
    return {
        "file": REFERENCES_FILE,
        "names": list(names),
        "num_images": len(names),
        **record,
        "torch": torch.__version__,
    }


# Dense outputs are large (a 150-class segmenter's logits at 512 x 512 are 157 MB an image): references of a dense
# artifact are taken at a reduced side and, when an image's outputs exceed DENSE_LARGE_OUTPUT_BYTES, for 2 images.
DENSE_REFERENCE_SIDE = 128
DENSE_REFERENCE_COUNT = 4
DENSE_LARGE_OUTPUT_BYTES = 2 << 20
DENSE_LARGE_COUNT = 2
OUTPUT_PREFIX = "out_"  # references.npz key of a dense output: out_<output name>


def dense_reference_plan(model_config, min_size: int | None, max_size: int | None) -> tuple[int, int, int]:
    """(side, image count, float32 output bytes per image) of a dense artifact's references: side min(image_size,
    DENSE_REFERENCE_SIDE) brought within [min_size, max_size]; DENSE_LARGE_COUNT images when one image's outputs
    are above DENSE_LARGE_OUTPUT_BYTES, else DENSE_REFERENCE_COUNT."""
    from .models.shapes import stage_sizes

    side = min(model_config.input.image_size, DENSE_REFERENCE_SIDE)
    if max_size is not None:
        side = min(side, max_size)
    if min_size is not None:
        side = max(side, min_size)
    if model_config.task == "segmentation":
        values = model_config.num_classes * side * side
    else:
        sizes = stage_sizes(model_config, side, side)
        values = sum(c * h * w for c, (h, w) in zip(model_config.widths, sizes))
    per_image = 4 * values
    count = DENSE_LARGE_COUNT if per_image > DENSE_LARGE_OUTPUT_BYTES else DENSE_REFERENCE_COUNT
    return side, count, per_image


def write_dense_references(
    folder: Path, model, spec, min_size: int | None = None, max_size: int | None = None, count: int | None = None
) -> dict:
    """references.npz of a backbone or segmentation artifact: `inputs` (N, 3, s, s) square crops at the reduced side
    s (dense_reference_plan), `names`, and `out_<name>` per output (outputs.py names), from the PyTorch fp32 model
    with the scan in plain torch. Returns the manifest's `references` section (side, count, bytes recorded)."""

    from .data.preprocess import fixed_size_spec
    from .data.sources import load_batch
    from .outputs import output_names

    cfg = model.config
    side, planned, per_image = dense_reference_plan(cfg, min_size, max_size)
    count = count or planned
    source = f"{REFERENCE_SOURCE}:{count}"
    inputs, _, names = load_batch(source, fixed_size_spec(spec, side))
    keys = output_names(cfg.task, len(cfg.depths))
    outputs = torch_reference(model, inputs, 2)
    return save_references(
        folder,
        inputs,
        names,
        {f"{OUTPUT_PREFIX}{k}": v for k, v in zip(keys, outputs, strict=True)},
        source=source,
        size=side,
        outputs=[f"{OUTPUT_PREFIX}{k}" for k in keys],
        output_bytes_per_image=per_image,
        inputs=f"square {side} x {side} crops, preprocessed as input.preprocessing says otherwise (float32 NCHW);"
        f" a reduced side and {len(names)} images keep the file small",
        logits="PyTorch fp32 model's outputs, scan in plain torch (independent of the C++ kernel), at export",
    )


def read_references(
    folder: Path, manifest: dict
) -> tuple[np.ndarray, np.ndarray | dict[str, np.ndarray], list[str]] | None:
    """(inputs, logits, names) from the artifact's references, or None when it carries none (built before they
    existed). For a dense artifact (output.task backbone or segmentation) the second item is a dict {output name:
    array} in output order. The file must be among the manifest's hashed files (the loader checked its hash)."""
    info = manifest.get("references")
    if not info:
        return None
    name = info.get("file") if isinstance(info, dict) else None
    if not isinstance(name, str) or name not in manifest["files"]:
        raise ArtifactError(f"{folder}/manifest.json: references.file {name!r} is not among its hashed files")
    path = Path(folder) / name
    from .outputs import manifest_output_names, manifest_task

    if manifest_task(manifest) != "classification":
        return _read_dense(path, manifest_output_names(manifest))
    try:
        with np.load(path, allow_pickle=False) as data:
            inputs, logits, names = data["inputs"], data["logits"], [str(n) for n in data["names"]]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise ArtifactError(f"{path}: not a readable references file (inputs, logits, names): {exc}") from None
    num_classes = manifest["output"]["num_classes"]
    if inputs.dtype != np.float32 or inputs.ndim != 4 or logits.shape != (len(inputs), num_classes):
        raise ArtifactError(
            f"{path}: expected float32 inputs (N, C, H, W) and logits (N, {num_classes}), "
            f"got {inputs.dtype} {inputs.shape} and {logits.shape}"
        )
    return inputs, logits, names


def _read_dense(path: Path, names_out: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray], list[str]]:
    keys = [f"{OUTPUT_PREFIX}{n}" for n in names_out]
    try:
        with np.load(path, allow_pickle=False) as data:
            inputs, names = data["inputs"], [str(n) for n in data["names"]]
            outputs = {n: data[k] for n, k in zip(names_out, keys)}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise ArtifactError(
            f"{path}: not a readable dense references file (inputs, names, {', '.join(keys)}): {exc}"
        ) from None
    if inputs.dtype != np.float32 or inputs.ndim != 4:
        raise ArtifactError(f"{path}: expected float32 inputs (N, C, H, W), got {inputs.dtype} {inputs.shape}")
    for name, value in outputs.items():
        if value.dtype != np.float32 or value.ndim != 4 or len(value) != len(inputs):
            raise ArtifactError(
                f"{path}: output {name!r} must be float32 (N={len(inputs)}, C, H, W), got {value.dtype} {value.shape}"
            )
    return inputs, outputs, names
