"""DivPrune fidelity: `divprune_select` against the released code (tests/reference/divprune.py, vbdi/divprune).

Same picks in the same selection order on integer features with many exact ties (equal distances, duplicate tokens).
Pinned differences (docs/fidelity.md): once every remaining token duplicates a chosen one the code's argmax can pick
a chosen token again (a duplicate index); tokensieve never re-picks. A ratio budget is ceil(r·n) (DivPrune:
round(r·n)); a count recipe gives DivPrune's budget exactly.
"""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.divprune import divprune as reference_divprune, subset_size
from tokensieve.graph_passes.methods.diversity import divprune_select
from tokensieve.recipe import parse_recipe, resolve_recipe

SETTINGS = settings(max_examples=40, deadline=None)


# Every token has norm 2 (times a power of two): (±1, ±1, ±1, ±1) or ±2·e_i. Cosines are then exact multiples of
# 1/4 in float32, so exact ties (equal distances, duplicate tokens) are real ties for both. (Near-ties from rounding,
# e.g. a true cosine 0 computed as 1e-8, may break differently: the code compares 1 - cos, which absorbs < 6e-8.)
_SIGNS = torch.tensor([[a, b, c, d] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1) for d in (-1, 1)], dtype=torch.float32)
POOL = torch.cat([_SIGNS, 2 * torch.eye(4), -2 * torch.eye(4)])


@st.composite
def cases(draw):
    B, n = draw(st.integers(1, 3)), draw(st.integers(2, 40))
    keep = draw(st.integers(1, n))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = POOL[torch.randint(0, len(POOL), (B, n), generator=gen)]
    x = x * 2.0 ** torch.randint(0, 3, (B, n, 1), generator=gen)
    return x, keep


@SETTINGS
@given(cases())
def test_divprune_picks_are_the_released_codes(case):
    x, keep = case
    picks = divprune_select(x, keep)
    for b in range(x.shape[0]):
        ref, _ = reference_divprune(x[b], keep)
        ref = ref.tolist()
        repeat = next((i for i in range(keep) if ref[i] in ref[:i]), keep)   # the code's first re-pick, if any
        assert picks[b, :repeat].tolist() == ref[:repeat]
        assert len(set(picks[b].tolist())) == keep                          # tokensieve never re-picks


def test_duplicates_make_the_code_re_pick_a_chosen_token():
    """Pinned difference: 3 directions, 4 picks; the 4th scores 0 everywhere and argmax takes token 0 again."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    ref, _ = reference_divprune(x, 4)
    assert len(set(ref.tolist())) < 4
    picks = divprune_select(x[None], 4)[0].tolist()
    assert picks[:3] == ref[:3].tolist() and len(set(picks)) == 4


def test_ratio_budget_is_ceil_where_divprune_rounds():
    """LLaVA-1.5's 576 image tokens at DivPrune's default SUBSET_RATIO 0.098: DivPrune keeps 56, a ratio recipe 57."""
    assert subset_size(0.098, 576) == 56
    (stage,) = resolve_recipe(parse_recipe("divprune@0:0.098"), 2, 577, 1)
    assert stage.keep == 57
    (stage,) = resolve_recipe(parse_recipe("divprune@0:56"), 2, 577, 1)
    assert stage.keep == 56
