"""BaseRunner: the life cycle and input checks every runner shares (after Polygraphy's BaseRunner).

A subclass provides `activate()`, `deactivate()`, `input_specs` and `infer()`; the base gives it the context manager,
the feed check (names, dtypes, static dims: a wrong feed is a one-line ConfigError before the backend sees it) and
seeded random feeds.
"""
from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping
from typing import Union

import numpy as np

from ..errors import ConfigError

Dim = Union[int, str, None]


def fmt_shape(shape: tuple) -> str:
    """(1, 3, 224, 224) / (batch, 3, 224, 224) / (?, 3); a 1-d shape keeps its comma like a tuple."""
    parts = ["?" if d is None else str(d) for d in shape]
    return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"


def process_rss_bytes() -> int | None:
    """Resident set size of this process (Linux /proc); None where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def trim_freed_heap() -> None:
    """Hand freed heap pages back to the OS (glibc malloc_trim), so an RSS delta measured next counts a new session's
    memory instead of reusing what the previous one freed; a no-op off glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class BaseRunner:
    """Shared half of a runner; `name` names it in error messages, `inference_time` is the last infer() in seconds."""

    name: str = "runner"
    inference_time: float | None = None

    def activate(self) -> "BaseRunner":
        raise NotImplementedError

    def deactivate(self) -> None:
        raise NotImplementedError

    @property
    def input_specs(self) -> list[tuple[str, tuple[Dim, ...], np.dtype]]:
        raise NotImplementedError

    def __enter__(self):
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def last_inference_time(self) -> float | None:
        """Polygraphy spelling of `inference_time`."""
        return self.inference_time

    def _check_feeds(self, feeds: Mapping[str, np.ndarray]) -> None:
        specs = self.input_specs
        expected = [n for n, _, _ in specs]
        unknown = [n for n in feeds if n not in expected]
        if unknown:
            raise ConfigError(f"unknown input(s) {unknown} for {self.name}; the model's inputs are {expected}")
        missing = [n for n in expected if n not in feeds]
        if missing:
            raise ConfigError(f"missing input(s) {missing} for {self.name}; the model's inputs are {expected}")
        for name, shape, dtype in specs:
            arr = feeds[name]
            if not isinstance(arr, np.ndarray):
                raise ConfigError(f"input {name!r} is a {type(arr).__name__}, not a numpy array; pass np.asarray(..., dtype={dtype.name})")
            if arr.dtype != dtype:
                raise ConfigError(f"input {name!r} has dtype {arr.dtype.name} but the model expects {dtype.name}; cast it with .astype(np.{dtype.name})")
            bad_rank = arr.ndim != len(shape)
            bad_dim = not bad_rank and any(isinstance(d, int) and d != a for d, a in zip(shape, arr.shape))
            if bad_rank or bad_dim:
                raise ConfigError(
                    f"input {name!r} has shape {fmt_shape(arr.shape)} but the model expects {fmt_shape(shape)}; resize your input"
                )

    def make_random_feeds(self, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
        """One random array per input; every dynamic dim becomes `batch`. Floats ~ N(0, 1), ints in [0, 10)."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ConfigError(f"batch={batch!r} must be a positive integer")
        rng = np.random.default_rng(seed)
        feeds = {}
        for name, shape, dtype in self.input_specs:
            dims = tuple(d if isinstance(d, int) and d >= 0 else batch for d in shape)
            if dtype.kind == "f":
                arr = rng.standard_normal(dims).astype(dtype)
            elif dtype.kind == "b":
                arr = rng.integers(0, 2, dims).astype(dtype)
            else:
                arr = rng.integers(0, 10, dims).astype(dtype)
            feeds[name] = arr
        return feeds
