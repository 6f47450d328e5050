#!/usr/bin/env bash
# An aarch64 test bench on this x86-64 Debian machine (idempotent; about a minute the first time, instant after):
#   - the cross compiler (g++-aarch64-linux-gnu) and qemu user-mode (qemu-user-static), from apt, if absent;
#   - an arm64 Debian bookworm root with Python 3.11 (debootstrap --foreign, unpacked, no chroot or binfmt);
#   - the RUNTIME ONLY as aarch64 wheels (numpy, onnxruntime, pillow, rich), no torch, installed into a site folder;
#   - a fake aarch64 /proc/cpuinfo inside the root (qemu -L serves it): onnxruntime's cpuinfo otherwise reads the
#     host's x86 one and segfaults under qemu (FIELD-NOTES.md, "ARM64 from this x86 machine");
#   - $ARM64_ENV/python: runs that emulated Python with the site folder on its path. QEMU_CPU=cortex-a53 (qemu reads
#     it) emulates a CPU without dot-product / fp16 arithmetic.
# Emulation is for correctness only (hundreds of times slower than hardware): never quote a speed measured under it.
# Usage: bash scripts/arm64_env.sh [ENV_DIR]   (default: .arm64 in the repository, or $VMAMBA_ARM64_ENV)
set -euo pipefail
cd "$(dirname "$0")/.."
ENV_DIR=$(realpath -m "${1:-${VMAMBA_ARM64_ENV:-.arm64}}")
ROOT=$ENV_DIR/root
WHEELS=$ENV_DIR/wheels
SITE=$ENV_DIR/site
MIRROR=${VMAMBA_DEBIAN_MIRROR:-http://deb.debian.org/debian}
HOST_PY=${PYTHON:-python3}
# The runtime install: what a device needs to load, predict, validate and bench an ONNX Runtime artifact; then the
# runtimes of cpu-openvino (openvino's aarch64 wheel is tagged manylinux_2_35 only) and cpu-tvm (tvm_ffi here, and
# libtvm_runtime.so alone from the aarch64 apache-tvm wheel below: no compiler).
RUNTIME_PACKAGES=(numpy "onnxruntime==1.32.*" "pillow>=10" "rich>=13" "openvino==2026.4.1" openvino-telemetry
  "apache-tvm-ffi==0.1.14.post0")
TVM_WHEEL="apache-tvm==0.27.0.post1"

say() { echo "arm64_env: $*"; }

need_apt=()
command -v aarch64-linux-gnu-g++ >/dev/null || need_apt+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64-static >/dev/null || need_apt+=(qemu-user-static)
command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || need_apt+=(debootstrap)
if [ ${#need_apt[@]} -gt 0 ]; then
  say "installing ${need_apt[*]} (apt-get)"
  sudo_=""
  [ "$(id -u)" -eq 0 ] || sudo_=sudo
  $sudo_ apt-get update -q >/dev/null
  $sudo_ apt-get install -y -q --no-install-recommends "${need_apt[@]}" >/dev/null
fi

mkdir -p "$ENV_DIR"
if [ ! -x "$ROOT/usr/bin/python3.11" ]; then
  say "arm64 Debian root with python3 into $ROOT (debootstrap --foreign)"
  rm -rf "$ROOT"
  PATH=$PATH:/usr/sbin debootstrap --arch=arm64 --foreign --variant=minbase --include=python3 bookworm "$ROOT" \
    "$MIRROR" >"$ENV_DIR/debootstrap.log" 2>&1
  # The second stage would need a chroot; unpacking the downloaded packages is enough to run Python.
  for deb in "$ROOT"/var/cache/apt/archives/*.deb; do dpkg -x "$deb" "$ROOT"; done
  rm -f "$ROOT"/var/cache/apt/archives/*.deb
fi

# A Neoverse-N1 (armv8.2-a with asimddp and asimdhp); QEMU_CPU=cortex-a53 changes the instructions qemu accepts and
# what getauxval(AT_HWCAP) reports, not this file.
mkdir -p "$ROOT/proc"
{
  for n in 0 1; do
    printf 'processor\t: %s\nBogoMIPS\t: 50.00\n' "$n"
    printf 'Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop'
    printf ' asimddp ssbs\n'
    printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n\n'
  done
} >"$ROOT/proc/cpuinfo"

stamp=$ENV_DIR/.runtime-wheels
want=$(printf '%s\n' "${RUNTIME_PACKAGES[@]}" | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  say "aarch64 wheels of the runtime (${RUNTIME_PACKAGES[*]}) into $SITE"
  wheel_flags=(--platform manylinux_2_35_aarch64 --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64
    --platform manylinux_2_17_aarch64 --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311)
  rm -rf "$SITE"
  "$HOST_PY" -m pip download -q --disable-pip-version-check "${wheel_flags[@]}" -d "$WHEELS" "${RUNTIME_PACKAGES[@]}"
  "$HOST_PY" -m pip install -q --disable-pip-version-check "${wheel_flags[@]}" --no-index --find-links "$WHEELS" \
    --target "$SITE" "${RUNTIME_PACKAGES[@]}"
  "$HOST_PY" -m pip download -q --disable-pip-version-check "${wheel_flags[@]}" --no-deps -d "$WHEELS" "$TVM_WHEEL"
  mkdir -p "$ENV_DIR/tvm-runtime"
  "$HOST_PY" - "$ENV_DIR/tvm-runtime/libtvm_runtime.so" "$WHEELS"/apache_tvm-*aarch64*.whl <<'PYEOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[-1]) as wheel:  # the runtime library alone (the compiler library is 240 MB)
    open(sys.argv[1], "wb").write(wheel.read("tvm/lib/libtvm_runtime.so"))
PYEOF
  echo "$want" >"$stamp"
fi

cat >"$ENV_DIR/python" <<EOF
#!/usr/bin/env bash
# The emulated aarch64 Python with the runtime-only site folder (written by scripts/arm64_env.sh).
export PYTHONPATH="$SITE\${PYTHONPATH:+:\$PYTHONPATH}"
export PYTHONNOUSERSITE=1
export VMAMBA_TVM_RUNTIME_LIB="$ENV_DIR/tvm-runtime/libtvm_runtime.so"
exec qemu-aarch64-static -L "$ROOT" "$ROOT/usr/bin/python3.11" "\$@"
EOF
chmod +x "$ENV_DIR/python"
"$ENV_DIR/python" -c 'import platform, numpy, onnxruntime; print("arm64_env: ok:", platform.machine(),
  "python", platform.python_version(), "numpy", numpy.__version__, "onnxruntime", onnxruntime.__version__)'
