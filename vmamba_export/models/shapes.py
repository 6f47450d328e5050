"""Spatial sizes through a VMamba model, computed from the config alone (no model, no forward pass).

v2: the stem is two Conv2d(k3, s2, p1) and every downsampling one more; each maps a side x to ceil(x / 2).
v0: the stem is Conv2d(k4, s4) without padding, floor(x / 4); patch merging zero-pads odd sides, ceil(x / 2).
"""

from __future__ import annotations

from .configs import VMambaConfig


def _half_up(x: int) -> int:
    return (x + 1) // 2


def _stem(cfg: VMambaConfig, x: int) -> int:
    if cfg.version == "v0":
        return x // 4
    return _half_up(_half_up(x))


def stage_sizes(cfg: VMambaConfig, h: int, w: int) -> list[tuple[int, int]]:
    """(H, W) of the map each stage's blocks see for an h x w input, stage 0 first."""
    if h < 1 or w < 1:
        raise ValueError(f"input size must be positive, got {h}x{w}")
    sizes = [(_stem(cfg, h), _stem(cfg, w))]
    for _ in range(len(cfg.depths) - 1):
        ph, pw = sizes[-1]
        sizes.append((_half_up(ph), _half_up(pw)))
    return sizes


def export_min_size(cfg: VMambaConfig) -> int:
    """Smallest input side for which every stage keeps >= 2 positions a side.

    torch.export with a dynamic H/W specialises a dimension that reaches 1 (size-1 broadcasting), so the dynamic
    range of an exported graph has to start here. The sizes only shrink stage by stage, so the last stage decides.
    """
    side = 1
    while stage_sizes(cfg, side, side)[-1][0] < 2:
        side += 1
    return side


__all__ = ["export_min_size", "stage_sizes"]
