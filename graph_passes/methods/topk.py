"""Fixed-budget selection and gather: (B, N, C) -> (B, num_prefix_tokens + keep, C).

Selection is always a static-K TopK over the patch tokens' scores, then a sort of the indices so kept
tokens stay in their original order; prefix tokens ([CLS], distillation, registers) are always kept.
"""
from __future__ import annotations

import torch
from torch import Tensor


def select_topk(scores: Tensor, keep: int, num_prefix_tokens: int = 1) -> Tensor:
    """(B, N) scores -> (B, keep) int64 positions in the sequence of the kept patch tokens, ascending."""
    patch_scores = scores[:, num_prefix_tokens:]
    # A stable descending sort breaks exact ties by lowest position, as ONNX TopK does
    # (torch.topk leaves ties unspecified), so eager and exported pick the same tokens.
    idx = patch_scores.sort(dim=-1, descending=True, stable=True).indices[:, :keep]
    return idx.sort(dim=-1).values + num_prefix_tokens


def gather_tokens(x: Tensor, idx: Tensor, num_prefix_tokens: int = 1) -> Tensor:
    """Keep the prefix tokens of `x` (B, N, C) followed by the tokens at positions `idx` (B, K)."""
    kept = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    if num_prefix_tokens == 0:
        return kept
    return torch.cat([x[:, :num_prefix_tokens], kept], dim=1)


def prune_topk(x: Tensor, scores: Tensor, keep: int, num_prefix_tokens: int = 1) -> tuple[Tensor, Tensor]:
    """(B, N, C), (B, N) -> ((B, num_prefix_tokens + keep, C), (B, keep) kept positions, ascending)."""
    idx = select_topk(scores, keep, num_prefix_tokens)
    return gather_tokens(x, idx, num_prefix_tokens), idx


def fuse_dropped_tokens(x: Tensor, scores: Tensor, idx: Tensor, num_prefix_tokens: int = 1,
                        mean: bool = False) -> Tensor:
    """EViT's fused token -> (B, 1, C): the dropped patch tokens summed with their scores as weights, Σ_d s_d x_d.

    That is EViT's released code (youweiliang/evit evit.py `Block.forward`: `torch.sum(non_topk * non_topk_attn)`,
    the head-averaged [CLS] attention of the dropped tokens, not renormalized; tests/reference/evit.py). With
    `mean` the weights are normalized, Σ_d s_d x_d / Σ_d s_d (tokensieve's earlier form, and the sensible one for
    scores that are not attention probabilities, e.g. TTV's). The dropped set is a comparison mask (positions vs kept
    indices: no scatter), so the weighted sum never subtracts nearly equal totals.
    """
    n = x.shape[1] - num_prefix_tokens
    local = idx - num_prefix_tokens                                                    # (B, K)
    positions = torch.arange(n, device=x.device, dtype=local.dtype)
    kept = (local.unsqueeze(-1) == positions).any(dim=1)                               # (B, n)
    w = scores[:, num_prefix_tokens:].float() * (~kept).float()                        # (B, n)
    num = torch.matmul(w.unsqueeze(1), x[:, num_prefix_tokens:].float())              # (B, 1, C)
    if not mean:
        return num.to(x.dtype)
    den = w.sum(dim=-1, keepdim=True).unsqueeze(-1).clamp_min(1e-30)
    return (num / den).to(x.dtype)
