"""Merging methods (ToMe, token transforming): reduce tokens by weighted averages, as MatMuls.

Both reduce the n patch tokens (prefix tokens [CLS]/registers are never merged and stay first) to `keep`
output tokens with one MatMul by a (B, keep, n) weight matrix W, built from comparisons with an arange
(one-hot) or a softmax, so the export has no ScatterND/ScatterElements (ToMe's `scatter_reduce(mean)`):

    tome                out_k = Σ_i W[k, i] x_i / Σ_i W[k, i]
                        W[k, i] = 1 if patch i survives at output k or is merged into it (bipartite soft matching,
                        as facebookresearch/ToMe's tome/merge.py; tests/reference/tome.py transcribes it)
    token-transforming  out_j = Σ_i M[i, j] x_i / Σ_i M[i, j]     M[i, :] = softmax_j(cos(x_i, a_j) / τ)
                        (a_j: the `keep` anchor tokens with the highest [CLS] or mean attention)

Kept positions: ToMe's survivors (unmerged A tokens, then every B token: the released code's order; ascending in
the `spatial` variant), token transforming's anchors (ascending, so its tokens stay in their original order).
"""
from __future__ import annotations

import torch
from torch import Tensor

from tokensieve.graph_passes.methods.attention_scores import cls_attention_scores, mean_attention_scores
from tokensieve.graph_passes.methods.spec import Param, PruneMethod, Reduce, ScoreInput
from tokensieve.graph_passes.methods.topk import gather_tokens


def unit_vectors(x: Tensor) -> Tensor:
    """Unit vectors along the last dim, in float32 (a zero vector stays zero)."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def top_mask(values: Tensor, k: int) -> Tensor:
    """(B, n) -> (B, n) bool: the k largest values, exact ties to the lowest position (as ONNX TopK).

    By ranks from pairwise comparisons, rank_i = #{j: v_j > v_i} + #{j < i: v_j = v_i}, instead of a stable
    sort: torch.onnx has no translation for aten.sort.stable, and torch.topk leaves ties unspecified.
    """
    vi, vj = values.unsqueeze(-1), values.unsqueeze(-2)                              # [b, i, j]: v_i, v_j
    positions = torch.arange(values.shape[-1], device=values.device)
    before = positions.unsqueeze(-1) > positions                                     # j < i
    rank = (vj > vi).sum(dim=-1) + ((vj == vi) & before).sum(dim=-1)
    return rank < k


def ascending_positions(mask: Tensor, k: int) -> Tensor:
    """(B, n) bool with k True per row -> (B, k) int64 positions of the True entries, ascending.

    TopK of a key that is distinct for every selected position (n - position; 0 when not selected): no NonZero.
    """
    n = mask.shape[-1]
    positions = torch.arange(n, device=mask.device)
    key = torch.where(mask, (n - positions).float(), 0.0)
    return key.topk(k, dim=-1).indices


# --------------------------------------------------------------------------- ToMe


def tome_metric(q: Tensor, k: Tensor, scale: float | None = None) -> Tensor:
    """ToMe's similarity metric: the block's keys averaged over heads, (B, H, N, D) -> (B, N, D)."""
    return k.mean(dim=1)


def tome_max_merge(num_patches: int, spatial: bool = False) -> int:
    """The most patch tokens one bipartite matching merges: ToMe's cap floor(n / 2) (its `min(r, (t - protected) //
    2)`), or the size of set A, ceil(n / 2), in the spatial variant."""
    return (num_patches + 1) // 2 if spatial else num_patches // 2


def tome_match(metric: Tensor, r: int, first_a: int = 0) -> tuple[Tensor, Tensor]:
    """Bipartite soft matching of the patch metric (B, n, D) -> (merged (B, n_a) bool, dst (B, n_a) B-set index).

    Set A = patch positions first_a, first_a + 2, ...; set B = the others. Each A token's best B match by cosine
    similarity is dst (first on ties, as ONNX ArgMax and torch.max); the r A tokens with the most similar match
    are merged (ties to the lowest position: `top_mask`).
    """
    m = unit_vectors(metric)
    sim = torch.matmul(m[:, first_a::2], m[:, 1 - first_a::2].transpose(-2, -1))   # (B, n_a, n_b)
    return top_mask(sim.amax(dim=-1), r), sim.argmax(dim=-1)


def _rank(values: Tensor) -> Tensor:
    """(B, n) -> (B, n) int64: each value's place in a descending sort, exact ties to the lower position (`top_mask`)."""
    vi, vj = values.unsqueeze(-1), values.unsqueeze(-2)
    positions = torch.arange(values.shape[-1], device=values.device)
    before = positions.unsqueeze(-1) > positions                                     # [i, j]: j < i
    return (vj > vi).sum(dim=-1) + ((vj == vi) & before).sum(dim=-1)


def _tome_groups(metric: Tensor, r: int, p: int, spatial: bool) -> tuple[int, Tensor, Tensor, Tensor]:
    """Patch metric (B, n, D) -> (first_a, W_a (B, keep, n_a), W_b (B, keep, n_b), survivors (B, keep) local).

    W_a[k, i] / W_b[k, j] = 1 when A token i / B token j belongs to output token k (itself or its merge target).
    """
    b, n = metric.shape[:2]
    keep = n - r
    positions = torch.arange(n, device=metric.device)
    if spatial:  # A = even patch positions, survivors ascending
        merged, dst = tome_match(metric, r, 0)
        a_of = torch.div(positions, 2, rounding_mode="floor")
        idx = ascending_positions(~(merged[:, a_of] & (positions % 2 == 0)), keep)  # (B, keep) local, ascending
        target_a = torch.where(merged, 2 * dst + 1, positions[0::2])                 # local position of its group
        target_b = positions[1::2].expand(b, -1)
        return 0, idx.unsqueeze(-1) == target_a.unsqueeze(1), idx.unsqueeze(-1) == target_b.unsqueeze(1), idx
    # ToMe: A = even SEQUENCE positions p + i, so the first A patch is local position p % 2.
    first_a = p % 2
    a_pos, b_pos = positions[first_a::2], positions[1 - first_a::2]
    n_a, n_b = a_pos.shape[0], b_pos.shape[0]
    m = unit_vectors(metric)
    sim = torch.matmul(m[:, first_a::2], m[:, 1 - first_a::2].transpose(-2, -1))      # (B, n_a, n_b)
    rank = _rank(sim.amax(dim=-1))                                                     # edge_idx order
    merged = rank < r
    # Output slots: unmerged A first (ascending with a prefix token: cumsum; without: the argsort order), then B.
    unm_slot = torch.cumsum((~merged).long(), dim=-1) - 1 if p else rank - r
    target_a = torch.where(merged, (n_a - r) + sim.argmax(dim=-1), unm_slot)           # (B, n_a) output slot
    target_b = (n_a - r) + torch.arange(n_b, device=metric.device)                     # (n_b,)
    slots = torch.arange(keep, device=metric.device).unsqueeze(-1)                     # (keep, 1)
    w_a = slots == target_a.unsqueeze(1)                                               # (B, keep, n_a)
    w_b = (slots == target_b).expand(b, -1, -1)                                        # (B, keep, n_b)
    own = (w_a & ~merged.unsqueeze(1)).float()
    # Survivor positions: the unmerged A token or the B token of each slot (exact in float32: n < 2**24).
    idx = torch.matmul(own, a_pos.float()) + torch.matmul(w_b.float(), b_pos.float())
    return first_a, w_a, w_b, idx.to(torch.int64)


def tome_merge(x: Tensor, metric: Tensor, keep: int, num_prefix_tokens: int = 1, prop_attn: bool = False,
               state: Tensor | None = None, spatial: bool = False, sizes: bool = False) -> tuple[Tensor, ...]:
    """ToMe reduce: merge r = n - keep patch tokens into their bipartite match by a (size-weighted) mean, as MatMuls.

    x (B, N, C), metric (B, N, D) = `tome_metric` -> ((B, p + keep, C), surviving positions (B, keep)).
    Default: the released code's `bipartite_soft_matching` + `merge_wavg` (facebookresearch/ToMe tome/merge.py).
    Sets A and B alternate over the WHOLE sequence (A = even sequence positions, B = odd ones), prefix tokens
    excluded from both (ToMe sets the [CLS] row and the distillation column of the scores to -inf); each A
    token's best B match by cosine (first on ties); the r A tokens with the most similar match merge into it
    (ties to the lower position; ToMe's argsort leaves them unspecified). Output order as the code's
    `cat([unm, dst])`: prefix, the unmerged A tokens (ascending with a prefix token, ToMe's `unm_idx.sort()`;
    with none, by descending best similarity, the argsort order), then every B token in order; the kept
    positions come in that output order. Needs r <= floor(n / 2) (`tome_validate`).
    spatial=True: tokensieve's earlier variant: A/B alternate over the patch tokens only (A = even patch
    positions), survivors in ascending position order, r <= ceil(n / 2).
    Sizes (ToMe's merge_wavg): with sizes=True or prop_attn the sizes are the carried state: `state` (B, N) float
    sizes in (None = all 1), means are size-weighted, and the sizes out (B, p + keep) are returned third, for the
    next ToMe stage (the method's default: `sizes=true`, as the code carries them through every block). With
    prop_attn (ToMe's proportional attention) later attention also adds log(size) to its logits (`tome_size_mask`).
    sizes=False and no prop_attn: every token counts as size 1 at every stage (tokensieve's earlier form).
    """
    p = num_prefix_tokens
    n = x.shape[1] - p
    r = n - keep
    size = torch.ones_like(x[:, :, 0], dtype=torch.float32) if state is None else state.float()
    if r <= 0:  # keep every patch token (a ratio of 1.0)
        kept = (torch.arange(n, device=x.device) + p).expand(x.shape[0], -1)
        return (x, kept, size) if prop_attn or sizes else (x, kept)
    first_a, w_a, w_b, idx = _tome_groups(metric[:, p:], r, p, spatial)
    w_a, w_b = w_a.float(), w_b.float()
    sp = size[:, p:].unsqueeze(-1)                                                # (B, n, 1) token sizes
    xp = x[:, p:].float() * sp
    a, b = slice(first_a, None, 2), slice(1 - first_a, None, 2)
    total = torch.matmul(w_a, xp[:, a]) + torch.matmul(w_b, xp[:, b])             # (B, keep, C) group sums
    count = torch.matmul(w_a, sp[:, a]) + torch.matmul(w_b, sp[:, b])             # (B, keep, 1) group sizes >= 1
    tokens = (total / count).to(x.dtype)
    if p:
        tokens = torch.cat([x[:, :p], tokens], dim=1)
    if prop_attn or sizes:
        return tokens, idx + p, torch.cat([size[:, :p], count.squeeze(-1)], dim=1)
    return tokens, idx + p


def tome_size_mask(size: Tensor) -> Tensor:
    """ToMe's proportional attention: (B, N) token sizes -> (B, 1, 1, N) additive log(size) attention bias."""
    return size.log()[:, None, None, :]


def tome_validate(num_patches: int, keep: int, options: dict) -> str | None:
    n_a = tome_max_merge(num_patches, options.get("spatial", False))
    if num_patches - keep > n_a:
        return (f"ToMe merges at most {n_a} of {num_patches} patch tokens per stage (keep >= {num_patches - n_a}); "
                "lower the budget per stage or add stages")
    return None


# --------------------------------------------------------------------------- token transforming


def anchor_scores(q: Tensor, k: Tensor, scale: float | None = None, mean_attention: bool = False) -> Tensor:
    """Importance of each token as an anchor (B, N): the [CLS] attention row, or the mean attention received."""
    return mean_attention_scores(q, k, scale) if mean_attention else cls_attention_scores(q, k, scale)


def transform_tokens(x: Tensor, scores: Tensor, keep: int, num_prefix_tokens: int = 1,
                     temperature: float = 0.1) -> tuple[Tensor, Tensor]:
    """Token transforming reduce: many-to-many soft assignment of every patch token to `keep` anchors.

    Anchors a_j = the `keep` patch tokens with the highest `scores` (ascending positions). Every patch token x_i
    spreads unit mass over the anchors, M[i, :] = softmax_j(cos(x_i, a_j) / τ), and each anchor becomes the
    M-weighted mean of all patch tokens, out_j = Σ_i M[i, j] x_i / Σ_i M[i, j] (a (keep × n) MatMul). An anchor
    is its own most similar anchor (cos = 1), so Σ_i M[i, j] >= 1 / keep > 0. As τ -> 0 every token goes
    to its nearest anchor (hard clustering); large τ pulls every anchor toward the mean patch token.
    This is tokensieve's formulation after the papers' description (anchors by attention, many-to-many soft
    assignment, a K×N matrix times the tokens); the exact normalization of Zeng et al.'s matrix was not checked
    against their code.
    -> ((B, p + keep, C), anchor positions (B, keep)).
    """
    p = num_prefix_tokens
    idx = ascending_positions(top_mask(scores[:, p:], keep), keep) + p           # (B, keep) ascending
    xp = x[:, p:].float()
    anchors = gather_tokens(x, idx, 0).float()                                    # (B, keep, C)
    sim = torch.matmul(unit_vectors(xp), unit_vectors(anchors).transpose(-2, -1))    # (B, n, keep)
    m = (sim / temperature).softmax(dim=-1)
    mass = m.sum(dim=1).unsqueeze(-1)                                             # (B, keep, 1)
    tokens = (torch.matmul(m.transpose(-2, -1), xp) / mass).to(x.dtype)
    if p:
        tokens = torch.cat([x[:, :p], tokens], dim=1)
    return tokens, idx


METHODS: tuple = (
    PruneMethod(
        name="tome",
        summary="merge the most similar patch tokens (bipartite soft matching on the keys) by averaging; "
                "at most half the patch tokens per stage",
        paper="ToMe: Token Merging (Bolya et al., ICLR 2023)",
        score_input=ScoreInput.ATTENTION_QK, score=tome_metric, reduce=Reduce.MERGE,
        reduce_fn=tome_merge, validate=tome_validate,
        params=(Param("prop_attn", False, "proportional attention: carry token sizes, size-weighted merges, "
                      "log(size) added to later attention logits (every later stage must be tome(prop_attn=true))",
                      bool),
                Param("spatial", False, "tokensieve's spatial variant: sets A/B alternate over the patch tokens only "
                      "and the survivors stay in position order, up to ceil(n/2) merges (default: ToMe's code: A/B "
                      "alternate over the whole sequence, survivors ordered unmerged A then B, up to floor(n/2))",
                      bool),
                Param("sizes", True, "carry token sizes to later tome stages: size-weighted means as ToMe's merge_wavg "
                      "(false: every stage starts at size 1, tokensieve's earlier form)", bool)),
        reduce_params=("prop_attn", "spatial", "sizes"),
        carries_state=lambda options: options.get("prop_attn", False) or options.get("sizes", True),
        state_mask=tome_size_mask, state_masks=lambda options: options.get("prop_attn", False),

        in_block=lambda options: True,  # ToMeBlock: x = x + attn; merge; x = x + mlp(x)
    ),
    PruneMethod(
        name="token-transforming",
        summary="keep the top-[CLS]-attention patch tokens as anchors and softly merge every patch token into "
                "them (softmax over cosine similarity / temperature)",
        paper="Token Transforming (Zeng et al., 2025); GTP-ViT (Xu et al., WACV 2024)",
        score_input=ScoreInput.ATTENTION_QK, score=anchor_scores, reduce=Reduce.MERGE, requires_cls=True,
        reduce_fn=transform_tokens,
        params=(
            Param("temperature", 0.1, "τ of the softmax over anchors (small: hard nearest-anchor merge)",
                  float, 1e-3, 10.0),
            Param("mean_attention", False, "pick anchors by mean attention received instead of [CLS] attention",
                  bool),
        ),
        score_params=("mean_attention",), reduce_params=("temperature",),
    ),
)
