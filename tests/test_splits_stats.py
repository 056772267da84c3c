"""Known-answer tests of the held-out splits (locus.splits) and the uncertainty helpers
(locus.stats)."""

import math

import pytest

from locus import splits, stats


def _items():
    # 12 prompts, each asked 1-3 times (repeats are samples of the same prompt)
    return [(f"prompt {i}", r) for i in range(12) for r in range(1 + i % 3)]


def _prompt(item):
    return item[0]


def test_split_by_group_keeps_every_group_whole_and_disjoint():
    train, test = splits.split_by_group(_items(), _prompt, [0.75, 0.25], seed=0)
    assert len(train) + len(test) == len(_items())
    assert not splits.shared_groups(train, test, _prompt)
    assert len({_prompt(x) for x in train}) == 9 and len({_prompt(x) for x in test}) == 3
    splits.assert_disjoint({"train": train, "test": test}, _prompt)


def test_split_by_group_is_deterministic_and_seed_dependent():
    a = splits.split_by_group(_items(), _prompt, [0.5, 0.25, 0.25], seed=1)
    b = splits.split_by_group(_items(), _prompt, [0.5, 0.25, 0.25], seed=1)
    c = splits.split_by_group(_items(), _prompt, [0.5, 0.25, 0.25], seed=2)
    assert a == b and a != c
    assert [len({_prompt(x) for x in s}) for s in a] == [6, 3, 3]


def test_a_sample_split_would_be_caught():
    items = _items()
    by_sample = [items[::2], items[1::2]]  # the leak this module exists to prevent
    with pytest.raises(ValueError, match="share"):
        splits.assert_disjoint({"train": by_sample[0], "test": by_sample[1]}, _prompt)


@pytest.mark.parametrize("fractions", [[0.5, 0.6], [1.2, -0.2], []])
def test_bad_fractions_are_refused(fractions):
    with pytest.raises(ValueError, match="fractions"):
        splits.split_by_group(_items(), _prompt, fractions, seed=0)


def test_too_few_groups_are_refused():
    with pytest.raises(ValueError, match="distinct groups"):
        splits.split_by_group([("a", 0), ("a", 1)], _prompt, [0.5, 0.5], seed=0)


def test_wilson_interval_known_values():
    iv = stats.wilson_interval(8, 10)
    assert iv.estimate == 0.8
    assert iv.lo == pytest.approx(0.4902, abs=1e-4) and iv.hi == pytest.approx(0.9433, abs=1e-4)
    zero = stats.wilson_interval(0, 30)
    assert zero.lo == 0.0 and 0.10 < zero.hi < 0.12


def test_mean_interval_uses_student_t():
    iv = stats.mean_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t_{0.975, 2} * sd / sqrt(n)
    assert iv.estimate == 2.0 and iv.hi - iv.estimate == pytest.approx(half)
    assert stats.mean_interval([0.5]).n == 1


def test_paired_difference_and_compare():
    after = [1, 1, 1, 0, 1, 1, 1, 1, 1, 1] * 6
    before = [1] * 60
    diff = stats.paired_difference(after, before)
    assert diff.estimate == pytest.approx(-0.1)
    assert stats.compare(diff, margin=0.2) == "comparable"
    assert stats.compare(diff, margin=0.05) == "inconclusive"
    assert stats.compare(stats.paired_difference([0] * 60, before), margin=0.2) == "worse"
    assert stats.compare(stats.Interval(0.1, 0.02, 0.2, 50), margin=0.05) == "better"
    with pytest.raises(ValueError, match="same length"):
        stats.paired_difference([1, 0], [1])


def test_fisher_exact_p():
    assert stats.fisher_exact_p(3, 3, 1, 3) == pytest.approx(0.4)
    assert stats.fisher_exact_p(10, 10, 0, 10) < 1e-4


def test_rate_record_is_the_wilson_interval_as_a_dict():
    record = stats.rate_record([True, False, True, True])
    found = stats.wilson_interval(3, 4)
    assert record == {"rate": 0.75, "lo": found.lo, "hi": found.hi, "n": 4}
    with pytest.raises(ValueError, match="n > 0"):
        stats.rate_record([])
