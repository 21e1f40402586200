"""Trace each tiny model once per test session and hand out fresh GraphModules of it."""
from __future__ import annotations

import functools

import torch

from tiny_models import build
from tokensieve.exporter.trace import FirstOutput, trace


@functools.lru_cache(maxsize=None)
def traced_tiny(name: str):
    """(FirstOutput-wrapped eager model, seeded batch-2 input, ExportedProgram with a dynamic batch).

    Call `ep.module()` for a fresh unlifted GraphModule each time: the FX passes edit it in place.
    """
    model, x = build(name)
    module = FirstOutput(model)
    return module, x, trace(module, x)


def random_batch(x: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """A seeded input shaped like `x` with batch size `n`."""
    return torch.randn(n, *x.shape[1:], generator=torch.Generator().manual_seed(seed))
