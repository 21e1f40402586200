"""FEATHER (uniform positions ∪ attention top-k) and recycling (AIM / VFlowOpt: dropped tokens averaged into the most
similar kept token), exported on tiny models and checked against the eager reference, plus their unit formulas."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from method_checks import assert_exported_case, exported_cases
from tiny_models import build
from tokensieve import api
from tokensieve.errors import ConfigError
from tokensieve.graph_passes.methods.attention_scores import cls_attention_scores, feather_scores, feather_uniform_count
from tokensieve.graph_passes.methods.recycle import recycle_dropped_tokens
from tokensieve.graph_passes.methods.topk import select_topk
from tokensieve.graph_passes.onnx.check_static import op_census
from tokensieve.recipe import parse_recipe

CASES = {
    # 16 patches: feather keeps round(0.5*8)=4 uniform + 4 by [CLS] attention, then 1 uniform + 3 (recycled)
    "feather-recycle": ("vit", "feather@1:0.5+feather(uniform_share=0.25,recycle=true)@2:4", [17, 9, 5]),
    # 5 prefix tokens (registers), recycle after a [CLS] top-k and a hidden-state score
    "recycle": ("dinov2_registers", "cls-topk(recycle=true)@1:0.5+ttv(recycle=true)@2:4", [21, 13, 9]),
}
exported = exported_cases(CASES)


def test_export_matches_eager_and_is_static(exported):
    case, result = exported
    assert_exported_case(result, CASES[case][2])
    census = op_census(result.onnx_model)
    assert census["TopK"] >= 2 and census["ArgMax"] >= 1  # recycle's nearest kept token: one ArgMax per stage


def test_recycle_changes_the_output_but_not_the_kept_tokens():
    """Control: the same recipe without recycle keeps the same tokens and gives a different output."""
    model, example = build("vit")
    x = torch.randn(2, *example.shape[1:], generator=torch.Generator().manual_seed(3))
    outs = {}
    for recipe in ("cls-topk@1:0.5", "cls-topk(recycle=true)@1:0.5"):
        plan = api.plan(model, example, recipe)
        outs[recipe] = plan.reference(x)
    (plain, kept_plain), (rec, kept_rec) = outs.values()
    assert all(torch.equal(a, b) for a, b in zip(kept_plain, kept_rec))
    assert (plain - rec).abs().max() > 1e-3


def _naive_recycle(x: torch.Tensor, idx: torch.Tensor, p: int) -> torch.Tensor:
    out = []
    for b in range(x.shape[0]):
        kept = idx[b].tolist()
        groups = {k: [x[b, k]] for k in kept}
        for j in range(p, x.shape[1]):
            if j in groups:
                continue
            sims = [torch.nn.functional.cosine_similarity(x[b, j], x[b, k], dim=0) for k in kept]
            best = kept[int(np.argmax([float(s) for s in sims]))]  # first maximum
            groups[best].append(x[b, j])
        out.append(torch.cat([x[b, :p], torch.stack([torch.stack(groups[k]).mean(0) for k in kept])]))
    return torch.stack(out)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2), st.integers(2, 12), st.integers(1, 11), st.integers(0, 2**31 - 1))
def test_recycle_equals_naive_nearest_kept_mean(p, n, keep, seed):
    keep = min(keep, n - 1)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, p + n, 6, generator=g)
    idx = select_topk(torch.randn(2, p + n, generator=g), keep, p)
    got = recycle_dropped_tokens(x, idx, p)
    assert got.shape == (2, p + keep, 6)
    torch.testing.assert_close(got, _naive_recycle(x, idx, p), atol=1e-5, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(st.integers(3, 30), st.floats(0.0, 1.0), st.integers(0, 2**31 - 1), st.data())
def test_feather_keeps_the_uniform_positions_and_the_best_of_the_rest(n, share, seed, data):
    keep = data.draw(st.integers(1, n - 1))
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 3, 1 + n, 4, generator=g), torch.randn(2, 3, 1 + n, 4, generator=g)
    idx = select_topk(feather_scores(q, k, keep=keep, num_prefix_tokens=1, uniform_share=share), keep, 1)
    u = feather_uniform_count(keep, share)
    uniform = set((np.round(np.linspace(0, n - 1, u)).astype(int) + 1).tolist()) if u else set()
    base = cls_attention_scores(q, k)
    for b in range(2):
        kept = set(idx[b].tolist())
        assert uniform <= kept and len(kept) == keep
        rest = [j for j in range(1, 1 + n) if j not in uniform]
        best = sorted(rest, key=lambda j: (-float(base[b, j]), j))[: keep - len(uniform)]
        assert kept == uniform | set(best)


@pytest.mark.parametrize("recipe, needle", [
    ("cls-topk(recycle=true,fuse=true)@1:0.5", "recycle=true merges the dropped tokens"),
    ("ttv(recycle=true,pospad=true)@1:0.5", "pospad=true has nothing left"),
    ("feather(uniform_share=1.5)@1:0.5", "uniform_share=1.5 is outside [0.0, 1.0]"),
    ("divprune(recycle=true)@1:0.5", "has no parameter 'recycle'"),
])
def test_bad_options_are_one_line(recipe, needle):
    with pytest.raises(ConfigError) as e:
        parse_recipe(recipe)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_feather_without_cls_needs_mean_attention():
    model, example = build("siglip_vision")
    with pytest.raises(ConfigError, match="CLS"):
        api.plan(model, example, "feather@1:0.5")
    plan = api.plan(model, example, "feather(mean_attention=true)@1:0.5")
    assert plan.stages[0].keep == 8
