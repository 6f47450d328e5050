"""Parameter and FLOP counts of a config, without weights (meta device)."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .configs import VMambaConfig
from .vmamba import SS2D


def _build(cfg: VMambaConfig) -> torch.nn.Module:
    from . import build_from_config  # the task's module: classifier, backbone or segmenter

    return build_from_config(cfg)


def count_flops(cfg: VMambaConfig, image_size: int = 224) -> int:
    """Multiply-accumulates x 2 of convolutions and matmuls (torch's flop counter), plus the scan's own work, of the
    config's task module (a segmenter: backbone and UPerHead; the bilinear resizes are not counted).

    The scan is counted as 9 * B * K * Di * N * L flops (the selective-scan count used by the Mamba and VMamba papers'
    fvcore hooks), added per SS2D block since the counter does not see inside the custom op.
    """
    with torch.device("meta"):
        model = _build(cfg).eval()
        x = torch.empty(1, cfg.in_chans, image_size, image_size)
        scan_flops = 0

        def counting_scan(u, delta, A_logs, B, C, D, delta_bias):
            nonlocal scan_flops
            bsz, di, h, w = u.shape
            scan_flops += 9 * bsz * delta.shape[1] * di * A_logs.shape[1] * h * w
            return torch.empty_like(u)

        model.set_scan(counting_scan)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(x)
    return counter.get_total_flops() // 2 + scan_flops


def count_parameters(cfg: VMambaConfig) -> int:
    """Parameters of the config's task module (a segmenter's: backbone and decode head; BatchNorm statistics are
    buffers, not counted)."""
    with torch.device("meta"):
        model = _build(cfg)
    return sum(p.numel() for p in model.parameters())


__all__ = ["SS2D", "count_flops", "count_parameters"]
