"""hiprune (anchors / buffers / registers from two encoder depths): export + verify, op census, MACs, selection, errors.

End to end: each (model, recipe) below is exported once (module-scoped fixture) and checked against the eager
reference on ONNX Runtime, including the CLS-free SigLIP and a later stage after the HiPrune stage. Unit level:
`hiprune_select` against a plain-Python sort-and-fill reference (hypothesis: any grid, budget split, batch, many
ties), the fill rule when the anchors have too few neighbours, the grid adjacency, the budget split, and the
one-line errors of a bad split, a bad anchor block and an earlier stage. Eager reference: the anchor block is read
at HookStage.earlier_path (not derived from the stage's own `<prefix>.<index>` path).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from hypothesis import given, settings
from hypothesis import strategies as st

from tiny_models import TINY_MODEL_INFO, build
from method_checks import DYNAMIC_OPS as NO_DYNAMIC_OPS, assert_matches_eager, exported_cases
from tokensieve import api
from tokensieve.cli import main
from tokensieve.errors import ConfigError
from tokensieve.graph_passes.methods.hiprune import (
    anchor_block_of, grid_adjacency, hiprune_scores, hiprune_select, hiprune_split, tiered_top_mask,
)
from tokensieve.graph_passes.methods.reference import run_reference
from tokensieve.graph_passes.methods.registry import METHODS
from tokensieve.graph_passes.onnx.check_static import check_static, op_census
from tokensieve.recipe import parse_recipe, resolve_recipe

SETTINGS = settings(max_examples=60, deadline=None)

# case id -> (tiny model, recipe, tokens entering block 0 then after each stage, patch tokens kept per stage)
# Every tiny model has a 4 x 4 patch grid.
CASES = {
    # the released selection (default): round(8 x 0.5 / 5) = 1 anchor + its index neighbours, registers the rest
    "siglip": ("siglip_vision", "hiprune(anchor_block=1,alpha=0.5)@2:0.5", [16, 8], [8]),
    "vit-then-cls": ("vit", "hiprune@2:0.5+cls-topk@3:0.5", [17, 9, 5], [8, 4]),  # anchors from block 2 // 2 = 1
    "registers-diagonal": ("dinov2_registers", "hiprune(anchor_block=0,anchor_ratio=0.25,buffer_ratio=0.5,"
                           "diagonal=true,alpha=0)@2:6", [21, 11], [6]),   # tokensieve's split (alpha=0)
}


exported = exported_cases(CASES)


# --------------------------------------------------------------------------- export + verify


def test_onnx_runtime_matches_eager_reference_over_20_inputs(exported):
    _, result = exported
    assert_matches_eager(result)


def test_onnx_is_static_with_two_attention_recomputes_and_one_adjacency_matmul(exported):
    _, result = exported
    dense = op_census(result.dense_onnx)
    # hiprune: q·kᵀ at the anchor block and at its own block + anchors · adjacency; cls-topk: its [CLS] row
    want = sum(3 if s.stage.method == "hiprune" else 1 for s in result.stages)
    for model in (result.onnx_model, result.debug_onnx):
        census = op_census(model)
        assert not set(census) & NO_DYNAMIC_OPS, {op: census[op] for op in NO_DYNAMIC_OPS if census[op]}
        assert census["MatMul"] - dense["MatMul"] == want
        check_static(model)


def test_tokens_per_stage(exported):
    case, result = exported
    name, _, tokens, keeps = CASES[case]
    assert result.layout.num_prefix_tokens == TINY_MODEL_INFO[name].num_prefix_tokens
    assert result.layout.grid == (4, 4)
    assert [s.keep for s in result.stages] == keeps
    assert result.tokens == tokens


def test_onnx_kept_indices_are_ascending_unique_patch_positions(exported):
    _, result = exported
    x = torch.randn(3, *result.input_shape[1:], generator=torch.Generator().manual_seed(3))
    sess = ort.InferenceSession(result.debug_onnx.SerializeToString(), providers=["CPUExecutionProvider"])
    _, *kept = sess.run(None, {"pixel_values": x.numpy()})
    for stage, idx in zip(result.stages, kept):
        assert idx.shape == (3, stage.keep) and (np.diff(idx, axis=1) > 0).all()
        assert (idx >= stage.num_prefix_tokens).all() and (idx < stage.tokens_in).all()


def test_mac_overhead_over_cls_topk_is_two_attention_matrices_and_the_adjacency(monkeypatch):
    """Same budget after block 2 of the tiny ViT (N = 17 tokens, H = 2 heads of D = 24, n = 16 patches).

    api.export counts the MACs on the traced programs, before any ONNX: the conversion (most of an export's time; the
    file's exported cases convert and verify) is skipped here."""
    monkeypatch.setattr(api, "to_onnx", lambda *a, **kw: None)
    monkeypatch.setattr(api, "run_onnx_passes", lambda *a, **kw: None)
    model, x = build("vit")
    hp = api.export(model, x, "hiprune@2:0.5")
    cls = api.export(model, x, "cls-topk@2:0.5")
    N, H, D, n = 17, 2, 24, 16
    assert hp.macs_pruned - cls.macs_pruned == 2 * H * N * N * D + n * n - H * N * D


# --------------------------------------------------------------------------- selection


def _neighbours(i: int, grid: tuple[int, int], diagonal: bool) -> set[int]:
    h, w = grid
    r, c = divmod(i, w)
    steps = [(-1, 0), (1, 0), (0, -1), (0, 1)] + ([(-1, -1), (-1, 1), (1, -1), (1, 1)] if diagonal else [])
    return {(r + dr) * w + c + dc for dr, dc in steps if 0 <= r + dr < h and 0 <= c + dc < w}


def naive_hiprune(s_anchor: list[float], s_register: list[float], grid, n_a: int, n_b: int, n_r: int,
                  diagonal: bool) -> list[int]:
    """Stable sorts (ties to the lowest position): anchors, best neighbours (then best others), registers."""
    n = len(s_anchor)
    by_anchor = sorted(range(n), key=lambda i: (-s_anchor[i], i))
    anchors = by_anchor[:n_a]
    near = set().union(*(_neighbours(a, grid, diagonal) for a in anchors)) - set(anchors)
    buffers = [i for i in by_anchor if i in near][:n_b]
    buffers += [i for i in by_anchor if i not in near and i not in anchors][:n_b - len(buffers)]  # fill
    taken = set(anchors) | set(buffers)
    registers = [i for i in sorted(range(n), key=lambda i: (-s_register[i], i)) if i not in taken][:n_r]
    return sorted(taken | set(registers))


@st.composite
def select_cases(draw):
    h, w = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    n = h * w
    keep = draw(st.integers(1, n))
    a = draw(st.sampled_from([0.0, 0.1, 0.2, 0.5, 1.0]))
    b = draw(st.sampled_from([x for x in (0.0, 0.2, 0.4, 0.8, 1.0) if a + x <= 1.0]))
    B = draw(st.integers(1, 3))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    levels = draw(st.integers(1, 6))  # few distinct values: many exact ties
    s_anchor = torch.randint(0, levels, (B, n), generator=gen).float()
    s_register = torch.randint(0, levels, (B, n), generator=gen).float()
    return s_anchor, s_register, (h, w), hiprune_split(keep, a, b), draw(st.booleans())


@SETTINGS
@given(select_cases())
def test_hiprune_select_matches_the_naive_sort_and_fill(case):
    s_anchor, s_register, grid, split, diagonal = case
    mask = hiprune_select(s_anchor, s_register, grid, *split, diagonal)
    assert mask.shape == s_anchor.shape and (mask.sum(-1) == sum(split)).all()
    for b in range(s_anchor.shape[0]):
        want = naive_hiprune(s_anchor[b].tolist(), s_register[b].tolist(), grid, *split, diagonal)
        assert torch.nonzero(mask[b]).flatten().tolist() == want


def test_buffers_fill_from_the_best_remaining_tokens_when_anchors_have_too_few_neighbours():
    # 3 x 3 grid, one anchor in the corner (position 0: neighbours 1 and 3), four buffers wanted.
    #   anchor scores  9 1 5        -> anchor 0; neighbours 1, 3 are buffers although they score low,
    #                  2 8 7           then the best others fill: 4 (8) and 5 (7); registers: none.
    #                  6 3 4
    s_anchor = torch.tensor([[9.0, 1, 5, 2, 8, 7, 6, 3, 4]])
    mask = hiprune_select(s_anchor, torch.zeros(1, 9), (3, 3), n_anchor=1, n_buffer=4, n_register=0)
    assert torch.nonzero(mask[0]).flatten().tolist() == [0, 1, 3, 4, 5]
    # with the 8-neighbourhood, 4 is a neighbour too: buffers 1, 3, 4 and then the best other, 5
    mask = hiprune_select(s_anchor, torch.zeros(1, 9), (3, 3), 1, 4, 0, diagonal=True)
    assert torch.nonzero(mask[0]).flatten().tolist() == [0, 1, 3, 4, 5]
    # and the best neighbours win over better non-neighbours when there are enough: 2 of {1, 3}
    mask = hiprune_select(s_anchor, torch.zeros(1, 9), (3, 3), 1, 1, 0)
    assert torch.nonzero(mask[0]).flatten().tolist() == [0, 3]


def test_registers_come_from_the_deep_attention_among_the_rest():
    s_anchor = torch.tensor([[0.0, 0, 0, 0, 9]])                  # 1 x 5 grid: anchor 4, its neighbour 3
    s_register = torch.tensor([[5.0, 1, 2, 9, 9]])              # 3 and 4 are taken: registers 0 then 2
    mask = hiprune_select(s_anchor, s_register, (1, 5), 1, 1, 2)
    assert torch.nonzero(mask[0]).flatten().tolist() == [0, 2, 3, 4]


@pytest.mark.parametrize("grid, diagonal, degrees", [
    ((3, 3), False, [2, 3, 2, 3, 4, 3, 2, 3, 2]),
    ((3, 3), True, [3, 5, 3, 5, 8, 5, 3, 5, 3]),
    ((1, 4), False, [1, 2, 2, 1]),
    ((2, 3), True, [3, 5, 3, 3, 5, 3]),
])
def test_grid_adjacency_is_the_row_major_neighbourhood(grid, diagonal, degrees):
    adj = grid_adjacency(grid, diagonal)
    assert torch.equal(adj, adj.T) and not adj.diagonal().any()
    assert adj.sum(-1).tolist() == degrees
    for i in range(grid[0] * grid[1]):
        assert set(torch.nonzero(adj[i]).flatten().tolist()) == _neighbours(i, grid, diagonal)


@SETTINGS
@given(B=st.integers(1, 3), n=st.integers(1, 30), data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_tiered_top_mask_sorts_by_tier_then_value(B, n, data, seed):
    k = data.draw(st.integers(0, n))
    gen = torch.Generator().manual_seed(seed)
    tier, values = torch.randint(0, 3, (B, n), generator=gen), torch.randint(0, 3, (B, n), generator=gen).float()
    mask = tiered_top_mask(tier, values, k)
    for b in range(B):
        order = sorted(range(n), key=lambda i: (-int(tier[b, i]), -float(values[b, i]), i))[:k]
        assert torch.nonzero(mask[b]).flatten().tolist() == sorted(order)


@pytest.mark.parametrize("keep, a, b, split", [
    (8, 0.2, 0.4, (2, 3, 3)), (10, 0.2, 0.4, (2, 4, 4)), (1, 0.2, 0.4, (1, 0, 0)), (5, 0.0, 1.0, (1, 4, 0)),
    (4, 0.5, 0.5, (2, 2, 0)), (7, 1.0, 0.0, (7, 0, 0)), (3, 0.1, 0.0, (1, 0, 2)),
])
def test_hiprune_split_gives_at_least_one_anchor_and_registers_the_rest(keep, a, b, split):
    assert hiprune_split(keep, a, b) == split and sum(split) == keep


def test_hiprune_scores_are_the_kept_mask_with_prefix_tokens_at_zero():
    gen = torch.Generator().manual_seed(0)
    q_a, k_a, q, k = (torch.randn(2, 2, 10, 4, generator=gen) for _ in range(4))  # 1 prefix + 3 x 3 patches
    for alpha in (0.0, 0.1, 1.0):  # tokensieve's split, the released selection
        scores = hiprune_scores(q_a, k_a, None, q, k, None, keep=5, num_prefix_tokens=1, grid=(3, 3), alpha=alpha)
        assert scores.shape == (2, 10) and scores.dtype == torch.float32
        assert (scores[:, 0] == 0).all() and ((scores == 0) | (scores == 1)).all() and (scores.sum(-1) == 5).all()


# --------------------------------------------------------------------------- eager reference: the anchor block's path


def _inputs(plan: api.Plan, batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, *plan.input_shape[1:], generator=torch.Generator().manual_seed(5))


def test_reference_reads_the_anchor_block_at_hookstage_earlier_path():
    """The eager reference reads the anchor block's attention at `earlier_path`: pointing a stage built with
    anchor_block=1 at block 0 reproduces anchor_block=0 exactly, and its kept tokens differ from anchor_block=1."""
    model, example = build("vit")
    # alpha=0 (tokensieve's split): anchors are 20 % of the budget, so the anchor block matters on a 4 x 4 grid
    one = api.plan(model, example, "hiprune(anchor_block=1,alpha=0)@2:0.5+cls-topk@3:0.5")
    zero = api.plan(model, example, "hiprune(anchor_block=0,alpha=0)@2:0.5+cls-topk@3:0.5")
    assert [h.earlier_path for h in one.hook_stages] == [one.block_paths[1], None]  # cls-topk reads one block
    assert zero.hook_stages[0].earlier_path == zero.block_paths[0]
    x = _inputs(one)
    out_one, kept_one = one.reference(x)
    out_zero, kept_zero = zero.reference(x)
    moved = [dataclasses.replace(one.hook_stages[0], earlier_path=one.block_paths[0]), one.hook_stages[1]]
    out_moved, kept_moved = run_reference(one.module, x, moved)
    assert all(torch.equal(a, b) for a, b in zip(kept_moved, kept_zero))
    torch.testing.assert_close(out_moved, out_zero, rtol=0, atol=0)
    assert not torch.equal(kept_moved[0], kept_one[0])  # so the anchor block did change the selection
    with pytest.raises(ValueError, match="set HookStage.earlier_path"):
        run_reference(one.module, x, [dataclasses.replace(one.hook_stages[0], earlier_path=None)])


class _Aliased(nn.Module):
    """A model whose blocks are also registered as `anchor`, `deep` and `last` (no `<prefix>.<index>` path)."""

    def __init__(self, model: nn.Module, paths: list[str]):
        super().__init__()
        self.model = model
        self.anchor, self.deep, self.last = (model.get_submodule(p) for p in paths)

    def forward(self, x):
        return self.model(x)


def test_reference_accepts_block_paths_that_are_not_prefix_dot_index():
    """Stages addressed by plain names (the anchor block is not derived from the stage's own path) give the same
    output and kept tokens as the discovered `<prefix>.<index>` paths."""
    model, example = build("vit")
    plan = api.plan(model, example, "hiprune(anchor_block=1)@2:0.5+cls-topk@3:0.5")
    aliased = _Aliased(plan.module, plan.block_paths[1:4])
    hiprune, cls_topk = plan.hook_stages
    renamed = [dataclasses.replace(hiprune, block_path="deep", earlier_path="anchor"),
               dataclasses.replace(cls_topk, block_path="last")]
    x = _inputs(plan)
    want_out, want_kept = plan.reference(x)
    got_out, got_kept = run_reference(aliased, x, renamed)
    assert all(torch.equal(a, b) for a, b in zip(got_kept, want_kept))
    torch.testing.assert_close(got_out, want_out, rtol=0, atol=0)


# --------------------------------------------------------------------------- recipe validation


def test_recipe_shorthand_defaults_and_catalogue(capsys):
    recipe = parse_recipe("hiprune(anchor_block=1)@2:0.5")
    assert recipe.stages[0].options() == {"anchor_block": 1, "anchor_ratio": 0.2, "buffer_ratio": 0.4,
                                          "diagonal": False, "alpha": 0.1}
    assert recipe.shorthand() == "hiprune(anchor_block=1)@2:0.5"
    assert anchor_block_of(recipe.stages[0].options(), 2) == 1
    assert anchor_block_of(METHODS["hiprune"].defaults(), 7) == 3  # -1: after_block // 2
    assert not METHODS["hiprune"].requires_cls
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for text in ("hiprune", "HiPrune (Liu et al., 2025", "anchor_block = -1", "buffer_ratio = 0.4",
                 "zero-tprune", "Zero-TPrune (Wang, Dedhia & Jha, CVPR 2024)", "iters = 30", "similar_share = 0.5"):
        assert text in out


@pytest.mark.parametrize("text, match", [
    ("hiprune(anchor_ratio=0.7,buffer_ratio=0.5)@2:0.5", r"anchor_ratio \+ buffer_ratio = 1.2 exceeds 1"),
    ("hiprune(anchor_block=2)@2:0.5", r"the anchor block 2 must come before block 2"),
    ("hiprune(anchor_block=3)@2:0.5", r"the anchor block 3 must come before block 2"),
    ("hiprune@0:0.5", r"the anchor block 0 must come before block 0"),      # default 0 // 2 = 0
    ("cls-topk@0:0.5+hiprune@2:0.5", r"needs the full patch grid, but an earlier stage leaves 9 of 17 tokens"),
])
def test_bad_placement_or_split_is_a_one_line_config_error(text, match):
    with pytest.raises(ConfigError, match=match) as e:
        resolve_recipe(parse_recipe(text), 4, 17, 1)
    assert "\n" not in str(e.value) and str(e.value).startswith("Stage hiprune@")


@pytest.mark.parametrize("text, match", [
    ("hiprune(anchor_block=-2)@2:0.5", r"anchor_block=-2 is outside \[-1, 10000\]"),
    ("hiprune(anchor_ratio=1.5)@2:0.5", r"anchor_ratio=1.5 is outside \[0.0, 1.0\]"),
    ("hiprune(diagonal=1)@2:0.5", "diagonal must be true or false"),
    ("hiprune(iters=3)@2:0.5", "has no parameter 'iters'; its parameters: alpha, anchor_block, anchor_ratio"),
])
def test_bad_parameters_are_one_line_config_errors(text, match):
    with pytest.raises(ConfigError, match=match) as e:
        parse_recipe(text)
    assert "\n" not in str(e.value)


def test_bad_anchor_block_through_export_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match=r"Stage hiprune@1: the anchor block 1 must come before block 1") as e:
        api.export(*build("siglip_vision"), "hiprune(anchor_block=1)@1:0.5")
    assert "\n" not in str(e.value)
