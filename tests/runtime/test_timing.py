"""measure_alternating: block order, warm-ups, no call-by-call interleaving; LatencyStats and speedup."""
from __future__ import annotations

import itertools
import json
import time

import numpy as np
import pytest

from tokensieve.errors import ConfigError
from tokensieve.runtime.timing import LatencyStats, measure_alternating, speedup


def _logged(log: list[str], *names: str) -> dict:
    return {n: (lambda n=n: log.append(n)) for n in names}


def _runs(log: list[str]) -> list[tuple[str, int]]:
    """Collapse the call log into (case, consecutive calls)."""
    return [(k, len(list(g))) for k, g in itertools.groupby(log)]


def test_blocks_alternate_and_never_interleave():
    log: list[str] = []
    stats = measure_alternating(_logged(log, "dense", "pruned"), blocks=4, iters=3, warmup=2)
    # A B | B A | A B | B A: adjacent same-case blocks merge into one run of 2 * (warmup + iters) calls.
    assert _runs(log) == [("dense", 5), ("pruned", 10), ("dense", 10), ("pruned", 10), ("dense", 5)]
    assert len(log) == 4 * 2 * (2 + 3)
    assert list(stats) == ["dense", "pruned"]
    assert all(s.count == 4 * 3 for s in stats.values())


def test_three_cases_order_and_progress():
    log: list[str] = []
    messages: list[str] = []
    measure_alternating(_logged(log, "a", "b", "c"), blocks=2, iters=1, warmup=0, progress=messages.append)
    assert log == ["a", "b", "c", "c", "b", "a"]
    assert messages == [f"block {i}/2: {n}" for i, n in [(1, "a"), (1, "b"), (1, "c"), (2, "c"), (2, "b"), (2, "a")]]


def test_warmup_calls_are_untimed():
    durations = iter([0.03] + [0.0] * 100)  # the one slow call is the block's warm-up
    stats = measure_alternating({"a": lambda: time.sleep(next(durations))}, blocks=1, iters=4, warmup=1)["a"]
    assert stats.count == 4
    assert stats.max_ms < 20


def test_sleep_medians_and_speedup():
    stats = measure_alternating(
        {"slow": lambda: time.sleep(0.004), "fast": lambda: time.sleep(0.002)}, blocks=2, iters=5, warmup=1
    )
    slow, fast = stats["slow"], stats["fast"]
    assert fast.median_ms >= 2.0 and slow.median_ms >= 4.0
    assert slow.min_ms <= slow.median_ms <= slow.p90_ms <= slow.p99_ms
    assert speedup(slow, fast) == pytest.approx(slow.median_ms / fast.median_ms)
    assert speedup(slow, fast) > 1.2


def test_latency_stats_fields():
    s = LatencyStats("x", (4.0, 1.0, 3.0, 2.0, 10.0))
    assert s.median_ms == 3.0
    assert s.mean_ms == 4.0
    assert s.min_ms == 1.0 and s.max_ms == 10.0
    assert s.p90_ms == pytest.approx(np.percentile([1, 2, 3, 4, 10], 90)) == pytest.approx(7.6)  # linear
    assert s.p99_ms == pytest.approx(9.76)
    d = s.to_dict()
    assert d["name"] == "x" and d["count"] == 5 and d["median_ms"] == 3.0 and d["samples_ms"] == [4.0, 1.0, 3.0, 2.0, 10.0]
    json.dumps(d)
    with pytest.raises(Exception):
        s.name = "y"  # frozen
    with pytest.raises(ConfigError):
        LatencyStats("empty", ())


def test_speedup_is_baseline_over_other():
    assert speedup(LatencyStats("d", (46.7,)), LatencyStats("p", (30.3,))) == pytest.approx(46.7 / 30.3)
    with pytest.raises(ConfigError):
        speedup(LatencyStats("d", (1.0,)), LatencyStats("p", (0.0,)))


@pytest.mark.parametrize(
    "kwargs", [{"blocks": 0}, {"iters": 0}, {"warmup": -1}, {"blocks": 1.5}, {"iters": True}]
)
def test_bad_arguments_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        measure_alternating({"a": lambda: None}, **kwargs)


def test_bad_cases_are_config_errors():
    with pytest.raises(ConfigError):
        measure_alternating({})
    with pytest.raises(ConfigError) as e:
        measure_alternating({"a": 3})
    assert "not a callable" in str(e.value)
