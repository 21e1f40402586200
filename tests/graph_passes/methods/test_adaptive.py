"""Adaptive (input-dependent count) stages: capped K slots + validity mask vs the eager reference's real compaction.

End to end: each (model, recipe) is exported once and ONNX Runtime is compared with the eager reference, which runs
every sample alone and really drops the tokens (x[:, kept]). Identical kept indices (-1 in invalid slots) and outputs
within 1e-4 prove that the attention mask keeps invalid slots out of every valid token. A control export without the
mask must fail the same check. Unit level: `adaptive_select` against a naive per-row loop (hypothesis).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokensieve.graph_passes.fx.insert_prune_stages as insert_prune_stages
from tiny_models import build
from method_checks import assert_matches_eager, assert_static_without_dynamic_ops, exported_cases
from tokensieve import api
from tokensieve.errors import ConfigError
from tokensieve.graph_passes.methods.adaptive import adaptive_select, compact
from tokensieve.graph_passes.onnx.check_static import op_census
from tokensieve.recipe import parse_recipe


# case id -> (tiny model, recipe). Random-init attention is nearly uniform (shares within ~2 % of 1), so the
# default threshold 1.0 keeps 6..11 of 16 tokens, varying between inputs (checked below).
CASES = {
    "vit-one-stage": ("vit", "adaptive@1:0.75"),                                   # logits from [CLS]
    "vit-two-stages": ("vit", "adaptive@1:0.75+adaptive(threshold=1.0)@2:0.75"),
    "dinov2-sequence": ("dinov2", "adaptive(threshold=1.0)@1:12"),                # a per-token output
    "registers": ("dinov2_registers", "adaptive@0:0.75+adaptive@2:0.6"),           # [CLS] + 4 registers
}


exported = exported_cases(CASES)


def _counts(result, inputs: int = 20, batch: int = 3) -> list[set[int]]:
    gen = torch.Generator().manual_seed(0)
    seen = [set() for _ in result.stages]
    for _ in range(inputs):
        _, kept = result.reference(torch.randn(batch, *result.input_shape[1:], generator=gen))
        for s, k in zip(seen, kept):
            s.update((k >= 0).sum(-1).tolist())
    return seen


def test_onnx_runtime_matches_eager_compaction_over_20_inputs(exported):
    case, result = exported
    assert_matches_eager(result)
    # The check is only meaningful if the count really varies and slots really go unused.
    for stage, counts in zip(result.stages, _counts(result)):
        assert len(counts) > 1, (case, stage.stage, counts)
        assert min(counts) < stage.keep, (case, stage.stage, counts)


def test_static_graph_without_dynamic_ops(exported):
    _, result = exported
    assert_static_without_dynamic_ops(result)
    # one masked attention per block after the first adaptive stage: an Add of the key bias before each Softmax
    assert op_census(result.onnx_model)["Softmax"] >= len(result.block_paths)


def test_capped_shape_and_valid_first_slots(exported):
    _, result = exported
    p = result.layout.num_prefix_tokens
    assert result.tokens[1:] == [p + s.keep for s in result.stages]
    _, kept = result.reference(torch.randn(4, *result.input_shape[1:], generator=torch.Generator().manual_seed(5)))
    for stage, k in zip(result.stages, kept):
        assert k.shape == (4, stage.keep)
        for row in k.tolist():
            n = sum(i >= 0 for i in row)
            assert n >= 1 and all(i == -1 for i in row[n:]) and row[:n] == sorted(set(row[:n]))  # valid first, ascending


def test_without_the_attention_mask_the_export_no_longer_matches(monkeypatch):
    """Control: the same capped graph without masking later attention differs from eager compaction."""
    monkeypatch.setattr(insert_prune_stages, "_mask_later_attention", lambda later, mask: None)
    result = api.export(*build("vit"), "adaptive@1:0.75")
    report = api.verify(result, num_inputs=5, batch=3)
    assert report.max_abs_diff > 1e-3


def test_sequence_output_pads_only_the_invalid_rows():
    result = api.plan(*build("dinov2"), "adaptive(threshold=1.0)@1:12")  # the eager reference: no ONNX needed
    out, kept = result.reference(torch.randn(3, *result.input_shape[1:], generator=torch.Generator().manual_seed(1)))
    p = result.layout.num_prefix_tokens
    assert out.shape[1] == p + 12
    for b in range(3):
        n = int((kept[0][b] >= 0).sum())
        assert not torch.isnan(out[b, :p + n]).any() and torch.isnan(out[b, p + n:]).all()


@pytest.mark.parametrize("recipe, message", [
    ("adaptive@1:0.5+cls-topk@2:0.5", "follows a stateful adaptive stage"),
    ("adaptive(threshold=-1)@1:0.5", r"threshold=-1.0 is outside"),
    ("adaptive(fuse=true)@1:0.5", "has no parameter 'fuse'"),
    ("adaptive@1:16", "must be below the 16 patch tokens"),
])
def test_bad_adaptive_recipes_are_one_line_errors(recipe, message):
    with pytest.raises(ConfigError, match=message) as e:
        api.export(*build("vit"), recipe)
    assert "\n" not in str(e.value)


def test_adaptive_needs_cls():
    with pytest.raises(ConfigError, match="no \\[CLS\\] token"):
        api.export(*build("siglip_vision"), "adaptive@1:0.5")


def test_recipe_shorthand_roundtrip():
    r = parse_recipe("adaptive(threshold=1.5)@2:0.5")
    assert r.stages[0].options() == {"threshold": 1.5, "compact": False}
    assert parse_recipe(r.shorthand()) == r


# --------------------------------------------------------------------------- adaptive_select vs a naive loop


def _naive(scores: torch.Tensor, cap: int, p: int, threshold: float, valid):
    rows_idx, rows_ok = [], []
    for b in range(scores.shape[0]):
        s = scores[b, p:].double().tolist()
        inc = [True] * len(s) if valid is None else valid[b, p:].tolist()
        live = [i for i in range(len(s)) if inc[i]]
        total = sum(s[i] for i in live)
        top = max(s[i] for i in live)
        passing = [i for i in live if s[i] * len(live) / total >= threshold or s[i] == top]
        chosen = sorted(sorted(passing, key=lambda i: (-s[i], i))[:cap])
        rest = [i for i in range(len(s)) if i not in chosen][:cap - len(chosen)]
        rows_idx.append([i + p for i in chosen] + [i + p for i in sorted(rest)])
        rows_ok.append([True] * len(chosen) + [False] * len(rest))
    return rows_idx, rows_ok


@st.composite
def select_cases(draw):
    B, p, n = draw(st.integers(1, 3)), draw(st.integers(0, 3)), draw(st.integers(1, 24))
    cap = draw(st.integers(1, n))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    levels = draw(st.sampled_from([None, 2, 4]))  # few levels: exact ties
    scores = torch.rand(B, p + n, generator=gen) + 0.01 if levels is None else \
        torch.randint(1, levels + 1, (B, p + n), generator=gen).float()
    valid = None
    if draw(st.booleans()):
        valid = torch.rand(B, p + n, generator=gen) < 0.7
        valid[:, :p] = True
        valid[:, p] = True  # at least one valid patch token, as after an earlier stage
    return scores, cap, p, draw(st.sampled_from([0.0, 0.9, 1.0, 1.3, 5.0])), valid


@settings(max_examples=150, deadline=None)
@given(select_cases())
def test_adaptive_select_matches_a_naive_loop(case):
    scores, cap, p, threshold, valid = case
    idx, ok = adaptive_select(scores, cap, p, threshold, valid)
    want_idx, want_ok = _naive(scores, cap, p, threshold, valid)
    assert ok.tolist() == want_ok
    assert idx.tolist() == want_idx
    # compaction keeps the prefix, then the valid kept tokens in order
    x = torch.arange(scores.shape[1], dtype=torch.float32).view(1, -1, 1)
    kept = torch.where(ok, idx, -1)[:1]
    assert compact(x, kept, p)[0, :, 0].tolist() == list(range(p)) + [i for i, o in zip(want_idx[0], want_ok[0]) if o]


def test_adaptive_keeps_at_least_the_top_token():
    scores = torch.tensor([[0.5, 0.1, 0.1, 0.1, 0.1]])  # uniform patches: nobody passes threshold 2
    idx, ok = adaptive_select(scores, 3, 1, threshold=2.0)
    assert int(ok.sum()) == 3  # all four tie for the top: ties all pass, capped at 3
    idx, ok = adaptive_select(torch.tensor([[0.5, 0.3, 0.1, 0.1, 0.1]]), 3, 1, threshold=2.0)
    assert idx.tolist() == [[1, 2, 3]] and ok.tolist() == [[True, False, False]]
