"""MMR fidelity: `mmr_select` against IDPruner's released selection loop (tests/reference/idpruner.py).

Same picks in the same order for λ in [0, 1] on exact-tie inputs (norm-2 tokens: exact cosines; importance from a
few levels: ties). Fixed in this change: the first pick is the most important token for every λ (λ = 0 used to
start from token 0). Pinned difference (docs/fidelity.md): tokensieve's importance is the [CLS] attention row,
IDPruner's a trained selector's score (any importance gives the same selection for the same values).
"""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.idpruner import idpruner_select
from tokensieve.graph_passes.methods.diversity import mmr_select

_SIGNS = torch.tensor([[a, b, c, d] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1) for d in (-1, 1)],
                      dtype=torch.float32)
POOL = torch.cat([_SIGNS, 2 * torch.eye(4), -2 * torch.eye(4)])


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 2), n=st.integers(2, 30), lam=st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]),
       seed=st.integers(0, 2**31 - 1), data=st.data())
def test_mmr_picks_are_idpruners(B, n, lam, seed, data):
    keep = data.draw(st.integers(1, n))
    gen = torch.Generator().manual_seed(seed)
    x = POOL[torch.randint(0, len(POOL), (B, n), generator=gen)]
    importance = torch.randint(0, 4, (B, n), generator=gen).float() / 4
    picks = mmr_select(x, importance, keep, lam)
    for b in range(B):
        assert picks[b].tolist() == idpruner_select(x[b], importance[b], keep, lam)
