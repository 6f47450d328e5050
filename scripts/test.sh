#!/usr/bin/env bash
# The test command (README, .ci/run): set-up, lint and format check, then the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
ruff format --check .
# Two workers (pytest-xdist), each taking whole test files so that a module's fixtures export their artifacts once;
# most of the suite is single-threaded Python (exports, graph rewrites). `bash scripts/test.sh -n 0`: one process.
python -m pytest -n 2 --dist loadfile "$@"
