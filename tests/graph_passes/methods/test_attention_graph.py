"""zero-tprune (Weighted PageRank I-stage + similarity S-stage): export + verify, op census, MACs, select math, errors.

End to end: each (model, recipe) below is exported once (module-scoped fixture) and checked against the eager
reference on ONNX Runtime, including the CLS-free SigLIP. Unit level: `weighted_pagerank` against a float64 numpy
power iteration, `zero_tprune_select` against a plain-Python sort-and-match reference (hypothesis: any n, keep,
batch, many ties), hand-built cases for each stage, and recipe validation of the parameters.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tiny_models import TINY_MODEL_INFO, build
from method_checks import DYNAMIC_OPS as NO_DYNAMIC_OPS, assert_matches_eager, exported_cases
from tokensieve import api
from tokensieve.errors import ConfigError
from tokensieve.graph_passes.methods.attention_graph import (
    similar_count, weighted_pagerank, wpr_scores, zero_tprune, zero_tprune_select,
)
from tokensieve.graph_passes.methods.diversity import cosine_similarity
from tokensieve.graph_passes.methods.registry import METHODS
from tokensieve.graph_passes.methods.topk import select_topk
from tokensieve.graph_passes.onnx.check_static import check_static, op_census
from tokensieve.recipe import parse_recipe

SETTINGS = settings(max_examples=60, deadline=None)

# case id -> (tiny model, two-stage recipe, tokens entering block 0 then after each stage, patch tokens kept per stage)
CASES = {
    "vit": ("vit", "zero-tprune(iters=10)@1:0.5+zero-tprune(iters=5)@2:0.5", [17, 9, 5], [8, 4]),
    "siglip": ("siglip_vision", "zero-tprune(iters=8)@1:0.5+zero-tprune(iters=8,similar_share=0)@2:3",
               [16, 8, 3], [8, 3]),
    "registers": ("dinov2_registers", "zero-tprune(iters=6,similar_share=1)@1:0.5+zero-tprune(iters=6)@2:0.5",
                  [21, 13, 9], [8, 4]),
}


exported = exported_cases(CASES)


# --------------------------------------------------------------------------- export + verify


def test_onnx_runtime_matches_eager_reference_over_20_inputs(exported):
    _, result = exported
    assert assert_matches_eager(result).stage_blocks == [1, 2]


def test_onnx_is_static_with_one_matmul_per_power_iteration(exported):
    _, result = exported
    dense = op_census(result.dense_onnx)
    iters = [s.options["iters"] for s in result.stages]
    similar = [similar_count(s.tokens_in - s.num_prefix_tokens, s.keep, s.options["similar_share"]) > 0
               for s in result.stages]
    for model in (result.onnx_model, result.debug_onnx):
        census = op_census(model)
        assert not set(census) & NO_DYNAMIC_OPS, {op: census[op] for op in NO_DYNAMIC_OPS if census[op]}
        # per stage: q·kᵀ, one (1 × N)·(N × N) product per iteration, and the key similarity if the S-stage runs
        assert census["MatMul"] - dense["MatMul"] == sum(1 + i + s for i, s in zip(iters, similar))
        check_static(model)


def test_tokens_per_stage(exported):
    case, result = exported
    name, _, tokens, keeps = CASES[case]
    assert result.layout.num_prefix_tokens == TINY_MODEL_INFO[name].num_prefix_tokens
    assert [s.keep for s in result.stages] == keeps
    assert result.tokens == tokens


def test_kept_indices_are_ascending_unique_patch_positions(exported):
    _, result = exported
    x = torch.randn(3, *result.input_shape[1:], generator=torch.Generator().manual_seed(3))
    _, kept = result.reference(x)
    for stage, idx in zip(result.stages, kept):
        assert idx.shape == (3, stage.keep)
        assert (idx[:, 1:] > idx[:, :-1]).all()
        assert (idx >= stage.num_prefix_tokens).all() and (idx < stage.tokens_in).all()


def test_mac_overhead_over_cls_topk_is_attention_plus_iterations_plus_similarity(monkeypatch):
    """Same budget, one stage after block 1 of the tiny ViT (N = 17 tokens, H = 2 heads of D = 24, n = 16 patches).

    api.export counts the MACs on the traced programs, before any ONNX: the ONNX conversion (most of an export's
    time; the file's exported cases convert and verify) is skipped here."""
    monkeypatch.setattr(api, "to_onnx", lambda *a, **kw: None)
    monkeypatch.setattr(api, "run_onnx_passes", lambda *a, **kw: None)
    model, x = build("vit")
    zt = api.export(model, x, "zero-tprune(iters=10)@1:0.5")
    cls = api.export(model, x, "cls-topk@1:0.5")
    N, H, D, n, iters = 17, 2, 24, 16, 10
    # zero-tprune: H·N²·D (attention) + iters·H·N² (power iterations) + n²·D (key cosines); cls-topk: H·N·D
    # cls-topk's gather is hoisted into block 1 (hoist_token_gathers: o_proj + MLP on the K + 1 kept tokens); zero-tprune
    # reads the block output, so its block 1 runs on all N: C = 48, MLP 96, 8 dropped tokens
    hoisted = (N - (1 + n // 2)) * (48 * 48 + 2 * 48 * 96)
    assert zt.macs_pruned - cls.macs_pruned == H * N * N * D + iters * H * N * N + n * n * D - H * N * D + hoisted


# --------------------------------------------------------------------------- I-stage: Weighted PageRank


@SETTINGS
@given(B=st.integers(1, 3), H=st.integers(1, 3), N=st.integers(1, 24), iters=st.integers(1, 40),
       seed=st.integers(0, 2**31 - 1))
def test_weighted_pagerank_matches_numpy_power_iteration(B, H, N, iters, seed):
    gen = torch.Generator().manual_seed(seed)
    attn = (torch.randn(B, H, N, N, generator=gen) * 3).softmax(dim=-1)
    got = weighted_pagerank(attn, iters)
    a = attn.double().numpy()
    want = np.empty((B, N))
    for b in range(B):
        per_head = []
        for h in range(H):
            s = np.full(N, 1.0 / N)
            for _ in range(iters):
                s = np.einsum("j,ji->i", s, a[b, h])  # s_i = Σ_j A[j, i] s_j
            per_head.append(s)
        want[b] = np.mean(per_head, axis=0)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got.sum(-1).numpy(), 1.0, rtol=1e-5)  # rows of A sum to 1: stays a distribution


def test_tokens_attended_by_important_tokens_are_important():
    # 0 attends to 1, everyone else attends to 0: 0 and 1 share the mass, the rest get nothing after one step.
    attn = torch.zeros(1, 1, 5, 5)
    attn[0, 0, 0, 1] = 1.0
    attn[0, 0, 1:, 0] = 1.0
    s = weighted_pagerank(attn, iters=1)
    torch.testing.assert_close(s, torch.tensor([[0.8, 0.2, 0.0, 0.0, 0.0]]))
    s = weighted_pagerank(attn, iters=2)  # token 1 now receives all of token 0's importance
    torch.testing.assert_close(s, torch.tensor([[0.2, 0.8, 0.0, 0.0, 0.0]]))


def test_wpr_scores_recompute_the_blocks_softmax_attention():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 7, 4, generator=gen), torch.randn(2, 3, 7, 4, generator=gen)
    importance, metric = wpr_scores(q, k, 0.3, iters=4)
    attn = torch.nn.functional.scaled_dot_product_attention(q, k, torch.eye(7).expand(2, 3, 7, 7), scale=0.3)
    torch.testing.assert_close(importance, weighted_pagerank(attn, 4))
    torch.testing.assert_close(metric, k.mean(dim=1))


# --------------------------------------------------------------------------- S-stage + selection


def naive_select(importance: list[float], sim: list[list[float]], keep: int, share: float) -> list[int]:
    """The stages written out: stable sorts (ties to the lowest position), explicit groups and matches."""
    n = len(importance)
    order = sorted(range(n), key=lambda i: (-importance[i], i))
    r_s = min(int(share * (n - keep) + 0.5), keep)
    m = keep + r_s
    survivors = order[:m]
    group_b, group_a = survivors[:m - m // 2], survivors[m - m // 2:]
    best = {a: max(sim[a][b] for b in group_b) for a in group_a}
    dropped = sorted(group_a, key=lambda a: (-best[a], a))[:r_s]
    return sorted(set(survivors) - set(dropped))


@st.composite
def select_cases(draw):
    B, n, D = draw(st.integers(1, 3)), draw(st.integers(1, 32)), draw(st.integers(1, 6))
    keep = draw(st.integers(1, n))
    share = draw(st.sampled_from([0.0, 0.25, 0.5, 1.0]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    levels = draw(st.integers(1, 5))  # few distinct values: many exact ties in the importance and similarities
    importance = torch.randint(0, levels, (B, n), generator=gen).float()
    metric = torch.randint(-1, 2, (B, n, D), generator=gen).float()
    return importance, metric, keep, share


@SETTINGS
@given(select_cases())
def test_zero_tprune_select_matches_the_naive_stages(case):
    importance, metric, keep, share = case
    mask = zero_tprune_select(importance, metric, keep, share)
    assert mask.shape == importance.shape and (mask.sum(-1) == keep).all()
    sim = cosine_similarity(metric)
    for b in range(importance.shape[0]):
        want = naive_select(importance[b].tolist(), sim[b].tolist(), keep, share)
        assert torch.nonzero(mask[b]).flatten().tolist() == want


@SETTINGS
@given(B=st.integers(1, 3), n=st.integers(1, 24), p=st.integers(0, 5), C=st.integers(1, 6), data=st.data(),
       seed=st.integers(0, 2**31 - 1))
def test_zero_tprune_reduce_keeps_prefix_and_gathers_ascending_positions(B, n, p, C, data, seed):
    keep = data.draw(st.integers(1, n))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, p + n, C, generator=gen)
    importance, metric = torch.rand(B, p + n, generator=gen), torch.randn(B, p + n, 4, generator=gen)
    out, idx = zero_tprune(x, (importance, metric), keep, p, similar_share=0.5)
    assert out.shape == (B, p + keep, C) and idx.shape == (B, keep) and idx.dtype == torch.long
    assert (idx[:, 1:] > idx[:, :-1]).all() and (idx >= p).all() and (idx < p + n).all()
    torch.testing.assert_close(out[:, :p], x[:, :p], rtol=0, atol=0)
    torch.testing.assert_close(out[:, p:], x.gather(1, idx.unsqueeze(-1).expand(-1, -1, C)), rtol=0, atol=0)
    mask = zero_tprune_select(importance[:, p:], metric[:, p:], keep, 0.5)
    assert idx.tolist() == [(torch.nonzero(row).flatten() + p).tolist() for row in mask]


def test_similar_share_zero_is_importance_top_k():
    gen = torch.Generator().manual_seed(1)
    importance, metric = torch.rand(3, 20, generator=gen), torch.randn(3, 20, 5, generator=gen)
    mask = zero_tprune_select(importance, metric, 7, similar_share=0.0)
    assert [torch.nonzero(r).flatten().tolist() for r in mask] == select_topk(importance, 7, 0).tolist()


def test_s_stage_drops_a_duplicate_of_an_important_token_instead_of_the_least_important():
    # 8 tokens, importance descending with position; keep 5 and drop 3: r_s = round(0.5 * 3) = 2, r_i = 1.
    # I-stage drops token 7; survivors 0..6, B = {0, 1, 2, 3}, A = {4, 5, 6}. Token 4 duplicates token 0 and
    # token 5 token 1, token 6 is orthogonal to every B token: the S-stage drops 4 and 5 (importance alone: 5, 6).
    e = torch.eye(8)
    metric = torch.stack([e[0], e[1], e[2], e[3], e[0], e[1], e[6], e[7]]).unsqueeze(0)
    importance = torch.arange(8, 0, -1).float().unsqueeze(0)
    mask = zero_tprune_select(importance, metric, keep=5, similar_share=0.5)
    assert torch.nonzero(mask[0]).flatten().tolist() == [0, 1, 2, 3, 6]
    # Token 4 duplicates token 2, tokens 5 and 6 match nothing (similarity 0, an exact tie): the S-stage drops 4,
    # then 5 (the tie goes to the lowest position).
    metric2 = torch.stack([e[0], e[1], e[2], e[3], e[2], e[5], e[6], e[7]]).unsqueeze(0)
    mask = zero_tprune_select(importance, metric2, keep=5, similar_share=0.5)
    assert torch.nonzero(mask[0]).flatten().tolist() == [0, 1, 2, 3, 6]


@pytest.mark.parametrize("n, keep, share, want", [(16, 8, 0.5, 4), (16, 8, 1.0, 8), (16, 3, 1.0, 3), (16, 15, 0.5, 1),
                                                  (16, 8, 0.0, 0)])
def test_similar_count_is_a_share_of_the_dropped_tokens_capped_at_keep(n, keep, share, want):
    assert similar_count(n, keep, share) == want


# --------------------------------------------------------------------------- recipe validation


def test_recipe_shorthand_and_catalogue():
    recipe = parse_recipe("zero-tprune(iters=10)@3:0.5")
    assert recipe.stages[0].options() == {"iters": 10, "similar_share": 0.5}
    assert recipe.shorthand() == "zero-tprune(iters=10)@3:0.5"
    spec = METHODS["zero-tprune"]
    assert "Zero-TPrune" in spec.paper and [p.name for p in spec.params] == ["iters", "similar_share"]
    assert not spec.requires_cls


@pytest.mark.parametrize("text, match", [
    ("zero-tprune(iters=0)@1:0.5", r"iters=0 is outside \[1, 100\]"),
    ("zero-tprune(iters=101)@1:0.5", r"iters=101 is outside \[1, 100\]"),
    ("zero-tprune(iters=2.5)@1:0.5", "iters must be an integer"),
    ("zero-tprune(similar_share=1.5)@1:0.5", r"similar_share=1.5 is outside \[0.0, 1.0\]"),
    ("zero-tprune(similar_share=true)@1:0.5", "similar_share must be a number"),
    ("zero-tprune(alpha=1)@1:0.5", "has no parameter 'alpha'; its parameters: iters, similar_share"),
])
def test_bad_parameters_are_one_line_config_errors(text, match):
    with pytest.raises(ConfigError, match=match) as e:
        parse_recipe(text)
    assert "\n" not in str(e.value)


def test_bad_block_through_export_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match=r"the model has blocks 0..3") as e:
        api.export(*build("vit"), "zero-tprune@4:0.5")
    assert "\n" not in str(e.value)
