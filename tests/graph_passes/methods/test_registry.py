"""The TopK-family methods (cls-topk, attn-mean, ttv, random, uniform, each with EViT's fused token where offered).

End to end: each (model, recipe) below is exported once (module-scoped fixture, ~5 s each) and checked against the
eager reference on ONNX Runtime. Unit level: the score functions and `fuse_dropped_tokens` against naive formulas,
recipe validation of method parameters, and the determinism of the position-only methods.
"""
from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tiny_models import TINY_MODEL_INFO, build
from method_checks import DYNAMIC_OPS as NO_DYNAMIC_OPS, assert_matches_eager
from tokensieve import api
from tokensieve.errors import ConfigError
from tokensieve.graph_passes.methods.attention_scores import mean_attention_scores
from tokensieve.graph_passes.methods.hidden_scores import transition_scores
from tokensieve.graph_passes.methods.position_scores import _P, MAX_SEED, random_scores, uniform_scores
from tokensieve.graph_passes.methods.topk import fuse_dropped_tokens, select_topk
from tokensieve.graph_passes.onnx.check_static import op_census
from tokensieve.recipe import parse_recipe

SETTINGS = settings(max_examples=60, deadline=None)

# case id -> (tiny model, two-stage recipe, tokens entering block 0 then after each stage, patch tokens kept per stage)
# Each model has 16 patch tokens; a fused stage adds one token, which the next stage counts as a patch token.
CASES = {
    "cls-topk": ("vit", "cls-topk@1:0.5+cls-topk@2:0.5", [17, 9, 5], [8, 4]),
    # 5 prefix tokens ([CLS] + 4 registers): 16 -> 8 kept + fused; 9 -> ceil(4.5) = 5 kept + fused
    "cls-topk-fuse": ("dinov2_registers", "cls-topk(fuse=true)@1:0.5+cls-topk(fuse=true)@2:0.5", [21, 14, 11], [8, 5]),
    "attn-mean": ("siglip_vision", "attn-mean@1:0.5+attn-mean@2:4", [16, 8, 4], [8, 4]),
    "attn-mean-fuse": ("siglip_vision", "attn-mean(fuse=true)@1:0.5+attn-mean(fuse=true)@2:4", [16, 9, 5], [8, 4]),
    "ttv": ("vit", "ttv(direction_weight=0.5)@1:0.5+ttv(fuse=true)@2:4", [17, 9, 6], [8, 4]),
    "random": ("plain_vit", "random(seed=7)@1:0.5+random(seed=7)@2:4", [17, 9, 5], [8, 4]),
    "uniform": ("vit", "uniform@1:0.5+uniform@2:3", [17, 9, 4], [8, 3]),
}


@pytest.fixture(scope="module")
def export_case():
    """case id -> ExportResult, each exported once per module."""
    cache = {}

    def get(case: str):
        if case not in cache:
            name, recipe, _, _ = CASES[case]
            cache[case] = api.export(*build(name), recipe)
        return cache[case]

    return get


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, export_case):
    return request.param, export_case(request.param)


@pytest.fixture(scope="module")
def random_exports(export_case):
    """The `random` case exported twice, from two separately built models."""
    name, recipe, _, _ = CASES["random"]
    return [export_case("random"), api.export(*build(name), recipe)]


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _run_debug(result, x: torch.Tensor) -> list[np.ndarray]:
    """ONNX Runtime outputs of the debug ONNX: [model output, kept_idx per stage]."""
    sess = ort.InferenceSession(result.debug_onnx.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"pixel_values": x.numpy()})


# --------------------------------------------------------------------------- export + verify


def test_onnx_runtime_matches_eager_reference_over_20_inputs(exported):
    _, result = exported
    assert assert_matches_eager(result).stage_blocks == [1, 2]


def test_onnx_selects_with_topk_and_has_no_dynamic_ops(exported):
    _, result = exported
    for model in (result.onnx_model, result.debug_onnx):
        census = op_census(model)
        assert census["TopK"] >= len(result.stages)
        assert not set(census) & NO_DYNAMIC_OPS, {op: census[op] for op in NO_DYNAMIC_OPS if census[op]}
    assert "TopK" not in op_census(result.dense_onnx)


def test_tokens_per_stage(exported):
    case, result = exported
    name, _, tokens, keeps = CASES[case]
    info = TINY_MODEL_INFO[name]
    p = info.num_prefix_tokens
    assert result.layout.num_prefix_tokens == p and result.layout.num_tokens == info.seq_len
    assert [s.keep for s in result.stages] == keeps
    assert result.tokens == tokens
    for s in result.stages:  # fuse adds exactly one token per stage
        assert s.tokens_out == p + s.keep + int(bool(s.options.get("fuse")))
    assert result.tokens_per_block() == [tokens[0], tokens[0], tokens[1], tokens[2]]

    debug = {o.name: _dims(o) for o in result.debug_onnx.graph.output}
    assert debug["kept_idx.1"] == ["batch", keeps[0]] and debug["kept_idx.2"] == ["batch", keeps[1]]
    if result.output_name == "last_hidden_state":
        assert debug["last_hidden_state"] == ["batch", tokens[2], 48]

    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    out, *kept = _run_debug(result, x)
    if result.output_name == "last_hidden_state":
        assert out.shape == (3, tokens[2], 48)
    for idx, k, n_in in zip(kept, keeps, tokens):
        assert idx.shape == (3, k)
        assert (np.diff(idx, axis=1) > 0).all()  # ascending, unique
        assert (idx >= p).all() and (idx < n_in).all()  # patch positions of the sequence entering the stage


# --------------------------------------------------------------------------- mean_attention_scores


@SETTINGS
@given(B=st.integers(1, 3), H=st.integers(1, 4), N=st.integers(1, 48), D=st.integers(1, 16),
       use_scale=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_mean_attention_scores_is_the_averaged_softmax(B, H, N, D, use_scale, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, H, N, D, generator=gen), torch.randn(B, H, N, D, generator=gen)
    scale = 0.3 if use_scale else None
    s = mean_attention_scores(q, k, scale)

    assert s.shape == (B, N) and s.dtype == torch.float32
    assert (s >= 0).all()
    torch.testing.assert_close(s.sum(dim=-1), torch.ones(B), rtol=0, atol=1e-5)
    factor = scale if use_scale else 1 / math.sqrt(D)
    naive = torch.zeros(B, N, dtype=torch.float64)
    for h in range(H):
        logits = (q[:, h].double() @ k[:, h].double().transpose(-2, -1)) * factor  # (B, N, N)
        naive += logits.softmax(dim=-1).sum(dim=1)  # attention each key receives, summed over queries
    torch.testing.assert_close(s.double(), naive / (H * N), rtol=1e-5, atol=1e-6)


def test_mean_attention_scores_in_half_precision_are_float32():
    q, k = torch.randn(2, 3, 16, 8).half(), torch.randn(2, 3, 16, 8).half()
    s = mean_attention_scores(q, k)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s.sum(-1), torch.ones(2), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- transition_scores


def _naive_transition(x_in: torch.Tensor, x_out: torch.Tensor, direction_weight: float) -> torch.Tensor:
    x_in, x_out = x_in.double(), x_out.double()
    B, N, _ = x_in.shape
    out = torch.zeros(B, N, dtype=torch.float64)
    for b in range(B):
        delta = [math.sqrt(float(((x_out[b, i] - x_in[b, i]) ** 2).sum())) for i in range(N)]
        mean = sum(delta) / N
        for i in range(N):
            a, c = x_in[b, i], x_out[b, i]
            cos = float((a * c).sum()) / (math.sqrt(float((a * a).sum())) * math.sqrt(float((c * c).sum())))
            out[b, i] = delta[i] / mean + direction_weight * (1 - cos)
    return out


@SETTINGS
@given(B=st.integers(1, 3), N=st.integers(1, 24), C=st.integers(2, 16),
       direction_weight=st.sampled_from([0.0, 0.5, 1.0, 3.0]), seed=st.integers(0, 2**31 - 1))
def test_transition_scores_matches_the_naive_formula(B, N, C, direction_weight, seed):
    gen = torch.Generator().manual_seed(seed)
    x_in = torch.randn(B, N, C, generator=gen)
    x_out = x_in + torch.randn(B, N, C, generator=gen)
    s = transition_scores(x_in, x_out, direction_weight)
    assert s.shape == (B, N) and s.dtype == torch.float32
    torch.testing.assert_close(s.double(), _naive_transition(x_in, x_out, direction_weight), rtol=1e-4, atol=1e-5)
    # magnitude term averages to 1 over the tokens; direction term lies in [0, 2]
    magnitude = transition_scores(x_in, x_out, 0.0)
    torch.testing.assert_close(magnitude.mean(dim=-1), torch.ones(B), rtol=0, atol=1e-5)
    assert ((s - magnitude) >= -1e-5).all() and ((s - magnitude) <= 2 * direction_weight + 1e-5).all()


@pytest.mark.parametrize("c", [1e-2, 10.0, 1e3])
def test_transition_scores_do_not_depend_on_the_hidden_scale(c):
    gen = torch.Generator().manual_seed(0)
    x_in = torch.randn(2, 17, 48, generator=gen)
    x_out = x_in + 0.5 * torch.randn(2, 17, 48, generator=gen)
    torch.testing.assert_close(transition_scores(c * x_in, c * x_out, 0.7), transition_scores(x_in, x_out, 0.7),
                               rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- random_scores / uniform_scores


@pytest.mark.parametrize("N", [1, 17, 197, 577, 4097])
def test_random_scores_have_no_ties_and_are_the_same_for_every_row(N):
    x = torch.randn(3, N, 4)
    s = random_scores(x, seed=11)
    assert s.shape == (3, N) and s.dtype == torch.float32
    assert len(set(s[0].tolist())) == N
    assert (s == s[:1]).all()
    assert (s == s.round()).all() and (s >= 0).all() and (s < _P).all()  # exact integers in float32
    torch.testing.assert_close(random_scores(torch.zeros(3, N, 4), seed=11), s, rtol=0, atol=0)  # content-free


def test_random_scores_change_with_seed():
    x = torch.zeros(1, 197, 4)
    assert not torch.equal(random_scores(x, 0), random_scores(x, 1))
    assert not torch.equal(random_scores(x, 3), random_scores(x, 12345))


@pytest.mark.parametrize("seeds", [(0, 1), (0, MAX_SEED)], ids=["0-vs-1", "0-vs-max"])
def test_random_kept_set_changes_with_seed(seeds):
    x = torch.zeros(1, 17, 4)
    a, b = (select_topk(random_scores(x, s), 8, 1) for s in seeds)
    assert not torch.equal(a, b)


def test_random_kept_positions_look_random():
    idx = select_topk(random_scores(torch.zeros(1, 17, 4), 0), 8, 1)[0].tolist()
    assert idx != list(range(idx[0], idx[0] + 8)), f"keeps a contiguous run {idx}"
    s = random_scores(torch.zeros(1, 197, 4), 0)[0, 1:].double().numpy()
    assert abs(np.corrcoef(s[:-1], s[1:])[0, 1]) < 0.3


@settings(max_examples=200, deadline=None)
@given(data=st.data(), n=st.integers(1, 600), prefix=st.integers(0, 5), B=st.integers(1, 3))
def test_uniform_scores_mark_keep_evenly_spaced_patches(data, n, prefix, B):
    keep = data.draw(st.integers(1, n), label="keep")
    s = uniform_scores(torch.zeros(B, prefix + n, 2), keep, prefix)
    assert s.shape == (B, prefix + n) and (s == s[:1]).all()
    assert set(s.unique().tolist()) <= {0.0, 1.0}
    assert int(s[0].sum()) == keep
    chosen = s[0].nonzero().flatten()
    assert (chosen >= prefix).all()
    assert int(chosen[0]) == prefix and (keep == 1 or int(chosen[-1]) == prefix + n - 1)  # first and last patch
    gaps = chosen.diff()
    assert keep < 2 or int(gaps.max()) - int(gaps.min()) <= 1  # evenly spaced
    # TopK over these scores keeps exactly the marked positions
    torch.testing.assert_close(select_topk(s, keep, prefix)[0], chosen, rtol=0, atol=0)


# --------------------------------------------------------------------------- fuse_dropped_tokens


@st.composite
def fuse_cases(draw):
    B = draw(st.integers(1, 4))
    prefix = draw(st.integers(0, 5))
    n = draw(st.integers(2, 64))           # patch tokens
    keep = draw(st.integers(1, n - 1))     # at least one token is dropped
    C = draw(st.integers(1, 8))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(B, prefix + n, C, generator=gen)
    scores = torch.rand(B, prefix + n, generator=gen) + 0.01  # positive, like softmax / TTV scores
    return x, scores, keep, prefix


@SETTINGS
@given(fuse_cases())
def test_fuse_dropped_tokens_is_the_weighted_mean_of_the_dropped_patches(case):
    # fuse_mean=true (TTV's default); EViT's weighted sum is checked against its code in test_fidelity_evit.py
    x, scores, keep, prefix = case
    B, N, C = x.shape
    idx = select_topk(scores, keep, prefix)
    fused = fuse_dropped_tokens(x, scores, idx, prefix, mean=True)
    assert fused.shape == (B, 1, C) and fused.dtype == x.dtype

    dropped = torch.ones(B, N, dtype=torch.bool)
    dropped[:, :prefix] = False
    for b in range(B):
        dropped[b, idx[b]] = False
    w, xd = scores.double(), x.double()
    for b in range(B):
        wd = w[b][dropped[b]]
        want = (wd.unsqueeze(-1) * xd[b][dropped[b]]).sum(0) / wd.sum()
        torch.testing.assert_close(fused[b, 0].double(), want, rtol=1e-4, atol=1e-5)

    # mass: sum_w_kept * x_kept + sum_w_dropped * fused == sum over all patch tokens w * x
    kept = ~dropped
    kept[:, :prefix] = False
    mass_kept = (w * kept).unsqueeze(-1).mul(xd).sum(1)
    mass_fused = (w * dropped).sum(1, keepdim=True) * fused[:, 0].double()
    total = (w[:, prefix:].unsqueeze(-1) * xd[:, prefix:]).sum(1)
    torch.testing.assert_close(mass_kept + mass_fused, total, rtol=1e-4, atol=1e-4)


def test_fused_token_stays_inside_the_dropped_tokens_range_for_peaked_scores():
    gen = torch.Generator().manual_seed(0)
    B, N, C, keep = 2, 197, 64, 98
    x = torch.randn(B, N, C, generator=gen)
    scores = (10 * torch.randn(B, N, generator=gen)).softmax(dim=-1)  # like a sharp [CLS] attention row
    idx = select_topk(scores, keep, 1)
    fused = fuse_dropped_tokens(x, scores, idx, 1)
    assert fused.abs().max() <= x.abs().max()  # a convex combination of the dropped tokens


# --------------------------------------------------------------------------- recipe validation


@pytest.mark.parametrize("text, match", [
    ("cls-topk(alpha=1)@1:0.5", r"has no parameter 'alpha'; its parameters: fuse"),
    ("uniform(seed=1)@1:0.5", r"has no parameter 'seed'; its parameters: pospad"),
    ("cls-topk(fuse=1)@1:0.5", r"fuse must be true or false, got 1"),
    ("attn-mean(fuse=yes)@1:0.5", r"fuse must be true or false"),
    ("random(seed=1.5)@1:0.5", r"seed must be an integer, got 1.5"),
    ("random(seed=true)@1:0.5", r"seed must be an integer"),
    ("random(seed=-1)@1:0.5", r"seed=-1 is outside"),
    ("ttv(direction_weight=-1)@1:0.5", r"direction_weight=-1.0 is outside \[0.0, 100.0\]"),
    ("ttv(direction_weight=1e9)@1:0.5", r"direction_weight=.* is outside"),
    ("ttv(direction_weight=\"big\")@1:0.5", r"direction_weight must be a number"),
])
def test_bad_method_parameters_are_one_line_config_errors(text, match):
    with pytest.raises(ConfigError, match=match) as e:
        parse_recipe(text)
    assert "\n" not in str(e.value)


def test_good_method_parameters_are_typed_and_defaulted():
    a, b = parse_recipe("cls-topk(fuse=true)@1:0.5+ttv(direction_weight=0.5)@2:4").stages
    assert a.options() == {"fuse": True, "fuse_mean": False, "pospad": False, "recycle": False}
    assert b.options() == {"direction_weight": 0.5, "fuse": False, "fuse_mean": True, "pospad": False, "recycle": False}
    assert parse_recipe("random(seed=3)@1:4").stages[0].options() == {"seed": 3, "pospad": False, "recycle": False}
    assert parse_recipe("ttv(direction_weight=2)@1:4").stages[0].options()["direction_weight"] == 2.0
    assert parse_recipe("uniform@1:4").stages[0].options() == {"pospad": False, "recycle": False}


def test_cls_method_on_siglip_is_a_config_error_naming_cls():
    model, x = build("siglip_vision")
    with pytest.raises(ConfigError, match=r"\[CLS\]") as e:
        api.export(model, x, "cls-topk(fuse=true)@1:0.5")
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- determinism of position-only methods


def _expected_random_kept(seed: int, tokens: list[int], keeps: list[int], prefix: int) -> list[torch.Tensor]:
    return [select_topk(random_scores(torch.zeros(1, n, 1), seed), k, prefix)[0] for n, k in zip(tokens, keeps)]


def test_random_same_seed_gives_the_same_kept_indices_across_exports(random_exports):
    first, second = random_exports
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    kept_a, kept_b = _run_debug(first, x)[1:], _run_debug(second, x)[1:]
    _, _, tokens, keeps = CASES["random"]
    for a, b, want in zip(kept_a, kept_b, _expected_random_kept(7, tokens, keeps, 1)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, np.broadcast_to(want.numpy(), a.shape))


@pytest.mark.parametrize("case", ["random", "uniform"])
def test_position_methods_keep_the_same_indices_for_every_input(export_case, case):
    """Kept indices of random/uniform are fixed at export time: identical over inputs and batch rows."""
    result = export_case(case)
    gen = torch.Generator().manual_seed(2)
    runs = [_run_debug(result, scale * torch.randn(3, 3, 32, 32, generator=gen))[1:] for scale in (1.0, 5.0, 0.01)]
    first = runs[0]
    for kept in runs:
        for idx, idx0 in zip(kept, first):
            assert (idx == idx[:1]).all()
            np.testing.assert_array_equal(idx, idx0)
    # and equal to the eager reference on a different input
    _, ref_kept = result.reference(torch.randn(1, 3, 32, 32))
    for idx, ref in zip(first, ref_kept):
        np.testing.assert_array_equal(idx[0], ref[0].numpy())
