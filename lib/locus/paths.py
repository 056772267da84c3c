"""Where the project's outputs go: figures, claims and model caches."""

from __future__ import annotations

import json
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def figures_dir(override: str | os.PathLike | None = None) -> Path:
    """The figures folder: ``override``, else ``$LOCUS_FIGURES_DIR``, else ``<repo>/figures``."""
    chosen = override or os.environ.get("LOCUS_FIGURES_DIR") or REPO_ROOT / "figures"
    path = Path(chosen)
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The user cache, outside the repository (real models converted at set-up, caches computed
    for models that are not embedded): ``override``, else ``$LOCUS_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/locus``, else ``~/.cache/locus``."""
    home_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = Path(override or os.environ.get("LOCUS_CACHE_DIR") or home_cache / "locus")
    path.mkdir(parents=True, exist_ok=True)
    return path


def benchmark_result(name: str) -> dict | None:
    """The committed result of ``benchmarks/<name>.py`` (``benchmarks/results/<name>.json``), or
    None where it was never run: performance goals are measured by those scripts, on a stated
    machine and load, not by whatever run made a cache."""
    path = REPO_ROOT / "benchmarks" / "results" / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None
