"""The statistics of an evaluation: intervals for a score, and whether two models differ on the same examples.

- A right/wrong score (each example 0 or 1) gets the Wilson score interval, which
  stays inside [0, 1] and is honest at 0 % and 100 % and on small sets, where the
  normal approximation says "± 0".
- Any other score gets a percentile bootstrap interval of its mean.
- Two models on the same examples are compared paired: McNemar's exact test on
  the examples only one of them gets right (right/wrong scores), else a paired
  bootstrap of the mean difference. Both are two-sided.

numpy only, seeded: the same scores give the same intervals and p-values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Bootstrap resamples; 2,000 puts the 95 % bounds within about a tenth of their width.
RESAMPLES = 2000
Z95 = 1.959963984540054


@dataclass(frozen=True)
class Interval:
    """A score's mean and its 95 % interval."""

    mean: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def is_binary(scores) -> bool:
    """Whether every score is 0 or 1 (a right/wrong metric)."""
    return all(s in (0, 1) for s in scores)


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion: (low, high)."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # Rounded far below any shown digit: at 0 of n the bound is 0, not a float's 2.8e-17.
    return (max(0.0, round(centre - spread, 12)), min(1.0, round(centre + spread, 12)))


def interval(scores, *, seed: int = 0) -> Interval:
    """The mean of ``scores`` with its 95 % interval (Wilson for 0/1 scores, else a percentile bootstrap)."""
    import numpy as np

    values = np.asarray([s for s in scores if s is not None and not math.isnan(s)], dtype=float)
    if not len(values):
        return Interval(math.nan, math.nan, math.nan)
    mean = float(values.mean())
    if is_binary(values):
        low, high = wilson(int(values.sum()), len(values))
        return Interval(mean, low, high)
    if len(values) == 1:
        return Interval(mean, mean, mean)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(RESAMPLES, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return Interval(mean, float(low), float(high))


def mcnemar(a, b) -> float:
    """Two-sided exact McNemar p-value for paired 0/1 scores ``a`` and ``b`` of the same examples."""
    only_a = sum(1 for x, y in zip(a, b) if x == 1 and y == 0)
    only_b = sum(1 for x, y in zip(a, b) if x == 0 and y == 1)
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_bootstrap(a, b, *, seed: int = 0) -> float:
    """Two-sided p-value that the mean of ``a - b`` over the same examples is zero (paired bootstrap)."""
    import numpy as np

    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    diff = diff[~np.isnan(diff)]
    if not len(diff) or not diff.any():
        return 1.0
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(RESAMPLES, len(diff)))].mean(axis=1)
    # How often the resampled difference lands on the other side of zero, both ways.
    share = min((means <= 0).mean(), (means >= 0).mean())
    return float(min(1.0, 2 * share + 1 / RESAMPLES))


def paired_p(a, b, *, seed: int = 0) -> float:
    """The paired test that suits the scores: McNemar for 0/1 scores, else the paired bootstrap."""
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None
             and not (isinstance(x, float) and math.isnan(x)) and not (isinstance(y, float) and math.isnan(y))]
    xs, ys = [x for x, _ in pairs], [y for _, y in pairs]
    if is_binary(xs) and is_binary(ys):
        return mcnemar(xs, ys)
    return paired_bootstrap(xs, ys, seed=seed)


def highest(means: dict) -> str | None:
    """The key of the highest mean (NaN never counts), the first of those tied; None when none is a number."""
    found = [(value, -i, key) for i, (key, value) in enumerate(means.items())
             if value is not None and not math.isnan(value)]
    return max(found)[2] if found else None
