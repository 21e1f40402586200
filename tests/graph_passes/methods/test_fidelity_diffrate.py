"""DiffRate fidelity: `diffrate_reduce` against the released inference block (tests/reference/diffrate.py).

Same kept tokens and merged values (<= 1e-5) from the same attention, with exact importance ties (integer q/k);
the merge similarities are tie-free (random tokens). Pinned differences (docs/fidelity.md): kept tokens in position
order (the code: importance order), no sizes carried (the code scales merged sizes by the merge similarity for
its proportional attention in later blocks), and key_metric=true merges by the keys instead of the tokens.
"""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.diffrate import diffrate_block_eval
from tokensieve.graph_passes.methods.attention_scores import cls_attention_scores
from tokensieve.graph_passes.methods.recycle import diffrate_reduce, diffrate_scores

SETTINGS = settings(max_examples=30, deadline=None)


@st.composite
def cases(draw):
    B, H, n = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(2, 30))
    keep = draw(st.integers(1, n - 1))
    k1 = draw(st.integers(keep, n))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q = torch.randint(-2, 3, (B, H, n + 1, 4), generator=gen).float()   # exact logits: importance ties
    k = torch.randint(-2, 3, (B, H, n + 1, 4), generator=gen).float()
    x = torch.randn(B, n + 1, 6, generator=gen)
    return q, k, x, keep, k1


@SETTINGS
@given(cases())
def test_diffrate_is_the_released_inference_block(case):
    q, k, x, keep, k1 = case
    B, N, _ = x.shape
    attn = (q @ k.transpose(-2, -1) * 0.5).softmax(dim=-1)
    ref, ref_size, ref_idx = diffrate_block_eval(x, attn, torch.ones(B, N, 1), 1 + k1, 1 + keep)
    out, idx = diffrate_reduce(x, diffrate_scores(q, k, 0.5), keep, 1, prune_keep=float(k1) if k1 > 1 else 1.0 / (N - 1))
    order = ref_idx[:, 1:].argsort(dim=1)                                     # importance order -> position order
    assert torch.equal(idx, ref_idx[:, 1:].gather(1, order))
    torch.testing.assert_close(out[:, 0], ref[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(out[:, 1:], ref[:, 1:].gather(1, order.unsqueeze(-1).expand(-1, -1, 6)),
                               rtol=1e-5, atol=1e-5)
    # pinned: the code's sizes (merged sources weigh their similarity) differ from 1 once something merges
    assert (k1 > keep) == bool((ref_size[:, 1:] != 1).any())


def test_key_metric_merges_by_the_keys():
    """key_metric=true (tokensieve's earlier form): the same pruning, the merge compares head-averaged keys."""
    gen = torch.Generator().manual_seed(3)
    q, k, x = torch.randn(2, 2, 17, 4, generator=gen), torch.randn(2, 2, 17, 4, generator=gen), torch.randn(2, 17, 6, generator=gen)
    scores = diffrate_scores(q, k, key_metric=True)
    assert torch.equal(scores[0], cls_attention_scores(q, k)) and torch.equal(scores[1], k.mean(1))
    by_keys, idx_k = diffrate_reduce(x, scores, 6, 1, prune_keep=12.0)
    by_tokens, idx_t = diffrate_reduce(x, diffrate_scores(q, k), 6, 1, prune_keep=12.0)
    assert torch.equal(idx_k, idx_t) and not torch.allclose(by_keys, by_tokens)
