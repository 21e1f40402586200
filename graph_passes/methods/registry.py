"""The catalogue of pruning methods a recipe can name (`tokensieve methods` prints it).

A method = a score function (what it reads from the block it follows) + fixed-budget TopK
selection + a reduce (gather, optionally EViT's fused extra token). Adding a method = one score
function + one entry here + its tests; the passes, exporter and targets do not change.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

from tokensieve.graph_passes.methods.attention_scores import cls_attention_scores, mean_attention_scores
from tokensieve.graph_passes.methods.hidden_scores import transition_scores
from tokensieve.graph_passes.methods.position_scores import random_scores, uniform_scores


class ScoreInput(Enum):
    """What a method's score function reads from the block it follows."""

    ATTENTION_QK = "attention_qk"   # score(q, k, scale, **params): q, k as given to the block's SDPA
    HIDDEN = "hidden"               # score(x_in, x_out, **params): the block's input and output tokens
    POSITIONS = "positions"         # score(x_out, **params): depends on positions only (fixed subset)


class Reduce(Enum):
    GATHER = "gather"
    MERGE = "merge"


@dataclass(frozen=True)
class Param:
    name: str
    default: object
    help: str
    kind: type = float
    low: float | None = None
    high: float | None = None

    def check(self, value: object, method: str) -> object:
        """Return `value` converted to `kind`, or raise ValueError with a one-line reason."""
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{method}: {self.name} must be true or false, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (self.kind is int and not float(value).is_integer()):
            raise ValueError(f"{method}: {self.name} must be {'an integer' if self.kind is int else 'a number'}, got {value!r}")
        value = self.kind(value)
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise ValueError(f"{method}: {self.name}={value} is outside [{self.low}, {self.high}]")
        return value


FUSE = Param("fuse", False, "add EViT's extra token: the score-weighted mean of the dropped tokens", bool)


@dataclass(frozen=True)
class PruneMethod:
    name: str
    summary: str
    paper: str
    score_input: ScoreInput
    score: Callable = field(repr=False)
    reduce: Reduce = Reduce.GATHER
    requires_cls: bool = False
    params: tuple[Param, ...] = ()
    score_params: tuple[str, ...] = ()      # params passed on to the score function
    needs_keep: bool = False                # score(x, keep=K, num_prefix_tokens=p) (fixed subsets)

    def param(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)

    def defaults(self) -> dict:
        return {p.name: p.default for p in self.params}

    def extra_tokens(self, params: dict) -> int:
        """Tokens a stage adds besides prefix + kept (EViT's fused token)."""
        return int(bool(params.get("fuse", False)))


METHODS: dict[str, PruneMethod] = {
    m.name: m
    for m in (
        PruneMethod(
            name="cls-topk",
            summary="keep the patch tokens the [CLS] token attends to most (head-averaged attention row)",
            paper="EViT (Liang et al., ICLR 2022); FasterVLM (Zhang et al., 2024)",
            score_input=ScoreInput.ATTENTION_QK, score=cls_attention_scores, requires_cls=True, params=(FUSE,),
        ),
        PruneMethod(
            name="attn-mean",
            summary="keep the patch tokens that receive the most attention on average (no [CLS] needed, e.g. SigLIP)",
            paper="attention-received importance, as in FastV (Chen et al., ECCV 2024) without a query token",
            score_input=ScoreInput.ATTENTION_QK, score=mean_attention_scores, params=(FUSE,),
        ),
        PruneMethod(
            name="ttv",
            summary="keep the tokens whose hidden state the block changes most (magnitude + direction)",
            paper="TransPrune: token transition variation (Li et al., 2025)",
            score_input=ScoreInput.HIDDEN, score=transition_scores,
            params=(Param("direction_weight", 1.0, "weight of the direction term 1-cos(x_in, x_out)", float, 0.0, 100.0), FUSE),
            score_params=("direction_weight",),
        ),
        PruneMethod(
            name="random",
            summary="keep a seeded pseudo-random subset of patch positions (same for every input)",
            paper="random visual tokens baseline (e.g. Wen et al., 2025 'Token pruning in MLLMs: are we solving the right problem?')",
            score_input=ScoreInput.POSITIONS, score=random_scores,
            params=(Param("seed", 0, "seed of the position order", int, 0, 2**31 - 1),), score_params=("seed",),
        ),
        PruneMethod(
            name="uniform",
            summary="keep evenly spaced patch positions (strided subset, same for every input)",
            paper="uniform / strided spatial sampling baseline (as in FEATHER, Endo et al., 2025)",
            score_input=ScoreInput.POSITIONS, score=uniform_scores, needs_keep=True,
        ),
    )
}
