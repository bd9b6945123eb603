"""The benchmarks' paired timing: the median's distribution-free interval and the alternating order."""
import pytest

from lit_sahs.paired_timing import alternating_seconds, median_interval


def test_median_interval_is_the_binomial_order_statistics():
    assert median_interval(list(range(16, 0, -1))) == (4, 13)  # P(X < 4) * 2 = 0.021 <= 0.05 < P(X < 5) * 2
    assert median_interval([3, 1, 2, 5, 4]) == (1, 5)  # too few values: the whole range


def test_alternating_seconds_flips_the_order_every_pair():
    calls = []
    t = alternating_seconds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, pairs=3)
    assert calls == ["a", "b", "b", "a", "a", "b"] and [len(v) for v in t.values()] == [3, 3]
    with pytest.raises(ValueError, match="two arms"):
        alternating_seconds({"a": lambda: None}, pairs=1)
