"""Bootstrap intervals of benchmark accuracies and paired differences (jobs/intervals.py)."""

from __future__ import annotations

import numpy as np
import pytest

from jobs.intervals import Interval, accuracy_interval, paired_difference, verdict


def test_accuracy_interval_pools_seeds_and_covers_the_binomial_spread():
    rng = np.random.default_rng(0)
    correct = (rng.random((3, 1000)) < 0.6).astype(float)  # 3 seeds x 1000 questions, p = 0.6
    ci = accuracy_interval(correct)
    assert ci.estimate == pytest.approx(correct.mean())
    assert ci.low < ci.estimate < ci.high and ci.holds(0.6)
    # about 1.96 standard errors of a mean over 1000 questions each side (seeds averaged first)
    se = correct.mean(axis=0).std(ddof=1) / np.sqrt(1000)
    assert ci.high - ci.low == pytest.approx(2 * 1.96 * se, rel=0.15)


def test_constant_scores_give_a_point_interval():
    ci = accuracy_interval(np.ones((2, 50)))
    assert (ci.estimate, ci.low, ci.high) == (1.0, 1.0, 1.0)


def test_paired_difference_sees_a_consistent_gain_that_unpaired_noise_would_hide():
    rng = np.random.default_rng(1)
    hard = rng.random(400) < 0.5  # half the questions are hard for both methods
    base = np.where(hard, 0.0, 1.0)[None, :].repeat(3, 0)
    better = base.copy()
    better[:, np.flatnonzero(hard)[:40]] = 1.0  # +10 points on the same questions, every seed
    diff = paired_difference(better, base)
    assert diff.estimate == pytest.approx(0.1) and diff.low > 0.05 and verdict(diff) == "higher"
    assert verdict(paired_difference(base, better)) == "lower"


def test_a_difference_whose_interval_holds_zero_is_no_difference():
    rng = np.random.default_rng(2)
    a = (rng.random((3, 100)) < 0.30).astype(float)
    b = (rng.random((3, 100)) < 0.28).astype(float)
    diff = paired_difference(a, b)
    assert diff.holds(0.0) and verdict(diff) == "no difference found"
    assert verdict(Interval(0.05, 0.01, 0.09, 0.95)) == "higher"


@pytest.mark.parametrize("bad, message", [
    (np.zeros((2, 0)), "expected \\(seeds, questions\\)"),
    (np.full((1, 3), 1.5), "in \\[0, 1\\]"),
    (np.full((1, 3), np.nan), "no NaN"),
])
def test_bad_scores_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        accuracy_interval(bad)


def test_paired_scores_need_the_same_questions():
    with pytest.raises(ValueError, match="same questions: 3 vs 4"):
        paired_difference(np.ones((1, 3)), np.ones((1, 4)))
