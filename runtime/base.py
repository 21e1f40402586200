"""BaseRunner: the life cycle, feed check and timing every runner shares (after Polygraphy's BaseRunner).

Public `activate()` / `deactivate()` / `infer(feeds)` live here; a runner implements only `activate_impl()`,
`deactivate_impl()`, `is_active`, `input_specs` and `infer_impl(feeds)` (plus `check_feeds_impl` for checks of its
own). `infer` checks the feeds once (names, dtypes, static dims: a wrong feed is a one-line ConfigError before the
backend sees it), activates the runner if needed (runners also work outside `with`), times `infer_impl` into
`inference_time`, and returns its outputs. Seeded random feeds come from the input specs.
"""
from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Mapping
from typing import Union

import numpy as np

from ..errors import ConfigError

Dim = Union[int, str, None]


def check_batch(batch) -> None:
    """make_random_feeds' batch: a positive int, else a one-line ConfigError."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"batch={batch!r} must be a positive integer")


def random_array(rng: np.random.Generator, dims: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Floats ~ N(0, 1), bools in {0, 1}, ints in [0, 10): what make_random_feeds gives every input."""
    if dtype.kind == "f":
        return rng.standard_normal(dims).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, dims).astype(dtype)
    return rng.integers(0, 10, dims).astype(dtype)


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

    # ---- what a runner implements ----
    @property
    def is_active(self) -> bool:
        raise NotImplementedError

    def activate_impl(self) -> None:
        """Load the model (session, engine, buffers)."""
        raise NotImplementedError

    def deactivate_impl(self) -> None:
        """Free what activate_impl loaded, so the runner can be activated again."""
        raise NotImplementedError

    @property
    def input_specs(self) -> list[tuple[str, tuple[Dim, ...], np.dtype]]:
        """[(name, shape, dtype)]; a dynamic dim is its name (str) or None."""
        raise NotImplementedError

    def check_feeds_impl(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Checks of the runner's own, after the shared ones (e.g. an engine's profile ranges); none by default."""

    def infer_impl(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run checked `feeds` on the active runner; {output name: array}."""
        raise NotImplementedError

    # ---- the shared life cycle ----
    def activate(self) -> "BaseRunner":
        """activate_impl() unless already active; returns the runner."""
        if not self.is_active:
            self.activate_impl()
        return self

    def deactivate(self) -> None:
        """deactivate_impl() if active; a no-op otherwise."""
        if self.is_active:
            self.deactivate_impl()

    def __enter__(self):
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check `feeds`, run the model, return {output name: array}; sets `inference_time` (s, infer_impl's)."""
        self.check_feeds(feeds)  # before activating: a wrong feed fails before the backend is touched
        self.activate()
        start = time.perf_counter()
        outputs = self.infer_impl(feeds)
        self.inference_time = time.perf_counter() - start
        return outputs

    def last_inference_time(self) -> float | None:
        """Polygraphy spelling of `inference_time`."""
        return self.inference_time

    def check_feeds(self, feeds: Mapping[str, np.ndarray]) -> None:
        """The one feed check: every input given and no other, numpy arrays of the model's dtypes and static dims,
        then the runner's own `check_feeds_impl`; a one-line ConfigError for the first problem."""
        self._check_feed_specs(feeds)
        self.check_feeds_impl(feeds)

    def _check_feed_specs(self, feeds: Mapping[str, np.ndarray]) -> None:
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
        check_batch(batch)
        rng = np.random.default_rng(seed)
        return {name: random_array(rng, tuple(d if isinstance(d, int) and d >= 0 else batch for d in shape), dtype)
                for name, shape, dtype in self.input_specs}
