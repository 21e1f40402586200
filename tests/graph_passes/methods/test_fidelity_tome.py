"""ToMe fidelity: `tome_merge` against the released code (tests/reference/tome.py, facebookresearch/ToMe).

Default form: identical merge groups, survivor positions in the code's output order, tokens and sizes <= 1e-5, on
random metrics with exact ties, for the prefix layouts the code handles ([CLS]: class_token, + a distillation
token: distill_token, none). Pinned differences (docs/fidelity.md): the spatial variant is the code run on the
patch tokens alone with the survivors sorted by position; sizes=false restarts the sizes at 1 every stage.
"""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.tome import tome_step
from tokensieve.graph_passes.methods.merge import tome_max_merge, tome_merge
from tokensieve.graph_passes.methods.registry import METHODS
from tokensieve.graph_passes.methods.stage import run_stage

SETTINGS = settings(max_examples=30, deadline=None)


@st.composite
def cases(draw, spatial: bool = False):
    B, n, p = draw(st.integers(1, 3)), draw(st.integers(2, 24)), draw(st.integers(0, 2))
    r = draw(st.integers(0, n // 2))  # the code's cap (t - protected) // 2
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    D = draw(st.integers(1, 4))
    if draw(st.booleans()):  # entries ±1: many exact ties of the cosine similarities (and never a zero vector)
        metric = torch.randint(0, 2, (B, p + n, D), generator=gen).float() * 2 - 1
    else:
        metric = torch.randn(B, p + n, D, generator=gen)
    size = torch.randint(1, 4, (B, p + n), generator=gen).float()
    return metric, size, n - r, p


def _groups(metric: torch.Tensor, keep: int, p: int, **kw) -> torch.Tensor:
    """tokensieve's merge groups: merging the identity tokens gives each output row's members (B, p + keep, N) bool."""
    B, N, _ = metric.shape
    eye = torch.eye(N).expand(B, N, N)
    return tome_merge(eye, metric, keep, p, **kw)[0] > 0


@SETTINGS
@given(cases())
def test_default_tome_is_the_released_bipartite_soft_matching(case):
    metric, size, keep, p = case
    B, N, _ = metric.shape
    x = torch.randn(B, N, 5)
    ref_x, ref_size, ref_groups = tome_step(x, metric, N - p - keep, class_token=p >= 1, distill_token=p == 2,
                                            size=size)
    out, idx, new_size = tome_merge(x, metric, keep, p, prop_attn=True, state=size)
    assert torch.equal(_groups(metric, keep, p), ref_groups)                   # same groups, same output order
    torch.testing.assert_close(out, ref_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new_size, ref_size, rtol=0, atol=0)
    # a survivor is its group's B token (odd sequence position) or, unmerged, the A token itself
    for b in range(B):
        for k, row in enumerate(ref_groups[b, p:]):
            members = row.nonzero().flatten().tolist()
            odd = [m for m in members if m % 2]
            assert idx[b, k].item() == (odd[0] if odd else members[0])
    plain, plain_idx = tome_merge(x, metric, keep, p)                         # sizes all 1: merge_wavg(size=None)
    torch.testing.assert_close(plain, tome_step(x, metric, N - p - keep, p >= 1, p == 2)[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(plain_idx, idx)


@SETTINGS
@given(cases())
def test_spatial_variant_is_the_code_on_the_patch_tokens_sorted_by_position(case):
    metric, size, keep, p = case
    B, N, _ = metric.shape
    x = torch.randn(B, N, 5)
    out, idx = tome_merge(x, metric, keep, p, spatial=True)
    assert (idx[:, 1:] > idx[:, :-1]).all()
    ref_x, _, ref_groups = tome_step(x[:, p:], metric[:, p:], N - p - keep, class_token=False)
    for b in range(B):
        survivors = [(row.nonzero().flatten().tolist(), k) for k, row in enumerate(ref_groups[b])]
        first = [max(m, key=lambda i: i % 2) + p for m, _ in survivors]   # the B member, else the A token
        order = sorted(range(keep), key=first.__getitem__)
        assert idx[b].tolist() == [first[k] for k in order]
        torch.testing.assert_close(out[b, p:], ref_x[b, order], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, :p], x[:, :p], rtol=0, atol=0)


def test_sizes_are_carried_to_later_stages_by_default():
    """ToMe's merge_wavg carries sizes through every block: so does `tome` (sizes=true, the default; the state is
    read by the next tome stage and biases no attention without prop_attn). sizes=false = the earlier form (every
    stage weighs each token 1), pinned as the code with its sizes dropped."""
    spec = METHODS["tome"]
    options = spec.defaults()
    assert spec.stateful(options) and not spec.masks_attention(options)
    assert spec.masks_attention({**options, "prop_attn": True}) and not spec.stateful({**options, "sizes": False})
    gen = torch.Generator().manual_seed(0)
    x, metric = torch.randn(1, 17, 4, generator=gen), torch.randn(1, 17, 3, generator=gen)
    m1, _ = tome_merge(metric, metric, 8, 1)                                 # the metric merged alike (a stand-in)
    r1, s1, _ = tome_step(x, metric, 8, class_token=True)
    rm1, _, _ = tome_step(metric, metric, 8, class_token=True)
    sized, _, _ = tome_step(r1, rm1, 4, class_token=True, size=s1)          # the code as it runs
    unsized, _, _ = tome_step(r1, rm1, 4, class_token=True)                 # the code with sizes dropped
    assert not torch.allclose(sized, unsized, atol=1e-3)
    # the stage dispatcher with the method's default options, the state passed on as the pass / reference do
    x1, _, state = run_stage(spec, options, 8, 1, None, scores=metric, x_out=x)
    x1_metric = tome_merge(metric, metric, 8, 1)[0]
    x2, _, _ = run_stage(spec, options, 4, 1, state, scores=x1_metric, x_out=x1)
    torch.testing.assert_close(x2, sized, rtol=1e-5, atol=1e-5)
    off = {**options, "sizes": False}
    y1, _, none = run_stage(spec, off, 8, 1, None, scores=metric, x_out=x)
    y2, _, _ = run_stage(spec, off, 4, 1, none, scores=x1_metric, x_out=y1)
    assert none is None
    torch.testing.assert_close(y2, unsized, rtol=1e-5, atol=1e-5)
    x2p, _, _ = tome_merge(x1, m1, 4, 1, prop_attn=True, state=tome_merge(x, metric, 8, 1, prop_attn=True)[2])
    torch.testing.assert_close(x2p, sized, rtol=1e-5, atol=1e-5)             # prop_attn carries them as the code


def test_merge_caps():
    assert [tome_max_merge(n) for n in (8, 9)] == [4, 4]                   # the code: (t - protected) // 2
    assert [tome_max_merge(n, spatial=True) for n in (8, 9)] == [4, 5]     # |A| = ceil(n / 2)


def test_carried_sizes_change_the_model_output_and_any_method_may_follow():
    """End to end on the eager reference (the exports of test_merge_methods verify the graph against it): the two
    stages of `tome@1:0.5+tome@2:5` weigh the second merge by the first's sizes; a later stage of another method
    drops the state (sizes are ToMe's, and they bias no attention without prop_attn)."""
    from tiny_models import build
    from tokensieve import api

    model, x = build("vit")
    batch = torch.randn(3, *x.shape[1:], generator=torch.Generator().manual_seed(2))
    sized = api.plan(model, x, "tome@1:0.5+tome@2:5").reference(batch)[0]
    unsized = api.plan(model, x, "tome(sizes=false)@1:0.5+tome(sizes=false)@2:5").reference(batch)[0]
    assert (sized - unsized).abs().max() > 1e-4
    mixed = api.plan(model, x, "tome@1:0.5+cls-topk@2:0.5")
    assert mixed.reference(batch)[0].isfinite().all()
