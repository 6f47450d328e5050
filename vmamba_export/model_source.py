"""Where a model's weights come from (bundled, a checkpoint file, or seeded random init) and how to rebuild the same
PyTorch model later from what the manifest records, so `validate` can compare an artifact with its source."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError, VMambaExportError
from .models import DEFAULT_MODEL, VMamba, build_model, get_config


@dataclass
class ModelSource:
    model: VMamba
    weights: dict  # manifest record: kind ("bundled" | "checkpoint" | "random"), name/path, sha256, seed


def state_dict_digest(model: torch.nn.Module) -> str:
    """sha256 over every tensor's name, shape and bytes: identifies weights whatever file they came from."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def bundled_names() -> list[str]:
    from .bundled import available_bundled

    return available_bundled()


def resolve_model(
    model_name: str | None = None,
    checkpoint: str | Path | None = None,
    random_weights: bool = False,
    seed: int = 0,
) -> ModelSource:
    """The model a command works on: a checkpoint, a bundled trained model, or (asked for) seeded random weights."""
    if checkpoint is not None and random_weights:
        raise VMambaExportError("--checkpoint and --random-weights contradict each other: give one of them")
    if checkpoint is not None:
        from .artifact import sha256_file
        from .checkpoint import load_checkpoint

        model = load_checkpoint(checkpoint, name=model_name)
        path = Path(checkpoint).resolve()
        weights = {"kind": "checkpoint", "path": str(path), "sha256": sha256_file(path)}
    else:
        name = model_name or DEFAULT_MODEL
        get_config(name)  # unknown names fail here with the list of known ones
        if random_weights:
            torch.manual_seed(seed)
            model = build_model(name)
            weights = {"kind": "random", "name": name, "seed": seed}
        elif name in bundled_names():
            from .artifact import sha256_file
            from .bundled import bundled_weights_path, load_bundled

            model = load_bundled(name)
            weights = {"kind": "bundled", "name": name, "sha256": sha256_file(bundled_weights_path(name))}
        else:
            raise VMambaExportError(
                f"no weights for {name!r}: pass --checkpoint PATH (an official .pth or your fine-tune), "
                f"or --random-weights for a speed-only build; bundled trained models: {', '.join(bundled_names())}"
            )
    weights["state_digest"] = state_dict_digest(model)
    return ModelSource(model=model, weights=weights)


def rebuild_from_manifest(manifest: dict) -> VMamba:
    """The PyTorch fp32 model an artifact was built from, checked against the recorded weight digest."""
    weights = manifest["model"].get("weights", {})
    kind = weights.get("kind")
    if kind == "checkpoint":
        path = Path(weights.get("path", ""))
        if not path.is_file():
            raise CheckpointError(
                f"the artifact was built from checkpoint {path}, which is not there; pass --checkpoint to validate"
            )
        source = resolve_model(manifest["model"]["name"], checkpoint=path)
    elif kind == "random":
        source = resolve_model(weights["name"], random_weights=True, seed=int(weights.get("seed", 0)))
    elif kind == "bundled":
        source = resolve_model(weights["name"])
    else:
        raise VMambaExportError(f"manifest records weights of unknown kind {kind!r}")
    expected = weights.get("state_digest")
    if expected and source.weights["state_digest"] != expected:
        raise VMambaExportError(
            "the PyTorch weights rebuilt for validation differ from those the artifact was built from "
            f"({kind} {weights.get('path') or weights.get('name')}); pass --checkpoint with the original file"
        )
    return source.model
