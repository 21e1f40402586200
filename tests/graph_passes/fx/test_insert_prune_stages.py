"""insert_prune_stages on the unlifted GraphModule of each tiny model: numerics vs the eager reference, op census,
idempotence. The pass chain runs as in api.export: mask removal -> stage insertion -> respecialization."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from tiny_models import TINY_MODEL_INFO, TINY_MODELS, TinyBlock, TinyViT
from tiny_traced import random_batch, traced_tiny
from tokensieve.errors import PassError
from tokensieve.exporter.trace import FirstOutput, trace
from tokensieve.graph_passes.blocks import discover_blocks, token_layout
from tokensieve.graph_passes.fx.insert_prune_stages import TAG, insert_prune_stages, kept_index_nodes
from tokensieve.graph_passes.fx.remove_constant_attention_mask import remove_constant_attention_mask
from tokensieve.graph_passes.fx.respecialize_token_counts import respecialize_token_counts
from tokensieve.graph_passes.methods.reference import HookStage, run_reference
from tokensieve.graph_passes.pass_manager import PassContext
from tokensieve.recipe import parse_recipe, resolve_recipe

PRUNE = torch.ops.tokensieve.prune_topk.default
MODELS = sorted(TINY_MODELS)  # siglip_vision too: at pass level prefix 0 is legal (api.export rejects cls-topk)


def _pruned(name: str, recipe: str):
    """Fresh GraphModule of a tiny model with the recipe's stages inserted; also the eager module and stages."""
    module, x, ep = traced_tiny(name)
    gm = ep.module()
    blocks = discover_blocks(gm)
    layout = token_layout(gm, blocks)
    stages = resolve_recipe(parse_recipe(recipe), len(blocks), layout.num_tokens, layout.num_prefix_tokens)
    ctx = PassContext(tuple(blocks), tuple(stages), (x,))
    remove_constant_attention_mask(gm, ctx)
    inserted = insert_prune_stages(gm, ctx)
    respecialize_token_counts(gm, ctx)
    hooks = [HookStage(blocks[s.stage.after_block].path, s.stage.method, s.keep, s.num_prefix_tokens) for s in stages]
    return gm, blocks, stages, hooks, module, x, inserted


def _run_with_kept(gm: fx.GraphModule, x: torch.Tensor):
    """gm(x) plus the value of every kept-indices node, in graph order (the graph's outputs are left alone)."""
    wanted = kept_index_nodes(gm)
    seen = {}

    class Capture(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in wanted:
                seen[n] = out
            return out

    with torch.no_grad():
        out = Capture(gm).run(x)
    return out, [seen[n] for n in wanted]


def _ops(gm: fx.GraphModule) -> list[str]:
    return [f"{n.op}:{n.target}" for n in gm.graph.nodes]


@pytest.mark.parametrize("name", MODELS)
def test_pruned_graph_matches_eager_reference(name):
    gm, _, stages, hooks, module, x, inserted = _pruned(name, "cls-topk@1,2:0.5")
    assert inserted.modified
    for inp in (x, random_batch(x, 3, seed=1)):
        out, kept = _run_with_kept(gm, inp)
        ref, ref_kept = run_reference(module, inp, hooks)
        assert len(kept) == len(ref_kept) == len(stages)
        for got, want, s in zip(kept, ref_kept, stages):
            assert got.shape == (inp.shape[0], s.keep)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "recipe"),
    [("plain_vit", "cls-topk@0:5+cls-topk@3:2"), ("dinov2", "cls-topk@0,1,2,3:0.7"), ("deit", "cls-topk@3:1")],
)
def test_other_recipes_match_eager_reference(name, recipe):
    """Stage after block 0 and after the last block, count budgets, four chained stages."""
    gm, _, stages, hooks, module, x, _ = _pruned(name, recipe)
    out, kept = _run_with_kept(gm, x)
    ref, ref_kept = run_reference(module, x, hooks)
    for got, want in zip(kept, ref_kept, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["vit", "deit", "dinov2_registers", "siglip_vision"])
def test_kept_indices_are_sorted_patch_positions(name):
    gm, _, stages, _, _, x, _ = _pruned(name, "cls-topk@1,2:0.5")
    prefix = TINY_MODEL_INFO[name].num_prefix_tokens
    _, kept = _run_with_kept(gm, x)
    for idx, s in zip(kept, stages):
        assert (idx[:, 1:] > idx[:, :-1]).all()
        assert idx.min() >= prefix and idx.max() < s.tokens_in


@pytest.mark.parametrize("name", ["vit", "clip_vision", "plain_vit"])
def test_one_prune_op_per_stage_after_its_block(name):
    gm, blocks, stages, _, _, _, _ = _pruned(name, "cls-topk@1,2:0.5")
    prunes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is PRUNE]
    assert len(prunes) == len(stages) == 2
    for node, s in zip(prunes, stages):
        block = blocks[s.stage.after_block]
        tokens, scores, keep, prefix = node.args
        assert tokens is block.output
        assert (keep, prefix) == (s.keep, s.num_prefix_tokens)
        assert node.meta[TAG]["block"] == s.stage.after_block
        assert (node.meta[TAG]["tokens_in"], node.meta[TAG]["tokens_out"]) == (s.tokens_in, s.tokens_out)
        # the block output now feeds only the stage; everything downstream reads the pruned tokens
        assert set(block.output.users) == {node}
        getitems = sorted(node.users, key=lambda u: u.args[1])
        assert [u.target for u in getitems] == [operator.getitem, operator.getitem]
        assert getitems[1].meta[TAG].get("kept_indices") is True
    assert kept_index_nodes(gm) == [max(p.users, key=lambda u: u.args[1]) for p in prunes]


@pytest.mark.parametrize("name", ["vit", "plain_vit"])
def test_idempotent(name):
    gm, blocks, stages, _, _, x, _ = _pruned(name, "cls-topk@1,2:0.5")
    ops, code = _ops(gm), gm.code
    again = insert_prune_stages(gm, PassContext(tuple(blocks), tuple(stages), (x,)))
    assert again.modified is False
    assert _ops(gm) == ops and gm.code == code
    assert sum(n.target is PRUNE for n in gm.graph.nodes) == 2


@pytest.mark.parametrize("recipe", ["cls-topk(fuse=true,pospad=true)@1:0.5+adaptive@2:0.75",
                                    "tome(prop_attn=true)@1,2:0.8"])
def test_idempotent_with_token_reuse_and_carried_state(recipe):
    """A fused token / PosPad markers, a validity state, ToMe's size state and the later attention's key masks."""
    gm, blocks, stages, _, _, x, inserted = _pruned("vit", recipe)
    assert inserted.modified
    code = gm.code
    assert insert_prune_stages(gm, PassContext(tuple(blocks), tuple(stages), (x,))).modified is False
    assert gm.code == code


def test_empty_recipe_leaves_graph_unchanged():
    _, x, ep = traced_tiny("plain_vit")
    gm = ep.module()
    ops = _ops(gm)
    assert insert_prune_stages(gm, PassContext(tuple(discover_blocks(gm)), (), (x,))).modified is False
    assert _ops(gm) == ops


def test_rediscovered_blocks_make_second_insert_a_no_op():
    gm, _, stages, _, _, _, _ = _pruned("plain_vit", "cls-topk@1,2:0.5")
    ops = _ops(gm)
    again = insert_prune_stages(gm, PassContext(tuple(discover_blocks(gm)), tuple(stages)))
    assert again.modified is False and _ops(gm) == ops


class _TwoAttentionBlock(TinyBlock):
    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v) + F.scaled_dot_product_attention(k, q, v)
        return x + self.proj(a.transpose(1, 2).reshape(b, n, c))


def test_block_with_two_attention_ops_raises_pass_error():
    torch.manual_seed(0)
    model = TinyViT(dim=48, depth=2, mlp_dim=96)
    model.blocks = nn.ModuleList(_TwoAttentionBlock(48, 2, 96) for _ in range(2))
    gm = trace(FirstOutput(model.eval()), torch.randn(2, 3, 32, 32)).module()
    blocks = discover_blocks(gm)
    assert [len(b.attention) for b in blocks] == [2, 2]
    stages = resolve_recipe(parse_recipe("cls-topk@0:0.5"), 2, 17, 1)
    with pytest.raises(PassError, match="exactly one"):
        insert_prune_stages(gm, PassContext(tuple(blocks), tuple(stages)))
