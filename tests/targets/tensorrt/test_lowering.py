"""tensorrt_lowering: the pass list each spec gets, run once by the builder; the whole list is idempotent."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ir = pytest.importorskip("onnx_ir")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from tokensieve.errors import TargetError  # noqa: E402
from tokensieve.targets.base import BuildSpec, Precision  # noqa: E402
from tokensieve.targets.tensorrt.builder import run_lowering  # noqa: E402
from tokensieve.targets.tensorrt.lowering import tensorrt_lowering  # noqa: E402


def _names(passes) -> list[str]:
    return [type(p).__name__ for p in passes]


def test_list_per_spec(tmp_path):
    lib = tmp_path / "libtokensieve_plugins.so"
    lib.write_bytes(b"")
    assert _names(tensorrt_lowering(BuildSpec(), strongly_typed=True)) == ["CheckQuantizationPass", "SplitLargeTopKPass",
                                                                              "LintForTensorRTPass"]
    fp16 = BuildSpec(precision=Precision.FP16)
    assert _names(tensorrt_lowering(fp16, strongly_typed=True))[-1] == "ConvertToFp16Pass"
    assert _names(tensorrt_lowering(fp16, strongly_typed=False))[-1] == "MarkFp32NodesPass"
    plugins = tensorrt_lowering(BuildSpec(plugin_library=str(lib)), strongly_typed=True)
    assert _names(plugins)[1:3] == ["DiversityToPluginPass", "CompactToPluginPass"]
    assert all(hasattr(p, "substitutions") for p in plugins[1:3])


def _model(k: int, dropped_op: str | None = None) -> ir.Model:
    """x [2, 8000] -> Relu -> TopK(k) (+ a node the lint refuses)."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("TopK", ["r", "k"], ["values", "indices"], axis=-1, largest=1, sorted=1, name="select")]
    if dropped_op:
        nodes.append(helper.make_node(dropped_op, ["values"], ["z"], name="bad", domain="custom.domain"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8000])],
                              [helper.make_tensor_value_info("values", TensorProto.FLOAT, [2, k]),
                               helper.make_tensor_value_info("indices", TensorProto.INT64, [2, k])],
                              initializer=[numpy_helper.from_array(np.array([k], np.int64), "k")])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


@pytest.mark.parametrize("strongly_typed", [True, False])
def test_idempotent(strongly_typed):
    """One run lowers (the K=5000 TopK split, fp16 converted or tagged); a second run of the list changes nothing."""
    model = _model(5000)
    passes = tensorrt_lowering(BuildSpec(precision="fp16"), strongly_typed=strongly_typed)
    assert run_lowering(passes, model)
    once = ir.to_proto(model).SerializeToString()
    assert not run_lowering(tensorrt_lowering(BuildSpec(precision="fp16"), strongly_typed=strongly_typed), model)
    assert ir.to_proto(model).SerializeToString() == once
    ks = [int(ir.convenience.get_const_tensor(n.inputs[1]).numpy().reshape(-1)[0]) for n in model.graph if n.op_type == "TopK"]
    assert ks == [3840, 1160]


def test_lint_error_is_one_line_and_not_wrapped():
    """The lint's TargetError reaches the caller as is (onnx-ir's PassManager would wrap it in its PassError)."""
    with pytest.raises(TargetError) as e:
        run_lowering(tensorrt_lowering(BuildSpec(), strongly_typed=True), _model(10, dropped_op="Foo"))
    assert "\n" not in str(e.value) and "custom.domain::Foo" in str(e.value)
