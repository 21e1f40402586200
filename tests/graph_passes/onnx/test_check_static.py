"""check_static_model (check_static as an ONNX pass): refuses data-dependent ops unless a stage asked for them, and
never modifies the model."""
from __future__ import annotations

import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from tokensieve.errors import ExportError
from tokensieve.graph_passes.onnx.check_static import check_static_model
from tokensieve.graph_passes.pass_manager import PassContext, is_check
from tokensieve.recipe import parse_recipe, resolve_recipe


def _model(op: str) -> ir.Model:
    """x (B, 4) -> op -> y; with op=NonZero the output size depends on the data."""
    node = helper.make_node(op, ["x"], ["y"])
    out_type = TensorProto.INT64 if op == "NonZero" else TensorProto.FLOAT
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4])],
                              [helper.make_tensor_value_info("y", out_type, None)])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def _ctx(recipe: str) -> PassContext:
    return PassContext(stages=tuple(resolve_recipe(parse_recipe(recipe), 2, 17, 1)))


def test_idempotent():
    model = _model("Relu")
    text = ir.to_proto(model).SerializeToString()
    assert is_check(check_static_model)
    for _ in range(2):  # idempotent: a check never modifies
        result = check_static_model(model, PassContext())
        assert result.modified is False and result.model is model
    assert ir.to_proto(model).SerializeToString() == text


def test_data_dependent_op_is_refused():
    with pytest.raises(ExportError, match="NonZero"):
        check_static_model(_model("NonZero"), PassContext())


def test_allowed_ops_come_from_the_stages():
    assert _ctx("divprune(loop=true)@0:0.5").allowed_ops == {"Loop"}
    assert _ctx("divprune@0:0.5").allowed_ops == frozenset()
    assert _ctx("adaptive(compact=true)@0:0.75").compacts and not _ctx("adaptive@0:0.75").compacts
