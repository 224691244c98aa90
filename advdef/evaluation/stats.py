"""Statistics of accuracies: Wilson intervals, the exact McNemar test, mean and sd over seeds (stdlib only)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Proportion:
    """k successes out of n, with its 95% Wilson interval."""

    k: int
    n: int

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.k, self.n)

    @property
    def half_width(self) -> float:
        low, high = self.interval
        return (high - low) / 2


def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval for k/n (well behaved near 0 and 1, unlike the Wald interval)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    low = 0.0 if k == 0 else max(0.0, centre - half)  # exact bounds where rounding would blur them
    high = 1.0 if k == n else min(1.0, centre + half)
    return (low, high)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for paired binary outcomes.

    `b` and `c` are the discordant pairs (robust under A only, robust under B only); under the
    null each discordant pair is a fair coin, so p = P(Binomial(b + c, 1/2) as extreme as
    observed) = min(1, 2 * P(X <= min(b, c))). Concordant pairs carry no information. The exact
    test (not the chi-square approximation) because evaluation subsets are small.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be non-negative, got b={b}, c={c}")
    trials = b + c
    if trials == 0:
        return 1.0
    tail = sum(math.comb(trials, i) for i in range(min(b, c) + 1)) / 2**trials
    return min(1.0, 2 * tail)


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); sd is None for a single value."""
    if not values:
        return (float("nan"), None)
    mean = sum(values) / len(values)
    if len(values) < 2:
        return (mean, None)
    return (mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)))
