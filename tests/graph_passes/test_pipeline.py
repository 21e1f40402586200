"""The FX pass list as api.export runs it: it converges, and afterwards every pass in it is a no-op (idempotent on
the final graph, whatever ran after it); the ONNX list turns a debug export into the deployable one."""
from __future__ import annotations

import pytest
import torch

from tiny_traced import traced_tiny
from tokensieve.graph_passes.blocks import discover_blocks, token_layout
from tokensieve.graph_passes.fx.insert_prune_stages import TAG
from tokensieve.graph_passes.onnx.check_static import check_static_model
from tokensieve.graph_passes.pipeline import CANONICALIZE_PASSES, FX_PASSES, ONNX_PASSES, run_fx_passes, run_onnx_passes
from tokensieve.graph_passes.pass_manager import PassContext
from tokensieve.recipe import parse_recipe, resolve_recipe


def _ctx(gm, x, recipe: str) -> PassContext:
    blocks = discover_blocks(gm)
    layout = token_layout(gm, blocks)
    stages = resolve_recipe(parse_recipe(recipe), len(blocks), layout.num_tokens, layout.num_prefix_tokens)
    return PassContext(tuple(blocks), tuple(stages), (x,))


@pytest.mark.parametrize(("name", "recipe"), [
    ("vit", "cls-topk(fuse=true)@1:0.5+adaptive@2:0.75"),   # a model mask removed, reuse, a state, key masks
    ("dinov2", "adaptive(compact=true)@1:12"),               # compact_token_axis, a padded per-token output
    ("clip_vision", "tome(prop_attn=true)@0,2:0.8"),         # ToMe's size state
])
def test_every_pass_is_a_no_op_on_the_final_graph(name, recipe):
    _, x, ep = traced_tiny(name)
    gm = ep.module()
    ctx = _ctx(gm, x, recipe)
    assert run_fx_passes(gm, ctx).modified
    code = gm.code
    for p in FX_PASSES:
        assert p(gm, ctx).modified is False, p.__name__
        assert gm.code == code, p.__name__
    assert run_fx_passes(gm, ctx).modified is False
    stages = {n.meta[TAG]["block"] for n in gm.graph.nodes if TAG in n.meta}
    assert stages == {s.stage.after_block for s in ctx.stages}


def test_canonicalization_is_the_head_of_the_list():
    """api.export canonicalizes first (the dense baseline), then runs the whole list: without stages it is a no-op."""
    assert FX_PASSES[:len(CANONICALIZE_PASSES)] == CANONICALIZE_PASSES
    module, x, ep = traced_tiny("vit")
    gm = ep.module()
    ctx = _ctx(gm, x, "cls-topk@1:0.5")
    assert run_fx_passes(gm, ctx, CANONICALIZE_PASSES).modified  # transformers' all-true mask goes
    assert all(n.kwargs.get("attn_mask") is None and (len(n.args) < 4 or n.args[3] is None)
               for n in gm.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default)
    code = gm.code
    assert run_fx_passes(gm, PassContext(ctx.blocks, (), (x,)), FX_PASSES).modified is False  # no stages: dense
    assert gm.code == code
    with torch.no_grad():
        torch.testing.assert_close(gm(x), module(x), rtol=0, atol=1e-6)


def _proto(debug: bool):
    """x -> Relu -> out (+ x -> ArgMax -> kept_idx.1 when `debug`)."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Relu", ["x"], ["out"])]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", 4])]
    if debug:
        nodes.append(helper.make_node("ArgMax", ["x"], ["kept_idx.1"], axis=1))
        outputs.append(helper.make_tensor_value_info("kept_idx.1", TensorProto.INT64, ["B", 1]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4])], outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_onnx_list_makes_the_deployable_model_and_leaves_its_input_alone():
    debug = _proto(debug=True)
    before = debug.SerializeToString()
    model = run_onnx_passes(debug, PassContext())
    assert [o.name for o in model.graph.output] == ["out"] and [n.op_type for n in model.graph.node] == ["Relu"]
    assert debug.SerializeToString() == before
    dense = _proto(debug=False)
    assert run_onnx_passes(dense, PassContext()) is dense  # nothing to drop: checked, returned as it is
    assert ONNX_PASSES[-1] is check_static_model
