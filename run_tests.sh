#!/usr/bin/env bash
# Run every check: the library's pytest suite, then nbval over the notebooks (lax mode: the
# cells tagged nbval-check-output must reproduce their stored numbers; every cell must run).
# Sets up .venv on first use. Extra arguments go to pytest (e.g. ./run_tests.sh -k masks).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_env.sh
locus_ensure_env
export LOCUS_FIGURES_DIR="${LOCUS_FIGURES_DIR:-$(mktemp -d)}"
export PYTHONHASHSEED=0
exec "$PY" -m pytest tests notebooks --nbval-lax --nbval-current-env -p no:cacheprovider \
  -o addopts="" --durations=15 "$@"
