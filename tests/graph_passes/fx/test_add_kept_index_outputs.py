"""add_kept_index_outputs: the model output, then each stage's kept positions, as a flat tuple of outputs."""
from __future__ import annotations

import torch

from tiny_traced import traced_tiny
from tokensieve.graph_passes.blocks import discover_blocks, token_layout
from tokensieve.graph_passes.fx.add_kept_index_outputs import add_kept_index_outputs
from tokensieve.graph_passes.fx.insert_prune_stages import insert_prune_stages, kept_index_nodes
from tokensieve.graph_passes.fx.remove_constant_attention_mask import remove_constant_attention_mask
from tokensieve.graph_passes.fx.respecialize_token_counts import respecialize_token_counts
from tokensieve.graph_passes.methods.reference import HookStage, run_reference
from tokensieve.graph_passes.pass_manager import PassContext
from tokensieve.graph_passes.pipeline import run_fx_passes
from tokensieve.recipe import parse_recipe, resolve_recipe


def _staged(recipe: str):
    module, x, ep = traced_tiny("vit")
    gm = ep.module()
    blocks = discover_blocks(gm)
    layout = token_layout(gm, blocks)
    stages = resolve_recipe(parse_recipe(recipe), len(blocks), layout.num_tokens, layout.num_prefix_tokens)
    ctx = PassContext(tuple(blocks), tuple(stages), (x,))
    run_fx_passes(gm, ctx, (remove_constant_attention_mask, insert_prune_stages, respecialize_token_counts))
    hooks = [HookStage(blocks[s.stage.after_block].path, s.stage.method, s.keep, s.num_prefix_tokens) for s in stages]
    return gm, ctx, module, x, hooks


def test_outputs_are_the_model_output_then_kept_positions():
    gm, ctx, module, x, hooks = _staged("cls-topk@1,2:0.5")
    assert add_kept_index_outputs(gm, ctx).modified
    with torch.no_grad():
        out, *kept = gm(x)
    ref, ref_kept = run_reference(module, x, hooks)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert len(kept) == 2
    for got, want in zip(kept, ref_kept, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_idempotent():
    gm, ctx, *_ = _staged("cls-topk@1,2:0.5")
    assert add_kept_index_outputs(gm, ctx).modified
    code = gm.code
    assert add_kept_index_outputs(gm, ctx).modified is False
    assert gm.code == code


def test_no_stage_leaves_outputs_alone():
    _, x, ep = traced_tiny("vit")
    gm = ep.module()
    code = gm.code
    assert not kept_index_nodes(gm)
    assert add_kept_index_outputs(gm, PassContext(example_inputs=(x,))).modified is False
    assert gm.code == code
