"""Recycling (AIM / VFlowOpt-style prune-then-merge): after a gather stage, every dropped patch token is averaged
into the kept token most similar to it, instead of being thrown away.

    out_k = (x_k + Σ_{d dropped, dst(d) = k} x_d) / (1 + #{d : dst(d) = k}),   dst(d) = argmax_k cos(x_d, x_k)

One (B, K, n) 0/1 weight matrix W (each kept token's own position plus the dropped tokens assigned to it) and one
MatMul, built from comparisons with an arange and an ArgMax: no ScatterND / ScatterElements. A kept token nothing is
assigned to stays exactly itself (a one-hot row). Similarity: cosine of the block's output tokens (what the stage
gathers), ties to the lowest kept slot (torch.argmax and ONNX ArgMax both take the first maximum). The kept positions,
the token count and the order are those of the gather stage; prefix tokens are never merged into.

DiffRate (Chen et al., ICCV 2023) is the same structure with two budgets per block: `diffrate_reduce` prunes to the
K1 most important tokens ([CLS] attention), then merges the K1 - K least important survivors into the most similar
(cosine of the tokens, as its code; keys with key_metric=true) of the K most important. Its learned per-block
rates become static (K1, K) pairs at export: a recipe with one
`diffrate(prune_keep=K1)@L:K` stage per block (core/recipe.py reads DiffRate-style tables of token counts).
Without proportional attention (merged tokens count as one; the code carries sizes scaled by the merge similarity:
docs/fidelity.md).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from tokensieve.graph_passes.methods.attention_scores import cls_attention_scores
from tokensieve.graph_passes.methods.merge import ascending_positions, top_mask, unit_vectors
from tokensieve.graph_passes.methods.spec import Param, PruneMethod, Reduce, ScoreInput
from tokensieve.graph_passes.methods.topk import gather_tokens


def recycle_weights(x: Tensor, idx: Tensor, num_prefix_tokens: int = 1, sources: Tensor | None = None,
                    metric: Tensor | None = None) -> Tensor:
    """x (B, p + n, C), kept positions idx (B, K) -> W (B, K, n) float: row k = kept token k + the source tokens
    assigned to it. Sources: every dropped patch token, or the (B, n) bool mask `sources` (DiffRate: only the pruning
    survivors that are not kept); similarity: cosine of `metric` (B, p + n, D), default the tokens themselves."""
    p = num_prefix_tokens
    xp = x[:, p:]
    n, K = xp.shape[1], idx.shape[1]
    positions = torch.arange(n, device=x.device, dtype=idx.dtype)
    own = (idx - p).unsqueeze(-1) == positions                                         # (B, K, n)
    dropped = ~own.any(dim=1) if sources is None else sources & ~own.any(dim=1)        # (B, n)
    m = x if metric is None else metric
    kept = gather_tokens(m, idx, 0)                                                    # (B, K, D)
    sim = torch.matmul(unit_vectors(m[:, p:]), unit_vectors(kept).transpose(-2, -1))   # (B, n, K)
    dst = sim.argmax(dim=-1)                                                           # (B, n)
    slots = torch.arange(K, device=x.device, dtype=dst.dtype)
    assigned = (dst.unsqueeze(1) == slots.view(1, K, 1)) & dropped.unsqueeze(1)        # (B, K, n)
    return (own | assigned).float()


def recycle_dropped_tokens(x: Tensor, idx: Tensor, num_prefix_tokens: int = 1) -> Tensor:
    """x (B, p + n, C), kept positions idx (B, K) ascending -> (B, p + K, C): the prefix tokens, then each kept token
    averaged with the dropped tokens most similar to it."""
    return merge_by_weights(x, recycle_weights(x, idx, num_prefix_tokens), num_prefix_tokens)


def merge_by_weights(x: Tensor, w: Tensor, num_prefix_tokens: int = 1) -> Tensor:
    """x (B, p + n, C), 0/1 weights W (B, K, n) -> (B, p + K, C): the prefix tokens, then each row's mean."""
    p = num_prefix_tokens
    merged = (torch.matmul(w, x[:, p:].float()) / w.sum(dim=-1, keepdim=True)).to(x.dtype)
    return torch.cat([x[:, :p], merged], dim=1) if p else merged


# --------------------------------------------------------------------------- DiffRate


def diffrate_scores(q: Tensor, k: Tensor, scale: float | None = None, key_metric: bool = False) -> tuple[Tensor, ...]:
    """DiffRate's importance, the [CLS] attention (B, N), as a 1-tuple: the merge compares the tokens themselves, as
    the released code (`get_merge_func(x)`). With key_metric (tokensieve's earlier form) also the keys averaged over
    heads (B, N, D), ToMe's metric, which the merge then compares instead."""
    importance = cls_attention_scores(q, k, scale)
    return (importance, k.mean(dim=1)) if key_metric else (importance,)


def diffrate_pruned(num_patches: int, prune_keep: float) -> int:
    """K1: patch tokens left by DiffRate's pruning step (a ratio <= 1 of the entering patches, or a count)."""
    return math.ceil(prune_keep * num_patches) if prune_keep <= 1 else int(prune_keep)


def diffrate_reduce(x: Tensor, scores: tuple[Tensor, ...], keep: int, num_prefix_tokens: int = 1,
                    prune_keep: float = 1.0) -> tuple[Tensor, Tensor]:
    """DiffRate at one block: sort the patch tokens by [CLS] attention, prune to the K1 most important, then merge the
    K1 - keep least important survivors into the most similar (cosine of the tokens x, or of the metric when
    `scores` = (importance, metric)) of the `keep` most important, by a plain mean (OpenGVLab/DiffRate
    DiffRate/merge.py `get_merge_func`, `scatter_reduce(mean)`). -> ((B, p + keep, C), kept positions (B, keep)
    ascending). One MatMul by a (keep × n) 0/1 matrix, as recycling."""
    importance, *rest = scores
    metric = rest[0] if rest else None
    p = num_prefix_tokens
    k1 = diffrate_pruned(x.shape[1] - p, prune_keep)
    # By ranks (merge.top_mask: exact ties to the lowest position, as TopK), not a stable sort: no ONNX lowering.
    idx = ascending_positions(top_mask(importance[:, p:], keep), keep) + p            # the merge destinations
    sources = top_mask(importance[:, p:], k1)                                          # (B, n): pruning survivors
    return merge_by_weights(x, recycle_weights(x, idx, p, sources=sources, metric=metric), p), idx


def diffrate_validate(num_patches: int, keep: int, options: dict) -> str | None:
    k1 = diffrate_pruned(num_patches, options.get("prune_keep", 1.0))
    if not keep <= k1 <= num_patches:
        return (f"prune_keep={options.get('prune_keep')} leaves {k1} of {num_patches} patch tokens after pruning; it "
                f"must leave between keep={keep} and {num_patches} (merging then goes from there to keep)")
    return None


METHODS: tuple = (
    PruneMethod(
        name="diffrate",
        summary="prune to the prune_keep most important patch tokens ([CLS] attention), then merge the least important "
                "survivors into the most similar (cosine of the tokens) of the keep most important, by a mean",
        paper="DiffRate (Chen et al., ICCV 2023): learned per-block prune/merge rates, static per block at export",
        score_input=ScoreInput.ATTENTION_QK, score=diffrate_scores, reduce=Reduce.MERGE, requires_cls=True,
        reduce_fn=diffrate_reduce, validate=diffrate_validate, reduce_params=("prune_keep",),
        params=(Param("prune_keep", 1.0, "patch tokens left by the pruning step, before merging down to keep: a "
                      "ratio (<= 1) of the entering patch tokens or a count (> 1); 1.0 = merge only", float,
                      1e-6, 1e6),
                Param("key_metric", False, "merge by the cosine of the head-averaged keys (tokensieve's earlier "
                      "form) instead of the tokens themselves (DiffRate's code)", bool)),
        score_params=("key_metric",),
        in_block=lambda options: True,  # DiffRateBlock: x = x + attn; prune, merge; x = x + mlp(x)
    ),
)
