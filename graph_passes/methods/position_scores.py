"""Content-independent scores: the kept set depends only on positions, fixed at export time.

Both are exact integer arithmetic on positions (no RNG state), so eager, ONNX and TensorRT agree.
"""
from __future__ import annotations

import torch
from torch import Tensor

_P = 16777213  # a prime below 2**24: float32 holds every residue exactly, so there are no ties
_A = 1103515  # multiplier coprime to _P


def random_scores(x: Tensor, seed: int = 0) -> Tensor:
    """A seeded pseudo-random order of the N positions -> (B, N); distinct values, no ties (N < 2**24)."""
    pos = torch.arange(x.shape[1], device=x.device, dtype=torch.int64)
    ranks = ((pos + 1) * _A + seed * 7919) % _P
    return ranks.to(torch.float32).unsqueeze(0).expand(x.shape[0], -1)


def uniform_scores(x: Tensor, keep: int, num_prefix_tokens: int = 1) -> Tensor:
    """1 on `keep` evenly spaced patch positions (round(linspace)), 0 elsewhere -> (B, N)."""
    n = x.shape[1] - num_prefix_tokens
    chosen = torch.linspace(0, n - 1, keep, device=x.device).round().to(torch.int64) + num_prefix_tokens
    pos = torch.arange(x.shape[1], device=x.device, dtype=torch.int64)
    hit = (pos.unsqueeze(1) == chosen.unsqueeze(0)).any(dim=1)
    return hit.to(torch.float32).unsqueeze(0).expand(x.shape[0], -1)
