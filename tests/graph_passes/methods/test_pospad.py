"""PosPad (FocusUI): one marker token per run of dropped tokens, at the run's last position, static shape.

End to end: `cls-topk(pospad=true)` (and a second stage with PosPad + fused token) exported on the tiny ViT and
checked against the eager reference on ONNX Runtime, plus check_static. Unit level: `pospad_tokens` against a
naive Python loop over the dropped runs.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tiny_models import TINY_MODEL_INFO, build
from method_checks import assert_matches_eager, assert_static_without_dynamic_ops
from tokensieve import api
from tokensieve.graph_passes.methods.pospad import pospad_slots, pospad_tokens
from tokensieve.graph_passes.methods.topk import select_topk
from tokensieve.recipe import parse_recipe


# case id -> (recipe, tokens entering block 0 then after each stage); the tiny ViT has [CLS] + 16 patches.
CASES = {
    # K = 8 of 16, M = min(9, 8) = 8 marker slots -> 1 + 8 + 8 = 17
    "one-stage": ("cls-topk(pospad=true)@1:0.5", [17, 17]),
    # K = 4 of 16, M = min(5, 12) = 5 -> 10; then 9 patches: K = 3, M = min(4, 6) = 4, + fused -> 1 + 3 + 4 + 1 = 9
    "two-stage-fuse": ("cls-topk(pospad=true)@1:0.25+cls-topk(pospad=true,fuse=true)@2:3", [17, 10, 9]),
}


@pytest.fixture(scope="module", params=list(CASES))
def exported(request):
    recipe, _ = CASES[request.param]
    return request.param, api.export(*build("vit"), recipe)


def test_onnx_runtime_matches_eager_reference_over_20_inputs(exported):
    case, result = exported
    assert_matches_eager(result)


def test_static_and_no_dynamic_ops(exported):
    assert_static_without_dynamic_ops(exported[1])


def test_token_accounting_adds_the_marker_slots(exported):
    case, result = exported
    _, tokens = CASES[case]
    p = TINY_MODEL_INFO["vit"].num_prefix_tokens
    assert result.tokens == tokens
    for s in result.stages:
        n = s.tokens_in - p
        assert s.tokens_out == p + s.keep + pospad_slots(n, s.keep) + int(bool(s.options.get("fuse")))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    ref, kept = result.reference(x)
    assert [tuple(k.shape) for k in kept] == [(2, s.keep) for s in result.stages]  # kept_idx stays (B, K)


def test_pospad_is_a_parameter_of_the_gather_methods_only():
    for text in ("cls-topk(pospad=true)@1:4", "attn-mean(pospad=true)@1:4", "ttv(pospad=true)@1:4",
                 "random(pospad=true)@1:4", "uniform(pospad=true)@1:4"):
        assert parse_recipe(text).stages[0].options()["pospad"] is True
    assert parse_recipe("cls-topk@1:4").stages[0].options()["pospad"] is False
    with pytest.raises(Exception, match="pospad must be true or false"):
        parse_recipe("cls-topk(pospad=1)@1:4")


# --------------------------------------------------------------------------- pospad_tokens vs a naive loop


def _naive(x: torch.Tensor, idx: torch.Tensor, prefix: int):
    """Walk the patches in order: kept -> itself; each run of dropped -> mean of the run at its last position."""
    B, N, C = x.shape
    n, K = N - prefix, idx.shape[1]
    M = pospad_slots(n, K)
    toks, poss = [], []
    for b in range(B):
        kept = set((idx[b] - prefix).tolist())
        seq, pos, run = [], [], []
        for j in range(n):
            if j in kept:
                seq.append(x[b, prefix + j].double())
                pos.append(prefix + j)
            else:
                run.append(j)
                if j == n - 1 or (j + 1) in kept:
                    seq.append(torch.stack([x[b, prefix + i].double() for i in run]).mean(0))
                    pos.append(prefix + j)
                    run = []
        assert len(seq) <= K + M  # the budget always fits every run
        seq += [torch.zeros(C, dtype=torch.float64)] * (K + M - len(seq))
        pos += [-1] * (K + M - len(pos))
        toks.append(torch.cat([x[b, :prefix].double(), torch.stack(seq)]))
        poss.append(pos)
    return torch.stack(toks), torch.tensor(poss)


@st.composite
def pospad_cases(draw):
    B = draw(st.integers(1, 3))
    prefix = draw(st.integers(0, 3))
    n = draw(st.integers(1, 40))
    keep = draw(st.integers(1, n))
    C = draw(st.integers(1, 6))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    # scores from a few distinct levels exercise ties and long runs; sometimes fully random
    levels = draw(st.sampled_from([None, 2, 3]))
    scores = torch.rand(B, prefix + n, generator=gen) if levels is None else \
        torch.randint(0, levels, (B, prefix + n), generator=gen).float()
    return torch.randn(B, prefix + n, C, generator=gen), scores, keep, prefix


@settings(max_examples=200, deadline=None)
@given(pospad_cases())
def test_pospad_tokens_match_a_naive_loop(case):
    x, scores, keep, prefix = case
    idx = select_topk(scores, keep, prefix)
    n = x.shape[1] - prefix
    M = pospad_slots(n, keep)
    tokens, positions = pospad_tokens(x, idx, M, prefix)
    assert tokens.shape == (x.shape[0], prefix + keep + M, x.shape[2]) and tokens.dtype == x.dtype
    assert positions.shape == (x.shape[0], keep + M) and positions.dtype == torch.int64
    want_tokens, want_pos = _naive(x, idx, prefix)
    torch.testing.assert_close(positions, want_pos, rtol=0, atol=0)
    torch.testing.assert_close(tokens.double(), want_tokens, rtol=1e-5, atol=1e-5)
    for b in range(x.shape[0]):
        used = positions[b][positions[b] >= 0]
        assert (used.diff() > 0).all()                                       # original order, unique
        assert set((idx[b]).tolist()) <= set(used.tolist())                  # every kept token is there
        k = int((positions[b] >= 0).sum())
        assert (positions[b, k:] == -1).all() and (tokens[b, prefix + k:] == 0).all()  # padding at the end
        kept_slots = torch.isin(positions[b], idx[b])
        torch.testing.assert_close(tokens[b, prefix:][kept_slots], x[b, positions[b][kept_slots]], rtol=0, atol=0)


def test_pospad_example():
    # 6 patches after [CLS]; keep positions 2 and 5 (local 1, 4): runs {0}, {2, 3}, {5} -> 3 markers, M = 3
    x = torch.arange(7, dtype=torch.float32).view(1, 7, 1)
    idx = torch.tensor([[2, 5]])
    tokens, positions = pospad_tokens(x, idx, pospad_slots(6, 2), 1)
    assert positions.tolist() == [[1, 2, 4, 5, 6]]
    assert tokens[0, :, 0].tolist() == [0.0, 1.0, 2.0, 3.5, 5.0, 6.0]


def test_fewer_slots_than_runs_drops_the_later_markers():
    x = torch.arange(7, dtype=torch.float32).view(1, 7, 1)
    tokens, positions = pospad_tokens(x, torch.tensor([[2, 5]]), 1, 1)
    assert positions.tolist() == [[1, 2, 5]]
    assert tokens[0, :, 0].tolist() == [0.0, 1.0, 2.0, 5.0]
