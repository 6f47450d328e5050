"""The selective scan as one op. Contract: docs/scan-op.md.

`selective_scan_2d(u, delta, A_logs, B, C, D, delta_bias) -> y`, with u (Bt, Di, H, W), delta (Bt, 4, Di, H, W),
A_logs (4*Di, N), B and C (Bt, 4, N, H, W), D and delta_bias (4*Di,), y (Bt, Di, H, W): the four directional scans of
SS2D (row-major, column-major and their reverses), each mapped back to the 2-D map and summed.
"""

from .op import OP_NAME, OP_NAMESPACE, QUALIFIED_NAME, check_scan_inputs, selective_scan_2d
from .portable import selective_scan_portable
from .reference import selective_scan_reference

__all__ = [
    "OP_NAME",
    "OP_NAMESPACE",
    "QUALIFIED_NAME",
    "check_scan_inputs",
    "selective_scan_2d",
    "selective_scan_portable",
    "selective_scan_reference",
]
