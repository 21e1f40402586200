"""EVS fidelity: `evs_scores` + the fixed-budget TopK against vLLM's `compute_retention_mask` (tests/reference/evs.py).

Same kept tokens for every budget from one frame to all, on tokens with exact cosine ties (norm-2 vectors). Pinned
difference (docs/fidelity.md): vLLM derives the count from a pruning rate q, max(P, int(T·P·(1 - q))); tokensieve
takes the count (or a ratio) from the recipe and refuses fewer than one frame.
"""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.evs import compute_retained_tokens_count, compute_retention_mask
from tokensieve.graph_passes.methods.topk import select_topk
from tokensieve.graph_passes.methods.video import evs_scores

_SIGNS = torch.tensor([[a, b, c, d] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1) for d in (-1, 1)],
                      dtype=torch.float32)
POOL = torch.cat([_SIGNS, 2 * torch.eye(4), -2 * torch.eye(4)])  # norm 2: exact cosines (multiples of 1/4)


@settings(max_examples=30, deadline=None)
@given(T=st.integers(1, 4), P=st.integers(1, 8), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_evs_keeps_what_vllm_keeps(T, P, seed, data):
    gen = torch.Generator().manual_seed(seed)
    x = POOL[torch.randint(0, len(POOL), (T * P,), generator=gen)] * 2.0 ** torch.randint(0, 3, (T * P, 1), generator=gen)
    x[P:] = torch.where(torch.rand(T * P - P, 1, generator=gen) < 0.3, x[:-P], x[P:])  # static tokens: cos 1 ties
    keep = data.draw(st.integers(P, T * P))
    want = compute_retention_mask(x, T, P, keep).nonzero().flatten()
    got = select_topk(evs_scores(x[None], frames=T), keep, 0)[0]
    assert got.tolist() == want.tolist()


def test_retained_count_formula():
    """vLLM's count from q: floor, at least one frame. A recipe count equal to it gives vLLM's selection."""
    assert compute_retained_tokens_count(64, 8, 0.75) == 128
    assert compute_retained_tokens_count(64, 8, 0.99) == 64       # never below the first frame
    assert compute_retained_tokens_count(10, 3, 0.35) == 19       # int(19.5) floors
