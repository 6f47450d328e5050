#!/usr/bin/env bash
# Proof on aarch64 from this x86-64 machine, under qemu user-mode emulation (correctness only: no speed is measured).
#   1. the scan kernel, cross-built for linux-aarch64, against a float64 reference (kernels/cpu/scan_check.cpp):
#      each variant (armv8.2-a+fp16+dotprod picked on qemu's default CPU; armv8-a forced) and the run-time dispatch
#      on a CPU without dot-product (qemu -cpu cortex-a53 must pick armv8-a by itself);
#   2. the NEON vector instructions of the kernel's inner loop (objdump), for the record;
#   3. `vmamba-export build --platform linux-aarch64` of both bundled models (vmamba_digits_v2, d_state 1;
#      vmamba_digits_v0, d_state 16) for cpu-onnxruntime and onnx-portable, fp32 and int8: each artifact's self-check
#      (`vmamba-export validate DIR` against the references it carries) runs in the emulated arm64 Python that has
#      the runtime only (numpy, onnxruntime, pillow, rich; no torch), and --fail-on-parity makes a miss fail this;
#   4. `vmamba-export predict` of one artifact there, and proof that torch is absent there;
#   5. the bundled segmenter (vmamba_shapes_seg) exported for linux-aarch64 cpu-onnxruntime: fp32 (its last node the
#      BilinearResize op) self-checked, int8 judged by its held-out mIoU drop there (PyTorch's mIoU as the export
#      recorded it: no torch in the emulated Python), and a predicted mask.
# Usage: bash scripts/arm64_check.sh [OUT]  (default out/arm64; the test bench from scripts/arm64_env.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/arm64}
PY=${VMAMBA_PYTHON:-.venv/bin/python}
ENV_DIR=$(realpath -m "${VMAMBA_ARM64_ENV:-.arm64}")
export VMAMBA_ARM64_ENV=$ENV_DIR
mkdir -p "$OUT"
bash scripts/arm64_env.sh "$ENV_DIR"
"$PY" -m vmamba_export.build_kernels --platform linux-aarch64 --quiet

echo "== 1. scan kernel on aarch64 (qemu), against the float64 reference"
OBJ=kernels/build/obj/linux-aarch64
aarch64-linux-gnu-g++ -O2 -std=c++17 -Wall -Wextra kernels/cpu/scan_check.cpp "$OBJ"/scan_armv8_a.o \
  "$OBJ"/scan_armv8_2_a.o "$OBJ"/c_api.o -pthread -o "$OUT/scan_check"
QEMU=(qemu-aarch64-static -L /usr/aarch64-linux-gnu)
echo "-- qemu default CPU (has asimddp + asimdhp): the dispatcher must pick armv8.2-a+fp16+dotprod"
"${QEMU[@]}" "$OUT/scan_check" armv8.2-a+fp16+dotprod
echo "-- same CPU, baseline forced (VMAMBA_SCAN_ISA=armv8-a)"
VMAMBA_SCAN_ISA=armv8-a "${QEMU[@]}" "$OUT/scan_check" armv8-a
echo "-- qemu -cpu cortex-a53 (armv8.0: no dot-product, no fp16 arithmetic): the dispatcher must pick armv8-a"
"${QEMU[@]}" -cpu cortex-a53 "$OUT/scan_check" armv8-a

echo "== 2. NEON in the scan's inner loop (aarch64-linux-gnu-objdump -d, d_state-16 scan_direction, armv8-a)"
aarch64-linux-gnu-objdump -d --no-show-raw-insn -C "$OBJ/scan_armv8_a.o" >"$OUT/scan_armv8_a.objdump"
awk '/^[0-9a-f]+ <.*scan_direction<16, false, float>/ {on=1; next} /^[0-9a-f]+ </ {on=0} on' \
  "$OUT/scan_armv8_a.objdump" >"$OUT/scan_direction16.s"
echo "instructions in scan_direction<16, false, float>: $(grep -c ':' "$OUT/scan_direction16.s");" \
  "vector fmla: $(grep -cE 'fmla\s+v' "$OUT/scan_direction16.s"), vector fmul: $(grep -cE 'fmul\s+v' \
  "$OUT/scan_direction16.s"), vector fadd: $(grep -cE 'fadd\s+v' "$OUT/scan_direction16.s")"
grep -m1 -B4 -A12 -E 'fmla\s+v' "$OUT/scan_direction16.s"

echo "== 3. aarch64 artifacts of both bundled models, self-check under emulation"
for model in vmamba_digits_v2 vmamba_digits_v0; do
  "$PY" -m vmamba_export build --model "$model" --platform linux-aarch64 --targets cpu-onnxruntime onnx-portable \
    --out "$OUT/$model" --overwrite --fail-on-parity --no-bench
done

echo "== 4. the torch-free runtime on aarch64 (emulated)"
ART="$OUT/vmamba_digits_v2/vmamba_digits_v2-cpu-onnxruntime-fp32"
"$PY" - "$OUT/digit.png" <<'EOF'
import sys
import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
img = load_digits().images[0]  # a handwritten 0 (8x8, 0..16), as an RGB image
Image.fromarray(np.repeat((img * 15.9).astype(np.uint8)[..., None], 3, -1)).resize((32, 32)).save(sys.argv[1])
EOF
PYTHONPATH=$PWD "$ENV_DIR/python" - <<'EOF'
import importlib.util, platform
print("emulated:", platform.machine(), "| torch importable:", importlib.util.find_spec("torch") is not None,
      "| onnx importable:", importlib.util.find_spec("onnx") is not None)
EOF
PYTHONPATH=$PWD "$ENV_DIR/python" -m vmamba_export predict "$ART" "$OUT/digit.png" --top-k 3

echo "== 5. the bundled segmenter on aarch64 (emulated): dense outputs, the BilinearResize op, int8 mIoU without torch"
SEG="$OUT/vmamba_shapes_seg-cpu-onnxruntime"
"$PY" -m vmamba_export export --task segmentation --target cpu-onnxruntime --platform linux-aarch64 --out "$SEG-fp32" \
  --overwrite --validate
# int8 is judged by its mIoU drop: the held-out mIoU under emulation, PyTorch's as the export recorded it.
"$PY" -m vmamba_export export --task segmentation --target cpu-onnxruntime --platform linux-aarch64 --precision int8 \
  --out "$SEG-int8" --overwrite --validate --accuracy shapes:holdout
"$PY" - "$SEG-fp32/model.onnx" "$SEG-int8/manifest.json" <<'EOF'
import json
import sys
import onnx
last = onnx.load(sys.argv[1]).graph.node[-1]
assert (last.domain, last.op_type) == ("ai.vmamba", "BilinearResize"), (last.domain, last.op_type)
print("last node:", last.domain, last.op_type)
acc = json.load(open(sys.argv[2]))["validation"]["accuracy"]
print(f"int8 held-out mIoU on aarch64 {acc['artifact_miou']:.4f}, PyTorch {acc['torch_miou']:.4f}"
      f" ({acc['torch_from']}), drop {acc['drop_points']:.2f} points")
EOF
PYTHONPATH=$PWD "$ENV_DIR/python" -m vmamba_export predict "$SEG-fp32" "$OUT/digit.png" --out "$OUT/masks" --overwrite
echo "arm64_check: PASS (kernel variants and dispatch, and every artifact's self-check, under emulation)"
