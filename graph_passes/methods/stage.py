"""One pruning stage as plain function calls: score -> prune_topk -> optional recycling of the dropped tokens, PosPad
markers, fused token.

The eager reference calls `run_stage`; the FX pass inserts the same calls as graph nodes
(`score_call` gives the function and arguments for both).
"""
from __future__ import annotations

import torch
from torch import Tensor

from tokensieve.graph_passes.methods.adaptive import compact
from tokensieve.graph_passes.methods.pospad import pospad_slots, pospad_tokens
from tokensieve.graph_passes.methods.recycle import recycle_dropped_tokens
from tokensieve.graph_passes.methods.spec import PruneMethod, ScoreInput
from tokensieve.graph_passes.methods.topk import fuse_dropped_tokens, prune_topk


def score_call(spec: PruneMethod, options: dict, keep: int, num_prefix_tokens: int, *, q=None, k=None, scale=None,
               x_in=None, x_out=None, q_early=None, k_early=None, scale_early=None, grid=None,
               frames: int | None = None) -> tuple:
    """(function, args, kwargs) computing the stage's (B, N) scores from what the method reads (video methods: the
    layout's `frames` too)."""
    kwargs = {name: options[name] for name in spec.score_params}
    if spec.video:
        kwargs["frames"] = 1 if frames is None else frames
    if spec.needs_keep:  # fixed subsets (uniform, FEATHER's uniform share) need the budget
        kwargs |= {"keep": keep, "num_prefix_tokens": num_prefix_tokens}
    if spec.score_input is ScoreInput.ATTENTION_QK:
        args = (q, k, scale)
    elif spec.score_input is ScoreInput.ATTENTION_QK_TWO_BLOCKS:  # + the earlier block's q/k and the patch grid
        args = (q_early, k_early, scale_early, q, k, scale)
        kwargs |= {"keep": keep, "num_prefix_tokens": num_prefix_tokens, "grid": grid}
    elif spec.score_input is ScoreInput.HIDDEN:
        args = (x_in, x_out)
    else:
        args = (x_out,)
    return spec.score, args, kwargs


def reduce_kwargs(spec: PruneMethod, options: dict, frames: int | None = None) -> dict:
    kwargs = {name: options[name] for name in spec.reduce_params}
    if spec.video and spec.reduce_fn is not None:
        kwargs["frames"] = 1 if frames is None else frames
    return kwargs


def run_stage(spec: PruneMethod, options: dict, keep: int, num_prefix_tokens: int, state: Tensor | None = None,
              **inputs) -> tuple[Tensor, Tensor, Tensor | None]:
    """Eager stage: (tokens after the stage, kept positions (B, keep), carried state or None; see PruneMethod)."""
    fn, args, kwargs = score_call(spec, options, keep, num_prefix_tokens, **inputs)
    scores = fn(*args, **kwargs)
    x = inputs["x_out"]
    rkw = reduce_kwargs(spec, options, inputs.get("frames"))
    if spec.compacts:  # eager = real compaction of the valid slots (batch 1; see methods/adaptive.py)
        _, kept, _ = spec.reduce_fn(x, scores, keep, num_prefix_tokens, **rkw)
        return compact(x, kept, num_prefix_tokens), kept, None
    if spec.stateful(options):
        return spec.reduce_fn(x, scores, keep, num_prefix_tokens, state=state, **rkw)
    if spec.reduce_fn is not None:
        return (*spec.reduce_fn(x, scores, keep, num_prefix_tokens, **rkw), None)
    tokens, idx = prune_topk(x, scores, keep, num_prefix_tokens)
    return gather_options(x, scores, tokens, idx, keep, num_prefix_tokens, options), idx, None


def gather_options(x: Tensor, scores: Tensor, tokens: Tensor, idx: Tensor, keep: int, num_prefix_tokens: int,
                   options: dict) -> Tensor:
    """A gather stage's options on its kept tokens: the dropped tokens recycled into the kept ones, or PosPad markers
    in place of the dropped runs and/or EViT's fused token (recycle excludes the other two: core/recipe.py)."""
    if options.get("recycle"):
        tokens = recycle_dropped_tokens(x, idx, num_prefix_tokens)
    if options.get("pospad"):
        tokens, _ = pospad_tokens(x, idx, pospad_slots(x.shape[1] - num_prefix_tokens, keep), num_prefix_tokens)
    if options.get("fuse"):
        fused = fuse_dropped_tokens(x, scores, idx, num_prefix_tokens, mean=options.get("fuse_mean", False))
        tokens = torch.cat([tokens, fused], dim=1)
    return tokens
