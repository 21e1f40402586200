"""Adaptive (input-dependent) token count, compiled as a capped budget K + a validity mask.

`adaptive(threshold=τ)@L:K` keeps the patch tokens whose [CLS] attention is at least τ times the uniform share
(n·a_i / Σ_j a_j >= τ over the n valid patch tokens entering the stage), at least one token (the top-scoring one) and at most the cap K
(the best K by attention when more pass the threshold). The count depends on the input, as in adaptive-threshold
pruning (ATP-LLaVA, ATS); the exported shape does not:

    eager (reference)   x -> x[:, kept]                       (B=1, p + count tokens: real compaction)
    exported            x -> gather K slots, valid first      (B, p + K tokens) + valid (B, p + K) bool
                        later blocks' attention gets a key bias 0 / -inf from `valid`, so invalid slots never
                        influence a valid token and every valid row equals the compacted eager row

Slot order: valid slots first, in original position order, then the invalid slots (also ascending). So slot p + i
holds exactly the i-th token of the compacted sequence, and a later adaptive stage's kept positions (indices into
its input sequence) are the same numbers in eager and exported. kept_idx is -1 in invalid slots.

Every select is static: TopK (K = cap) of the masked scores via `tokensieve::prune_topk`'s ascending TopK, then one
TopK of distinct keys for the valid-first order. No NonZero, no data-dependent shape.

`compact=true` (last stage only) trades the static shape for real savings: after the stage the sequence is cut to
the largest valid count in the batch (graph_passes/fx/compact_token_axis.py), so latency follows the count, not the
cap. TensorRT builds swap the cut for TokenCompact's data-dependent form when the plugin library is given.
"""
from __future__ import annotations

import torch
from torch import Tensor

import tokensieve.graph_passes.methods.ops  # noqa: F401  registers torch.ops.tokensieve.prune_topk
from tokensieve.graph_passes.methods.attention_scores import cls_attention_scores
from tokensieve.graph_passes.methods.spec import Param, PruneMethod, ScoreInput
from tokensieve.graph_passes.methods.topk import gather_tokens

THRESHOLD = Param("threshold", 1.0, "keep patch tokens whose share of the patches' [CLS] attention is >= "
                  "threshold x the uniform share 1/n (1.0: above-average tokens); at least 1, at most the stage's budget (the cap)", float, 0.0, 1e4)
COMPACT = Param("compact", False, "really drop the invalid slots: later blocks run on the largest valid count in the "
                "batch (a data-dependent token axis; batch 1: exactly the kept tokens) instead of the cap; last stage only",
                bool)


def key_bias(valid: Tensor) -> Tensor:
    """(B, N) bool validity -> (B, N) float32 additive attention bias: 0 for valid keys, -inf for invalid ones."""
    return torch.where(valid, 0.0, float("-inf"))


def adaptive_select(scores: Tensor, cap: int, num_prefix_tokens: int = 1, threshold: float = 1.0,
                    valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(B, N) scores (+ (B, N) validity of the incoming tokens) -> (positions (B, cap), slot valid (B, cap)).

    Positions index the stage's input sequence, valid slots first in ascending order, then invalid ones ascending.
    """
    p = num_prefix_tokens
    s = scores[:, p:].float()
    incoming = torch.ones_like(s, dtype=torch.bool) if valid is None else valid[:, p:]
    n_valid = incoming.sum(dim=-1, keepdim=True).float()
    live = torch.where(incoming, s, float("-inf"))
    best = live >= live.amax(-1, keepdim=True)
    share = s * n_valid / torch.where(incoming, s, 0.0).sum(dim=-1, keepdim=True).clamp_min(1e-30)  # 1.0 = uniform
    passing = incoming & ((share >= threshold) | best)       # at least the top token (ties: all of them)
    masked = torch.where(passing, s, float("-inf"))
    full = torch.cat([scores[:, :p].float(), masked], dim=1) if p else masked
    if masked.shape[1] < cap:  # eager after an earlier adaptive stage: fewer tokens than slots; pad with invalid ones
        pad = masked.new_full((masked.shape[0], cap - masked.shape[1]), float("-inf"))
        masked, full = torch.cat([masked, pad], dim=1), torch.cat([full, pad], dim=1)
    idx = _select_topk_op(full, cap, p)                                    # (B, cap) ascending; -inf ones fill up
    slot_valid = masked.gather(1, idx - p) > float("-inf")
    # Valid first, each group ascending: one TopK of distinct keys (2N - pos for valid, N - pos for invalid).
    n = full.shape[1]
    order = torch.where(slot_valid, 2 * n - idx, n - idx).float().topk(cap, dim=-1).indices
    return idx.gather(1, order), slot_valid.gather(1, order)


def adaptive_prune(x: Tensor, scores: Tensor, keep: int, num_prefix_tokens: int = 1, threshold: float = 1.0,
                   state: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Capped form: (B, N, C) (+ `state`: (B, N) validity after an earlier adaptive stage) -> (tokens (B, p + keep, C),
    kept positions (B, keep) with -1 in invalid slots, validity (B, p + keep) bool of the output tokens)."""
    idx, slot_valid = adaptive_select(scores, keep, num_prefix_tokens, threshold, state)
    tokens = gather_tokens(x, idx.clamp(max=x.shape[1] - 1), num_prefix_tokens)  # clamp: eager's padding slots
    prefix = torch.ones_like(slot_valid[:, :num_prefix_tokens])
    return tokens, torch.where(slot_valid, idx, -1), torch.cat([prefix, slot_valid], dim=1)


def _select_topk_op(scores: Tensor, keep: int, num_prefix_tokens: int) -> Tensor:
    """`select_topk` through `tokensieve::prune_topk`: eager runs the same Python, the export gets its TopK translation
    (aten.sort.stable, which select_topk uses for exact ties, has no ONNX translation)."""
    return torch.ops.tokensieve.prune_topk.default(scores.unsqueeze(-1), scores, keep, num_prefix_tokens)[1]


def attention_key_mask(valid: Tensor) -> Tensor:
    """(B, N) validity -> (B, 1, 1, N) additive SDPA mask for the blocks after an adaptive stage."""
    return key_bias(valid)[:, None, None, :]


def compact(x: Tensor, kept: Tensor, num_prefix_tokens: int = 1) -> Tensor:
    """Eager compaction (batch 1): prefix tokens + the tokens at the valid kept positions -> (1, p + count, C)."""
    if x.shape[0] != 1:
        raise ValueError("compact() is the batch-1 eager reference; call it per sample")
    pos = kept[0][kept[0] >= 0]
    return torch.cat([x[:, :num_prefix_tokens], x[:, pos]], dim=1)


def adaptive_validate(num_patches: int, keep: int, options: dict) -> str | None:
    if keep < 1:
        return "adaptive needs a cap of at least 1 token"
    if options.get("compact") and keep < 2:
        return "compact=true needs a cap of at least 2 tokens (with 1 the count never varies); raise the budget"
    return None


METHODS: tuple = (
    PruneMethod(
        name="adaptive",
        summary="input-dependent count: keep the patch tokens with [CLS] attention >= threshold/n, at most the budget; "
                "compiled as K capped slots + a validity mask that later attention ignores",
        paper="adaptive-threshold token pruning (ATS, Fayyaz et al., ECCV 2022; ATP-LLaVA, Ye et al., 2025)",
        score_input=ScoreInput.ATTENTION_QK, score=cls_attention_scores, requires_cls=True,
        params=(THRESHOLD, COMPACT), reduce_fn=adaptive_prune, reduce_params=("threshold",), validate=adaptive_validate,
        carries_state=lambda options: True, state_mask=attention_key_mask, compacts=True,
    ),
)
