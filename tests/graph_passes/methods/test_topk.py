"""Property tests of the pruning math: select_topk / gather_tokens / prune_topk and cls_attention_scores."""
from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokensieve.graph_passes.methods.attention_scores import cls_attention_scores
from tokensieve.graph_passes.methods.topk import gather_tokens, prune_topk, select_topk

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def prune_cases(draw, integer_scores: bool = False):
    B = draw(st.integers(1, 4))
    N = draw(st.integers(2, 64))
    prefix = draw(st.integers(0, min(2, N - 1)))
    keep = draw(st.integers(1, N - prefix))
    C = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, C, generator=gen)
    if integer_scores:  # few distinct values: many ties
        scores = torch.randint(0, 3, (B, N), generator=gen).float()
    else:
        scores = torch.rand(B, N, generator=gen)
    return x, scores, keep, prefix


def _check_pruned(x, scores, keep, prefix):
    B, N, C = x.shape
    out, idx = prune_topk(x, scores, keep, prefix)

    assert out.shape == (B, prefix + keep, C)
    assert idx.shape == (B, keep) and idx.dtype == torch.long
    assert (idx[:, 1:] > idx[:, :-1]).all()  # strictly ascending, hence unique
    assert all(len(set(row.tolist())) == keep for row in idx)
    assert (idx >= prefix).all() and (idx < N).all()
    torch.testing.assert_close(out[:, :prefix], x[:, :prefix], rtol=0, atol=0)
    torch.testing.assert_close(out[:, prefix:], torch.stack([x[b, idx[b]] for b in range(B)]), rtol=0, atol=0)
    torch.testing.assert_close(idx, select_topk(scores, keep, prefix), rtol=0, atol=0)
    torch.testing.assert_close(out, gather_tokens(x, idx, prefix), rtol=0, atol=0)
    return idx


@SETTINGS
@given(prune_cases())
def test_prune_topk_keeps_prefix_and_the_highest_scoring_patches(case):
    x, scores, keep, prefix = case
    idx = _check_pruned(x, scores, keep, prefix)
    # with distinct scores the kept set is exactly the top-`keep` patch positions
    patch = scores[:, prefix:]
    kept_scores = scores.gather(1, idx)
    dropped = patch.clone()
    dropped.scatter_(1, idx - prefix, float("-inf"))
    assert (kept_scores.min(dim=1).values >= dropped.max(dim=1).values).all()
    want = patch.topk(keep, dim=1).indices.sort(dim=1).values + prefix
    torch.testing.assert_close(idx, want, rtol=0, atol=0)


@SETTINGS
@given(prune_cases(integer_scores=True))
def test_prune_topk_with_tied_scores_stays_unique_and_sorted(case):
    x, scores, keep, prefix = case
    idx = _check_pruned(x, scores, keep, prefix)
    # ties may go either way, but no dropped patch may beat a kept one
    dropped = scores[:, prefix:].clone()
    dropped.scatter_(1, idx - prefix, float("-inf"))
    assert (scores.gather(1, idx).min(dim=1).values >= dropped.max(dim=1).values).all()


@SETTINGS
@given(B=st.integers(1, 4), N=st.integers(2, 64), prefix=st.integers(0, 2))
def test_keeping_every_patch_is_the_identity(B, N, prefix):
    prefix = min(prefix, N - 1)
    x = torch.randn(B, N, 3)
    out, idx = prune_topk(x, torch.rand(B, N), N - prefix, prefix)
    torch.testing.assert_close(out, x, rtol=0, atol=0)
    torch.testing.assert_close(idx, torch.arange(prefix, N).expand(B, -1), rtol=0, atol=0)


@SETTINGS
@given(
    B=st.integers(1, 4), H=st.integers(1, 4), N=st.integers(2, 64), D=st.integers(1, 16),
    use_scale=st.booleans(), seed=st.integers(0, 2**31 - 1),
)
def test_cls_attention_scores_is_the_head_averaged_cls_softmax_row(B, H, N, D, use_scale, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, H, N, D, generator=gen), torch.randn(B, H, N, D, generator=gen)
    scale = 0.3 if use_scale else None
    s = cls_attention_scores(q, k, scale)

    assert s.shape == (B, N) and s.dtype == torch.float32
    assert (s >= 0).all()
    torch.testing.assert_close(s.sum(dim=-1), torch.ones(B), rtol=0, atol=1e-5)
    attn = ((q @ k.transpose(-2, -1)) * (scale if use_scale else 1 / math.sqrt(D))).softmax(-1)
    torch.testing.assert_close(s, attn[:, :, 0].mean(dim=1), rtol=1e-5, atol=1e-6)


def test_cls_attention_scores_in_half_precision_are_float32_and_normalized():
    q, k = torch.randn(2, 3, 17, 8).half(), torch.randn(2, 3, 17, 8).half()
    s = cls_attention_scores(q, k)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s.sum(-1), torch.ones(2), rtol=0, atol=1e-5)


def test_exact_ties_keep_the_lowest_positions_like_onnx_topk():
    for n in (8, 17, 64):
        torch.testing.assert_close(select_topk(torch.zeros(2, n), 3, 1), torch.tensor([[1, 2, 3]] * 2), rtol=0, atol=0)
