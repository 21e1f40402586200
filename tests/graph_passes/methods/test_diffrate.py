"""DiffRate (prune by [CLS] attention, then merge the least important survivors into the most important by keys):
exported on tiny models and checked against eager, the reduce against a naive loop, and the per-block budget table."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from method_checks import assert_exported_case, exported_cases
from tiny_models import build
from tokensieve import api
from tokensieve.errors import ConfigError
from tokensieve.graph_passes.methods.recycle import diffrate_pruned, diffrate_reduce
from tokensieve.graph_passes.methods.topk import prune_topk
from tokensieve.recipe import parse_recipe

CASES = {
    # 16 patches: prune to 12, merge to 8; then merge only 8 -> 4
    "vit": ("vit", "diffrate(prune_keep=0.75)@1:0.5+diffrate@2:4", [17, 9, 5]),
    "registers": ("dinov2_registers", "diffrate(prune_keep=12)@1:8+diffrate(prune_keep=6)@2:4", [21, 13, 9]),
}
exported = exported_cases(CASES)


def test_export_matches_eager_and_is_static(exported):
    case, result = exported
    assert_exported_case(result, CASES[case][2])


def _naive(x, importance, metric, keep, k1, p):
    out = []
    for b in range(x.shape[0]):
        order = sorted(range(p, x.shape[1]), key=lambda j: (-float(importance[b, j]), j))
        dest, sources = sorted(order[:keep]), order[keep:k1]
        groups = {d: [x[b, d]] for d in dest}
        for s in sources:
            sims = [float(torch.nn.functional.cosine_similarity(metric[b, s], metric[b, d], dim=0)) for d in dest]
            groups[dest[int(np.argmax(sims))]].append(x[b, s])
        out.append(torch.cat([x[b, :p], torch.stack([torch.stack(groups[d]).mean(0) for d in dest])]))
    return torch.stack(out)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2), st.integers(3, 14), st.integers(0, 2**31 - 1), st.data())
def test_reduce_equals_prune_then_nearest_merge(p, n, seed, data):
    keep = data.draw(st.integers(1, n - 1))
    k1 = data.draw(st.integers(keep, n))
    g = torch.Generator().manual_seed(seed)
    x, metric = torch.randn(2, p + n, 6, generator=g), torch.randn(2, p + n, 4, generator=g)
    importance = torch.rand(2, p + n, generator=g)
    tokens, idx = diffrate_reduce(x, (importance, metric), keep, p, prune_keep=float(k1) if k1 > 1 else 1.0 / n)
    assert diffrate_pruned(n, float(k1) if k1 > 1 else 1.0 / n) == k1
    torch.testing.assert_close(tokens, _naive(x, importance, metric, keep, k1, p), atol=1e-5, rtol=1e-5)
    if k1 == keep:  # nothing left to merge: exactly the pruned gather
        torch.testing.assert_close(tokens, prune_topk(x, importance, keep, p)[0])


def test_merging_changes_the_output_but_not_the_kept_tokens():
    """Control: prune_keep = keep (pure pruning, as cls-topk) vs merging the other survivors in: same kept tokens,
    another output."""
    model, example = build("vit")
    x = torch.randn(2, *example.shape[1:], generator=torch.Generator().manual_seed(2))
    (a, kept_a), (b, kept_b), (c, kept_c) = (api.plan(model, example, r).reference(x) for r in (
        "diffrate(prune_keep=8)@1:8", "cls-topk@1:8", "diffrate(prune_keep=12)@1:8"))
    assert all(torch.equal(u, v) for u, v in zip(kept_a, kept_b)) and torch.allclose(a, b, atol=1e-6)
    assert all(torch.equal(u, v) for u, v in zip(kept_a, kept_c)) and (a - c).abs().max() > 1e-3


def test_budget_table_becomes_one_stage_per_changing_block(tmp_path):
    path = tmp_path / "diffrate.json"
    path.write_text(json.dumps({"diffrate": {"patches": 16, "prune": [16, 12, 9, 8], "merge": [16, 10, 8, 8]}}))
    stages = parse_recipe(str(path)).stages
    assert [(s.method, s.after_block, s.keep.count, s.options()["prune_keep"]) for s in stages] == [
        ("diffrate", 1, 10, 12.0), ("diffrate", 2, 8, 9.0)]
    model, example = build("vit")
    assert api.plan(model, example, str(path)).stages[1].tokens_out == 9  # [CLS] + 8


@pytest.mark.parametrize("table, needle", [
    ({"patches": 16, "prune": [12]}, "needs patches"),
    ({"patches": 16, "prune": [12, 10], "merge": [10]}, "one count per block"),
    ({"patches": 16, "prune": [12], "merge": [13]}, "must not grow"),
    ({"patches": 16, "prune": [17], "merge": [10]}, "must not grow"),
    ({"patches": 16, "prune": [1.5], "merge": [1]}, "positive integer"),
    ({"patches": 16, "prune": [1], "merge": [1]}, "cannot be told from the ratio"),
])
def test_bad_tables_are_one_line(tmp_path, table, needle):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"diffrate": table}))
    with pytest.raises(ConfigError) as e:
        parse_recipe(str(path))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_prune_keep_below_keep_is_one_line():
    model, example = build("vit")
    with pytest.raises(ConfigError) as e:
        api.plan(model, example, "diffrate(prune_keep=0.25)@1:0.5")
    assert "leaves 4 of 16 patch tokens after pruning" in str(e.value) and "\n" not in str(e.value)
