#!/usr/bin/env bash
# The batch-1 checks of the cuda-onnxruntime target in steps that each fit one device call (10 minutes), for the
# DepthwiseConvProjections kernel (docs/cuda-onnxruntime.md, "DepthwiseConvProjections") and the batch-1 graph:
#
#   ORT_GPU_SITE=/root/ortgpu bash benchmarks/gpu_batch1_check.sh STEP [STEP ...]
#
#   tests     the GPU tests of the fused op, the batch-1 graphs and the CUDA-graph path (pytest -m gpu, about 3 min)
#   kernels   benchmarks/conv_projections.py: separate against fused per stage, every tile (torch only, about 1 min)
#   model     gpu_check.py model rows: the default batch-1 graph against conv-projected, fp16 and fp32, ConvNeXt-T in
#             the same call (about 6 min)
#   timeline  gpu_timeline.py: one fp16 batch-1 replay's kernels, default against conv-projected (about 2 min)
#
# Same set-up as gpu_check.sh (vmamba_export/_native carried, onnxruntime-gpu in $ORT_GPU_SITE). Logs: $OUT (else
# ./gpu_results)/batch1_<step>.txt, and gpu_check's and gpu_timeline's own files.
set -u
cd "$(dirname "$0")/.."
export OUT="${OUT:-$PWD/gpu_results}"
mkdir -p "$OUT"
export PYTHONPATH="${ORT_GPU_SITE:+$ORT_GPU_SITE:}$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
# run LOG COMMAND...: the command's output to the screen and LOG, its own exit status back
run() {
  local log=$1
  shift
  "$@" 2>&1 | tee "$log"
  return "${PIPESTATUS[0]}"
}
status=0
for step in "$@"; do
  log="$OUT/batch1_$step.txt"
  echo "== $step ($(date -u +%H:%M:%S) UTC) -> $log"
  case "$step" in
    tests)
      run "$log" "$PY" -m pytest -m gpu -o addopts="" -q -p no:cacheprovider tests/test_cuda.py -k \
        "conv_projections or conv-projected or batch1_graph or graph_path_matches_plain or packed_scan_paths_agree" ;;
    kernels) run "$log" "$PY" benchmarks/conv_projections.py --batches 1 8 ;;
    model)
      run "$log" "$PY" benchmarks/gpu_check.py --skip kernel --skip bandwidth --skip floor \
        --rows fp16 fp16-batch1-conv-projected fp32 fp32-batch1-conv-projected ;;
    timeline)
      run "$log" "$PY" benchmarks/gpu_timeline.py --fusions on --batch1-fusions default conv-projected \
        --precisions fp16 --skip-probes ;;
    *) echo "unknown step $step (tests, kernels, model, timeline)"; status=2; continue ;;
  esac || status=1
done
exit "$status"
