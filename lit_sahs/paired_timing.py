"""Paired timing shared by the benchmarks (experiments/benchmarks/): two arms run in alternating order on
the same inputs, reported as the median of the per-pair ratios with a distribution-free interval, since
these machines are too noisy for absolute times compared across runs."""
from __future__ import annotations

import time
from math import comb
from typing import Callable


def median_interval(values: list, level: float = 0.95) -> tuple:
    """Distribution-free confidence interval of the median: the order statistics k and n-k+1 with k the
    largest index whose two-sided binomial(n, 1/2) tail stays within 1 - level (the whole range when n is
    too small for that)."""
    v, n = sorted(values), len(values)
    k = 0
    for j in range(1, n // 2 + 1):  # P(X < j) for X ~ Bin(n, 1/2), twice, must stay <= 1 - level
        if 2 * sum(comb(n, i) for i in range(j)) / 2 ** n <= 1 - level:
            k = j
    return (v[k - 1], v[n - k]) if k else (v[0], v[-1])


def alternating_seconds(arms: dict[str, Callable[[], object]], pairs: int) -> dict[str, list[float]]:
    """Seconds of each of two arms per pair, the order flipping every pair (slow drift cancels)."""
    names = list(arms)
    if len(names) != 2:
        raise ValueError(f"two arms are compared, got {names}")
    out: dict[str, list[float]] = {n: [] for n in names}
    for i in range(pairs):
        for name in (names if i % 2 == 0 else names[::-1]):
            t = time.perf_counter()
            arms[name]()
            out[name].append(time.perf_counter() - t)
    return out
