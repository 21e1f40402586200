"""drop_debug_outputs: graph(out, kept_idx.*) -> graph(out), the nodes only the dropped outputs used go too."""
from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from tokensieve.graph_passes.onnx.drop_debug_outputs import drop_debug_outputs
from tokensieve.graph_passes.pass_manager import PassContext


def _debug_model() -> ir.Model:
    """x -> Relu -> out; x -> ArgMax -> Neg -> kept_idx.1 (Neg feeds only the debug output)."""
    nodes = [helper.make_node("Relu", ["x"], ["out"]),
             helper.make_node("ArgMax", ["x"], ["idx"], axis=1),
             helper.make_node("Neg", ["idx"], ["kept_idx.1"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", 4]),
                               helper.make_tensor_value_info("kept_idx.1", TensorProto.INT64, ["B", 1])])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def test_drops_the_kept_idx_outputs_and_their_nodes():
    result = drop_debug_outputs(_debug_model(), PassContext())
    assert result.modified
    assert [v.name for v in result.model.graph.outputs] == ["out"]
    assert _ops(result.model) == ["Relu"]
    onnx.checker.check_model(ir.to_proto(result.model))


def test_idempotent():
    model = drop_debug_outputs(_debug_model(), PassContext()).model
    text = ir.to_proto(model).SerializeToString()
    again = drop_debug_outputs(model, PassContext())
    assert again.modified is False
    assert ir.to_proto(again.model).SerializeToString() == text
