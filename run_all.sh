#!/usr/bin/env bash
# Regenerate every figure, the claims report and the HTML pages by running the notebooks with
# papermill, each on every model of the model matrix (notebooks/model_matrix.txt).
set -uo pipefail

usage() {
  cat <<'USAGE'
Usage: ./run_all.sh [NOTEBOOK_OR_FOLDER ...] [OPTIONS] [PAPERMILL_OPTIONS ...]

Runs the notebooks under notebooks/ with papermill, in a fixed order (the toy world first, then
lost_in_attention, projlens, safeseek), each on the models the model matrix lists for it, then
writes figures/claims.json, figures/REPORT.md and the HTML pages. Sets up .venv on first use
(torch CPU build where there is no GPU).

The model matrix, notebooks/model_matrix.txt, has one line per run: notebook, run name,
papermill parameters ("-": the notebook's defaults, the toy models). The defaults' run writes
figures/ and figures/claims/ (the committed results); every other run writes figures/<run>/, so
no run overwrites another's claims. A run whose model is not on this machine (neither in
locus.zoo nor an existing folder) is skipped with a message. The report has a column per run.

  NOTEBOOK_OR_FOLDER   run only these notebooks (files, or folders searched for *.ipynb)
  --models NAMES       only these runs of the matrix, comma-separated (e.g. --models toy);
                       default: every run whose model is available
  -p NAME VALUE        a notebook parameter, passed to every run (papermill -p)
  -r NAME VALUE        a raw string parameter (papermill -r)
  -y YAML              parameters as YAML (papermill -y)
  -f FILE              parameters from a YAML file (papermill -f)
                       A model parameter (model, vlm_model, chat_model) replaces the matrix:
                       each chosen notebook runs once on that model, as run <model's name>.
  --out DIR            where executed copies go, one folder per run (default: outputs/notebooks);
                       the source notebooks are never overwritten
  --html DIR           where the HTML pages go (default: outputs/html; index: DIR/index.html)
  --list               print the planned and the skipped runs, run nothing
  -h, --help           this help

Each executed copy keeps its outputs (DIR/<run>/<notebook>.ipynb) and becomes a static page
(outputs/html/<run>/<notebook>.html, figures embedded); outputs/html/index.html holds the
findings, a link per notebook and run, and the claims report. A failing notebook does not stop
the run: the script goes on and exits non-zero naming the runs that failed.

Examples:
  ./run_all.sh
  ./run_all.sh --models toy
  ./run_all.sh notebooks/projlens
  ./run_all.sh notebooks/lost_in_attention -p model /models/llava-1.5-7b-hf -p device cuda
USAGE
}

cd "$(dirname "$0")"
ROOT="$(pwd)"
OUT="$ROOT/outputs/notebooks"
HTML="$ROOT/outputs/html"
targets=()
params=()
models=""
list=0
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    -p|-r) [ $# -ge 3 ] || { echo "error: $1 needs NAME and VALUE" >&2; exit 2; }
           params+=("$1" "$2" "$3"); shift 3 ;;
    -y|-f) [ $# -ge 2 ] || { echo "error: $1 needs a value" >&2; exit 2; }
           params+=("$1" "$2"); shift 2 ;;
    --models) [ $# -ge 2 ] || { echo "error: --models needs run names" >&2; exit 2; }
              models="$2"; shift 2 ;;
    --out) [ $# -ge 2 ] || { echo "error: --out needs a folder" >&2; exit 2; }
           OUT="$(mkdir -p "$2" && cd "$2" && pwd)"; shift 2 ;;
    --html) [ $# -ge 2 ] || { echo "error: --html needs a folder" >&2; exit 2; }
            HTML="$(mkdir -p "$2" && cd "$2" && pwd)"; shift 2 ;;
    --list) list=1; shift ;;
    -*) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) [ -e "$1" ] || { echo "error: $1 does not exist" >&2; exit 2; }
       targets+=("$1"); shift ;;
  esac
done

source scripts/ensure_env.sh
locus_ensure_env || exit 1

# The plan: one shell-quoted line per run (notebook, run name, papermill arguments).
plan="$("$PY" -m locus.matrix ${targets[@]+"${targets[@]}"} --out "$OUT" --models "$models" \
  --params ${params[@]+"${params[@]}"})" || exit 2
runs=()
[ -n "$plan" ] && mapfile -t runs <<< "$plan"
[ ${#runs[@]} -gt 0 ] || { echo "error: no runs to make" >&2; exit 2; }
if [ "$list" = 1 ]; then
  for line in "${runs[@]}"; do eval "run=($line)"; echo "run ${run[0]} on ${run[1]}"; done
  exit 0
fi

failed=()
total=${#runs[@]}
start_all=$SECONDS
for i in "${!runs[@]}"; do
  eval "run=(${runs[$i]})"
  nb="${run[0]}" name="${run[1]}" dest="${run[3]}"
  mkdir -p "$(dirname "$dest")"
  echo "[$((i + 1))/$total] running $nb on $name"
  t0=$SECONDS
  if "$PY" -m papermill "${run[@]:2}" -k locus --cwd "$(dirname "notebooks/$nb")" \
      --progress-bar; then
    echo "[$((i + 1))/$total] done $nb on $name in $((SECONDS - t0)) s -> $dest"
  else
    echo "[$((i + 1))/$total] FAILED $nb on $name after $((SECONDS - t0)) s (executed copy: $dest)"
    failed+=("$nb on $name")
  fi
done

"$PY" -m locus.results || failed+=("the claims report")
"$PY" -m locus.pages --notebooks "$OUT" --html "$HTML" || failed+=("the HTML pages")
echo "all runs: $((SECONDS - start_all)) s"
if [ ${#failed[@]} -gt 0 ]; then
  printf 'failed: %s\n' "${failed[@]}" >&2
  exit 1
fi
