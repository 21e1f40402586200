"""The greedy diversity methods (divprune, mmr) and their two ONNX forms (unrolled steps, one Loop node).

Unit level: the greedy selections against naive numpy references of the papers' formulas (float64, with
distances for DivPrune), the kept-set invariants of the reduce functions, tie-breaking on exactly representable
inputs (eager and ONNX Runtime, both forms). End to end: tiny models exported and checked against the eager
reference, op census of both forms, recipe validation of `lam` and `loop`.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tiny_models import TINY_MODEL_INFO, build
from method_checks import DYNAMIC_OPS as NO_DYNAMIC_OPS, assert_matches_eager
from tokensieve import api
from tokensieve.errors import ConfigError, ExportError
from tokensieve.graph_passes.methods.diversity import (
    LOOP_DEFAULT, cosine_similarity, divprune, divprune_first, divprune_select, greedy_select, mmr,
    mmr_select,
)
from tokensieve.graph_passes.methods.registry import METHODS
from tokensieve.graph_passes.onnx.check_static import check_static, op_census
from tokensieve.recipe import parse_recipe

SETTINGS = settings(max_examples=60, deadline=None)
TIE_TOL = 1e-5  # the float64 reference and the float32 implementation may order candidates closer than this differently


# --------------------------------------------------------------------------- naive references (numpy, float64)


def _cosine(x: np.ndarray) -> np.ndarray:
    xn = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    s = xn @ xn.T
    return (s + s.T) / 2  # exactly symmetric, so mutual nearest neighbours tie exactly (as in the implementation)


def _pick(values: np.ndarray, chosen: list[int]) -> tuple[int, float]:
    """argmax over the unchosen tokens (lowest index on ties) and the gap to the runner-up."""
    v = values.copy()
    v[chosen] = -np.inf
    best = int(np.argmax(v))
    rest = np.delete(v, chosen + [best])
    gap = float(v[best] - rest.max()) if rest.size else np.inf
    return best, gap


def naive_divprune(x: np.ndarray, keep: int) -> tuple[list[int], float]:
    """DivPrune on (n, C): first the token farthest from its nearest neighbour, then repeatedly the token whose
    min cosine distance to the chosen set is largest. Returns (picks in order, smallest runner-up gap)."""
    d = 1.0 - _cosine(x)
    off_diag = d + np.diag(np.full(len(x), np.inf))
    chosen, gaps = [], []
    for step in range(keep):
        values = off_diag.min(axis=1) if step == 0 else d[chosen].min(axis=0)
        best, gap = _pick(values, chosen)
        chosen.append(best)
        gaps.append(gap)
    return chosen, min(gaps)


def naive_mmr(x: np.ndarray, w: np.ndarray, keep: int, lam: float) -> tuple[list[int], float]:
    """MMR on (n, C) with raw importance w (n,): argmax λ·imp − (1−λ)·max_{j chosen} cos(i, j), imp min-max normalized;
    the first pick is argmax imp for every λ (IDPruner's first round, tests/reference/idpruner.py)."""
    s = _cosine(x)
    imp = (w - w.min()) / (w.max() - w.min() + 1e-6)
    chosen, gaps = [], []
    for _ in range(keep):
        redundancy = s[:, chosen].max(axis=1) if chosen else np.zeros(len(x))
        best, gap = _pick(lam * imp - (1 - lam) * redundancy if chosen else imp, chosen)
        chosen.append(best)
        gaps.append(gap)
    return chosen, min(gaps)


def _distinct(gap: float) -> bool:
    """Exact ties (gap 0) are broken alike everywhere; near ties are left to the float rounding."""
    return gap == 0.0 or gap > TIE_TOL


# --------------------------------------------------------------------------- greedy selection vs the references


@st.composite
def token_cases(draw, max_batch: int = 3):
    B = draw(st.integers(1, max_batch))
    p = draw(st.integers(0, 4))            # prefix tokens
    n = draw(st.integers(2, 40))           # patch tokens
    keep = draw(st.integers(1, n - 1))
    C = draw(st.integers(2, 24))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(B, p + n, C, generator=gen) * draw(st.sampled_from([1e-2, 1.0, 30.0]))
    scores = torch.rand(B, p + n, generator=gen).softmax(dim=-1)  # like a [CLS] attention row
    return x, scores, keep, p


def _check_kept(out: torch.Tensor, idx: torch.Tensor, x: torch.Tensor, keep: int, p: int) -> None:
    B, N, C = x.shape
    assert idx.shape == (B, keep) and idx.dtype == torch.int64
    assert out.shape == (B, p + keep, C) and out.dtype == x.dtype
    assert (idx.diff(dim=-1) > 0).all()                      # ascending, so unique
    assert (idx >= p).all() and (idx < N).all()              # patch positions only
    torch.testing.assert_close(out[:, :p], x[:, :p], rtol=0, atol=0)  # prefix tokens kept as they are
    torch.testing.assert_close(out[:, p:], torch.stack([x[b, idx[b]] for b in range(B)]), rtol=0, atol=0)


@SETTINGS
@given(token_cases())
def test_divprune_matches_the_naive_max_min_greedy(case):
    x, _, keep, p = case
    refs = [naive_divprune(x[b, p:].double().numpy(), keep) for b in range(x.shape[0])]
    assume(all(_distinct(gap) for _, gap in refs))
    picks = divprune_select(x[:, p:], keep)
    assert picks.tolist() == [r for r, _ in refs]
    out, idx = divprune(x, cosine_similarity(x), keep, p)
    _check_kept(out, idx, x, keep, p)
    assert idx.tolist() == [sorted(i + p for i in r) for r, _ in refs]


@SETTINGS
@given(token_cases(), st.sampled_from([0.0, 0.2, 0.5, 0.8, 1.0]))
def test_mmr_matches_the_naive_marginal_relevance_greedy(case, lam):
    x, scores, keep, p = case
    refs = [naive_mmr(x[b, p:].double().numpy(), scores[b, p:].double().numpy(), keep, lam) for b in range(x.shape[0])]
    assume(all(_distinct(gap) for _, gap in refs))
    assert mmr_select(x[:, p:], scores[:, p:], keep, lam).tolist() == [r for r, _ in refs]
    out, idx = mmr(x, scores, keep, p, lam=lam)
    _check_kept(out, idx, x, keep, p)
    assert idx.tolist() == [sorted(i + p for i in r) for r, _ in refs]


@settings(max_examples=15, deadline=None)
@given(token_cases(), st.sampled_from([0.0, 0.5, 1.0]))
def test_loop_form_gives_the_same_picks_as_the_unrolled_form_in_eager(case, lam):
    x, scores, keep, p = case
    for fn, kwargs in ((divprune, {}), (mmr, {"lam": lam})):
        s = cosine_similarity(x) if fn is divprune else scores
        unrolled, loop = fn(x, s, keep, p, loop=False, **kwargs), fn(x, s, keep, p, loop=True, **kwargs)
        torch.testing.assert_close(loop[0], unrolled[0], rtol=0, atol=0)
        assert torch.equal(loop[1], unrolled[1])


def test_mmr_at_lambda_one_is_cls_top_k():
    gen = torch.Generator().manual_seed(0)
    x, scores = torch.randn(2, 33, 16, generator=gen), torch.rand(2, 33, generator=gen)
    _, idx = mmr(x, scores, 10, 1, lam=1.0)
    want = scores[:, 1:].topk(10, dim=-1).indices.sort(dim=-1).values + 1
    assert torch.equal(idx, want)


def test_mmr_importance_is_scale_free():
    """Importance is min-max normalized, so multiplying the attention row changes nothing."""
    gen = torch.Generator().manual_seed(1)
    x, scores = torch.randn(2, 25, 8, generator=gen), torch.rand(2, 25, generator=gen).softmax(-1)
    assert torch.equal(mmr(x, scores, 9, 1, lam=0.6)[1], mmr(x, 50 * scores, 9, 1, lam=0.6)[1])


# --------------------------------------------------------------------------- ties: exact inputs, lowest position wins

# 2-D tokens with cosines in {-1, 0, 1}, exact in float32: e0, e1, -e0, e0, -e1, e1 (scaled; normalization is exact).
TIE_TOKENS = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-4.0, 0.0], [1.0, 0.0], [0.0, -2.0], [0.0, 8.0]])
# First: max similarity to another token [1, 1, 0, 1, 0, 1] -> -e0 (2; ties with 4). Then the farthest from -e0: e0
# (0; ties with 3). Then e1, -e1, e1 all at similarity 0 -> 1, then -e1 (4), then 3 and 5 (both duplicates).
TIE_DIVPRUNE = [2, 0, 1, 4, 3, 5]


def test_divprune_breaks_exact_ties_by_lowest_position():
    x = TIE_TOKENS.unsqueeze(0)
    assert naive_divprune(TIE_TOKENS.double().numpy(), 6)[0] == TIE_DIVPRUNE
    for loop in (False, True):
        assert divprune_select(x, 6, loop=loop)[0].tolist() == TIE_DIVPRUNE
        assert divprune_select(x, 3, loop=loop)[0].tolist() == TIE_DIVPRUNE[:3]
    # all-equal tokens: every step ties, picks are 0, 1, 2, ...
    assert divprune_select(torch.ones(2, 7, 3), 5).tolist() == [[0, 1, 2, 3, 4]] * 2
    # equal importance and λ=1: MMR is a top-k with ties to the lowest position
    assert mmr_select(torch.randn(1, 6, 4), torch.ones(1, 6), 4, lam=1.0).tolist() == [[0, 1, 2, 3]]


class _Greedy(torch.nn.Module):
    def __init__(self, keep: int, loop: bool):
        super().__init__()
        self.keep, self.loop = keep, loop

    def forward(self, sim):
        return greedy_select(sim, divprune_first(sim), self.keep, loop=self.loop)


@pytest.mark.parametrize("loop", [False, True], ids=["unrolled", "loop"])
def test_onnx_greedy_breaks_ties_like_eager(loop):
    sim = cosine_similarity(torch.stack([TIE_TOKENS, TIE_TOKENS.flip(0), torch.ones(6, 2)]))
    ep = torch.export.export(_Greedy(6, loop), (sim,), dynamic_shapes=({0: torch.export.Dim("batch")},), strict=False)
    model = torch.onnx.export(ep, dynamo=True, opset_version=18, optimize=True, verbose=False).model_proto
    census = op_census(model)
    assert census.get("Loop", 0) == int(loop) and census["ArgMin"] == (1 if loop else 6)  # Loop: steps 2..K inside
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: sim.numpy()})[0]
    want = _Greedy(6, loop)(sim).numpy()
    np.testing.assert_array_equal(got, want)
    assert got[0].tolist() == TIE_DIVPRUNE and got[2].tolist() == [0, 1, 2, 3, 4, 5]
    assert got[1].tolist() == naive_divprune(TIE_TOKENS.flip(0).double().numpy(), 6)[0]


# --------------------------------------------------------------------------- export + verify on tiny models

# case id -> (tiny model, recipe, greedy steps per stage)
CASES = {
    "divprune": ("dinov2_registers", "divprune@1:0.5+divprune@2:3", [8, 3]),   # 5 prefix tokens
    "divprune-no-cls": ("siglip_vision", "divprune@1:0.5", [8]),              # no prefix token
    "mmr": ("vit", "mmr@1:0.5+mmr(lam=0.8)@2:3", [8, 3]),
    "loop": ("vit", "divprune(loop=true)@1:0.5+mmr(loop=true,lam=0.3)@2:3", [8, 3]),
}


@pytest.fixture(scope="module")
def exported():
    """case id -> ExportResult, each exported once (the Loop form's stages ask for Loop: api.export allows it)."""
    cache = {}

    def get(case: str):
        if case not in cache:
            name, recipe, _ = CASES[case]
            cache[case] = api.export(*build(name), recipe)
        return cache[case]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_onnx_runtime_matches_eager_reference_over_20_inputs(exported, case):
    result = exported(case)
    assert_matches_eager(result)
    p = TINY_MODEL_INFO[CASES[case][0]].num_prefix_tokens
    assert result.tokens[1:] == [p + k for k in CASES[case][2]]


@pytest.mark.parametrize("case", ["divprune", "divprune-no-cls", "mmr"])
def test_default_form_is_unrolled_static_and_passes_check_static(exported, case):
    assert LOOP_DEFAULT is False
    result = exported(case)
    steps = sum(CASES[case][2])
    for model in (result.onnx_model, result.debug_onnx):
        census = op_census(model)
        assert not set(census) & NO_DYNAMIC_OPS, {op: census[op] for op in NO_DYNAMIC_OPS if census.get(op)}
        assert census.get("ArgMin", 0) + census.get("ArgMax", 0) == steps  # one per greedy step
        assert census["TopK"] == len(result.stages)                         # the final sort of the kept positions
        check_static(model)


def test_loop_form_has_one_loop_per_stage_and_is_static_when_loop_is_allowed(exported):
    result = exported("loop")
    census = op_census(result.onnx_model)
    assert census["Loop"] == 2
    assert census["ArgMin"] == 1 and census["ArgMax"] == 1  # the first pick of each stage; steps 2..K in the bodies
    bodies = [n.attribute[0].g for n in result.onnx_model.graph.node if n.op_type == "Loop"]
    assert sorted(op_census_of(b).get("ArgMin", 0) + op_census_of(b).get("ArgMax", 0) for b in bodies) == [1, 1]
    assert all(not set(op_census_of(b)) & {"ScatterND", "ScatterElements", "NonZero"} for b in bodies)
    check_static(result.onnx_model, allowed_ops=frozenset({"Loop"}))  # every size known once the batch is fixed
    with pytest.raises(ExportError, match="Loop"):
        check_static(result.onnx_model)


def op_census_of(graph) -> dict:
    out: dict[str, int] = {}
    for n in graph.node:
        out[n.op_type] = out.get(n.op_type, 0) + 1
    return out


# --------------------------------------------------------------------------- recipe validation


@pytest.mark.parametrize("text, match", [
    ("mmr(lam=1.5)@1:0.5", r"mmr: lam=1.5 is outside \[0.0, 1.0\]"),
    ("mmr(lam=-0.1)@1:0.5", r"mmr: lam=-0.1 is outside \[0.0, 1.0\]"),
    ("mmr(lam=\"half\")@1:0.5", r"lam must be a number"),
    ("divprune(loop=1)@1:0.5", r"loop must be true or false, got 1"),
    ("divprune(lam=0.5)@1:0.5", r"has no parameter 'lam'; its parameters: loop"),
])
def test_bad_parameters_are_one_line_config_errors(text, match):
    with pytest.raises(ConfigError, match=match) as e:
        parse_recipe(text)
    assert "\n" not in str(e.value)


def test_parameters_are_typed_and_defaulted():
    a, b = parse_recipe("divprune@1:0.5+mmr(lam=1)@2:4").stages
    assert a.options() == {"loop": LOOP_DEFAULT}
    assert b.options() == {"lam": 1.0, "loop": LOOP_DEFAULT} and isinstance(b.options()["lam"], float)
    assert METHODS["mmr"].requires_cls and not METHODS["divprune"].requires_cls


def test_mmr_on_a_model_without_cls_is_a_config_error():
    with pytest.raises(ConfigError, match=r"\[CLS\]") as e:
        api.export(*build("siglip_vision"), "mmr@1:0.5")
    assert "\n" not in str(e.value)
