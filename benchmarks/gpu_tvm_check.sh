#!/usr/bin/env bash
# cuda-tvm on the GPU machine with TVM's runtime only (benchmarks/gpu_tvm_check.py says what it measures).
#
#   bash benchmarks/gpu_tvm_check.sh
#
# Carry two git-ignored folders built here: .tvm-gpu (python benchmarks/gpu_tvm_prepare.py: the cuda-tvm artifact
# without its weights file, the reference logits, the scan-only module) and .tvm-rt (tvm_ffi for cp312 +
# libtvm_runtime.so, libtvm_runtime_cuda.so, libcudart.so.13). No TVM compiler, no internet needed there.
# Results: $OUT (else ./gpu_results)/gpu_tvm_check.{json,log}.
set -u
cd "$(dirname "$0")/.."
export OUT="${OUT:-$PWD/gpu_results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/.tvm-rt/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader || echo "nvidia-smi failed"
du -sh .tvm-gpu .tvm-rt 2>&1 | sed 's/^/  /'
"$PY" -c "import torch; print('torch', torch.__version__, torch.version.cuda, torch.cuda.is_available())"
"$PY" -c "import tvm" 2>/dev/null && echo "note: a full tvm package is importable here (the check uses tvm_ffi only)"
"$PY" benchmarks/gpu_tvm_check.py "$@" 2>&1 | tee "$OUT/gpu_tvm_check.stdout"
