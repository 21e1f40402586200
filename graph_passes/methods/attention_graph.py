"""Zero-TPrune (Wang et al., CVPR 2024): importance by Weighted PageRank over the attention graph, then similarity.

The block's attention matrix A = softmax(q kᵀ · scale) (B, H, N, N), recomputed from the q/k given to its SDPA, is
the adjacency matrix of a directed graph: token j sends A[j, i] of its importance to token i. The I-stage runs a
fixed number of power iterations of that graph shift operator from the uniform distribution,

    s_0 = 1/N,    s_{t+1}[i] = Σ_j A[j, i] · s_t[j]      (s_{t+1} = s_t A: one (1 × N)·(N × N) MatMul per head)

so a token is important when important tokens attend to it. Rows of A sum to 1, so s_t stays a distribution.
Heads are combined by their mean. The stage then drops r = n - keep patch tokens ([CLS]/registers always stay):

    I-stage  drop the r_i least important patch tokens                     (r_i = r - r_s)
    S-stage  sort the m = keep + r_s survivors by importance; the floor(m/2) least important form group A, the
             rest group B; each A token is matched to its most similar B token (cosine of the head-averaged keys,
             as ToMe's metric) and the r_s A tokens with the most similar match are dropped
             (r_s = min(round(similar_share · r), keep), so that r_s <= |A|)

All counts are static (fixed K), selections are comparison masks (`top_mask`) and the kept positions a TopK
(`ascending_positions`): no NonZero/ScatterND. Choices where the paper's exact recipe could not be checked here
(only its abstract and project page were reachable): the paper iterates WPR until it converges, we run `iters`
steps (default 30); heads are averaged (its Emphasizing-Informative-Region aggregation and Variance-based Head
Filter are not implemented); the split of the budget between the two stages (`similar_share`, default 0.5) and
the sequential importance partition into A/B are ours.
"""
from __future__ import annotations

import torch
from torch import Tensor

from tokensieve.graph_passes.methods.attention_scores import _scale
from tokensieve.graph_passes.methods.diversity import cosine_similarity
from tokensieve.graph_passes.methods.merge import ascending_positions, top_mask
from tokensieve.graph_passes.methods.spec import Param, PruneMethod, ScoreInput
from tokensieve.graph_passes.methods.topk import gather_tokens

ITERS_DEFAULT = 30
MAX_ITERS = 100
SIMILAR_SHARE_DEFAULT = 0.5


def weighted_pagerank(attn: Tensor, iters: int = ITERS_DEFAULT) -> Tensor:
    """(B, H, N, N) row-stochastic attention -> (B, N): `iters` steps s <- s A from s = 1/N, averaged over heads."""
    n = attn.shape[-1]
    s = attn.new_full((*attn.shape[:2], 1, n), 1.0 / n)  # (B, H, 1, N)
    for _ in range(iters):
        s = torch.matmul(s, attn)
    return s.squeeze(2).mean(dim=1)


def wpr_scores(q: Tensor, k: Tensor, scale: float | None = None, iters: int = ITERS_DEFAULT) -> tuple[Tensor, Tensor]:
    """Zero-TPrune's score from a block's SDPA inputs (B, H, N, D) -> (importance (B, N), key metric (B, N, D)).

    Recomputes the full attention matrix (B·H·N²·D MACs) plus `iters` · B·H·N² MACs for the power iterations.
    """
    attn = torch.matmul(q * _scale(q, scale), k.transpose(-2, -1)).float().softmax(dim=-1)
    return weighted_pagerank(attn, iters), k.mean(dim=1)


def similar_count(num_patches: int, keep: int, similar_share: float) -> int:
    """r_s: how many of the num_patches - keep dropped tokens the S-stage chooses (at most keep, so r_s <= |A|)."""
    r = num_patches - keep
    return min(int(similar_share * r + 0.5), keep)


def zero_tprune_select(importance: Tensor, metric: Tensor, keep: int,
                       similar_share: float = SIMILAR_SHARE_DEFAULT) -> Tensor:
    """Patch importance (B, n) and similarity metric (B, n, D) -> (B, n) bool mask of the `keep` kept tokens."""
    n = importance.shape[-1]
    r_s = similar_count(n, keep, similar_share)
    m = keep + r_s                                                              # survivors of the I-stage
    survivors = top_mask(importance, m)
    if r_s == 0:
        return survivors
    group_b = top_mask(importance, m - m // 2)                                  # the more important half
    group_a = survivors & ~group_b
    sim = cosine_similarity(metric)                                             # (B, n, n)
    best = torch.where(group_b.unsqueeze(1), sim, float("-inf")).amax(dim=-1)   # each token's best B match
    drop = top_mask(torch.where(group_a, best, float("-inf")), r_s)            # |A| = m // 2 >= r_s finite values
    return survivors & ~drop


def zero_tprune(x: Tensor, scores: tuple[Tensor, Tensor], keep: int, num_prefix_tokens: int = 1,
                similar_share: float = SIMILAR_SHARE_DEFAULT) -> tuple[Tensor, Tensor]:
    """Zero-TPrune reduce: `scores` = `wpr_scores(q, k)` -> ((B, p + keep, C), kept positions (B, keep) ascending)."""
    p = num_prefix_tokens
    importance, metric = scores
    kept = zero_tprune_select(importance[:, p:], metric[:, p:], keep, similar_share)
    idx = ascending_positions(kept, keep) + p
    return gather_tokens(x, idx, p), idx


METHODS: tuple = (
    PruneMethod(
        name="zero-tprune",
        summary="Weighted PageRank over the block's attention graph (fixed power iterations), drop the least "
                "important patch tokens, then the less important ones most similar (keys) to an important one",
        paper="Zero-TPrune (Wang, Dedhia & Jha, CVPR 2024)",
        score_input=ScoreInput.ATTENTION_QK, score=wpr_scores, reduce_fn=zero_tprune,
        params=(
            Param("iters", ITERS_DEFAULT, "power iterations of the Weighted PageRank (static count)", int, 1,
                  MAX_ITERS),
            Param("similar_share", SIMILAR_SHARE_DEFAULT, "share of the dropped tokens chosen by the similarity "
                  "stage (0 = importance only); at most keep tokens", float, 0.0, 1.0),
        ),
        score_params=("iters",), reduce_params=("similar_share",),
    ),
)
