"""HiPrune (Liu et al., 2025): anchors, buffers and registers from the attention of two encoder depths.

Default (alpha > 0): the released code's selection (Danielement321/HiPrune LLaVA/llava/model/llava_arch.py
`encode_images`; tests/reference/hiprune.py): round(K·alpha/5) anchors (highest anchor-block attention), each with its
index neighbours clamp(i ± 1), clamp(i ± w) (the code's arithmetic: a row start's i - 1 wraps to the previous row),
then the rest of the K by the deep block's attention (`hiprune_released_select`). The register count depends on the
overlaps, so it is a tensor k in the rank comparison; shapes stay static.

alpha = 0: tokensieve's earlier split. A stage after block L keeps `keep` patch tokens of the full h × w patch grid
([CLS]/registers always stay), split into three static counts (`hiprune_split`):

    anchors    n_a = max(1, round(anchor_ratio · K))  highest attention at the earlier, object-centric block
                                                       `anchor_block` (default L // 2)
    buffers    n_b = round(buffer_ratio · K)          the best-scoring (same anchor-block attention) 2D grid
                                                       neighbours of the anchors (4-neighbourhood, 8 with diagonal);
                                                       when the anchors have fewer than n_b free neighbours the rest
                                                       is filled with the best-scoring other tokens
    registers  n_r = K - n_a - n_b                    highest attention at the deep block L among the rest

"Attention" is the attention a token receives, averaged over heads and queries (`mean_attention_scores`): HiPrune
needs no [CLS] token (SigLIP). Every selection is a comparison mask (pairwise ranks, ties to the lowest position,
as ONNX TopK), the neighbourhood a constant (n, n) adjacency MatMul: no NonZero/ScatterND.
The score of the stage is the kept mask itself (1 = kept), so the ordinary TopK + gather picks exactly those K.
The stage must see the full grid (no pruning stage before it) and the anchor block must come before block L
(`hiprune_validate_place`). Choices of ours in the alpha = 0 split: the ratios (0.2 / 0.4), buffers ranked by the
anchor-block attention, and the fill rule. The default anchor block (L // 2) is ours in both forms (the code's
HIPRUNE_OBJECT_LAYER is 9, 1-based, of CLIP-L's 24 layers, with the deep block 22: the LLaVA feature layer).
"""
from __future__ import annotations

import torch
from torch import Tensor

from tokensieve.graph_passes.methods.attention_scores import mean_attention_scores
from tokensieve.graph_passes.methods.merge import top_mask
from tokensieve.graph_passes.methods.spec import Param, PruneMethod, ScoreInput

ANCHOR_RATIO = 0.2
BUFFER_RATIO = 0.4
ALPHA = 0.1  # the released code's HIPRUNE_ALPHA default: anchors + their neighbours are about alpha · K
DEFAULT_ANCHOR_BLOCK = -1  # -1: after_block // 2
MAX_BLOCK = 10_000


def hiprune_split(keep: int, anchor_ratio: float = ANCHOR_RATIO,
                  buffer_ratio: float = BUFFER_RATIO) -> tuple[int, int, int]:
    """(n_anchor, n_buffer, n_register) for a budget of `keep`; needs anchor_ratio + buffer_ratio <= 1."""
    n_a = min(keep, max(1, int(anchor_ratio * keep + 0.5)))
    n_b = min(keep - n_a, int(buffer_ratio * keep + 0.5))
    return n_a, n_b, keep - n_a - n_b


def grid_adjacency(grid: tuple[int, int], diagonal: bool = False, device=None) -> Tensor:
    """(h·w, h·w) bool: patch i and j are 2D neighbours on the row-major h × w grid (4-neighbourhood, or 8)."""
    h, w = grid
    pos = torch.arange(h * w, device=device)
    dr = (pos.unsqueeze(1) // w - pos.unsqueeze(0) // w).abs()
    dc = (pos.unsqueeze(1) % w - pos.unsqueeze(0) % w).abs()
    return (torch.maximum(dr, dc) == 1) if diagonal else (dr + dc == 1)


def tiered_top_mask(tier: Tensor, values: Tensor, k: int) -> Tensor:
    """(B, n) -> (B, n) bool: the k best tokens by (tier, value), both descending; exact ties to the lowest position.

    Ranks from pairwise comparisons, as `merge.top_mask`, with the tier compared first (no arithmetic on the values,
    so close values never merge into ties).
    """
    ti, tj, vi, vj = tier.unsqueeze(-1), tier.unsqueeze(-2), values.unsqueeze(-1), values.unsqueeze(-2)
    positions = torch.arange(values.shape[-1], device=values.device)
    before = positions.unsqueeze(-1) > positions                                  # [i, j]: j < i
    same = tj == ti
    better = (tj > ti) | (same & (vj > vi)) | (same & (vj == vi) & before)
    return better.sum(dim=-1) < k


def hiprune_select(anchor_scores: Tensor, register_scores: Tensor, grid: tuple[int, int], n_anchor: int,
                   n_buffer: int, n_register: int, diagonal: bool = False) -> Tensor:
    """Patch scores (B, n) at the anchor block and the deep block -> (B, n) bool mask of the kept tokens.

    Exactly n_anchor + n_buffer + n_register tokens are kept (needs that total <= n = h·w).
    """
    anchors = top_mask(anchor_scores, n_anchor)
    adj = grid_adjacency(grid, diagonal, anchor_scores.device).float()
    near = torch.matmul(anchors.float(), adj) > 0                                 # a neighbour of some anchor
    tier = torch.where(anchors, 0, torch.where(near, 2, 1))                       # anchors never become buffers
    buffers = tiered_top_mask(tier, anchor_scores, n_buffer) if n_buffer else torch.zeros_like(anchors)
    taken = anchors | buffers
    if n_register == 0:
        return taken
    registers = top_mask(torch.where(taken, float("-inf"), register_scores), n_register)
    return taken | registers


def released_anchor_count(keep: int, alpha: float) -> int:
    """HiPrune's released code: round(K · alpha / 5) anchors (Python round), each with up to 4 neighbours."""
    return int(round(keep * alpha / 5))


def released_adjacency(grid: tuple[int, int], device=None) -> Tensor:
    """(n, n) bool [i, j]: j is one of HiPrune's released neighbours of patch i, clamp(i ± 1) and clamp(i ± w) on the
    flattened h × w grid: index arithmetic as the code does it (i - 1 at a row start is the previous row's last
    patch; an index outside the grid clamps to 0 or n - 1)."""
    h, w = grid
    n = h * w
    pos = torch.arange(n, device=device)
    near = torch.stack([pos - 1, pos + 1, pos - w, pos + w], dim=1).clamp(0, n - 1)   # (n, 4)
    return (near.unsqueeze(-1) == pos).any(dim=1)


def hiprune_released_select(anchor_scores: Tensor, register_scores: Tensor, grid: tuple[int, int], keep: int,
                            alpha: float) -> Tensor:
    """HiPrune's released LLaVA selection (Danielement321/HiPrune LLaVA/llava/model/llava_arch.py `encode_images`):
    the round(K·alpha/5) anchors with the highest anchor-block attention and their neighbours (`released_adjacency`),
    then the K - |anchors ∪ neighbours| highest deep-block attention tokens among the rest -> (B, n) bool, K kept.
    The register count depends on the overlaps (a tensor k in the rank comparison): static shapes still."""
    n_a = released_anchor_count(keep, alpha)
    anchors = top_mask(anchor_scores, n_a) if n_a else torch.zeros_like(anchor_scores, dtype=torch.bool)
    adj = released_adjacency(grid, anchor_scores.device).float()
    taken = anchors | (torch.matmul(anchors.float(), adj) > 0)
    n_r = keep - taken.sum(dim=-1, keepdim=True)                                     # (B, 1)
    return taken | top_mask(torch.where(taken, float("-inf"), register_scores), n_r)


def hiprune_scores(q_anchor: Tensor, k_anchor: Tensor, scale_anchor: float | None, q: Tensor, k: Tensor,
                   scale: float | None, *, keep: int, num_prefix_tokens: int, grid: tuple[int, int],
                   anchor_ratio: float = ANCHOR_RATIO, buffer_ratio: float = BUFFER_RATIO,
                   diagonal: bool = False, alpha: float = ALPHA) -> Tensor:
    """HiPrune's kept mask as the stage's score (B, N): 1.0 on the kept patch tokens, 0.0 elsewhere. alpha > 0: the
    released code's selection (`hiprune_released_select`); alpha = 0: tokensieve's split by anchor_ratio /
    buffer_ratio (`hiprune_select`).

    Recomputes the full attention matrix of both blocks (2 · B·H·N²·D MACs).
    """
    p = num_prefix_tokens
    s_anchor = mean_attention_scores(q_anchor, k_anchor, scale_anchor)[:, p:]
    s_register = mean_attention_scores(q, k, scale)[:, p:]
    if alpha > 0:
        kept = hiprune_released_select(s_anchor, s_register, grid, keep, alpha)
    else:
        kept = hiprune_select(s_anchor, s_register, grid, *hiprune_split(keep, anchor_ratio, buffer_ratio), diagonal)
    return torch.cat([kept.new_zeros(kept.shape[0], p), kept], dim=1).float()


def anchor_block_of(options: dict, after_block: int) -> int:
    """The block whose attention picks the anchors: `anchor_block`, or after_block // 2 when it is -1."""
    block = options.get("anchor_block", DEFAULT_ANCHOR_BLOCK)
    return after_block // 2 if block == DEFAULT_ANCHOR_BLOCK else block


def hiprune_validate(num_patches: int, keep: int, options: dict) -> str | None:
    n_a = released_anchor_count(keep, options.get("alpha", 0.0))
    if 5 * n_a > keep:
        return (f"alpha={options['alpha']:g} gives {n_a} anchors, with their neighbours up to {5 * n_a} tokens, more "
                f"than keep={keep}; lower alpha")
    total = options["anchor_ratio"] + options["buffer_ratio"]
    if total > 1.0 + 1e-9:
        return (f"anchor_ratio + buffer_ratio = {total:g} exceeds 1 (registers get the rest of the budget); "
                "lower one of them")
    return None


def hiprune_validate_place(after_block: int, tokens_in: int, num_tokens: int, options: dict) -> str | None:
    anchor = anchor_block_of(options, after_block)
    if not 0 <= anchor < after_block:
        return (f"the anchor block {anchor} must come before block {after_block} (0 <= anchor_block < {after_block}); "
                "set hiprune(anchor_block=...) or prune after a later block")
    if tokens_in != num_tokens:
        return (f"HiPrune needs the full patch grid, but an earlier stage leaves {tokens_in} of {num_tokens} tokens; "
                "make hiprune the first stage")
    return None


METHODS: tuple = (
    PruneMethod(
        name="hiprune",
        summary="keep anchors (top attention at a middle block), their 2D grid neighbours (buffers) and registers "
                "(top attention at this block); no [CLS] needed, first stage only",
        paper="HiPrune (Liu et al., 2025, arXiv:2508.00553)",
        score_input=ScoreInput.ATTENTION_QK_TWO_BLOCKS, score=hiprune_scores,
        params=(
            Param("anchor_block", DEFAULT_ANCHOR_BLOCK, "0-based block whose attention picks the anchors, before the "
                  "stage's block (-1: after_block // 2)", int, -1, MAX_BLOCK),
            Param("anchor_ratio", ANCHOR_RATIO, "with alpha=0: share of the budget for anchors (at least one)", float, 0.0, 1.0),
            Param("buffer_ratio", BUFFER_RATIO, "with alpha=0: share of the budget for the anchors' grid neighbours; "
                  "registers get the rest", float, 0.0, 1.0),
            Param("diagonal", False, "with alpha=0: buffers from the 8-neighbourhood instead of the 4-neighbourhood", bool),
            Param("alpha", ALPHA, "the released code's selection: round(alpha x keep / 5) anchors plus their 4 "
                  "index neighbours, registers the rest (its HIPRUNE_ALPHA, default 0.1); 0: tokensieve's split by "
                  "anchor_ratio / buffer_ratio (and diagonal)", float, 0.0, 1.0),
        ),
        score_params=("anchor_ratio", "buffer_ratio", "diagonal", "alpha"),
        validate=hiprune_validate, validate_place=hiprune_validate_place, earlier_block=anchor_block_of,
    ),
)
