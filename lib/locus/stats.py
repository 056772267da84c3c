"""Uncertainty for compared numbers: intervals for rates and seed means, paired differences,
an exact test for two rates, and the better / comparable / worse call that uses them.

Every verdict that compares two numbers goes through an interval here, so a difference inside
the noise of the sample is never called a change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats as _st


@dataclass(frozen=True)
class Interval:
    """An estimate with a two-sided confidence interval [lo, hi] and the sample size behind it."""

    estimate: float
    lo: float
    hi: float
    n: int

    def __str__(self) -> str:
        return f"{self.estimate:.3f} [{self.lo:.3f}, {self.hi:.3f}]"


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return float(_st.norm.ppf(0.5 + confidence / 2))


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> Interval:
    """Wilson score interval of a rate ``successes / n`` (well behaved at 0% and 100%)."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0, got {successes} of {n}")
    z = _z(confidence)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half), n)


def rate_record(flags: Sequence[bool], confidence: float = 0.95) -> dict:
    """The rate of true flags with its Wilson interval, as a plain dict (for manifests)."""
    found = wilson_interval(int(sum(flags)), len(flags), confidence)
    return {"rate": found.estimate, "lo": found.lo, "hi": found.hi, "n": found.n}


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean of ``values`` (e.g. one number per seed) with a Student-t interval; one value gives
    an interval of zero width at that value, flagged by ``n == 1``."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_interval needs at least one value")
    mean = sum(xs) / len(xs)
    if len(xs) == 1:
        return Interval(mean, mean, mean, 1)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    half = float(_st.t.ppf(0.5 + confidence / 2, len(xs) - 1)) * sd / math.sqrt(len(xs))
    return Interval(mean, mean - half, mean + half, len(xs))


def paired_difference(
    a: Sequence[float], b: Sequence[float], confidence: float = 0.95
) -> Interval:
    """Mean of ``a[i] - b[i]`` over paired items (the same prompts scored twice, e.g. 0/1
    correctness under an intervention and without it) with a Student-t interval."""
    if len(a) != len(b):
        raise ValueError(f"paired samples must have the same length, got {len(a)} and {len(b)}")
    return mean_interval([float(x) - float(y) for x, y in zip(a, b, strict=True)], confidence)


def fisher_exact_p(successes_a: int, n_a: int, successes_b: int, n_b: int) -> float:
    """Two-sided Fisher exact p-value that two rates are equal."""
    for s, n in ((successes_a, n_a), (successes_b, n_b)):
        if n <= 0 or not 0 <= s <= n:
            raise ValueError(f"need 0 <= successes <= n and n > 0, got {s} of {n}")
    table = [[successes_a, n_a - successes_a], [successes_b, n_b - successes_b]]
    return float(_st.fisher_exact(table)[1])


def compare(difference: Interval, margin: float) -> str:
    """Call a difference (intervention minus reference, higher is better) against a margin:

    - ``"better"``: the whole interval is above 0;
    - ``"comparable"``: the interval lies within ``[-margin, +∞)`` but not above 0
      (non-inferior: any loss is smaller than the margin);
    - ``"worse"``: the whole interval is below ``-margin``;
    - ``"inconclusive"``: the interval straddles ``-margin`` (too few samples to tell).
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if difference.lo > 0:
        return "better"
    if difference.lo >= -margin:
        return "comparable"
    if difference.hi < -margin:
        return "worse"
    return "inconclusive"
