"""hoist_token_gathers: a stage's gather moves up through its block's per-token ops (the MLP runs on K tokens); the
output and the kept positions stay the eager reference's, and ONNX Runtime's tools treat the graph like the dense one."""
from __future__ import annotations

import collections

import onnx
import pytest
import torch

from tiny_models import build
from tiny_traced import run_recipe, traced_tiny
from tokensieve import api
from tokensieve.errors import ConfigError
from tokensieve.flops import count_macs
from tokensieve.graph_passes.fx.hoist_token_gathers import PRUNE_TOPK, SELECT_TOPK, TAKE_TOKENS, hoist_token_gathers
from tokensieve.graph_passes.methods.reference import HookStage, run_reference
from tokensieve.graph_passes.pipeline import FX_PASSES, run_fx_passes
from tokensieve.recipe import parse_recipe

WITHOUT_HOIST = tuple(p for p in FX_PASSES if p is not hoist_token_gathers)


def _passed(name: str, recipe: str, passes=FX_PASSES):
    module, x, ep = traced_tiny(name)
    gm, ctx, blocks, _ = run_recipe(ep, x, recipe, passes)
    hooks = [HookStage(blocks[s.stage.after_block].path, s.stage.method, s.keep, s.num_prefix_tokens,
                       tuple(s.options.items()), placement=s.stage.placement) for s in ctx.stages]
    return gm, ctx, module, x, hooks


def _targets(gm) -> collections.Counter:
    return collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


def _linear_rows(gm, x) -> int:
    """Σ over the linear layers the graph runs of the tokens each one runs on (dead code removed first)."""
    gm.graph.eliminate_dead_code()
    gm.recompile()
    rows = []

    class Rows(torch.fx.Interpreter):
        def call_function(self, target, args, kwargs):
            if target is torch.ops.aten.linear.default and args[0].dim() == 3:
                rows.append(args[0].shape[1])
            return super().call_function(target, args, kwargs)

    with torch.no_grad():
        Rows(gm).run(x)
    return sum(rows)


@pytest.mark.parametrize("name, recipe", [("vit", "cls-topk@1,2:0.5"), ("dinov2_registers", "cls-topk@1:0.5"),
                                          ("siglip_vision", "attn-mean@1:0.5"), ("clip_vision", "cls-topk@0:0.5")])
def test_same_output_and_kept_positions_as_eager_with_the_mlp_on_kept_tokens(name, recipe):
    gm, ctx, module, x, hooks = _passed(name, recipe)
    targets = _targets(gm)
    assert targets[PRUNE_TOPK] == 0 and targets[SELECT_TOPK] == len(ctx.stages)
    with torch.no_grad():
        out, *kept = gm(x)
        ref, ref_kept = run_reference(module, x, hooks)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    for got, want in zip(kept, ref_kept, strict=True):
        assert torch.equal(got, want)
    # Each pruning block's attention projection and MLP (3 linears) now run on the kept tokens.
    plain, *_ = _passed(name, recipe, WITHOUT_HOIST)
    saved = sum(3 * (s.tokens_in - s.tokens_out) for s in ctx.stages)
    assert _linear_rows(plain, x) - _linear_rows(gm, x) == saved


def test_fewer_macs_than_gathering_the_block_output():
    gm, ctx, *_ = _passed("vit", "cls-topk@1:0.5")
    plain, *_ = _passed("vit", "cls-topk@1:0.5", WITHOUT_HOIST)
    x = ctx.example_inputs[0][:1]
    hoisted, gathered = (count_macs(torch.export.export(g, (x,)).graph_module) for g in (gm, plain))
    # tiny ViT: C = 48, MLP 96, N = 17 -> K = 9 + [CLS]: o_proj + fc1 + fc2 = 48·48 + 2·48·96 MACs per token
    assert gathered - hoisted == (17 - 9) * (48 * 48 + 2 * 48 * 96)


@pytest.mark.parametrize("recipe", ["tome@1:0.5+cls-topk@2:0.5", "divprune@0:0.5+cls-topk@2:0.5"])
def test_an_earlier_stage_keeps_its_kept_positions(recipe):
    """Regression: the pass's dead-code removal took an earlier merge / greedy stage's kept positions (read only by
    add_kept_index_outputs, after this pass), so the export had one kept_idx output too few."""
    gm, ctx, module, x, hooks = _passed("vit", recipe)
    with torch.no_grad():
        out, *kept = gm(x)
        ref, ref_kept = run_reference(module, x, hooks)
    assert len(kept) == len(ref_kept) == 2
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    for got, want in zip(kept, ref_kept, strict=True):
        assert torch.equal(got, want)


def test_at_block_out_keeps_the_gather_on_the_block_output():
    """`at=block_out` (recipe) = the placement before this pass: same graph as without it, same outputs as the default."""
    gm, ctx, module, x, hooks = _passed("vit", "cls-topk(at=block_out)@1:0.5+cls-topk@2:0.5")
    targets = _targets(gm)
    assert targets[PRUNE_TOPK] == 1 and targets[SELECT_TOPK] == 1  # only block 2's stage moved
    plain, *_ = _passed("vit", "cls-topk(at=block_out)@1:0.5+cls-topk(at=block_out)@2:0.5")
    assert _targets(plain)[SELECT_TOPK] == 0
    paper, *_ = _passed("vit", "cls-topk@1,2:0.5")
    with torch.no_grad():
        for g in (gm, plain):
            torch.testing.assert_close(g(x)[0], paper(x)[0], rtol=0, atol=1e-5)


def test_at_is_checked_and_round_trips():
    recipe = parse_recipe("cls-topk(at=block_out)@1:0.5+cls-topk(at=paper)@2:0.5")
    assert [s.placement for s in recipe.stages] == ["block_out", "paper"]
    assert "at" not in recipe.stages[0].options()
    assert parse_recipe(recipe.shorthand()) == recipe
    with pytest.raises(ConfigError, match="at='inside' is not a placement"):
        parse_recipe("cls-topk(at=inside)@1:0.5")


def test_idempotent():
    gm, ctx, *_ = _passed("vit", "cls-topk@1,2:0.5")
    code = gm.code
    assert hoist_token_gathers(gm, ctx).modified is False
    assert run_fx_passes(gm, ctx).modified is False
    assert gm.code == code


@pytest.mark.parametrize("recipe", ["ttv@1:0.5", "cls-topk(fuse=true)@1:0.5", "cls-topk(recycle=true)@1:0.5",
                                    "tome@1:0.5"])
def test_stages_that_read_the_block_output_stay_where_they_are(recipe):
    """ttv scores the block output, fuse/recycle reuse the dropped tokens, tome merges them: nothing to move."""
    gm, ctx, module, x, hooks = _passed("vit", recipe)
    assert _targets(gm)[TAKE_TOKENS] == 0
    plain, *_ = _passed("vit", recipe, WITHOUT_HOIST)
    assert gm.code == plain.code


def test_control_without_the_pass_the_mlp_runs_on_every_token():
    plain, *_ = _passed("vit", "cls-topk@1:0.5", WITHOUT_HOIST)
    targets = _targets(plain)
    assert targets[PRUNE_TOPK] == 1 and targets[TAKE_TOKENS] == 0


# --------------------------------------------------------------------------- ONNX Runtime's tools


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, x = build("vit")
    result = api.export(model, x, "cls-topk@1,2:0.5")
    out = tmp_path_factory.mktemp("hoist")
    paths = api.save(result, out)
    return paths, result


def _fused(path, tmp) -> collections.Counter:
    from onnxruntime.transformers import optimizer

    opt = optimizer.optimize_model(str(path), model_type="vit", num_heads=2, hidden_size=48, opt_level=0)
    return collections.Counter(n.op_type for n in opt.model.graph.node)


def test_ort_transformer_optimizer_fuses_the_pruned_model_like_the_dense_one(exported, tmp_path):
    paths, _ = exported
    pruned, dense = _fused(paths["model"], tmp_path), _fused(paths["dense"], tmp_path)
    assert dense["SkipLayerNormalization"] > 0
    for op in ("SkipLayerNormalization", "LayerNormalization", "BiasGelu"):
        assert pruned[op] == dense[op], op


def test_ort_quantization_preprocess_runs_on_the_pruned_model(exported, tmp_path):
    from onnxruntime.quantization.shape_inference import quant_pre_process

    paths, _ = exported
    out = tmp_path / "pre.onnx"
    quant_pre_process(str(paths["model"]), str(out), skip_optimization=False)
    graph = onnx.load(str(out)).graph
    shapes = {v.name: v for v in graph.value_info}
    assert any(n.op_type == "GatherElements" for n in graph.node)
    gathered = [n.output[0] for n in graph.node if n.op_type == "GatherElements"]
    assert all(g in shapes for g in gathered)  # symbolic shape inference went through the gathers
