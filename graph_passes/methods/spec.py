"""Method specs: what a pruning method reads from a block, how it selects, how it reduces."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

from tokensieve.graph_passes.methods.pospad import pospad_slots


class ScoreInput(Enum):
    """What a method's score function reads from the block it follows."""

    ATTENTION_QK = "attention_qk"   # score(q, k, scale, **params): q, k as given to the block's SDPA
    HIDDEN = "hidden"               # score(x_in, x_out, **params): the block's input and output tokens
    TOKENS = "tokens"               # score(x_out, **params): the block's output tokens (or only their positions)
    # score(q_e, k_e, scale_e, q, k, scale, keep=K, num_prefix_tokens=p, grid=(h, w), **params): also the q/k of an
    # earlier block (PruneMethod.earlier_block), and the patch grid; the stage must see every patch (HiPrune)
    ATTENTION_QK_TWO_BLOCKS = "attention_qk_two_blocks"


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
        """Return `value` converted to `kind`, or raise ValueError with a one-line reason: the type, then for numbers
        finiteness (NaN and ±inf compare False with every bound, so they are refused first) and the [low, high] range.
        The one check of every method option, from the shorthand or from a recipe file."""
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{method}: {self.name} must be true or false, got {_show(value)}")
            return value
        noun = "an integer" if self.kind is int else "a number"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{method}: {self.name} must be {noun}, got {_show(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{method}: {self.name} must be a finite number, got {value}")
        if self.kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{method}: {self.name} must be {noun}, got {_show(value)}")
        try:
            value = self.kind(value)
        except OverflowError:  # an int beyond float
            raise ValueError(f"{method}: {self.name}={_show(value)} is outside [{self.low}, {self.high}]") from None
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise ValueError(f"{method}: {self.name}={_show(value)} is outside [{self.low}, {self.high}]")
        return value


def _show(value: object, limit: int = 40) -> str:
    """A bounded repr of a user-given value (a huge int or a nested YAML list is cut, not expanded)."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring, r.maxother, r.maxlong = 2, 3, 3, limit, limit, limit
    try:
        text = r.repr(value)
    except ValueError:  # an int with more digits than Python converts to text
        text = f"<an integer of about {int(value.bit_length() * 0.30103)} digits>"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


FUSE = Param("fuse", False, "add EViT's extra token: the dropped tokens summed with their attention scores as "
             "weights (EViT's code)", bool)
FUSE_MEAN = Param("fuse_mean", False, "with fuse: the fused token is the score-weighted MEAN of the dropped tokens "
                  "(tokensieve's earlier form) instead of EViT's weighted sum", bool)
POSPAD = Param("pospad", False, "PosPad: one marker token (mean of the run) per run of dropped tokens, at the run's "
               "last position; min(K+1, n-K) static marker slots, unused ones zero at the end", bool)
RECYCLE = Param("recycle", False, "AIM / VFlowOpt-style recycling: average each dropped patch token into the kept "
                "token most similar to it (cosine of hidden states), one K x n MatMul; not with fuse or pospad", bool)
# Options that consume the dropped tokens (+ fuse_mean, how fuse does); at most one of recycle and (fuse, pospad).
TOKEN_REUSE = ("fuse", "pospad", "recycle", "fuse_mean")


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
    # Custom reduce instead of TopK + gather: reduce(x_out, scores, keep, num_prefix_tokens, **reduce_params)
    # -> (tokens (B, num_prefix_tokens + keep, C), kept/surviving positions (B, keep) int64). Used by
    # merging methods (ToMe) and greedy selections (DivPrune). `scores` is whatever `score` returns.
    reduce_fn: Callable | None = None
    reduce_params: tuple[str, ...] = ()
    # Budget check beyond 1 <= keep < patches: validate(num_patches, keep, options) -> None or a one-line
    # reason (e.g. ToMe can merge at most half of the tokens in one stage).
    validate: Callable[[int, int, dict], str | None] | None = None
    # Placement check: validate_place(after_block, tokens_in, num_tokens, options) -> None or a one-line reason, with
    # tokens_in entering the stage and num_tokens entering block 0 (HiPrune: an earlier anchor block, the full grid).
    validate_place: Callable[[int, int, int, dict], str | None] | None = None
    # ATTENTION_QK_TWO_BLOCKS: earlier_block(options, after_block) -> the index of the earlier block it also reads.
    earlier_block: Callable[[dict, int], int] | None = None
    # Token state carried to later stages (adaptive: validity of capped slots; tome with prop_attn: token sizes).
    # If carries_state(options): reduce_fn takes `state=` (None at the first such stage) and returns (tokens, kept,
    # state (B, p + keep)); every later attention op gets the additive (B, 1, 1, N) mask state_mask(state); only
    # stateful stages of the same method may follow.
    carries_state: Callable[[dict], bool] | None = None
    state_mask: Callable | None = None
    # Whether a carried state masks later attention (None: always). ToMe carries its sizes to later ToMe stages for
    # the size-weighted means (as the code's merge_wavg) but biases attention only with prop_attn; a state that does
    # not mask attention may be followed by any stage (it is read only by later stages of the same method).
    state_masks: Callable[[dict], bool] | None = None
    # The eager reference really drops invalid slots (batch 1) instead of masking (adaptive), and the stage's score
    # gets the incoming state's key bias (`key_bias=`) so that it sees the attention the block saw.
    compacts: bool = False
    # Video methods (methods/video.py): tokens are frames x positions; score and reduce_fn also take `frames=T`
    # (the layout's, not an option). validate_video(num_tokens, frames, keep, options) -> None or a one-line reason.
    # Only a video layout supplies frames (export-vlm on a Qwen2-VL grid): ViT recipes refuse these methods.
    validate_video: Callable[[int, int, int, dict], str | None] | None = None
    # Whether the paper runs the stage INSIDE block L, between the attention residual add and the MLP (the merged /
    # fused tokens then go through block L's MLP): in_block(options) -> bool. Used at the default placement
    # (`at=paper`) by graph_passes/fx/place_in_block.py and the eager reference. Gather-only stages get there by
    # hoist_token_gathers (exact by commutation) and leave this None.
    in_block: Callable[[dict], bool] | None = None

    def runs_in_block(self, options: dict, placement: str = "paper") -> bool:
        """Whether a stage of this method with these options and placement runs inside its block."""
        return placement == "paper" and self.in_block is not None and bool(self.in_block(options))

    @property
    def video(self) -> bool:
        return self.validate_video is not None

    def param(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)

    def defaults(self) -> dict:
        return {p.name: p.default for p in self.params}

    def stateful(self, options: dict) -> bool:
        return self.carries_state is not None and bool(self.carries_state(options))

    def masks_attention(self, options: dict) -> bool:
        """Whether this stage's carried state gives every later attention op its key mask (state_mask)."""
        return self.stateful(options) and (self.state_masks is None or bool(self.state_masks(options)))

    def needs_cls(self, options: dict) -> bool:
        """Whether this stage scores with the [CLS] token (an option may switch to a CLS-free score)."""
        return self.requires_cls and not options.get("mean_attention", False)

    def extra_tokens(self, params: dict, num_patches: int, keep: int) -> int:
        """Tokens a stage adds besides prefix + kept (EViT's fused token, PosPad's marker slots)."""
        pospad = pospad_slots(num_patches, keep) if params.get("pospad", False) else 0
        return int(bool(params.get("fuse", False))) + pospad


