"""int8 post-training quantization from calibration data.

`calibration` reads and preprocesses calibration images (the model's stored InputSpec); `onnxruntime_int8` quantizes
an fp32 ONNX export statically with onnxruntime.quantization, keeping the selective scan (and the projections that
feed it) in float; `openvino_int8` does the same for cpu-openvino with NNCF; `accuracy` holds what both share (top-1,
the sensitivity terms, the --max-drop loop). The lowerings (vmamba_export/lowering) call these when
`ExportOptions.precision == "int8"`.
"""

from __future__ import annotations

CALIB_METHODS = ("minmax", "percentile", "entropy")

__all__ = ["CALIB_METHODS"]
