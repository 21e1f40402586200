"""respecialize_token_counts: literal token counts downstream of a stage follow the pruned token axis."""
from __future__ import annotations

import pytest
import torch

from tiny_models import TinyViT
from tiny_traced import traced_tiny
from tokensieve.errors import PassError
from tokensieve.exporter.trace import FirstOutput, trace
from tokensieve.graph_passes.blocks import discover_blocks
from tokensieve.graph_passes.fx.insert_prune_stages import insert_prune_stages
from tokensieve.graph_passes.fx.respecialize_token_counts import respecialize_token_counts
from tokensieve.graph_passes.methods.reference import HookStage, run_reference
from tokensieve.graph_passes.pass_manager import PassContext
from tokensieve.recipe import parse_recipe, resolve_recipe

aten = torch.ops.aten
SHAPE_OPS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default)


class _HeadViT(TinyViT):
    """TinyViT (2 blocks, 17 tokens, hidden 48) whose head is `head_fn(self, tokens after the last block)`."""

    def __init__(self, head_fn):
        torch.manual_seed(0)
        super().__init__(dim=48, depth=2, mlp_dim=96)
        self.head_fn = head_fn

    def forward(self, pixel_values):
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.head_fn(self, x)


def _trace_and_insert(module, recipe: str, x: torch.Tensor):
    wrapped = FirstOutput(module.eval())
    gm = trace(wrapped, x).module()
    blocks = discover_blocks(gm)
    stages = resolve_recipe(parse_recipe(recipe), len(blocks), 17, 1)
    assert insert_prune_stages(gm, _ctx(blocks, recipe, x)).modified
    hooks = [HookStage(blocks[s.stage.after_block].path, "cls-topk", s.keep, 1) for s in stages]
    return wrapped, gm, blocks, hooks


def _ctx(blocks, recipe: str, x: torch.Tensor) -> PassContext:
    stages = resolve_recipe(parse_recipe(recipe), len(blocks), 17, 1) if recipe else []
    return PassContext(tuple(blocks), tuple(stages), (x,))


def _size_args(nodes) -> list[list]:
    return [[s for s in n.args[1] if isinstance(s, int)] for n in nodes]


def test_shape_ops_after_the_stage_name_the_pruned_count():
    _, x, ep = traced_tiny("plain_vit")
    gm = ep.module()
    blocks = discover_blocks(gm)
    ctx = _ctx(blocks, "cls-topk@1:0.5", x)
    insert_prune_stages(gm, ctx)
    assert respecialize_token_counts(gm, ctx).modified

    def shape_ops(block):
        return [n for n in block.nodes if n.target in SHAPE_OPS and isinstance(n.args[1], (list, tuple))]

    before, after = shape_ops(blocks[0]) + shape_ops(blocks[1]), shape_ops(blocks[2]) + shape_ops(blocks[3])
    assert before and after
    assert all(17 in sizes and 9 not in sizes for sizes in _size_args(before))
    assert all(9 in sizes and 17 not in sizes for sizes in _size_args(after))


def test_no_stage_means_no_edit():
    _, x, ep = traced_tiny("vit")
    gm = ep.module()
    code = gm.code
    assert respecialize_token_counts(gm, _ctx(discover_blocks(gm), "", x)).modified is False
    assert gm.code == code


def test_idempotent():
    _, x, ep = traced_tiny("clip_vision")
    gm = ep.module()
    ctx = _ctx(discover_blocks(gm), "cls-topk@0,2:0.5", x)
    insert_prune_stages(gm, ctx)
    assert respecialize_token_counts(gm, ctx).modified
    code = gm.code
    assert respecialize_token_counts(gm, ctx).modified is False
    assert gm.code == code


def test_slice_end_equal_to_old_count_follows_pruning():
    """`x[:, 1:17]` (patch tokens, explicit end) after a stage must become `x[:, 1:9]`."""
    model = _HeadViT(lambda self, x: self.head(self.norm(x)[:, 1:17].mean(1)))
    x = torch.randn(2, 3, 32, 32)
    wrapped, gm, _, hooks = _trace_and_insert(model, "cls-topk@1:0.5", x)
    assert respecialize_token_counts(gm, PassContext(example_inputs=(x,))).modified
    ends = [n.args[3] for n in gm.graph.nodes if n.target == aten.slice.Tensor and len(n.args) > 3 and n.args[2] == 1]
    assert 9 in ends and 17 not in ends
    ref, _ = run_reference(wrapped, x, hooks)
    torch.testing.assert_close(gm(x), ref, rtol=0, atol=1e-5)


def test_size_it_cannot_rewrite_raises_pass_error():
    """(B, 17, 48) -> (B, 816): the flattened size is no token count, so the pass must say it cannot fit it."""
    model = _HeadViT(lambda self, x: x.reshape(x.shape[0], 17 * 48)[:, :10])
    x = torch.randn(2, 3, 32, 32)
    _, gm, _, _ = _trace_and_insert(model, "cls-topk@1:0.5", x)
    with pytest.raises(PassError, match="no longer fits the shorter token axis"):
        respecialize_token_counts(gm, PassContext(example_inputs=(x,)))


def test_shape_op_reading_the_stage_output_directly_is_rewritten():
    def regroup_channels(self, x):  # a reshape reads the last block's output directly
        b, n, c = x.shape
        x = x.reshape(b, n, 2, c // 2).flip(2).reshape(b, n, c)
        return self.head(self.norm(x)[:, 0])

    x = torch.randn(2, 3, 32, 32)
    wrapped, gm, _, hooks = _trace_and_insert(_HeadViT(regroup_channels), "cls-topk@1:0.5", x)  # after the last block
    respecialize_token_counts(gm, PassContext(example_inputs=(x,)))
    ref, _ = run_reference(wrapped, x, hooks)
    torch.testing.assert_close(gm(x), ref, rtol=0, atol=1e-5)
