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

    import torch

    from .data.sources import load_batch
    from .scan.op import torch_scan

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
    # The scan in plain torch for the reference, then each block's own scan back (the model is the caller's).
    blocks = [m for m in model.modules() if hasattr(m, "scan_fn")]
    saved = [b.scan_fn for b in blocks]
    try:
        model.eval().set_scan(torch_scan)
        with torch.no_grad():
            logits = np.concatenate(
                [model(torch.from_numpy(inputs[s : s + 8])).numpy() for s in range(0, len(inputs), 8)]
            )
    finally:
        for block, scan in zip(blocks, saved):
            block.scan_fn = scan
    np.savez(
        Path(folder) / REFERENCES_FILE,
        inputs=inputs.astype(np.float32),
        logits=logits.astype(np.float32),
        names=np.asarray(names, dtype=str),
    )
    return {
        "file": REFERENCES_FILE,
        "source": source,
        "names": list(names),
        "num_images": len(names),
        "size": size,
        "inputs": "preprocessed as input.preprocessing says (float32 NCHW)",
        "logits": "PyTorch fp32 model, scan in plain torch (independent of the C++ kernel), computed at export",
        "torch": torch.__version__,
    }


def read_references(folder: Path, manifest: dict) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    """(inputs, logits, names) from the artifact's references, or None when it carries none (built before they
    existed). The file must be among the manifest's hashed files (the loader checked its hash)."""
    info = manifest.get("references")
    if not info:
        return None
    name = info.get("file") if isinstance(info, dict) else None
    if not isinstance(name, str) or name not in manifest["files"]:
        raise ArtifactError(f"{folder}/manifest.json: references.file {name!r} is not among its hashed files")
    path = Path(folder) / name
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
