#!/usr/bin/env bash
# All set-up on a fresh machine (idempotent, fast when already done): a venv in .venv with the pinned toolchain,
# this package installed editable, and the C++ kernels built (ONNX Runtime headers fetched from Debian at build time).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.vmamba-export-setup
want=$(cat pyproject.toml requirements.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  python -m pip install -q --disable-pip-version-check --upgrade pip
  # torch first and exactly: an unpinned `torch` pulls a multi-GB CUDA build.
  python -m pip install -q --disable-pip-version-check torch==2.13.0
  python -m pip install -q --disable-pip-version-check -r requirements.txt
  python -m pip install -q --disable-pip-version-check --no-deps -e .
  echo "$want" > "$stamp"
fi
python -m vmamba_export.build_kernels --quiet
# The linux-aarch64 libraries too where the cross compiler is installed (docs/platforms.md; nothing is installed here).
if command -v aarch64-linux-gnu-g++ >/dev/null; then
  python -m vmamba_export.build_kernels --quiet --platform linux-aarch64
fi
