"""`tokensieve::prune_topk`: the op the FX pass inserts; the exporter translates it to TopK + GatherND.

Keeping selection as one custom op until ONNX conversion keeps the graph readable (one node per
stage) and gives targets one place to substitute a plugin later.
"""
from __future__ import annotations

import torch
from torch import Tensor

from tokensieve.graph_passes.methods.topk import prune_topk


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

