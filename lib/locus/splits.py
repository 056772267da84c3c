"""Held-out splits by construction: items are split by a group key (the prompt string, the
image), never by sample, so no prompt or image of one split appears in another.

``split_by_group`` assigns whole groups to the splits, ``shared_groups`` and ``assert_disjoint``
check it; every notebook draws its train / search / validation / test sets through these.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TypeVar

T = TypeVar("T")


def split_by_group(
    items: Sequence[T],
    group: Callable[[T], Hashable],
    fractions: Sequence[float],
    seed: int,
) -> list[list[T]]:
    """Split ``items`` into ``len(fractions)`` lists whose groups are disjoint.

    The distinct groups (in first-seen order) are shuffled with ``seed`` and cut by
    ``fractions`` of the *number of groups* (largest-remainder rounding, so the counts add up);
    every item follows its group, and within a split items keep their input order.
    """
    if not fractions or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions must be >= 0 and sum to 1, got {list(fractions)}")
    keys = list(dict.fromkeys(group(x) for x in items))
    if len(keys) < sum(1 for f in fractions if f > 0):
        raise ValueError(
            f"{len(keys)} distinct groups cannot fill {len(fractions)} non-empty splits; "
            "add prompts/images or merge splits"
        )
    random.Random(seed).shuffle(keys)
    exact = [f * len(keys) for f in fractions]
    counts = [int(e) for e in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[: len(keys) - sum(counts)]:
        counts[i] += 1
    where: dict[Hashable, int] = {}
    start = 0
    for split, count in enumerate(counts):
        for key in keys[start:start + count]:
            where[key] = split
        start += count
    out: list[list[T]] = [[] for _ in fractions]
    for x in items:
        out[where[group(x)]].append(x)
    return out


def shared_groups(a: Sequence[T], b: Sequence[T], group: Callable[[T], Hashable]) -> set:
    """The group keys that occur in both ``a`` and ``b``."""
    return {group(x) for x in a} & {group(x) for x in b}


def assert_disjoint(splits: Mapping[str, Sequence[T]], group: Callable[[T], Hashable]) -> None:
    """Raise ValueError naming the splits and keys that share a group; silent when disjoint."""
    names = list(splits)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            common = shared_groups(splits[first], splits[second], group)
            if common:
                shown = sorted(map(str, common))[:5]
                raise ValueError(
                    f"splits {first!r} and {second!r} share {len(common)} group(s), e.g. {shown}"
                )
