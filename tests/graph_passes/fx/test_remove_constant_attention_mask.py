"""remove_constant_attention_mask: shape-only all-true / all-zero masks go, real masks raise PassError."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from tiny_models import TINY_MODELS, TinyBlock, TinyViT
from tiny_traced import random_batch, traced_tiny
from tokensieve.errors import PassError
from tokensieve.exporter.trace import FirstOutput, trace
from tokensieve.graph_passes.blocks import SDPA_TARGETS
from tokensieve.graph_passes.blocks import discover_blocks
from tokensieve.graph_passes.fx.insert_prune_stages import insert_prune_stages
from tokensieve.graph_passes.fx.remove_constant_attention_mask import remove_constant_attention_mask
from tokensieve.graph_passes.pass_manager import PassContext
from tokensieve.recipe import parse_recipe, resolve_recipe


def _ctx(x: torch.Tensor, recipe: str = "cls-topk@0:0.5") -> PassContext:
    """A context with a stage to insert (so a real mask is an error); recipe="" for a dense export."""
    stages = resolve_recipe(parse_recipe(recipe), 2, 17, 1) if recipe else []
    return PassContext(stages=tuple(stages), example_inputs=(x,))


def _masks(x: torch.Tensor, kind: str):
    b, n = x.shape[0], x.shape[1]
    if kind == "ones_bool":
        return torch.ones(b, 1, n, n, dtype=torch.bool)
    if kind == "arange_bool":  # transformers-style: built from arange(N), all true
        pos = torch.arange(n)
        return (pos[None, :] >= 0) & (pos[:, None] < n)
    if kind == "zeros_float":
        return torch.zeros(b, 1, n, n)
    if kind == "causal":  # constant but masks something
        return torch.ones(n, n, dtype=torch.bool).tril()
    if kind == "input_dependent":  # all true for these inputs, but reads the tokens' values
        return (x.abs().sum(-1) >= 0)[:, None, None, :]
    raise AssertionError(kind)


class _MaskedBlock(TinyBlock):
    def __init__(self, kind: str, positional: bool):
        super().__init__(48, 2, 96)
        self.kind, self.positional = kind, positional

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        mask = _masks(x, self.kind)
        a = F.scaled_dot_product_attention(q, k, v, mask) if self.positional else \
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def _masked_vit(kind: str, positional: bool = False):
    torch.manual_seed(0)
    model = TinyViT(dim=48, depth=2, mlp_dim=96)
    model.blocks = nn.ModuleList(_MaskedBlock(kind, positional) for _ in range(2))
    module = FirstOutput(model.eval())
    x = torch.randn(2, 3, 32, 32)
    return module, x, trace(module, x).module()


def _sdpa_masks(gm: fx.GraphModule) -> list:
    out = []
    for n in gm.graph.nodes:
        if n.target in SDPA_TARGETS:
            out.append(n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask"))
    return out


@pytest.mark.parametrize("positional", [False, True], ids=["kwarg", "positional"])
@pytest.mark.parametrize("kind", ["ones_bool", "arange_bool", "zeros_float"])
def test_trivial_mask_is_removed_exactly(kind, positional):
    module, x, gm = _masked_vit(kind, positional)
    assert all(isinstance(m, fx.Node) for m in _sdpa_masks(gm))
    assert remove_constant_attention_mask(gm, _ctx(x)).modified
    assert _sdpa_masks(gm) == [None, None]
    # the mask-building ops are dead code now
    assert not any(n.target in (torch.ops.aten.ones.default, torch.ops.aten.zeros.default, torch.ops.aten.arange.default)
                   for n in gm.graph.nodes)
    x3 = random_batch(x, 3)
    with torch.no_grad():
        torch.testing.assert_close(gm(x3), module(x3), rtol=0, atol=1e-6)



@pytest.mark.parametrize("kind", ["ones_bool", "zeros_float"])
def test_idempotent(kind):
    _, x, gm = _masked_vit(kind)
    assert remove_constant_attention_mask(gm, _ctx(x)).modified
    code = gm.code
    assert remove_constant_attention_mask(gm, _ctx(x)).modified is False
    assert gm.code == code


def test_without_stages_a_real_mask_stays():
    """A dense export (no stage to insert) keeps a mask that masks something, and reports no change."""
    _, x, gm = _masked_vit("causal")
    code = gm.code
    assert remove_constant_attention_mask(gm, _ctx(x, recipe="")).modified is False
    assert gm.code == code


def test_key_masks_of_a_stateful_stage_are_left_alone():
    """The pass list runs again after insert_prune_stages: the input-dependent key mask an adaptive stage gives the
    later attention is tokensieve's own, not a model mask to refuse."""
    _, x, ep = traced_tiny("plain_vit")
    gm = ep.module()
    ctx = PassContext(tuple(discover_blocks(gm)), tuple(resolve_recipe(parse_recipe("adaptive@1:0.75"), 4, 17, 1)), (x,))
    assert insert_prune_stages(gm, ctx).modified
    masks = _sdpa_masks(gm)
    assert masks[:2] == [None, None] and all(isinstance(m, fx.Node) for m in masks[2:])
    code = gm.code
    assert remove_constant_attention_mask(gm, ctx).modified is False
    assert gm.code == code and _sdpa_masks(gm) == masks


@pytest.mark.parametrize("kind", ["causal", "input_dependent"])
def test_real_mask_raises_pass_error(kind):
    """A causal mask masks something; the input-dependent one is all true here but reads the tokens' values."""
    _, x, gm = _masked_vit(kind)
    with pytest.raises(PassError, match="attention mask"):
        remove_constant_attention_mask(gm, _ctx(x))


def test_no_mask_is_a_no_op():
    _, x, ep = traced_tiny("plain_vit")
    gm = ep.module()
    code = gm.code
    assert remove_constant_attention_mask(gm, _ctx(x)).modified is False
    assert gm.code == code


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_tiny_models_end_without_masks_and_unchanged_outputs(name):
    module, x, ep = traced_tiny(name)
    gm = ep.module()
    remove_constant_attention_mask(gm, _ctx(x))
    assert _sdpa_masks(gm) == [None] * 4
    x3 = random_batch(x, 3)
    with torch.no_grad():
        torch.testing.assert_close(gm(x3), module(x3), rtol=0, atol=1e-6)
