"""HiPrune fidelity: the default `hiprune` selection against the released LLaVA code (tests/reference/hiprune.py).

Same kept set from the same two global-attention rows, for grids of several shapes, alpha values and budgets, with
exact score ties. Pinned differences (docs/fidelity.md): alpha = 0 is tokensieve's earlier split (anchor_ratio /
buffer_ratio, row-aware neighbours); the default anchor block is L // 2 (the code's object layer is fixed per model).
"""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.hiprune import hiprune_index_mask
from tokensieve.graph_passes.methods.attention_scores import mean_attention_scores
from tokensieve.graph_passes.methods.hiprune import hiprune_released_select, hiprune_scores, released_anchor_count


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 2), h=st.integers(2, 7), w=st.integers(2, 7), alpha=st.sampled_from([0.1, 0.5, 1.0]),
       seed=st.integers(0, 2**31 - 1), data=st.data())
def test_default_hiprune_keeps_the_released_codes_tokens(B, h, w, alpha, seed, data):
    n = h * w
    keep = data.draw(st.integers(1, n))
    if 5 * released_anchor_count(keep, alpha) > keep:   # refused by hiprune_validate (the code would crash)
        return
    gen = torch.Generator().manual_seed(seed)
    s_anchor = torch.randint(0, 4, (B, n), generator=gen).float() / 8   # few levels: exact ties
    s_deep = torch.randint(0, 4, (B, n), generator=gen).float() / 8
    want = hiprune_index_mask(s_anchor, s_deep, keep, alpha, w)
    got = hiprune_released_select(s_anchor, s_deep, (h, w), keep, alpha)
    assert torch.equal(got, want)
    assert (got.sum(-1) == keep).all()


def test_scores_read_the_global_attention_of_both_blocks():
    """hiprune_scores = the released selection of the head-and-query-mean attention (the code's "global attention")."""
    gen = torch.Generator().manual_seed(0)
    qa, ka, q, k = (torch.randn(1, 2, 17, 4, generator=gen) for _ in range(4))
    got = hiprune_scores(qa, ka, None, q, k, None, keep=10, num_prefix_tokens=1, grid=(4, 4), alpha=1.0)
    attn_a = (qa @ ka.transpose(-2, -1) / 2).softmax(-1).mean(1).mean(1)[:, 1:]
    attn_d = (q @ k.transpose(-2, -1) / 2).softmax(-1).mean(1).mean(1)[:, 1:]
    torch.testing.assert_close(mean_attention_scores(qa, ka)[:, 1:], attn_a)
    want = hiprune_index_mask(attn_a, attn_d, 10, 1.0, 4)
    assert got[0, 0] == 0 and torch.equal(got[:, 1:] > 0, want)
