"""ONNX lowerings of tokensieve ops for torch.onnx's custom_translation_table.

tokensieve::prune_topk -> select_topk · take_tokens, i.e.
tokensieve::select_topk -> Slice(scores) · TopK(K) · TopK(ascending indices) · Add(prefix)
tokensieve::take_tokens -> GatherElements(x, Expand(idx), axis=1) · Concat(prefix tokens, kept)
tokensieve::compact_valid -> ReduceMax(ReduceSum(Cast(valid))) · Slice(x), Slice(valid)  (data-dependent S)
tokensieve::pad_tokens -> Pad(x, [0.., length - Shape(x)[dim], 0..])

Translating the op directly (instead of decomposing it in a second run_decompositions) keeps the
ONNX conversion to one decomposition pass, and is where a target can later emit a plugin node.
"""
from __future__ import annotations

import torch
from onnxscript import opset18 as op

import tokensieve.graph_passes.methods.ops  # noqa: F401  registers torch.ops.tokensieve.*

_INT64_MAX = 2**63 - 1


def select_topk(scores, keep: int, num_prefix_tokens: int):
    """Same math as graph_passes.methods.topk.select_topk; ties resolve as ONNX TopK does (lowest index first)."""
    p = num_prefix_tokens
    patch_scores = op.Slice(scores, op.Constant(value_ints=[p]), op.Constant(value_ints=[_INT64_MAX]),
                            op.Constant(value_ints=[1]))
    k = op.Constant(value_ints=[keep])
    _, idx = op.TopK(patch_scores, k, axis=-1, largest=1, sorted=0)
    ascending, _ = op.TopK(idx, k, axis=-1, largest=0, sorted=1)  # sort the kept positions: original order
    return op.Add(ascending, op.Constant(value_int=p))


def take_tokens(x, pos, num_prefix_tokens: int):
    """graph_passes.methods.topk.gather_tokens: the prefix tokens, then (B, N, C)[b, pos[b, k], :] -> (B, K, C).

    GatherElements over the token axis with the positions broadcast along C: its output shape is the indices' shape,
    which ONNX Runtime's symbolic shape inference (and so its transformer optimizer and quantization preprocessing)
    follows; GatherND(batch_dims=1) stopped both."""
    index = op.Expand(op.Unsqueeze(pos, op.Constant(value_ints=[-1])),
                      op.Concat(op.Shape(pos), op.Shape(x, start=2), axis=0))
    kept = op.GatherElements(x, index, axis=1)
    p = num_prefix_tokens
    if p == 0:
        return kept
    prefix = op.Slice(x, op.Constant(value_ints=[0]), op.Constant(value_ints=[p]), op.Constant(value_ints=[1]))
    return op.Concat(prefix, kept, axis=1)


def prune_topk(x, scores, keep: int, num_prefix_tokens: int):
    """Same math as graph_passes.methods.topk.prune_topk: select_topk, then take_tokens."""
    pos = select_topk(scores, keep, num_prefix_tokens)
    return take_tokens(x, pos, num_prefix_tokens), pos


def compact_valid(x, valid, min_tokens: int):
    """S = max_b Σ valid[b] (>= min_tokens by construction: the prefix + at least one token are valid); the first S
    slots of x and valid. Targets match exactly this form (targets/tensorrt/compact_to_plugin.py swaps in
    TokenCompact's data-dependent mode)."""
    count = op.ReduceSum(op.Cast(valid, to=7), op.Constant(value_ints=[1]), keepdims=0)  # INT64
    s = op.ReduceMax(count, keepdims=1)
    zero, axis = op.Constant(value_ints=[0]), op.Constant(value_ints=[1])
    return op.Slice(x, zero, s, axis), op.Slice(valid, zero, s, axis)


def pad_tokens(x, dim: int, length: int):
    """Zero-pad axis `dim` to the static `length` (a compacted per-token output back to the capped shape)."""
    rank = len(x.shape)  # the exporter's values carry their traced shapes
    n = op.Shape(x, start=dim, end=dim + 1)
    parts = [op.Constant(value_ints=[0] * (rank + dim)), op.Sub(op.Constant(value_ints=[length]), n)]
    if rank - dim - 1:
        parts.append(op.Constant(value_ints=[0] * (rank - dim - 1)))
    return op.Pad(x, op.Concat(*parts, axis=0))


TRANSLATIONS = {
    torch.ops.tokensieve.prune_topk.default: prune_topk,
    torch.ops.tokensieve.select_topk.default: select_topk,
    torch.ops.tokensieve.take_tokens.default: take_tokens,
    torch.ops.tokensieve.compact_valid.default: compact_valid,
    torch.ops.tokensieve.pad_tokens.default: pad_tokens,
}
