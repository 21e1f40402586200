"""Latency measurement in alternating blocks, and the stats that summarise it.

On a small CPU, ONNX Runtime worker threads spin after each run, so two sessions timed call-by-call steal each
other's cores (ViT-S dense: 54-78 ms interleaved vs 47 ms alone, see FACTS.md). So each case runs alone for a
block (warm-up, then timed calls), and blocks alternate A B B A A B ... so slow drift hits every case alike.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError


@dataclass(frozen=True)
class LatencyStats:
    """Per-call latencies of one case in milliseconds, pooled over all blocks."""

    name: str
    samples_ms: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.samples_ms) == 0:
            raise ConfigError(f"LatencyStats {self.name!r} has no samples; time at least one call")
        object.__setattr__(self, "samples_ms", tuple(float(s) for s in self.samples_ms))

    def percentile_ms(self, q: float) -> float:
        """Linear-interpolated percentile (numpy's default)."""
        return float(np.percentile(self.samples_ms, q))

    @property
    def count(self) -> int:
        return len(self.samples_ms)

    @property
    def median_ms(self) -> float:
        return self.percentile_ms(50)

    @property
    def p90_ms(self) -> float:
        return self.percentile_ms(90)

    @property
    def p99_ms(self) -> float:
        return self.percentile_ms(99)

    @property
    def mean_ms(self) -> float:
        return float(np.mean(self.samples_ms))

    @property
    def min_ms(self) -> float:
        return float(np.min(self.samples_ms))

    @property
    def max_ms(self) -> float:
        return float(np.max(self.samples_ms))

    @property
    def std_ms(self) -> float:
        return float(np.std(self.samples_ms))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary plus the raw samples."""
        return {
            "name": self.name,
            "count": self.count,
            "median_ms": self.median_ms,
            "p90_ms": self.p90_ms,
            "p99_ms": self.p99_ms,
            "mean_ms": self.mean_ms,
            "min_ms": self.min_ms,
            "max_ms": self.max_ms,
            "std_ms": self.std_ms,
            "samples_ms": list(self.samples_ms),
        }


def _check_count(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r} must be an integer >= {minimum}")


def block_order(names: list[str], blocks: int) -> list[list[str]]:
    """Case order per block: forward on even blocks, reversed on odd ones (A B, B A, A B, ...)."""
    return [list(names) if b % 2 == 0 else list(reversed(names)) for b in range(blocks)]


def measure_alternating(
    cases: dict[str, Callable[[], object]],
    *,
    blocks: int = 4,
    iters: int = 20,
    warmup: int = 5,
    progress: Callable[[str], None] | None = None,
    before_block: Callable[[str], None] | None = None,
) -> dict[str, LatencyStats]:
    """Time each case alone in alternating blocks of `warmup` untimed + `iters` timed calls; never call-by-call.

    `before_block(name)` runs untimed before each block's warm-up (e.g. to load that case's session and free the
    other's, so only one is resident at a time). Returns {case name: LatencyStats} in the order of `cases`, each
    with blocks * iters samples.
    """
    _check_count("blocks", blocks, 1)
    _check_count("iters", iters, 1)
    _check_count("warmup", warmup, 0)
    if not cases:
        raise ConfigError("measure_alternating needs at least one case to time")
    for name, fn in cases.items():
        if not callable(fn):
            raise ConfigError(f"case {name!r} is a {type(fn).__name__}, not a callable; pass a zero-argument function")

    names = list(cases)
    samples: dict[str, list[float]] = {n: [] for n in names}
    clock = time.perf_counter
    for b, order in enumerate(block_order(names, blocks)):
        for name in order:
            if progress is not None:
                progress(f"block {b + 1}/{blocks}: {name}")
            if before_block is not None:
                before_block(name)
            fn = cases[name]
            for _ in range(warmup):
                fn()
            out = samples[name]
            for _ in range(iters):
                start = clock()
                fn()
                out.append((clock() - start) * 1e3)
    return {n: LatencyStats(n, tuple(samples[n])) for n in names}


def speedup(baseline: LatencyStats, other: LatencyStats) -> float:
    """baseline.median / other.median: > 1 means `other` is faster."""
    if other.median_ms <= 0:
        raise ConfigError(f"case {other.name!r} has median {other.median_ms} ms; cannot compute a speedup against it")
    return baseline.median_ms / other.median_ms
