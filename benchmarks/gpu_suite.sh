#!/usr/bin/env bash
# The GPU session in one command: install from the tree (no network), the CUDA tests, every
# benchmark, one summary.md -- see benchmarks/gpu_suite.py for the parts and the limits.
#   bash benchmarks/gpu_suite.sh [--dry-run] [--out DIR]
# --dry-run: the same script on a CPU with tiny shapes (what CI runs).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
exec "$PY" -m benchmarks.gpu_suite "$@"
