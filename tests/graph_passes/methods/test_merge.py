"""The merging methods (tome, token-transforming): export + verify, ONNX op census, reduce math, validation.

End to end: each (model, recipe) below is exported once (module-scoped fixture) and checked against the eager
reference on ONNX Runtime. Unit level: `tome_merge(spatial=true)` against Bolya et al.'s `bipartite_soft_matching`
with `scatter_reduce(mean)` on the patch tokens (written out below; the default form is checked against the
released code in test_fidelity_tome.py), `transform_tokens` against the naive formula, the tie rule of
`top_mask`, and recipe validation (ToMe merges at most half the patch tokens per stage).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tiny_models import TINY_MODEL_INFO
from method_checks import DYNAMIC_OPS as NO_DYNAMIC_OPS, assert_matches_eager, exported_cases
from tokensieve.errors import ConfigError
from tokensieve.graph_passes.methods.merge import (
    anchor_scores,
    ascending_positions,
    tome_merge,
    tome_metric,
    top_mask,
    transform_tokens,
)
from tokensieve.graph_passes.onnx.check_static import op_census
from tokensieve.recipe import parse_recipe, resolve_recipe

SETTINGS = settings(max_examples=60, deadline=None)

# case id -> (tiny model, two-stage recipe, tokens entering block 0 then after each stage, patch tokens kept per stage)
CASES = {
    "tome-vit": ("vit", "tome@1:0.5+tome@2:5", [17, 9, 6], [8, 5]),
    # no prefix token: ToMe's unmerged A tokens come in its argsort order (by best similarity), not by position.
    # (5 prefix tokens, [CLS] + 4 registers, take the vit case's path; exported in test_tome_prop_attn's "registers")
    "tome-siglip": ("siglip_vision", "tome@1:0.5+tome@2:5", [16, 8, 5], [8, 5]),
    "tt-vit": ("vit", "token-transforming@1:0.5+token-transforming(temperature=0.5)@2:3", [17, 9, 4], [8, 3]),
    "tt-registers": ("dinov2_registers", "token-transforming(mean_attention=true)@1:0.5+token-transforming@2:0.5",
                     [21, 13, 9], [8, 4]),
}


exported = exported_cases(CASES)


# --------------------------------------------------------------------------- export + verify


def test_onnx_runtime_matches_eager_reference_over_20_inputs(exported):
    _, result = exported
    assert assert_matches_eager(result).stage_blocks == [1, 2]


def test_onnx_merges_with_matmul_and_has_no_scatter_or_dynamic_ops(exported):
    _, result = exported
    dense = op_census(result.dense_onnx)
    for model in (result.onnx_model, result.debug_onnx):
        census = op_census(model)
        # per stage: ToMe's A×B similarity + 2 assignment MatMuls; token transforming's similarity + M^T x
        assert census["MatMul"] >= dense["MatMul"] + 2 * len(result.stages)
        assert not set(census) & NO_DYNAMIC_OPS, {op: census[op] for op in NO_DYNAMIC_OPS if census[op]}


def test_tokens_per_stage(exported):
    case, result = exported
    name, _, tokens, keeps = CASES[case]
    assert result.layout.num_prefix_tokens == TINY_MODEL_INFO[name].num_prefix_tokens
    assert [s.keep for s in result.stages] == keeps
    assert result.tokens == tokens


# --------------------------------------------------------------------------- ToMe reduce


def _bolya_tome(x: torch.Tensor, metric: torch.Tensor, r: int) -> tuple[list, list]:
    """ToMe's bipartite_soft_matching + merge_wavg with all sizes 1, for one image of patch tokens (n, C).

    Returns (positions, tokens) of the survivors with their merged values (order as in ToMe: unmerged A, then B),
    and the token sizes (for mass conservation).
    """
    m = metric / metric.norm(dim=-1, keepdim=True)
    a, b = m[0::2], m[1::2]
    scores = a @ b.T
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(descending=True, stable=True)
    unm_idx, src_idx = edge_idx[r:], edge_idx[:r]
    dst_idx = node_idx[src_idx]
    xa, xb = x[0::2], x[1::2]
    dst = xb.scatter_reduce(0, dst_idx[:, None].expand(-1, x.shape[1]), xa[src_idx], reduce="mean")
    size = torch.ones(len(xb)).scatter_add(0, dst_idx, torch.ones(r))
    positions = (2 * unm_idx).tolist() + list(range(1, x.shape[0], 2))
    tokens = torch.cat([xa[unm_idx], dst])
    sizes = torch.cat([torch.ones(len(unm_idx)), size])
    return positions, tokens, sizes


@st.composite
def tome_cases(draw):
    B = draw(st.integers(1, 3))
    n = draw(st.integers(2, 40))
    prefix = draw(st.integers(0, 5))
    r = draw(st.integers(0, (n + 1) // 2))  # the spatial variant's limit: at most |A| = ceil(n / 2) merges
    C, D = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(B, prefix + n, C, generator=gen)
    metric = torch.randn(B, prefix + n, D, generator=gen)
    return x, metric, n - r, prefix


@SETTINGS
@given(tome_cases())
def test_tome_merge_matches_bipartite_soft_matching(case):
    x, metric, keep, p = case
    B, N, C = x.shape
    n = N - p
    out, idx = tome_merge(x, metric, keep, p, spatial=True)

    assert out.shape == (B, p + keep, C) and idx.shape == (B, keep) and idx.dtype == torch.long
    assert (idx[:, 1:] > idx[:, :-1]).all() and (idx >= p).all() and (idx < N).all()  # ascending, unique
    torch.testing.assert_close(out[:, :p], x[:, :p], rtol=0, atol=0)  # prefix rows untouched
    odd = torch.arange(p + 1, N, 2)  # set B (odd patch positions) always survives
    assert all(set(odd.tolist()) <= set(row.tolist()) for row in idx)
    for b in range(B):
        positions, tokens, sizes = _bolya_tome(x[b, p:], metric[b, p:], n - keep)
        order = sorted(range(keep), key=positions.__getitem__)
        assert idx[b].tolist() == [positions[i] + p for i in order]
        # each survivor is the mean of its group (itself + the A tokens merged into it)
        torch.testing.assert_close(out[b, p:], tokens[order], rtol=1e-5, atol=1e-5)
        # mass: Σ size·token over the survivors = Σ of the input patch tokens
        torch.testing.assert_close((sizes[order, None] * out[b, p:]).sum(0), x[b, p:].sum(0), rtol=1e-4, atol=1e-4)


def test_tome_merges_identical_tokens_first_and_breaks_ties_by_position():
    # Patches 0..7; A = 0, 2, 4, 6; B = 1, 3, 5, 7. Each A token's metric equals its right B neighbour's (a basis
    # vector, so every best similarity is exactly 1.0): four exact ties, the lowest positions (0 and 2) merge.
    metric = torch.eye(4).repeat_interleave(2, dim=0).unsqueeze(0)  # rows e0 e0 e1 e1 e2 e2 e3 e3
    x = torch.randn(1, 8, 3, generator=torch.Generator().manual_seed(0))
    out, idx = tome_merge(x, metric, keep=6, num_prefix_tokens=0, spatial=True)
    assert idx.tolist() == [[1, 3, 4, 5, 6, 7]]
    want = torch.stack([(x[0, 0] + x[0, 1]) / 2, (x[0, 2] + x[0, 3]) / 2, *x[0, 4:]])
    torch.testing.assert_close(out[0], want)


def test_tome_keep_all_is_the_identity():
    x = torch.randn(2, 9, 4)
    out, idx = tome_merge(x, x, keep=8, num_prefix_tokens=1)
    torch.testing.assert_close(out, x, rtol=0, atol=0)
    assert idx.tolist() == [list(range(1, 9))] * 2


def test_tome_metric_is_the_head_averaged_keys():
    q, k = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    torch.testing.assert_close(tome_metric(q, k, 0.5), k.mean(dim=1))


# --------------------------------------------------------------------------- selection helpers


@SETTINGS
@given(B=st.integers(1, 3), n=st.integers(1, 40), data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_top_mask_is_a_stable_descending_sort_with_ties_to_the_lowest_position(B, n, data, seed):
    k = data.draw(st.integers(0, n))
    values = torch.randint(0, 4, (B, n), generator=torch.Generator().manual_seed(seed)).float()  # many ties
    mask = top_mask(values, k)
    want = torch.zeros(B, n, dtype=torch.bool)
    for b in range(B):
        want[b, values[b].sort(descending=True, stable=True).indices[:k]] = True
    assert torch.equal(mask, want)
    if k:
        pos = ascending_positions(mask, k)
        assert pos.tolist() == [torch.nonzero(row).flatten().tolist() for row in mask]


# --------------------------------------------------------------------------- token transforming reduce


def _naive_transform(x, scores, keep, p, tau):
    B, N, C = x.shape
    out = torch.empty(B, p + keep, C, dtype=torch.float64)
    out[:, :p] = x[:, :p].double()
    anchors = []
    for b in range(B):
        order = scores[b, p:].sort(descending=True, stable=True).indices[:keep].sort().values + p
        anchors.append(order.tolist())
        xs = [x[b, i].double() for i in range(p, N)]
        cos = lambda u, v: float(u @ v) / max(float(u.norm()) * float(v.norm()), 1e-300)
        w = torch.tensor([[cos(xi, x[b, j].double()) / tau for j in order] for xi in xs]).softmax(dim=-1)
        for jj in range(keep):
            out[b, p + jj] = sum(w[i, jj] * xs[i] for i in range(len(xs))) / w[:, jj].sum()
    return out, anchors


@SETTINGS
@given(B=st.integers(1, 3), n=st.integers(1, 24), p=st.integers(0, 5), C=st.integers(1, 8),
       tau=st.sampled_from([0.01, 0.1, 1.0, 10.0]), data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_transform_tokens_matches_the_naive_formula(B, n, p, C, tau, data, seed):
    keep = data.draw(st.integers(1, n))
    gen = torch.Generator().manual_seed(seed)
    x, scores = torch.randn(B, p + n, C, generator=gen), torch.rand(B, p + n, generator=gen)
    out, idx = transform_tokens(x, scores, keep, p, tau)
    want, anchors = _naive_transform(x, scores, keep, p, tau)
    assert out.shape == (B, p + keep, C) and idx.dtype == torch.long
    assert idx.tolist() == anchors  # ascending anchor positions
    torch.testing.assert_close(out[:, :p], x[:, :p], rtol=0, atol=0)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)


def test_transform_tokens_with_small_temperature_averages_each_cluster():
    # Two tight clusters around orthogonal directions; anchors 1 and 3 (highest scores), one per cluster.
    e = torch.eye(4)
    x = torch.stack([e[0], e[0] * 2, e[1] * 3, e[1], e[0] * 3]).unsqueeze(0)
    scores = torch.tensor([[0.1, 0.9, 0.2, 0.8, 0.0]])
    out, idx = transform_tokens(x, scores, keep=2, num_prefix_tokens=0, temperature=0.01)
    assert idx.tolist() == [[1, 3]]
    torch.testing.assert_close(out[0], torch.stack([e[0] * 2, e[1] * 2]))  # means of {0, 1, 4} and {2, 3}


def test_anchor_scores_cls_row_or_mean_attention():
    q, k = torch.randn(2, 3, 6, 4), torch.randn(2, 3, 6, 4)
    cls = anchor_scores(q, k)
    mean = anchor_scores(q, k, mean_attention=True)
    assert cls.shape == mean.shape == (2, 6) and not torch.allclose(cls, mean)
    torch.testing.assert_close(cls.sum(-1), torch.ones(2))
    torch.testing.assert_close(mean.sum(-1), torch.ones(2))


# --------------------------------------------------------------------------- recipe validation


@pytest.mark.parametrize("recipe, tokens, keeps", [
    ("tome@1:8", 17, [8]),                  # 16 patches: |A| = 8 merges at most
    ("tome@1:0.5+tome@2:4", 17, [8, 4]),
    ("tome@0:5", 10, [5]),                  # 9 patches: ToMe merges at most floor(9 / 2) = 4
    ("tome(spatial=true)@0:4", 10, [4]),    # the spatial variant: |A| = ceil(9 / 2) = 5
])
def test_tome_budget_up_to_half_resolves(recipe, tokens, keeps):
    assert [s.keep for s in resolve_recipe(parse_recipe(recipe), 4, tokens, 1)] == keeps


@pytest.mark.parametrize("recipe, tokens, limit", [
    ("tome@1:7", 17, "at most 8 of 16 patch tokens per stage (keep >= 8)"),
    ("tome@1:0.4", 17, "at most 8 of 16 patch tokens per stage (keep >= 8)"),   # keep = ceil(6.4) = 7
    ("tome@1:0.5+tome@2:3", 17, "at most 4 of 8 patch tokens per stage (keep >= 4)"),
    ("tome@0:4", 10, "at most 4 of 9 patch tokens per stage (keep >= 5)"),
    ("tome(spatial=true)@0:3", 10, "at most 5 of 9 patch tokens per stage (keep >= 4)"),
])
def test_tome_budget_beyond_half_is_a_one_line_config_error(recipe, tokens, limit):
    with pytest.raises(ConfigError) as e:
        resolve_recipe(parse_recipe(recipe), 4, tokens, 1)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("Stage tome@") and limit in msg and "add stages" in msg


@pytest.mark.parametrize("text, match", [
    ("token-transforming(temperature=0)@1:0.5", "temperature"),
    ("token-transforming(temperature=11)@1:0.5", "temperature"),
    ("token-transforming(mean_attention=1)@1:0.5", "true or false"),
    ("tome(temperature=0.1)@1:0.5", "no parameter"),
])
def test_bad_parameters_are_config_errors(text, match):
    with pytest.raises(ConfigError, match=match) as e:
        parse_recipe(text)
    assert "\n" not in str(e.value)
