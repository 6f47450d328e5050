#!/usr/bin/env bash
# Gather, here, TVM's runtime pieces that benchmarks/gpu_tvm_check.sh needs on the GPU machine (Python 3.12, no
# registry there): tvm_ffi for cp312 (unpacked wheel) and libtvm_runtime{,_cuda}.so from this venv's apache-tvm, plus
# libcudart.so.13 in case torch there has none loaded. About 10 MB; the folder is git-ignored (.git/info/exclude).
#
#   bash benchmarks/gpu_tvm_runtime.sh [OUT_DIR]     (default .tvm-rt)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.tvm-rt}"
py=.venv/bin/python
ffi_version=$("$py" -c "import importlib.metadata as m; print(m.version('apache-tvm-ffi'))")
tvm_lib=$("$py" -c "import tvm, pathlib; print(pathlib.Path(tvm.__file__).parent / 'lib')")
rm -rf "$out" && mkdir -p "$out/site" "$out/lib"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$tmp" "apache-tvm-ffi==$ffi_version"
"$py" -m zipfile -e "$tmp"/apache_tvm_ffi-*.whl "$out/site"
cp "$tvm_lib/libtvm_runtime.so" "$tvm_lib/libtvm_runtime_cuda.so" "$out/lib/"
cudart=$(ls "${CUDA_HOME:-/usr/local/cuda}"/lib*/libcudart.so.13 2>/dev/null | head -1 || true)
if [ -n "$cudart" ]; then cp -L "$cudart" "$out/lib/libcudart.so.13"; else echo "no libcudart.so.13 found (optional)"; fi
du -sh "$out"
