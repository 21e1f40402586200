"""The catalogue of pruning methods a recipe can name (`tokensieve methods` prints it).

A method = a score function (what it reads from the block it follows) + fixed-budget TopK
selection + a reduce (gather, optionally EViT's fused extra token), or a custom reduce (merging,
greedy selection). Adding a method = its functions + one PruneMethod entry + its tests; the
passes, exporter and targets do not change. Families live in their own modules and are listed here.
"""
from __future__ import annotations

from tokensieve.graph_passes.methods import adaptive, attention_graph, diversity, hiprune, merge, recycle, video
from tokensieve.graph_passes.methods.attention_scores import cls_attention_scores, feather_scores, mean_attention_scores
from tokensieve.graph_passes.methods.hidden_scores import transition_scores
from tokensieve.graph_passes.methods.position_scores import MAX_SEED, random_scores, uniform_scores
from tokensieve.graph_passes.methods.spec import FUSE, FUSE_MEAN, POSPAD, RECYCLE, Param, PruneMethod, Reduce, ScoreInput

__all__ = ["METHODS", "Param", "PruneMethod", "Reduce", "ScoreInput"]

METHODS: dict[str, PruneMethod] = {
    m.name: m
    for m in (
        PruneMethod(
            name="cls-topk",
            summary="keep the patch tokens the [CLS] token attends to most (head-averaged attention row)",
            paper="EViT (Liang et al., ICLR 2022); FasterVLM (Zhang et al., 2024)",
            score_input=ScoreInput.ATTENTION_QK, score=cls_attention_scores, requires_cls=True,
            params=(FUSE, FUSE_MEAN, POSPAD, RECYCLE),
            # EViT's Block.forward fuses the dropped tokens between the attention residual and the MLP
            in_block=lambda options: bool(options.get("fuse")),
        ),
        PruneMethod(
            name="attn-mean",
            summary="keep the patch tokens that receive the most attention on average (no [CLS] needed, e.g. SigLIP)",
            paper="attention-received importance, as in FastV (Chen et al., ECCV 2024) without a query token",
            score_input=ScoreInput.ATTENTION_QK, score=mean_attention_scores, params=(FUSE, FUSE_MEAN, POSPAD, RECYCLE),
        ),
        PruneMethod(
            name="ttv",
            summary="keep the tokens whose hidden state the block changes most (magnitude + direction)",
            paper="TransPrune: token transition variation (Li et al., 2025)",
            score_input=ScoreInput.HIDDEN, score=transition_scores,
            # TTV scores are not attention probabilities: its fused token is their weighted mean by default
            params=(Param("direction_weight", 1.0, "weight of the direction term 1-cos(x_in, x_out)", float, 0.0, 100.0), FUSE,
                    Param("fuse_mean", True, "with fuse: the fused token is the score-weighted mean of the dropped tokens "
                          "(false: their score-weighted sum, EViT's form for attention scores)", bool), POSPAD, RECYCLE),
            score_params=("direction_weight",),
        ),
        PruneMethod(
            name="random",
            summary="keep a seeded pseudo-random subset of patch positions (same for every input)",
            paper="random visual tokens baseline (e.g. Wen et al., 2025 'Token pruning in MLLMs: are we solving the right problem?')",
            score_input=ScoreInput.TOKENS, score=random_scores,
            params=(Param("seed", 0, "seed of the position order", int, 0, MAX_SEED), POSPAD, RECYCLE), score_params=("seed",),
        ),
        PruneMethod(
            name="uniform",
            summary="keep evenly spaced patch positions (strided subset, same for every input)",
            paper="uniform / strided spatial sampling baseline (as in FEATHER, Endo et al., 2025)",
            score_input=ScoreInput.TOKENS, score=uniform_scores, needs_keep=True, params=(POSPAD, RECYCLE),
        ),
        PruneMethod(
            name="feather",
            summary="keep a share of evenly spaced patch positions plus the patch tokens the [CLS] token attends to "
                    "most among the rest (full image coverage with attention top-k)",
            paper="FEATHER (Endo et al., 2025, 'Feather the Throttle'): FastV-style criterion + uniform sampling",
            score_input=ScoreInput.ATTENTION_QK, score=feather_scores, requires_cls=True, needs_keep=True,
            params=(Param("uniform_share", 0.5, "share of the budget given to evenly spaced positions (0: cls-topk, "
                          "1: uniform)", float, 0.0, 1.0),
                    Param("mean_attention", False, "score by mean attention received instead of [CLS] attention "
                          "(no [CLS] needed)", bool), FUSE, FUSE_MEAN, POSPAD, RECYCLE),
            score_params=("uniform_share", "mean_attention"),
        ),
    )
    + merge.METHODS
    + recycle.METHODS
    + diversity.METHODS
    + adaptive.METHODS
    + attention_graph.METHODS
    + hiprune.METHODS
    + video.METHODS
}
