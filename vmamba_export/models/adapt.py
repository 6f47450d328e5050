"""State-dict filters that map other spellings of VMamba weights onto this package's key names.

Kept next to the model, as timm keeps its `checkpoint_filter_fn`: the rename is a fact about the model's history,
not about file formats. See ARCHITECTURE.md ("Released checkpoints") for the v0 rename.
"""

from __future__ import annotations

import re

import torch

# (pattern, replacement) applied in order, each at most once per key. Anchored so that a v2 key can never match:
# v2 names use `patch_embed.<digit>`, `blocks.j.norm`, `blocks.j.op.` and `classifier.`.
_LEGACY_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^patch_embed\.proj\."), "patch_embed.0."),
    (re.compile(r"^patch_embed\.norm\."), "patch_embed.2."),
    (re.compile(r"^(layers\.\d+\.blocks\.\d+\.)ln_1\."), r"\1norm."),
    (re.compile(r"^(layers\.\d+\.blocks\.\d+\.)self_attention\."), r"\1op."),
    (re.compile(r"^norm\."), "classifier.norm."),
    (re.compile(r"^head\."), "classifier.head."),
)


def legacy_key(key: str) -> str:
    """The current name of one v0 (Jan 2024 training code) key; other keys come back unchanged."""
    for pattern, repl in _LEGACY_RULES:
        key = pattern.sub(repl, key, count=1)
    return key


def is_legacy(state_dict: dict[str, torch.Tensor]) -> bool:
    """True when any key uses a v0 spelling."""
    return any(legacy_key(k) != k for k in state_dict)


def adapt_legacy_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename v0 keys to the current names, keeping order and tensors (no copies). Current-name dicts pass through.

    Raises ValueError when two keys would end up with the same name (a dict mixing both spellings), since silently
    dropping one of them would load the wrong weights.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new = legacy_key(key)
        if new in out:
            raise ValueError(f"keys {key!r} and another key both map to {new!r} (mixed legacy and current names)")
        out[new] = value
    return out


__all__ = ["adapt_legacy_keys", "is_legacy", "legacy_key"]
