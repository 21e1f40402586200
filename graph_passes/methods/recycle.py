"""Recycling (AIM / VFlowOpt-style prune-then-merge): after a gather stage, every dropped patch token is averaged
into the kept token most similar to it, instead of being thrown away.

    out_k = (x_k + Σ_{d dropped, dst(d) = k} x_d) / (1 + #{d : dst(d) = k}),   dst(d) = argmax_k cos(x_d, x_k)

One (B, K, n) 0/1 weight matrix W (each kept token's own position plus the dropped tokens assigned to it) and one
MatMul, built from comparisons with an arange and an ArgMax: no ScatterND / ScatterElements. A kept token nothing is
assigned to stays exactly itself (a one-hot row). Similarity: cosine of the block's output tokens (what the stage
gathers), ties to the lowest kept slot (torch.argmax and ONNX ArgMax both take the first maximum). The kept positions,
the token count and the order are those of the gather stage; prefix tokens are never merged into.
"""
from __future__ import annotations

import torch
from torch import Tensor

from tokensieve.graph_passes.methods.merge import unit_vectors
from tokensieve.graph_passes.methods.topk import gather_tokens


def recycle_weights(x: Tensor, idx: Tensor, num_prefix_tokens: int = 1) -> Tensor:
    """x (B, p + n, C), kept positions idx (B, K) -> W (B, K, n) float: row k = kept token k + the dropped tokens
    assigned to it."""
    p = num_prefix_tokens
    xp = x[:, p:]
    n, K = xp.shape[1], idx.shape[1]
    positions = torch.arange(n, device=x.device, dtype=idx.dtype)
    own = (idx - p).unsqueeze(-1) == positions                                         # (B, K, n)
    dropped = ~own.any(dim=1)                                                          # (B, n)
    kept = gather_tokens(x, idx, 0)                                                    # (B, K, C)
    sim = torch.matmul(unit_vectors(xp), unit_vectors(kept).transpose(-2, -1))            # (B, n, K)
    dst = sim.argmax(dim=-1)                                                           # (B, n)
    slots = torch.arange(K, device=x.device, dtype=dst.dtype)
    assigned = (dst.unsqueeze(1) == slots.view(1, K, 1)) & dropped.unsqueeze(1)        # (B, K, n)
    return (own | assigned).float()


def recycle_dropped_tokens(x: Tensor, idx: Tensor, num_prefix_tokens: int = 1) -> Tensor:
    """x (B, p + n, C), kept positions idx (B, K) ascending -> (B, p + K, C): the prefix tokens, then each kept token
    averaged with the dropped tokens most similar to it."""
    p = num_prefix_tokens
    w = recycle_weights(x, idx, p)
    merged = (torch.matmul(w, x[:, p:].float()) / w.sum(dim=-1, keepdim=True)).to(x.dtype)
    return torch.cat([x[:, :p], merged], dim=1) if p else merged
