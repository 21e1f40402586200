"""Token scores read from a block's own attention inputs (q, k as given to SDPA: (B, H, N, D))."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from tokensieve.graph_passes.methods.position_scores import uniform_hits


def _scale(q: Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale


def cls_attention_scores(q: Tensor, k: Tensor, scale: float | None = None, key_bias: Tensor | None = None) -> Tensor:
    """EViT / FasterVLM score: the [CLS] row of softmax(q kᵀ · scale [+ key_bias]), averaged over heads -> (B, N).

    Only one row is recomputed (B·H·N·D MACs), so the block's fused attention stays fused. `key_bias` (B, N) is the
    additive bias the block's attention got (-inf on invalid slots after an adaptive stage).
    """
    logits = torch.matmul(q[:, :, :1, :] * _scale(q, scale), k.transpose(-2, -1))  # (B, H, 1, N)
    if key_bias is not None:
        logits = logits + key_bias[:, None, None, :].to(logits.dtype)
    return logits.float().softmax(dim=-1).mean(dim=1).squeeze(1)


def mean_attention_scores(q: Tensor, k: Tensor, scale: float | None = None) -> Tensor:
    """Attention each token receives, averaged over heads and queries -> (B, N). Needs no [CLS] token.

    Recomputes the full attention matrix (B·H·N²·D MACs): about a third of one block's attention cost.
    """
    logits = torch.matmul(q * _scale(q, scale), k.transpose(-2, -1))  # (B, H, N, N)
    return logits.float().softmax(dim=-1).mean(dim=(1, 2))


def feather_uniform_count(keep: int, uniform_share: float) -> int:
    """U: how many of FEATHER's `keep` tokens are fixed uniform positions (round(share · keep), at most keep)."""
    return min(keep, int(round(uniform_share * keep)))


def feather_scores(q: Tensor, k: Tensor, scale: float | None = None, *, keep: int, num_prefix_tokens: int = 1,
                   uniform_share: float = 0.5, mean_attention: bool = False) -> Tensor:
    """FEATHER: the union of U = round(share · keep) evenly spaced patch positions and the keep - U patch tokens with
    the highest attention score among the others -> (B, N) scores whose top-`keep` is exactly that union.

    The uniform positions get 2, above any attention probability (the scores are head/query means of softmax rows,
    so <= 1): TopK takes all U of them and then the best of the rest; every other score is unchanged.
    """
    base = mean_attention_scores(q, k, scale) if mean_attention else cls_attention_scores(q, k, scale)
    hit = uniform_hits(base.shape[1], feather_uniform_count(keep, uniform_share), num_prefix_tokens, base.device)
    return torch.where(hit.unsqueeze(0), torch.full_like(base, 2.0), base)
