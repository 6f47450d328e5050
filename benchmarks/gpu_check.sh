#!/usr/bin/env bash
# One-call GPU check of the cuda-onnxruntime target (benchmarks/gpu_check.py says what it measures).
#
#   ORT_GPU_SITE=/root/ortgpu bash benchmarks/gpu_check.sh [--quick] [--onnx-dir DIR] [--skip SECTION]
#
# Run from anywhere in the repository tree copied to the GPU machine, with vmamba_export/_native carried (it holds
# libvmamba_ort_cuda.so, built here by `python -m vmamba_export.build_kernels --cuda`; the folder is git-ignored).
# ORT_GPU_SITE: a folder holding onnxruntime-gpu (pip install --target), put first on PYTHONPATH so it shadows the
# image's CPU onnxruntime; already on PYTHONPATH works too. Results: $OUT (else ./gpu_results)/gpu_check.{json,log}.
set -u
cd "$(dirname "$0")/.."
export OUT="${OUT:-$PWD/gpu_results}"
mkdir -p "$OUT"
export PYTHONPATH="${ORT_GPU_SITE:+$ORT_GPU_SITE:}$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
echo "PYTHONPATH=$PYTHONPATH"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader || echo "nvidia-smi failed"
ls -la vmamba_export/_native/ 2>&1 | sed 's/^/  /'
if [ ! -f vmamba_export/_native/libvmamba_ort_cuda.so ]; then
  echo "libvmamba_ort_cuda.so is missing: carry vmamba_export/_native. Trying an sm_90-only build here (needs the"
  echo "ONNX Runtime headers under kernels/build/ort, or VMAMBA_ORT_INCLUDE)..."
  VMAMBA_CUDA_ARCHS=90 "$PY" -m vmamba_export.build_kernels --cuda || echo "build failed; the kernel checks will fail"
fi
"$PY" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.__file__, o.get_available_providers())" \
  || echo "onnxruntime import failed"
"$PY" benchmarks/gpu_check.py "$@" 2>&1 | tee "$OUT/gpu_check.stdout"
