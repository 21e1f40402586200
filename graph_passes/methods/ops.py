"""The ops the FX passes insert; the exporter translates each (exporter/onnx_translations.py).

`tokensieve::prune_topk` (every gather stage) becomes TopK + GatherElements; graph_passes/fx/hoist_token_gathers.py
splits it into `tokensieve::select_topk` (the positions) and `tokensieve::take_tokens` (the gather) where the gather
can move up through the block's per-token ops. `tokensieve::compact_valid` and
`tokensieve::pad_tokens` (adaptive(compact=true)) cut a valid-first sequence to its data-dependent valid count and
pad a per-token output back to its static shape. Keeping each as one custom op until ONNX conversion keeps the
graph readable (one node per stage) and gives targets one place to substitute a plugin.
"""
from __future__ import annotations

import torch
from torch import Tensor

from tokensieve.graph_passes.methods.topk import gather_tokens, prune_topk, select_topk


@torch.library.custom_op("tokensieve::prune_topk", mutates_args=())
def prune_topk_op(x: Tensor, scores: Tensor, keep: int, num_prefix_tokens: int) -> tuple[Tensor, Tensor]:
    """(B, N, C), (B, N) -> ((B, num_prefix_tokens + keep, C), (B, keep) kept positions)."""
    out, idx = prune_topk(x, scores, keep, num_prefix_tokens)
    return out.clone(), idx.clone()


@prune_topk_op.register_fake
def _(x: Tensor, scores: Tensor, keep: int, num_prefix_tokens: int) -> tuple[Tensor, Tensor]:
    return (
        x.new_empty(x.shape[0], num_prefix_tokens + keep, x.shape[2]),
        x.new_empty(x.shape[0], keep, dtype=torch.long),
    )


@torch.library.custom_op("tokensieve::select_topk", mutates_args=())
def select_topk_op(scores: Tensor, keep: int, num_prefix_tokens: int) -> Tensor:
    """(B, N) scores -> (B, keep) kept positions, ascending: prune_topk's selection alone."""
    return select_topk(scores, keep, num_prefix_tokens).clone()


@select_topk_op.register_fake
def _(scores: Tensor, keep: int, num_prefix_tokens: int) -> Tensor:
    return scores.new_empty(scores.shape[0], keep, dtype=torch.long)


@torch.library.custom_op("tokensieve::take_tokens", mutates_args=())
def take_tokens_op(x: Tensor, idx: Tensor, num_prefix_tokens: int) -> Tensor:
    """(B, N, C), (B, K) positions -> (B, num_prefix_tokens + K, C): prune_topk's gather alone (any C)."""
    return gather_tokens(x, idx, num_prefix_tokens).clone()


@take_tokens_op.register_fake
def _(x: Tensor, idx: Tensor, num_prefix_tokens: int) -> Tensor:
    return x.new_empty(x.shape[0], num_prefix_tokens + idx.shape[1], x.shape[2])


@torch.library.custom_op("tokensieve::compact_valid", mutates_args=())
def compact_valid_op(x: Tensor, valid: Tensor, min_tokens: int) -> tuple[Tensor, Tensor]:
    """Valid-first (B, N, C) tokens + (B, N) validity -> the first S slots of both, S = max over the batch of the
    valid count: at batch 1 exactly the valid tokens, the eager reference's compaction. `min_tokens` is a lower
    bound the caller guarantees (adaptive: the prefix tokens + at least one patch token are valid).

    S depends on the data: the exported graph gets a data-dependent token axis after this op
    (graph_passes/fx/compact_token_axis.py)."""
    s = int(valid.sum(-1).max())
    return x[:, :s].clone(), valid[:, :s].clone()


@compact_valid_op.register_fake
def _(x: Tensor, valid: Tensor, min_tokens: int) -> tuple[Tensor, Tensor]:
    s = torch.library.get_ctx().new_dynamic_size(min=min_tokens, max=x.shape[1])
    return x.new_empty(x.shape[0], s, x.shape[2]), valid.new_empty(valid.shape[0], s)


@torch.library.custom_op("tokensieve::pad_tokens", mutates_args=())
def pad_tokens_op(x: Tensor, dim: int, length: int) -> Tensor:
    """Zero-pad axis `dim` of `x` to `length` (a compacted per-token output back to its static shape)."""
    pad = [0, 0] * (x.dim() - 1 - dim) + [0, length - x.shape[dim]]
    return torch.nn.functional.pad(x, pad)


@pad_tokens_op.register_fake
def _(x: Tensor, dim: int, length: int) -> Tensor:
    shape = list(x.shape)
    shape[dim] = length
    return x.new_empty(shape)
