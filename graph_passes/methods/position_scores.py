"""Content-independent scores: the kept set depends only on positions, fixed at export time.

Both are exact integer arithmetic on positions (no RNG state), so eager, ONNX and TensorRT agree.
"""
from __future__ import annotations

import torch
from torch import Tensor

_P = 16777199  # prime < 2**24 (float32 holds every residue exactly) with P % 3 == 2, so x -> x**3 mod P is a bijection
MAX_SEED = _P - 1


def _cube(x: Tensor) -> Tensor:
    return (x * x % _P) * x % _P  # every product < 2**48: no int64 overflow


def random_scores(x: Tensor, seed: int = 0) -> Tensor:
    """A seeded pseudo-random order of the N positions -> (B, N); distinct values, no ties (N < 2**24).

    Two rounds of an affine map and a cube modulo a prime: each a bijection, so positions never tie,
    and the cubes scramble the order (an affine map alone would keep positions in runs).
    """
    pos = torch.arange(x.shape[1], device=x.device, dtype=torch.int64)
    h = _cube((pos * 10368889 + seed) % _P)
    h = _cube((h * 5623 + 7654321) % _P)
    return h.to(torch.float32).unsqueeze(0).expand(x.shape[0], -1)


def uniform_hits(num_tokens: int, count: int, num_prefix_tokens: int = 1, device=None) -> Tensor:
    """(N,) bool: True on `count` evenly spaced patch positions (round(linspace) over the N - p patch tokens)."""
    n = num_tokens - num_prefix_tokens
    chosen = torch.linspace(0, n - 1, count, device=device).round().to(torch.int64) + num_prefix_tokens
    pos = torch.arange(num_tokens, device=device, dtype=torch.int64)
    return (pos.unsqueeze(1) == chosen.unsqueeze(0)).any(dim=1)


def uniform_scores(x: Tensor, keep: int, num_prefix_tokens: int = 1) -> Tensor:
    """1 on `keep` evenly spaced patch positions (round(linspace)), 0 elsewhere -> (B, N)."""
    hit = uniform_hits(x.shape[1], keep, num_prefix_tokens, x.device)
    return hit.to(torch.float32).unsqueeze(0).expand(x.shape[0], -1)
