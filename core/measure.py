"""Timing several models of one backend against each other: alternating blocks (A B B A ...), one session or engine
resident at a time, so neither steals the other's cores (ONNX Runtime's spinning threads) or memory. Used by
`api.bench` (one batch) and by `tokensieve.benchmark` (batch sweeps, report files) above it."""
from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

from tokensieve.errors import ConfigError
from tokensieve.runtime import RUNNERS
from tokensieve.runtime.timing import measure_alternating

Progress = Callable[[str], None]


def runner_options(backend: str, **given) -> dict:
    """The runner keyword arguments that were set (not None/False), checked against `backend`'s runner signature:
    an option another backend owns is a one-line ConfigError naming that backend."""
    if backend not in RUNNERS:
        raise ConfigError(f"Unknown backend {backend!r}; use one of {', '.join(RUNNERS)}")
    given = {k: v for k, v in given.items() if v not in (None, False)}
    accepted = inspect.signature(RUNNERS[backend]).parameters
    for key in given:
        if key not in accepted:
            owners = [n for n, cls in RUNNERS.items() if key in inspect.signature(cls).parameters]
            raise ConfigError(f"--{key.replace('_', '-')} does not apply to --backend {backend}; "
                              f"it is an option of --backend {' / '.join(owners)}")
    return given


def time_models(runner_cls, paths: dict[str, Path], *, batch: int, blocks: int, iters: int, warmup: int,
                options: dict | None = None, progress: Progress | None = None) -> dict[str, dict]:
    """Time several models of one backend in alternating blocks, one resident at a time.

    Returns {name: {latency stats (ms), throughput_ips, memory, device}}; the first model's inputs feed every model.
    """
    runners = {name: runner_cls(path, name=name, **(options or {})) for name, path in paths.items()}
    state: dict = {"active": None, "feeds": None}
    memory: dict[str, dict] = {}
    devices: dict[str, str] = {}

    def release() -> None:
        name = state["active"]
        if name is None:
            return
        runner = runners[name]
        mem = runner.memory_usage()
        old = memory.get(name)
        if old is None or (mem.get("peak_bytes") or 0) > (old.get("peak_bytes") or 0):
            memory[name] = mem
        runner.deactivate()
        state["active"] = None

    def load(name: str) -> None:
        if state["active"] == name:
            return
        release()
        runner = runners[name].activate()
        state["active"] = name
        devices[name] = runner.device_label
        if state["feeds"] is None:
            state["feeds"] = runner.make_random_feeds(batch=batch, seed=0)

    cases = {name: (lambda r=runners[name]: r.infer(state["feeds"])) for name in runners}
    try:
        stats = measure_alternating(cases, blocks=blocks, iters=iters, warmup=warmup, before_block=load,
                                    progress=progress)
        release()
    finally:
        for r in runners.values():
            r.deactivate()
    out = {}
    for name, s in stats.items():
        d = {k: v for k, v in s.to_dict().items() if k != "samples_ms"}
        d["throughput_ips"] = batch * 1e3 / s.median_ms
        d["memory"] = memory.get(name)
        d["device"] = devices.get(name)
        out[name] = d
    return out
