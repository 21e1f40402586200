"""ONNX lowerings of tokensieve ops for torch.onnx's custom_translation_table.

tokensieve::prune_topk -> Slice(scores) · TopK(K) · TopK(ascending indices) · Add(prefix)
                          · GatherND(x, idx, batch_dims=1) · Concat(prefix tokens, kept)

Translating the op directly (instead of decomposing it in a second run_decompositions) keeps the
ONNX conversion to one decomposition pass, and is where a target can later emit a plugin node.
"""
from __future__ import annotations

import torch
from onnxscript import opset18 as op

import tokensieve.graph_passes.methods.ops  # noqa: F401  registers torch.ops.tokensieve.*

_INT64_MAX = 2**63 - 1


def prune_topk(x, scores, keep: int, num_prefix_tokens: int):
    """Same math as graph_passes.methods.topk.prune_topk; ties resolve as ONNX TopK does (lowest index first)."""
    p = num_prefix_tokens
    patch_scores = op.Slice(scores, op.Constant(value_ints=[p]), op.Constant(value_ints=[_INT64_MAX]),
                            op.Constant(value_ints=[1]))
    k = op.Constant(value_ints=[keep])
    _, idx = op.TopK(patch_scores, k, axis=-1, largest=1, sorted=0)
    ascending, _ = op.TopK(idx, k, axis=-1, largest=0, sorted=1)  # sort the kept positions: original order
    pos = op.Add(ascending, op.Constant(value_int=p))
    # GatherND with batch_dims=1: (B, N, C)[b, pos[b, k]] -> (B, K, C), every size static but B.
    kept = op.GatherND(x, op.Unsqueeze(pos, op.Constant(value_ints=[-1])), batch_dims=1)
    if p == 0:
        return kept, pos
    prefix = op.Slice(x, op.Constant(value_ints=[0]), op.Constant(value_ints=[p]), op.Constant(value_ints=[1]))
    return op.Concat(prefix, kept, axis=1), pos


TRANSLATIONS = {torch.ops.tokensieve.prune_topk.default: prune_topk}
