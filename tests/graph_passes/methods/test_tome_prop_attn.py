"""ToMe with proportional attention: token sizes carried across stages, size-weighted merges, log(size) attention bias.

End to end: two prop_attn stages exported on tiny models and checked against the eager reference (which adds the
same log-size bias to every later SDPA call) on ONNX Runtime; a control shows the bias changes the outputs.
Unit level: the sized merge against Bolya et al.'s `merge_wavg` (size-weighted scatter_reduce) and mass/size
conservation (hypothesis).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tiny_models import build
from method_checks import assert_matches_eager
from tokensieve import api
from tokensieve.errors import ConfigError
from tokensieve.graph_passes.methods.merge import tome_merge, tome_size_mask
from tokensieve.graph_passes.onnx.check_static import check_static, op_census

CASES = {
    "vit": ("vit", "tome(prop_attn=true)@1:0.5+tome(prop_attn=true)@2:5"),
    "registers": ("dinov2_registers", "tome(prop_attn=true)@0:0.5+tome(prop_attn=true)@2:0.5"),
}


@pytest.fixture(scope="module", params=list(CASES))
def exported(request):
    name, recipe = CASES[request.param]
    return api.export(*build(name), recipe)


def test_onnx_runtime_matches_eager_reference_over_20_inputs(exported):
    assert_matches_eager(exported)


def test_static_and_log_size_bias_in_later_attention(exported):
    check_static(exported.onnx_model)
    census = op_census(exported.onnx_model)
    assert census["Log"] >= 2 and not census["ScatterND"] and not census["ScatterElements"]


def test_proportional_attention_changes_the_output():
    """Control on the eager reference (what the exports above are verified against): api.plan binds the same hook
    stages as api.export, without converting anything to ONNX."""
    model, x = build("vit")
    plain = api.plan(model, x, "tome@1:0.5+tome@2:5")
    prop = api.plan(model, x, "tome(prop_attn=true)@1:0.5+tome(prop_attn=true)@2:5")
    batch = torch.randn(3, *x.shape[1:], generator=torch.Generator().manual_seed(2))
    (a, _), (b, _) = plain.reference(batch), prop.reference(batch)
    assert (a - b).abs().max() > 1e-4


@pytest.mark.parametrize("recipe", ["tome(prop_attn=true)@1:0.5+tome@2:5", "tome(prop_attn=true)@1:0.5+cls-topk@2:5"])
def test_a_stage_after_prop_attn_must_carry_the_sizes(recipe):
    with pytest.raises(ConfigError, match="follows a stateful tome stage") as e:
        api.export(*build("vit"), recipe)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- sized merge


def _bolya_wavg(x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor, r: int):
    """ToMe's bipartite_soft_matching + merge_wavg(size) for one image's patch tokens (n, C), sizes (n,)."""
    m = metric / metric.norm(dim=-1, keepdim=True)
    node_max, node_idx = (m[0::2] @ m[1::2].T).max(dim=-1)
    edge_idx = node_max.argsort(descending=True, stable=True)
    unm_idx, src_idx = edge_idx[r:], edge_idx[:r]
    dst_idx = node_idx[src_idx]
    xs, s = x * size[:, None], size
    xa, xb, sa, sb = xs[0::2], xs[1::2], s[0::2], s[1::2]
    dst = xb.scatter_reduce(0, dst_idx[:, None].expand(-1, x.shape[1]), xa[src_idx], reduce="sum")
    dst_size = sb.scatter_reduce(0, dst_idx, sa[src_idx], reduce="sum")
    positions = (2 * unm_idx).tolist() + list(range(1, x.shape[0], 2))
    sizes = torch.cat([sa[unm_idx], dst_size])
    tokens = torch.cat([xa[unm_idx], dst]) / sizes[:, None]
    return positions, tokens, sizes


@st.composite
def sized_cases(draw):
    B, n, p = draw(st.integers(1, 3)), draw(st.integers(2, 30)), draw(st.integers(0, 3))
    r = draw(st.integers(0, (n + 1) // 2))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(B, p + n, 4, generator=gen)
    metric = torch.randn(B, p + n, 3, generator=gen)
    size = torch.randint(1, 5, (B, p + n), generator=gen).float()
    return x, metric, size, n - r, p


@settings(max_examples=80, deadline=None)
@given(sized_cases())
def test_sized_merge_matches_merge_wavg_and_conserves_mass(case):
    x, metric, size, keep, p = case
    out, idx, new_size = tome_merge(x, metric, keep, p, prop_attn=True, state=size, spatial=True)
    assert new_size.shape == (x.shape[0], p + keep)
    torch.testing.assert_close(new_size[:, :p], size[:, :p], rtol=0, atol=0)
    torch.testing.assert_close(new_size.sum(-1), size.sum(-1))                           # sizes are conserved
    torch.testing.assert_close((new_size[..., None] * out).sum(1), (size[..., None] * x).sum(1),
                               rtol=1e-4, atol=1e-4)                                     # so is Σ size·token
    n = x.shape[1] - p
    for b in range(x.shape[0]):
        positions, tokens, sizes = _bolya_wavg(x[b, p:], metric[b, p:], size[b, p:], n - keep)
        order = sorted(range(keep), key=positions.__getitem__)
        assert idx[b].tolist() == [positions[i] + p for i in order]
        torch.testing.assert_close(out[b, p:], tokens[order], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(new_size[b, p:], sizes[order])


def test_first_stage_sizes_start_at_one_and_mask_is_log_size():
    x, metric = torch.randn(1, 9, 4), torch.randn(1, 9, 3)
    out, idx, size = tome_merge(x, metric, 4, 1, prop_attn=True)
    plain, plain_idx = tome_merge(x, metric, 4, 1)
    torch.testing.assert_close(out, plain)
    assert torch.equal(idx, plain_idx) and size.sum() == 9 and size[0, 0] == 1
    torch.testing.assert_close(tome_size_mask(size), size.log()[:, None, None, :])
