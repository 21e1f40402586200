"""The catalogue of pruning methods a recipe can name (`tokensieve methods` prints it)."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class ScoreInput(Enum):
    """What a method's score reads from the block it follows."""

    ATTENTION_QK = "attention_qk"  # q, k (and scale) of the block's scaled_dot_product_attention


class Reduce(Enum):
    GATHER = "gather"
    MERGE = "merge"


@dataclass(frozen=True)
class Param:
    name: str
    default: object
    help: str


@dataclass(frozen=True)
class PruneMethod:
    name: str
    summary: str
    paper: str
    score_input: ScoreInput
    reduce: Reduce = Reduce.GATHER
    requires_cls: bool = False
    params: tuple[Param, ...] = field(default_factory=tuple)


METHODS: dict[str, PruneMethod] = {
    m.name: m
    for m in (
        PruneMethod(
            name="cls-topk",
            summary="keep the patch tokens the [CLS] token attends to most (head-averaged attention row)",
            paper="EViT (Liang et al., ICLR 2022); FasterVLM (Zhang et al., 2024)",
            score_input=ScoreInput.ATTENTION_QK,
            requires_cls=True,
        ),
    )
}
