"""The model matrix of ``run_all.sh``: which models each notebook runs on, read from
``notebooks/model_matrix.txt``, and the papermill runs it plans.

A run keeps the notebook's defaults (the toy models; figures into ``figures/`` itself) or sets
parameters (another model; figures into ``figures/<run>/``, so no run overwrites another's
claims). ``python -m locus.matrix`` prints the plan for ``run_all.sh``, one shell-quoted line a
run, and says on stderr which runs it skips because their model is not on this machine.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from locus.paths import REPO_ROOT, figures_dir
from locus.results import model_label

NOTEBOOKS = REPO_ROOT / "notebooks"
MATRIX = NOTEBOOKS / "model_matrix.txt"
MODEL_PARAMETERS = ("model", "vlm_model", "chat_model")
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


@dataclass(frozen=True)
class Run:
    """One papermill run: a notebook (its path under notebooks/, no suffix), the run's name, and
    the parameters it sets (none: the notebook's defaults)."""

    notebook: str
    name: str
    parameters: tuple[tuple[str, str], ...] = ()

    @property
    def is_default(self) -> bool:
        return not self.parameters

    def models(self) -> list[str]:
        """The models this run sets (values of model, vlm_model, chat_model)."""
        return [value for key, value in self.parameters if key in MODEL_PARAMETERS]


def _parse_line(words: list[str], where: str) -> Run:
    if len(words) < 3:
        raise ValueError(f"{where}: expected 'notebook run parameters' ('-' for the notebook's "
                         f"defaults), got {' '.join(words)!r}")
    notebook, name, rest = words[0], words[1], words[2:]
    if not _RUN_NAME.fullmatch(name):
        raise ValueError(f"{where}: run name {name!r} must be a plain folder name")
    if rest == ["-"]:
        return Run(notebook, name)
    pairs = []
    for word in rest:
        key, sep, value = word.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"{where}: parameter {word!r} is not NAME=VALUE")
        pairs.append((key, value))
    return Run(notebook, name, tuple(pairs))


def read_matrix(path: str | Path = MATRIX) -> list[Run]:
    """The runs of a matrix file in file order. Refuses a malformed line (naming it), a run name
    used twice for one notebook, and a notebook without exactly one run of its defaults."""
    runs = [_parse_line(words, f"{path}:{number}")
            for number, line in enumerate(Path(path).read_text().splitlines(), 1)
            if (words := shlex.split(line, comments=True))]
    names = [(r.notebook, r.name) for r in runs]
    twice = sorted({f"{nb} ({name})" for nb, name in names if names.count((nb, name)) > 1})
    if twice:
        raise ValueError(f"{path}: runs named twice for one notebook: {', '.join(twice)}")
    for notebook in dict.fromkeys(r.notebook for r in runs):
        defaults = sum(r.is_default for r in runs if r.notebook == notebook)
        if defaults != 1:
            raise ValueError(f"{path}: {notebook} needs exactly one run of its defaults ('-'), "
                             f"has {defaults}")
    return runs


def find_notebooks(root: Path = NOTEBOOKS) -> list[str]:
    """The notebooks under ``root`` in run order: top-level ones first (the toy world), then
    each paper's folder in name order; as paths under ``root`` without ``.ipynb``."""
    paths = [p.relative_to(root) for p in root.rglob("*.ipynb")
             if ".ipynb_checkpoints" not in p.parts]
    paths.sort(key=lambda p: (len(p.parts) > 1, p.as_posix()))
    return [p.with_suffix("").as_posix() for p in paths]


def select_notebooks(notebooks: list[str], targets: list[str], root: Path = NOTEBOOKS) -> list[str]:
    """The notebooks that are, or lie under, one of ``targets`` (files or folders); all of them
    when there are no targets."""
    if not targets:
        return list(notebooks)
    wanted = [Path(t).resolve() for t in targets]

    def matches(nb: str) -> bool:
        path = (root / f"{nb}.ipynb").resolve()
        return any(path == w or w in path.parents for w in wanted)

    chosen = [nb for nb in notebooks if matches(nb)]
    if not chosen:
        raise ValueError(f"no notebooks matched {' '.join(targets)}")
    return chosen


def model_missing(name: str) -> str | None:
    """Why ``name`` cannot run on this machine, or None: it must be a model ``locus.zoo`` serves
    by name or an existing checkpoint folder."""
    from locus import zoo  # imports torch: only when a run names a model

    if name in zoo.named_models() or Path(name).is_dir():
        return None
    return (f"model {name!r} is neither in locus.zoo ({', '.join(zoo.named_models())}) "
            "nor an existing folder")


def user_parameters(params: list[str]) -> dict:
    """The parameters that papermill options set (-p/-r NAME VALUE, -y YAML, -f FILE)."""
    given: dict = {}
    i = 0
    while i < len(params):
        flag = params[i]
        if flag in ("-p", "-r") and i + 2 < len(params):
            given[params[i + 1]] = params[i + 2]
            i += 3
        elif flag in ("-y", "-f") and i + 1 < len(params):
            text = params[i + 1] if flag == "-y" else Path(params[i + 1]).read_text()
            loaded = yaml.safe_load(text) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{flag} {params[i + 1]!r}: expected a YAML mapping of parameters")
            given.update(loaded)
            i += 2
        else:
            raise ValueError(f"unexpected papermill option {flag!r} (use -p, -r, -y or -f)")
    return given


def plan(matrix: list[Run], notebooks: list[str], names: list[str] | None = None,
         params: list[str] | None = None) -> tuple[list[Run], list[str]]:
    """The runs to make for ``notebooks`` (in their order) and a message per run skipped.

    Model parameters among ``params`` make one run per notebook on that model instead of the
    matrix's (named after the model). Otherwise the matrix's runs, only those in ``names`` when
    given; a run whose model is not on this machine is skipped."""
    covered = {r.notebook for r in matrix}
    missing = [nb for nb in notebooks if nb not in covered]
    if missing:
        raise ValueError(f"not in the model matrix {MATRIX.name}: {', '.join(missing)}; "
                         "add a line per run")
    given = user_parameters(params or [])
    if "figures_dir" in given:
        raise ValueError("run_all.sh gives each run its own figures folder: set LOCUS_FIGURES_DIR "
                         "to move them all instead of passing figures_dir")
    chosen = [(key, str(given[key])) for key in MODEL_PARAMETERS if key in given]
    if chosen:
        if names:
            raise ValueError("--models chooses runs of the matrix; a model parameter "
                             "(-p model ...) makes its own run: give one or the other")
        name = "+".join(model_label(value) for _, value in chosen)
        return [Run(nb, name, tuple(chosen)) for nb in notebooks], []
    if names:
        unknown = sorted(set(names) - {r.name for r in matrix})
        if unknown:
            raise ValueError(f"no runs named {', '.join(unknown)} in {MATRIX.name} (runs: "
                             f"{', '.join(sorted({r.name for r in matrix}))})")
    runs, skipped = [], []
    for nb in notebooks:
        for run in (r for r in matrix if r.notebook == nb and (not names or r.name in names)):
            reasons = [why for model in run.models() if (why := model_missing(model))]
            if reasons:
                skipped.append(f"skipped {nb} on {run.name}: {'; '.join(reasons)}")
            else:
                runs.append(run)
    return runs, skipped


def papermill_args(run: Run, out: Path, params: list[str] | None = None,
                   figures: Path | None = None) -> list[str]:
    """The papermill arguments of ``run``: source, executed copy ``<out>/<run>/<notebook>``,
    the run's parameters (a non-default run's figures into ``<figures>/<run>``), then
    ``params``."""
    args = [str(NOTEBOOKS / f"{run.notebook}.ipynb"), str(out / run.name / f"{run.notebook}.ipynb")]
    for key, value in run.parameters:  # a [list] value goes as YAML (-p would make it a string)
        args += ["-y", f"{key}: {value}"] if value.startswith("[") else ["-p", key, value]
    if not run.is_default:
        args += ["-p", "figures_dir", str(figures_dir(figures) / run.name)]
    return args + list(params or [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Print run_all.sh's plan: one shell-quoted line per run (notebook, run "
                    "name, papermill arguments); skipped runs are named on stderr.")
    parser.add_argument("targets", nargs="*", help="notebooks or folders (default: all)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "outputs" / "notebooks",
                        help="folder of the executed copies")
    parser.add_argument("--models", default=None,
                        help="comma-separated run names of the matrix (default: all)")
    parser.add_argument("--params", nargs=argparse.REMAINDER, default=[],
                        help="papermill options passed to every run (last)")
    args = parser.parse_args(argv)
    try:
        notebooks = select_notebooks(find_notebooks(), args.targets)
        names = [n for n in args.models.split(",") if n] if args.models else None
        runs, skipped = plan(read_matrix(), notebooks, names, args.params)
    except (ValueError, OSError, yaml.YAMLError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for message in skipped:
        print(message, file=sys.stderr)
    for run in runs:
        print(shlex.join([run.notebook, run.name, *papermill_args(run, args.out, args.params)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
