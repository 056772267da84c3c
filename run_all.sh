#!/usr/bin/env bash
# Regenerate every figure and the claims report by running the notebooks with papermill.
set -uo pipefail

usage() {
  cat <<'USAGE'
Usage: ./run_all.sh [NOTEBOOK_OR_FOLDER ...] [PAPERMILL_OPTIONS ...]

Runs the notebooks under notebooks/ with papermill, in a fixed order (the toy world first, then
lost_in_attention, projlens, safeseek), and regenerates figures/, figures/claims.json and
figures/REPORT.md. Sets up .venv on first use (torch CPU build where there is no GPU).

  NOTEBOOK_OR_FOLDER   run only these notebooks (files, or folders searched for *.ipynb)
  -p NAME VALUE        a notebook parameter, passed to every notebook run (papermill -p)
  -r NAME VALUE        a raw string parameter (papermill -r)
  -y YAML              parameters as YAML (papermill -y)
  -f FILE              parameters from a YAML file (papermill -f)
  --out DIR            where executed copies go (default: outputs/notebooks); the source
                       notebooks are never overwritten
  -h, --help           this help

Each notebook's executed copy keeps its outputs; a failing notebook does not stop the run: the
script goes on and exits non-zero naming the notebooks that failed.

Examples:
  ./run_all.sh
  ./run_all.sh notebooks/projlens
  ./run_all.sh notebooks/lost_in_attention -p model /models/llava-1.5-7b-hf -p device cuda
USAGE
}

cd "$(dirname "$0")"
ROOT="$(pwd)"
OUT="$ROOT/outputs/notebooks"
targets=()
params=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    -p|-r) [ $# -ge 3 ] || { echo "error: $1 needs NAME and VALUE" >&2; exit 2; }
           params+=("$1" "$2" "$3"); shift 3 ;;
    -y|-f) [ $# -ge 2 ] || { echo "error: $1 needs a value" >&2; exit 2; }
           params+=("$1" "$2"); shift 2 ;;
    --out) [ $# -ge 2 ] || { echo "error: --out needs a folder" >&2; exit 2; }
           OUT="$(mkdir -p "$2" && cd "$2" && pwd)"; shift 2 ;;
    -*) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) [ -e "$1" ] || { echo "error: $1 does not exist" >&2; exit 2; }
       targets+=("$1"); shift ;;
  esac
done

source scripts/ensure_env.sh
locus_ensure_env || exit 1

# The fixed order: the toy world first, then each paper's notebooks in name order.
order=(notebooks/00_toy_world.ipynb)
for paper in lost_in_attention projlens safeseek; do
  while IFS= read -r nb; do order+=("$nb"); done < <(find "notebooks/$paper" -name '*.ipynb' \
    -not -path '*/.ipynb_checkpoints/*' 2>/dev/null | sort)
done
selected=()
for nb in "${order[@]}"; do
  [ -f "$nb" ] || continue
  if [ ${#targets[@]} -eq 0 ]; then selected+=("$nb"); continue; fi
  for t in "${targets[@]}"; do
    t="${t%/}"
    if [ "$nb" = "$t" ] || [ "$nb" = "${t#./}" ] || [[ "$nb" == "${t#./}"/* ]]; then
      selected+=("$nb"); break
    fi
  done
done
[ ${#selected[@]} -gt 0 ] || { echo "error: no notebooks matched ${targets[*]}" >&2; exit 2; }

failed=()
total=${#selected[@]}
start_all=$SECONDS
for i in "${!selected[@]}"; do
  nb="${selected[$i]}"
  dest="$OUT/${nb#notebooks/}"
  mkdir -p "$(dirname "$dest")"
  echo "[$((i + 1))/$total] running $nb"
  t0=$SECONDS
  if "$PY" -m papermill "$nb" "$dest" -k locus --cwd "$(dirname "$nb")" --progress-bar \
      ${params[@]+"${params[@]}"}; then
    echo "[$((i + 1))/$total] done $nb in $((SECONDS - t0)) s -> $dest"
  else
    echo "[$((i + 1))/$total] FAILED $nb after $((SECONDS - t0)) s (executed copy: $dest)"
    failed+=("$nb")
  fi
done

"$PY" -m locus.results
echo "all notebooks: $((SECONDS - start_all)) s; report: figures/REPORT.md"
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed notebooks:" "${failed[@]}" >&2
  exit 1
fi
