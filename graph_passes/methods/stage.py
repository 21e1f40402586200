"""The one stage dispatcher: score -> select (TopK or the method's reduce) -> optional reuse of the dropped tokens
(recycling, PosPad markers, EViT's fused token).

Every user runs a stage through `run_stage`: the eager reference (methods/reference.py), the FX pass
(graph_passes/fx/insert_prune_stages.py, which records the same calls as graph nodes through `call`), one stage alone
as ONNX (exporter/stage_onnx.py) and the VLM vision parts (exporter/vlm/). A selection is always
`tokensieve::prune_topk` (eager: methods/topk.prune_topk; ONNX: TopK + GatherND), so eager == graph == ONNX.
"""
from __future__ import annotations

import operator
from typing import Callable

import torch
from torch import Tensor

import tokensieve.graph_passes.methods.ops  # noqa: F401  registers torch.ops.tokensieve.prune_topk
from tokensieve.graph_passes.methods.adaptive import compact, key_bias
from tokensieve.graph_passes.methods.pospad import pospad_slots, pospad_tokens
from tokensieve.graph_passes.methods.recycle import recycle_dropped_tokens
from tokensieve.graph_passes.methods.spec import TOKEN_REUSE, PruneMethod, ScoreInput
from tokensieve.graph_passes.methods.topk import fuse_dropped_tokens

PRUNE_TOPK = torch.ops.tokensieve.prune_topk.default


def call_eagerly(fn: Callable, *args, **kwargs):
    """`run_stage`'s default `call`: run the function now."""
    return fn(*args, **kwargs)


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


def run_stage(spec: PruneMethod, options: dict, keep: int, num_prefix_tokens: int, state=None, *, scores=None,
              capped: bool = False, call: Callable = call_eagerly, **inputs) -> tuple:
    """Run one pruning stage -> (tokens after the stage, kept positions (B, keep), carried state or None).

    spec, options: the method (`METHODS[name]`) and its full options (defaults filled in); keep: the budget K;
    num_prefix_tokens: the protected leading tokens ([CLS], registers; 0 for a VLM's merged patches).
    inputs: what the method reads, by name (see `score_call`): `x_out` (B, N, C) the tokens to prune (always), `x_in`
    the block's input tokens, `q`, `k`, `scale` as given to the block's SDPA, `q_early`, `k_early`, `scale_early` and
    `grid` for a two-block score (HiPrune), `frames` for a video layout (video methods).
    state: the (B, N) token state of an earlier stateful stage of the same method (PruneMethod.carries_state), or None.
    scores: the stage's scores when the caller computed them itself (e.g. a VLM part that pools per-patch scores over
    its merged tokens); then only selection / reduction runs.
    capped: an input-dependent-count stage (adaptive, PruneMethod.compacts) keeps its K capped slots and returns their
    validity as the state (the exported form); otherwise (eager reference, batch 1) it really drops the invalid slots
    and returns state None.
    call: how each step runs, `call(fn, *args, **kwargs)`. Eager by default; the FX pass passes a function that inserts
    `fn` as a call_function node and returns the node, so the graph gets exactly these calls. Hence nothing here may
    look at the values of the inputs: every computation goes through `call`.

    A VLM vision part calls, e.g. (LLaVA: the last layer's q/k, one [CLS] prefix token):
        tokens, idx, _ = run_stage(METHODS[name], options, keep, 1, q=q, k=k, scale=scale, x_in=x, x_out=x_out)
    or, with its own scores (Qwen2-VL: per-patch scores averaged over each merge group; video frames = grid t):
        tokens, idx, _ = run_stage(METHODS[name], options, keep, 0, scores=scores, x_out=merged, frames=t)
    """
    x = inputs["x_out"]
    if scores is None:
        fn, args, kwargs = score_call(spec, options, keep, num_prefix_tokens, **inputs)
        if state is not None and spec.compacts:  # the score sees the attention the block saw: invalid keys masked
            kwargs = {**kwargs, "key_bias": call(key_bias, state)}
        scores = call(fn, *args, **kwargs)
    rkw = reduce_kwargs(spec, options, inputs.get("frames"))
    if spec.compacts and not capped:  # eager = real compaction of the valid slots (batch 1; see methods/adaptive.py)
        kept = call(operator.getitem, call(spec.reduce_fn, x, scores, keep, num_prefix_tokens, **rkw), 1)
        return call(compact, x, kept, num_prefix_tokens), kept, None
    if spec.stateful(options):
        out = call(spec.reduce_fn, x, scores, keep, num_prefix_tokens, **rkw, state=state)
        return tuple(call(operator.getitem, out, i) for i in range(3))
    if spec.reduce_fn is not None:  # merging methods and greedy selections: their own select + gather
        out = call(spec.reduce_fn, x, scores, keep, num_prefix_tokens, **rkw)
        return call(operator.getitem, out, 0), call(operator.getitem, out, 1), None
    out = call(PRUNE_TOPK, x, scores, keep, num_prefix_tokens)
    tokens, idx = call(operator.getitem, out, 0), call(operator.getitem, out, 1)
    reuse = {name: options[name] for name in TOKEN_REUSE if options.get(name)}
    if reuse:  # recycled / PosPad / fused tokens
        tokens = call(gather_options, x, scores, tokens, idx, keep, num_prefix_tokens, reuse)
    return tokens, idx, None


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
