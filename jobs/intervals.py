"""Confidence intervals for benchmark accuracies: a percentile bootstrap over questions, seeds pooled, and the
paired difference of two methods on the same questions (what `bench/quality.py` reports).

``correct`` is a (seeds, questions) array of 0/1 (or partial credit in [0, 1]): run s's score on question q, the
questions in the same order for every run and method. A method's accuracy is the mean over both axes; its
interval resamples questions (the seeds of a resampled question come along), so it covers question sampling,
the larger source of noise here, with the seed-to-seed spread folded into each question's mean. A paired
difference resamples the same questions for both methods. An interval that holds 0 means "no difference
found", never a win (``verdict``). Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    estimate: float  # the statistic on the data as it is
    low: float  # lower end of the (1 - alpha) percentile interval
    high: float  # upper end
    level: float  # 1 - alpha, e.g. 0.95

    def holds(self, value: float) -> bool:
        return self.low <= value <= self.high

    def __str__(self) -> str:
        return f"{self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}]"


def _check(correct: np.ndarray) -> np.ndarray:
    a = np.asarray(correct, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[1] == 0:
        raise ValueError(f"expected (seeds, questions) scores, got shape {a.shape}")
    if np.isnan(a).any() or (a < 0).any() or (a > 1).any():
        raise ValueError("scores must be in [0, 1] with no NaN")
    return a


def _bootstrap(per_question: np.ndarray, n_boot: int, level: float, seed: int) -> Interval:
    if not 0 < level < 1 or n_boot < 100:
        raise ValueError(f"level must be in (0, 1) and n_boot >= 100, got {level} and {n_boot}")
    rng = np.random.default_rng(seed)
    q = len(per_question)
    means = per_question[rng.integers(0, q, size=(n_boot, q))].mean(axis=1)  # (n_boot,)
    alpha = 1 - level
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return Interval(float(per_question.mean()), float(low), float(high), level)


def accuracy_interval(correct: np.ndarray, n_boot: int = 10_000, level: float = 0.95, seed: int = 0) -> Interval:
    """Accuracy over seeds and questions with a bootstrap-over-questions interval."""
    return _bootstrap(_check(correct).mean(axis=0), n_boot, level, seed)


def paired_difference(a: np.ndarray, b: np.ndarray, n_boot: int = 10_000, level: float = 0.95,
                      seed: int = 0) -> Interval:
    """accuracy(a) - accuracy(b) on the same questions, with a paired bootstrap interval (the same resampled
    questions for both; each method's seeds averaged per question first, so seed counts may differ)."""
    a, b = _check(a), _check(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"paired scores need the same questions: {a.shape[1]} vs {b.shape[1]}")
    return _bootstrap(a.mean(axis=0) - b.mean(axis=0), n_boot, level, seed)


def verdict(diff: Interval) -> str:
    """How a paired difference reads: a win or a loss only when its interval excludes 0."""
    if diff.holds(0.0):
        return "no difference found"
    return "higher" if diff.low > 0 else "lower"
