"""The fine-tune seed as a source of uncertainty: a number's mean and spread (min–max) over
seeds, and a verdict rule applied per seed and combined over seeds.

Each seed of a ProjLens notebook is a new data draw, poisoning and projector fine-tune (and a
new random-ΔW control); an interval over test inputs says nothing about how another fine-tune
would come out, so every compared number is shown with its spread over seeds, and a verdict
counts only where every seed gives it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from locus.results import VERDICTS


@dataclass(frozen=True)
class Spread:
    """The mean of one number over seeds and its range (min–max); ``n`` seeds; ``integer``:
    the values are counts (the range is printed without decimals)."""

    mean: float
    lo: float
    hi: float
    n: int
    integer: bool = False

    def text(self, scale: float = 1.0, digits: int = 3) -> str:
        """"mean (min–max)" of the values times ``scale``; the value alone where every seed
        gives the same one."""
        if self.integer and scale == 1:
            if self.lo == self.hi:
                return f"{self.lo:.0f}"
            return f"{self.mean:.1f} ({self.lo:.0f}–{self.hi:.0f})"
        mean, lo, hi = (f"{scale * v:.{digits}f}" for v in (self.mean, self.lo, self.hi))
        return mean if lo == hi else f"{mean} ({lo}–{hi})"

    def __str__(self) -> str:
        return self.text()


def spread(values: Sequence[float]) -> Spread:
    """Mean and min–max of one number's values over seeds (NaNs, e.g. a rate on no inputs,
    are left out; all-NaN gives a NaN spread)."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("spread needs at least one value")
    kept = [x for x in xs if not math.isnan(x)]
    if not kept:
        return Spread(math.nan, math.nan, math.nan, 0)
    integer = all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in values)
    return Spread(sum(kept) / len(kept), min(kept), max(kept), len(kept), integer)


def by_seed(results: Sequence) -> dict[int, list]:
    """Results (anything with a ``seed``) grouped by seed, in the order the seeds first
    appear."""
    out: dict[int, list] = {}
    for r in results:
        out.setdefault(r.seed, []).append(r)
    return out


def spread_rows(per_seed: Mapping[int, Sequence[Sequence]], n_labels: int) -> list[list]:
    """Rows of a per-seed table merged over seeds: the first ``n_labels`` cells (the labels)
    must agree across seeds; every other numeric cell becomes its ``Spread``, a non-numeric
    one is kept where all seeds agree and joined with " / " (seed order) where they do not."""
    tables = list(per_seed.values())
    if not tables or any(len(t) != len(tables[0]) for t in tables):
        raise ValueError("every seed needs a table of the same number of rows")
    rows = []
    for cells in zip(*tables, strict=True):
        labels = [list(c[:n_labels]) for c in cells]
        if any(lab != labels[0] for lab in labels):
            raise ValueError(f"row labels differ across seeds: {labels}")
        row = labels[0]
        for values in list(zip(*cells, strict=True))[n_labels:]:
            if all(isinstance(v, int | float | np.number) and not isinstance(v, bool)
                   for v in values):
                row.append(spread(values))
            else:
                texts = [str(v) for v in values]
                row.append(texts[0] if len(set(texts)) == 1 else " / ".join(texts))
        rows.append(row)
    return rows


def combined_verdict(per_seed: Mapping[int, str]) -> str:
    """The verdict over seeds: the seeds' verdict where every seed that ran agrees; 'partly'
    where they differ (the claim holds, or partly holds, for some fine-tunes only); 'not run'
    if no seed ran."""
    ran = [v for v in per_seed.values() if v != "not run"]
    if any(v not in VERDICTS for v in per_seed.values()):
        raise ValueError(f"unknown verdicts {sorted(set(per_seed.values()) - set(VERDICTS))}")
    if not ran:
        return "not run"
    return ran[0] if len(set(ran)) == 1 else "partly"


def agreement_text(per_seed: Mapping[int, str]) -> str:
    """How the per-seed verdicts agree: "holds in 3/3 seeds", or "flips across seeds: holds
    in seeds 0, 2; partly in seed 1"."""
    n = len(per_seed)
    distinct = list(dict.fromkeys(per_seed.values()))
    if len(distinct) == 1:
        return f"{distinct[0]} in {n}/{n} seeds"
    parts = []
    for verdict in distinct:
        seeds = [str(s) for s, v in per_seed.items() if v == verdict]
        parts.append(f"{verdict} in seed{'s' if len(seeds) > 1 else ''} {', '.join(seeds)}")
    return "flips across seeds: " + "; ".join(parts)
