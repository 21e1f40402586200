"""FasterVLM and FastV fidelity: tokensieve's selections against the released code (tests/reference/fastervlm.py,
tests/reference/fastv.py), from the same attention probabilities (tie-free: both sides use a top-k whose tie order
torch leaves unspecified; ONNX TopK takes the lower index).

FasterVLM: `cls_attention_scores` + `select_topk` (the LLaVA outer stage's calls) keep the code's index mask.
FastV: `select_image_tokens` keeps the code's keep_indexs. Pinned (docs/fidelity.md): tokensieve's `fastv@L` is
FastV's K = L + 1 (scored by layer L's attention, pruned before layer L + 1); FastV's R is the dropped share and its
count round(N·(1 − R)): a count recipe reproduces it.
"""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.fastervlm import fastervlm_index_mask
from reference.fastv import fastv_keep_indexs
from tokensieve.exporter.vlm.fastv import FastvSpec, select_image_tokens, selection_buffers
from tokensieve.graph_passes.methods.attention_scores import cls_attention_scores
from tokensieve.graph_passes.methods.topk import select_topk

SETTINGS = settings(max_examples=25, deadline=None)


@SETTINGS
@given(B=st.integers(1, 3), H=st.integers(1, 4), n=st.integers(2, 40), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_cls_topk_keeps_fastervlms_index_mask(B, H, n, seed, data):
    keep = data.draw(st.integers(1, n))
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, H, n + 1, 8, generator=gen), torch.randn(B, H, n + 1, 8, generator=gen)
    attn = (q @ k.transpose(-2, -1) / 8 ** 0.5).softmax(dim=-1)
    want = fastervlm_index_mask(attn, keep)
    idx = select_topk(cls_attention_scores(q, k), keep, 1) - 1
    got = torch.zeros_like(want).scatter(1, idx, True)
    assert torch.equal(got, want)


@SETTINGS
@given(H=st.integers(1, 4), before=st.integers(0, 6), n=st.integers(1, 30), after=st.integers(1, 6),
       seed=st.integers(0, 2**31 - 1), data=st.data())
def test_fastv_selection_is_the_released_keep_indexs(H, before, n, after, seed, data):
    drop_ratio = data.draw(st.sampled_from([0.0, 0.25, 0.5, 0.75, 0.9]))
    keep = round(n * (1 - drop_ratio))
    if keep < 1:
        return
    T = before + n + after
    gen = torch.Generator().manual_seed(seed)
    attn = torch.randn(1, H, T, T, generator=gen).softmax(dim=-1)
    want = fastv_keep_indexs(attn, before, n, drop_ratio)
    spec = FastvSpec(layer=0, keep=keep, num_image_tokens=n, num_layers=2)
    scores = attn.mean(dim=1)[:, -1]                                   # the last prompt position's head-mean row
    keep_idx, image_keep = select_image_tokens(scores, torch.arange(before, before + n)[None], spec,
                                               *selection_buffers(spec))
    assert keep_idx[0].tolist() == want.tolist()
    assert (image_keep[0] + before).tolist() == [i for i in want.tolist() if before <= i < before + n]
