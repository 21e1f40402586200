"""The video methods (evs, holitom): reduce math vs a naive reference, properties, ONNX export, one-line errors.

The reference below is written from graph_passes/methods/video.py's docstring only (Python loops, torch.cdist,
sorted(); none of video.py's or merge.py's helpers), in float64. Tokens are small multiples of 3, so run means and
squared distances are exact in float32 too, and exactly repeated frames / duplicated tokens give exact ties; the
similarity handed to both sides is the cosine rounded to 1/64 (exact in float32, many exact ties) and tau an odd
multiple of 1/128 (never equal to a similarity). A decision between two float64 values closer than float32 can
separate, or equal only by coincidence of different squared distances (float32 rounds those differently), is
`Ambiguous`: such a case says nothing about the tie rules and is rejected (hypothesis `reject`, ~5% of cases).
"""
from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import onnx_ir as ir
import pytest
import torch
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from torch import nn
from torch.export import Dim

from tokensieve.cli import main
from tokensieve.errors import ConfigError
from tokensieve.exporter.vlm.export_part import PartSpec, export_part
from tokensieve.exporter.vlm.llava import check_outer_method
import tokensieve.graph_passes.methods.ops  # noqa: F401  registers torch.ops.tokensieve.prune_topk
from tokensieve.graph_passes.methods.registry import METHODS
from tokensieve.graph_passes.methods.stage import reduce_kwargs, run_stage, score_call
from tokensieve.graph_passes.methods.video import (
    NEVER,
    evs_scores,
    evs_validate,
    holitom_reduce,
    previous_frame_similarity,
)
from tokensieve.graph_passes.onnx.check_static import check_static, op_census
from tokensieve.recipe import parse_recipe, resolve_recipe

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
REL = 1e-3  # float32 separates values further apart than this (relative); closer non-equal values are ambiguous
TAUS = [(2 * j + 1) / 128 for j in range(19, 61)]  # 0.30 .. 0.95: some random cosines exceed it, repeats always do


class Ambiguous(Exception):
    """A reference decision between two values that differ by less than float32 can resolve."""


def _near(a: float, b: float) -> bool:
    return a != b and abs(a - b) <= REL * max(abs(a), abs(b))


def _cos(u: torch.Tensor, v: torch.Tensor) -> float:
    nu, nv = float(u.norm()), float(v.norm())
    return 0.0 if nu == 0 or nv == 0 else float(u @ v) / (nu * nv)


def naive_similarity(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(B, N, C) -> (B, N) float64: cos to the same position in the previous frame, NEVER (-2) in frame 0."""
    B, N, _ = x.shape
    P = N // frames
    sim = torch.full((B, N), -2.0, dtype=torch.float64)
    for b in range(B):
        for n in range(P, N):
            sim[b, n] = _cos(x[b, n].double(), x[b, n - P].double())
    return sim


def naive_holitom(x: torch.Tensor, sim: torch.Tensor, keep: int, p: int, frames: int, tau: float, knn: int):
    """video.py's holitom from its docstring, one video at a time -> (tokens (B, p + keep, C) float64, idx lists)."""
    B, _, C = x.shape
    outs, idxs = [], []
    for b in range(B):
        toks, s = x[b, p:].double(), sim[b, p:].double().tolist()
        n = toks.shape[0]
        P = n // frames
        # 1. temporal: the (at most n - keep) most similar tokens above tau merge, ties to the lowest position
        merged = set(sorted((i for i in range(n) if s[i] > tau), key=lambda i: (-s[i], i))[: n - keep])
        runs: dict[int, list[int]] = {}
        for pos in range(P):
            root = None
            for t in range(frames):
                i = t * P + pos
                if i not in merged:
                    root = i
                assert root is not None  # frame 0 (sim -2 <= tau) never merges
                runs.setdefault(root, []).append(i)
        valid = sorted(runs)  # ascending positions: list order = position order below
        y = torch.stack([toks[runs[r]].mean(dim=0) for r in valid])
        m = len(valid)
        assert m >= keep
        # 2. DPC-kNN over the run means. d2 (exact for the multiples of 1/4 of video_tokens) tells float ties that
        # float32 reproduces (same squared distances: same floats) from equalities by coincidence (4.5 + 9 = 3 * 4.5,
        # which float32 computes from the rounded sqrt(4.5) differently): those count as unsure, like near values.
        D = (torch.cdist(y[None], y[None], compute_mode="donot_use_mm_for_euclid_dist")[0] / math.sqrt(C)).tolist()
        d2 = ((y[:, None] - y[None]) ** 2).sum(dim=-1).tolist()
        kk = min(knn, keep)
        dens = [math.exp(-sum(d * d for d in sorted(D[a])[:kk]) / kk) for a in range(m)]
        sig = [tuple(sorted(d2[a])[:kk]) for a in range(m)]  # what density a is computed from

        def unsure(u: float, v: float, same: bool) -> bool:
            return not same and (u == v or _near(u, v))

        far, far_d2 = max(max(row) for row in D), max(max(row) for row in d2)
        delta, delta_d2 = [], []
        for a in range(m):
            denser = [c for c in range(m) if dens[c] > dens[a] or (dens[c] == dens[a] and c < a)]
            flip = {c for c in range(m) if c != a and unsure(dens[c], dens[a], sig[c] == sig[a])}
            sure = [c for c in denser if c not in flip]
            d = min((D[a][c] for c in denser), default=far)
            if flip and min((D[a][c] for c in sure), default=far) != min(
                    (D[a][c] for c in sure + sorted(flip)), default=far):
                raise Ambiguous(f"density of {valid[a]} vs {[valid[c] for c in flip]}")
            delta.append(d)
            delta_d2.append(d2[a][min(denser, key=lambda c: D[a][c])] if denser else far_d2)
        score = [delta[a] * dens[a] for a in range(m)]
        score_sig = [(0.0,) if delta[a] == 0 else (delta_d2[a], sig[a]) for a in range(m)]
        order = sorted(range(m), key=lambda a: (-score[a], a))
        u, v = order[keep - 1], order[min(keep, m - 1)]
        if keep < m and unsure(score[u], score[v], score_sig[u] == score_sig[v]):
            raise Ambiguous("centre scores at the budget boundary")
        centres = sorted(order[:keep])
        clusters: dict[int, list[int]] = {c: [c] for c in centres}  # a centre joins itself
        for a in range(m):
            if a in clusters:
                continue
            ds = [D[a][c] for c in centres]
            best = min(ds)
            if any(_near(d, best) for d in ds):
                raise Ambiguous(f"nearest centre of {valid[a]}")
            clusters[centres[ds.index(best)]].append(a)  # first centre on exact ties
        out = torch.stack([y[clusters[c]].mean(dim=0) for c in centres])
        outs.append(torch.cat([x[b, :p].double(), out]))
        idxs.append([valid[c] + p for c in centres])
    return torch.stack(outs), idxs


@st.composite
def video_tokens(draw, integer: bool = True):
    """(B, T * P, C) tokens (multiples of 3, or + noise) with optional exactly repeated frames, near-repeats and
    duplicated positions."""
    B, frames, P, C = draw(st.integers(1, 2)), draw(st.integers(1, 4)), draw(st.integers(1, 6)), draw(st.integers(2, 8))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randint(-1, 2, (B, frames, P, C), generator=gen).float()
    repeat, perturb, dup = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    for t in range(1, frames):
        if repeat and torch.rand(1, generator=gen) < 0.6:    # frame t = frame t - 1 exactly
            x[:, t] = x[:, t - 1]
        elif perturb:                                         # one coordinate of each token moves by +-1
            x[:, t] = x[:, t - 1]
            c = torch.randint(0, C, (B, P), generator=gen)
            x[:, t].scatter_add_(-1, c.unsqueeze(-1), torch.randint(0, 2, (B, P, 1), generator=gen).float() * 2 - 1)
            x[:, t].clamp_(-1, 1)
    if dup and P > 1:                                         # position 1 copies position 0 in every frame
        x[:, :, 1] = x[:, :, 0]
    # x 3: every run mean (of 1..4 tokens) is a multiple of 1/4, so float32 computes the means and squared distances
    # exactly; |coordinates| <= 3 keeps the densities exp(-mean d^2) >= exp(-36), far from float32's subnormals
    x = 3 * x if integer else x + 0.1 * torch.randn(x.shape, generator=gen)
    return x.reshape(B, frames * P, C), frames


@st.composite
def holitom_cases(draw):
    x, frames = draw(video_tokens())
    B, N, C = x.shape
    p = draw(st.integers(0, 1))
    if p:
        x = torch.cat([torch.randn(B, 1, C), x], dim=1)
    sim = torch.cat([torch.zeros(B, p, dtype=torch.float64), naive_similarity(x[:, p:], frames)], dim=1)
    sim = torch.where(sim == -2.0, sim, torch.round(sim * 64) / 64).float()  # exact in float32: exact ties
    return x, sim, draw(st.integers(1, N)), p, frames, draw(st.sampled_from(TAUS)), draw(st.integers(1, 8))


def _check_layout(out: torch.Tensor, idx: torch.Tensor, x: torch.Tensor, keep: int, p: int) -> None:
    B, N, C = x.shape
    assert out.shape == (B, p + keep, C) and out.dtype == x.dtype
    assert idx.shape == (B, keep) and idx.dtype == torch.long
    assert (idx[:, 1:] > idx[:, :-1]).all() and (idx >= p).all() and (idx < N).all()  # ascending, unique, in range


# --------------------------------------------------------------------------- holitom vs the reference


@SETTINGS
@given(holitom_cases())
def test_holitom_reduce_matches_the_naive_reference(case):
    x, sim, keep, p, frames, tau, knn = case
    try:
        want, want_idx = naive_holitom(x, sim, keep, p, frames, tau, knn)
    except Ambiguous:
        reject()
    out, idx = holitom_reduce(x, sim, keep, p, frames=frames, tau=tau, knn=knn)
    _check_layout(out, idx, x, keep, p)
    assert idx.tolist() == want_idx
    torch.testing.assert_close(out[:, :p], x[:, :p], rtol=0, atol=0)  # the prefix is never merged
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_holitom_ties_merge_the_lowest_positions_and_pick_the_lowest_centres():
    e = torch.eye(4)  # one-hot tokens: every distance is 0 or sqrt(2)/2, exactly, so every tie below is exact
    # frame 1 = frame 0: four similarities of exactly 1; keep 6 allows 2 merges, the lowest positions (4, 5) merge
    x = torch.cat([e, e]).unsqueeze(0)
    out, idx = holitom_reduce(x, previous_frame_similarity(x, 2), keep=6, frames=2, tau=0.5, knn=2)
    assert idx.tolist() == [[0, 1, 2, 3, 6, 7]]
    torch.testing.assert_close(out[0], torch.cat([e, e[2:]]), rtol=0, atol=0)  # all 6 valid are centres
    # frame 1 = e0 e1 e3 e2: positions 4, 5 merge; valid run means e0 e1 e2 e3 | e3 e2 (6, 7 duplicate 3, 2).
    # density (knn 2): 1 for 2, 3, 6, 7 (a twin at 0), exp(-1/4) for 0, 1; delta: 2 (densest) and 3, 0, 1 are
    # sqrt(2)/2 from a denser token, 6 and 7 are 0 from their denser twin. keep 3: centres 2, 3 and 0 (tied with 1,
    # the lower position); 1 is equidistant to all three centres and joins the first (0); 6 joins 3, 7 joins 2.
    x = torch.cat([e, e[[0, 1, 3, 2]]]).unsqueeze(0)
    out, idx = holitom_reduce(x, previous_frame_similarity(x, 2), keep=3, frames=2, tau=0.5, knn=2)
    assert idx.tolist() == [[0, 2, 3]]
    torch.testing.assert_close(out[0], torch.stack([(e[0] + e[1]) / 2, e[2], e[3]]), rtol=0, atol=0)
    want, want_idx = naive_holitom(x, previous_frame_similarity(x, 2), 3, 0, 2, 0.5, 2)
    assert want_idx == [[0, 2, 3]] and torch.equal(want.float(), out)


def test_holitom_distances_are_euclidean_over_sqrt_c():
    # One frame, C = 4, tokens 0, 1, 2, 4 along the first axis: distances |a - b| / 2. knn 2 (self + nearest):
    # densities exp(-1/8) for 0, 1, 2 and exp(-1/2) for 4; delta 2 (densest, the max distance), 1/2, 1/2, 1 ->
    # scores 1.77, 0.44, 0.44, 0.61: centres 0 and 4. Token 1 joins 0; token 2 is 1 from both and joins the first.
    # (Unscaled distances would give densities exp(-1/2), exp(-2) and centres 0, 1.)
    x = torch.zeros(1, 4, 4)
    x[0, :, 0] = torch.tensor([0.0, 1.0, 2.0, 4.0])
    out, idx = holitom_reduce(x, torch.full((1, 4), NEVER), keep=2, frames=1, knn=2)
    assert idx.tolist() == [[0, 3]]
    torch.testing.assert_close(out[0, :, 0], torch.tensor([1.0, 4.0]), rtol=0, atol=1e-6)
    assert (out[0, :, 1:] == 0).all()


# --------------------------------------------------------------------------- evs vs the reference


@settings(max_examples=30, deadline=None)
@given(video_tokens(), st.booleans(), st.integers(0, 2**31 - 1), st.data())
def test_evs_keeps_the_most_changed_tokens_and_the_whole_first_frame(case, noisy, seed, data):
    x, frames = case  # exact repeats (1 - cos ~ 0, ties up to float32) unless noisy
    if noisy:
        x = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    B, N, C = x.shape
    P = N // frames
    keep = data.draw(st.integers(P, N))
    spec = METHODS["evs"]
    assert spec.validate_video(N, frames, keep, {}) is None
    tokens, idx, state = run_stage(spec, {}, keep, 0, x_out=x, frames=frames)
    assert state is None
    _check_layout(tokens, idx, x, keep, 0)
    torch.testing.assert_close(tokens, x.gather(1, idx.unsqueeze(-1).expand(-1, -1, C)), rtol=0, atol=0)
    change = 1 - naive_similarity(x, frames)  # frame 0: 3, above any 1 - cos
    tol = 1e-5
    for b in range(B):
        kept = set(idx[b].tolist())
        assert set(range(P)) <= kept  # the first frame is always kept
        s = change[b].tolist()
        # TopK up to float32: nothing dropped scores above anything kept
        assert min(s[i] for i in kept) >= max((s[i] for i in range(N) if i not in kept), default=-1) - tol
        order = sorted(range(N), key=lambda i: (-s[i], i))
        if keep == N or s[order[keep - 1]] - s[order[keep]] > tol:  # no near-tie at the boundary: the exact set
            assert kept == set(order[:keep])


def test_evs_scores_are_one_minus_the_previous_frame_cosine():
    x = torch.randn(2, 12, 5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(evs_scores(x, frames=3).double(), 1 - naive_similarity(x, 3), rtol=0, atol=1e-6)
    assert (evs_scores(x, frames=3)[:, :4] == 3.0).all()


# --------------------------------------------------------------------------- similarity


@pytest.mark.parametrize("frames", [1, 2, 3, 6])
def test_previous_frame_similarity_matches_the_naive_cosine(frames):
    x = torch.randn(2, 12, 7, generator=torch.Generator().manual_seed(frames))
    sim = previous_frame_similarity(x, frames)
    assert sim.shape == (2, 12) and sim.dtype == torch.float32
    torch.testing.assert_close(sim.double(), naive_similarity(x, frames), rtol=0, atol=1e-6)
    assert (sim[:, : 12 // frames] == NEVER).all()


def test_previous_frame_similarity_rejects_a_token_count_not_divisible_by_frames():
    with pytest.raises(ValueError, match="10 tokens do not split into 3 frames") as e:
        previous_frame_similarity(torch.randn(1, 10, 4), frames=3)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError):
        evs_scores(torch.randn(1, 10, 4), frames=0)


# --------------------------------------------------------------------------- properties


@settings(max_examples=15, deadline=None)
@given(video_tokens(integer=False), st.data())
def test_frames_1_never_merges_in_time(case, data):
    x, _ = case  # the T * P tokens read as one image
    N = x.shape[1]
    keep, knn = data.draw(st.integers(1, N)), data.draw(st.integers(1, 8))
    sim = previous_frame_similarity(x, frames=1)
    assert (sim == NEVER).all()  # an image has no previous frame
    # tau = -1 (the lowest) would merge any cosine: still the same as tau = 0.99, and DPC-kNN alone
    out, idx = holitom_reduce(x, sim, keep, frames=1, tau=-1.0, knn=knn)
    out_hi, idx_hi = holitom_reduce(x, sim, keep, frames=1, tau=0.99, knn=knn)
    assert torch.equal(idx, idx_hi) and torch.equal(out, out_hi)
    _check_layout(out, idx, x, keep, 0)
    try:
        want, want_idx = naive_holitom(x, sim, keep, 0, 1, -1.0, knn)
    except Ambiguous:
        reject()
    assert idx.tolist() == want_idx
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    full, full_idx = holitom_reduce(x, sim, N, frames=1, tau=-1.0, knn=knn)
    assert torch.equal(full, x) and full_idx.tolist() == [list(range(N))] * x.shape[0]


@settings(max_examples=20, deadline=None)
@given(video_tokens(), st.booleans(), st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_keep_all_with_tau_1_is_the_identity(case, integer, knn, seed):
    x, frames = case  # repeated frames and duplicated tokens included: every centre keeps itself
    if not integer:
        x = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    spec = METHODS["holitom"]
    opts = {**spec.defaults(), "tau": 1.0, "knn": knn}
    fn, args, kwargs = score_call(spec, opts, x.shape[1], 0, x_out=x, frames=frames)
    out, idx = spec.reduce_fn(x, fn(*args, **kwargs), x.shape[1], 0, **reduce_kwargs(spec, opts, frames))
    assert torch.equal(out, x)
    assert idx.tolist() == [list(range(x.shape[1]))] * x.shape[0]


@pytest.mark.parametrize("frames,P,C", [(2, 5, 4), (3, 6, 8), (4, 3, 2)])
def test_a_static_video_keeps_frame_0(frames, P, C):
    spec = METHODS["holitom"]
    gen = torch.Generator().manual_seed(frames)
    for first, exact in ((torch.randn(2, 1, P, C, generator=gen), False),
                         (torch.randint(1, 4, (2, 1, P, C), generator=gen).float(), True)):  # small ints: exact means
        x = first.expand(-1, frames, -1, -1).reshape(2, frames * P, C).contiguous()
        opts = spec.defaults()
        fn, args, kwargs = score_call(spec, opts, P, 0, x_out=x, frames=frames)
        out, idx = spec.reduce_fn(x, fn(*args, **kwargs), P, 0, **reduce_kwargs(spec, opts, frames))
        assert idx.tolist() == [list(range(P))] * 2
        torch.testing.assert_close(out, x[:, :P], rtol=0 if exact else 1e-6, atol=0 if exact else 1e-6)


def test_run_stage_passes_frames_to_holitoms_reduce():
    spec = METHODS["holitom"]
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(1, 4, 6, generator=gen)
    x = torch.cat([f, f + 0.01 * torch.randn(1, 4, 6, generator=gen), torch.randn(1, 4, 6, generator=gen)], dim=1)
    opts = spec.defaults()
    want, want_idx = holitom_reduce(x, previous_frame_similarity(x, 3), 6, 0, frames=3, **opts)
    tokens, idx, _ = run_stage(spec, opts, 6, 0, x_out=x, frames=3)
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(tokens, want, rtol=0, atol=0)


# --------------------------------------------------------------------------- ONNX


FRAMES, P_ONNX, C_ONNX, K_ONNX = 3, 8, 16, 10


class VideoStage(nn.Module):
    """One video stage as the exporter inserts it: the spec's score, then its reduce (TopK + gather for EVS)."""

    def __init__(self, method: str, keep: int, frames: int):
        super().__init__()
        self.spec, self.keep, self.frames = METHODS[method], keep, frames
        self.options = self.spec.defaults()

    def forward(self, x):
        fn, args, kwargs = score_call(self.spec, self.options, self.keep, 0, x_out=x, frames=self.frames)
        scores = fn(*args, **kwargs)
        if self.spec.reduce_fn is None:
            return tuple(torch.ops.tokensieve.prune_topk(x, scores, self.keep, 0))
        return self.spec.reduce_fn(x, scores, self.keep, 0, **reduce_kwargs(self.spec, self.options, self.frames))


def _onnx_inputs(n: int = 10, batch: int = 2) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    shape = (batch, FRAMES, P_ONNX, C_ONNX)
    inputs = []
    for i in range(n):
        x = torch.randn(shape, generator=gen)
        if i == 0:      # frame 1 repeats frame 0 exactly: 8 merges (under the 14 allowed), frame 2 is new
            x[:, 1] = x[:, 0]
        elif i % 2:     # near-static frames: cosines 0.77-0.99, 15-16 above tau = 0.8 for the 14 merges allowed
            for t in (1, 2):
                x[:, t] = x[:, t - 1] + (0.2 + 0.2 * i / n) * torch.randn(shape[0], P_ONNX, C_ONNX, generator=gen)
        inputs.append(x.reshape(batch, FRAMES * P_ONNX, C_ONNX))
    return inputs


@pytest.mark.parametrize("method", ["holitom", "evs"])
def test_onnx_runtime_matches_eager_and_the_graph_is_static(method):
    module = VideoStage(method, K_ONNX, FRAMES).eval()
    inputs = _onnx_inputs()
    spec = PartSpec(args=(inputs[0],), dynamic_shapes=({0: Dim("batch", min=1, max=64)},), input_names=["tokens"],
                    output_names=["out", "keep_idx"], dim_names={"tokens": {0: "batch"}})
    proto = ir.to_proto(export_part(module, spec, what=f"{method} stage"))
    census = op_census(proto)
    bad = {op: n for op, n in census.items() if op in ("NonZero", "Loop", "If") or op.startswith("Scatter")}
    assert not bad, bad
    assert census["TopK"] >= 1
    check_static(proto)  # every size known once the batch is fixed
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for x in inputs:
        with torch.no_grad():
            want, want_idx = module(x)
        got, got_idx = sess.run(None, {"tokens": x.numpy()})
        assert got.shape == (2, K_ONNX, C_ONNX) and got_idx.shape == (2, K_ONNX)
        np.testing.assert_array_equal(got_idx, want_idx.numpy())
        np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-5)
    got, got_idx = sess.run(None, {"tokens": inputs[1][:1].numpy()})  # another batch size
    np.testing.assert_array_equal(got_idx, module(inputs[1][:1])[1].numpy())


# --------------------------------------------------------------------------- one-line errors


@pytest.mark.parametrize("recipe", ["holitom@2:0.5", "evs@1:0.5", "holitom(tau=0.5)@0:4"])
def test_a_vit_recipe_refuses_a_video_method(recipe):
    with pytest.raises(ConfigError, match="video method") as e:
        resolve_recipe(parse_recipe(recipe), num_blocks=4, num_tokens=17, num_prefix_tokens=1)
    assert "export-vlm" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("method", ["holitom", "evs"])
def test_llava_refuses_a_video_method(method):
    with pytest.raises(ConfigError, match="video method") as e:
        check_outer_method(method, {}, num_patches=16, keep=8)
    assert "Qwen2-VL" in str(e.value) and "\n" not in str(e.value)


def test_evs_validate_needs_the_whole_first_frame():
    reason = evs_validate(24, 3, 7, {})
    assert reason is not None and "at least 8" in reason and "\n" not in reason
    assert evs_validate(24, 3, 8, {}) is None and evs_validate(24, 3, 24, {}) is None
    assert METHODS["evs"].validate_video is evs_validate
    image = evs_validate(16, 1, 8, {})  # one frame: EVS would keep it whole, so it needs a video
    assert image is not None and "needs a video" in image and evs_validate(16, 1, 16, {}) is None
    assert METHODS["holitom"].validate_video(24, 3, 1, {}) is None


def test_methods_lists_evs_and_holitom_as_video_only(capsys):
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    video = {lines[i - 1].split()[0] for i, line in enumerate(lines) if "video only" in line}
    assert video == {"evs", "holitom"}
    assert {name for name, m in METHODS.items() if m.video} == {"evs", "holitom"}


def test_cli_export_refuses_a_video_method_in_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export", "--model", "tiny", "--prune", "holitom@2:0.5", "-o", str(out), "--no-bench"]) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("tokensieve export: error: ")]
    assert len(errors) == 1 and captured.err.splitlines()[-1] == errors[0], captured.err
    assert "video method" in errors[0] and "export-vlm" in errors[0] and "Traceback" not in captured.err
    assert not out.exists()
