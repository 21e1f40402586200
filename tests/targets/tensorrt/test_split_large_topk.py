"""split_large_topk: TopK(K > max_k) -> exact rounds of TopK(<= max_k); checked against ONNX Runtime."""
from __future__ import annotations

import logging

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ir = pytest.importorskip("onnx_ir")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from tokensieve.targets.tensorrt.split_large_topk import SplitLargeTopKPass, split_large_topk  # noqa: E402

_NP = {TensorProto.FLOAT: np.float32, TensorProto.INT64: np.int64}


def _topk_model(shape, k, *, axis=-1, largest=1, sorted_=0, dtype=TensorProto.FLOAT, const_k=True):
    out_shape = list(shape)
    out_shape[axis] = k
    inputs = [helper.make_tensor_value_info("x", dtype, list(shape))]
    inits = []
    if const_k:
        inits.append(numpy_helper.from_array(np.array([k], np.int64), "k"))
    else:
        inputs.append(helper.make_tensor_value_info("k", TensorProto.INT64, [1]))
    node = helper.make_node("TopK", ["x", "k"], ["values", "indices"], axis=axis, largest=largest, sorted=sorted_,
                            name="select")
    outputs = [helper.make_tensor_value_info("values", dtype, out_shape),
               helper.make_tensor_value_info("indices", TensorProto.INT64, out_shape)]
    return helper.make_model(helper.make_graph([node], "g", inputs, outputs, initializer=inits),
                             opset_imports=[helper.make_opsetid("", 18)])


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["values", "indices"], feeds)


def _split(model: onnx.ModelProto, max_k: int) -> onnx.ModelProto:
    result = split_large_topk(model, max_k=max_k)
    assert result.modified
    out = ir.to_proto(result.model)
    onnx.checker.check_model(out)
    ks = [int(numpy_helper.to_array(t).reshape(-1)[0]) for t in _k_tensors(out)]
    assert ks and max(ks) <= max_k
    return out


def _k_tensors(model: onnx.ModelProto):
    consts = {i.name: i for i in model.graph.initializer}
    consts |= {n.output[0]: n.attribute[0].t for n in model.graph.node if n.op_type == "Constant"}
    return [consts[n.input[1]] for n in model.graph.node if n.op_type == "TopK"]


def _assert_same(before, after, sorted_: int, axis: int = -1):
    (v0, i0), (v1, i1) = before, after
    assert v0.shape == v1.shape and i0.shape == i1.shape
    if not sorted_:  # order unspecified: compare as sets (sorted by index), values follow their indices
        o0, o1 = np.argsort(i0, axis=axis), np.argsort(i1, axis=axis)
        v0, i0 = np.take_along_axis(v0, o0, axis), np.take_along_axis(i0, o0, axis)
        v1, i1 = np.take_along_axis(v1, o1, axis), np.take_along_axis(i1, o1, axis)
    np.testing.assert_array_equal(i1, i0)
    np.testing.assert_array_equal(v1, v0)


@pytest.mark.parametrize("largest,sorted_", [(1, 0), (1, 1), (0, 1)])
def test_large_k_matches_onnxruntime(largest, sorted_):
    model = _topk_model((2, 8000), 5000, largest=largest, sorted_=sorted_)
    split = _split(model, 3840)
    rng = np.random.default_rng(0)
    for _ in range(2):
        x = rng.standard_normal((2, 8000)).astype(np.float32)
        _assert_same(_run(model, {"x": x}), _run(split, {"x": x}), sorted_)


@pytest.mark.parametrize("axis", [-1, 1, 0])
@pytest.mark.parametrize("largest,sorted_", [(1, 0), (1, 1), (0, 1)])
def test_tiny_max_k_with_ties(axis, largest, sorted_):
    shape = (3, 11, 2)
    model = _topk_model(shape, 10 if axis == 1 else 3 if axis == 0 else 2, axis=axis, largest=largest,
                        sorted_=sorted_)
    max_k = 4 if axis == 1 else 1
    split = _split(model, max_k)
    rng = np.random.default_rng(1)
    for _ in range(5):
        x = rng.integers(-3, 3, size=shape).astype(np.float32)  # many ties: lowest index first
        _assert_same(_run(model, {"x": x}), _run(split, {"x": x}), sorted_, axis=axis)


def test_int64_ascending_sort():
    model = _topk_model((2, 12), 12, largest=0, sorted_=1, dtype=TensorProto.INT64)
    split = _split(model, 4)
    x = np.stack([np.random.default_rng(s).permutation(100)[:12] for s in range(2)]).astype(np.int64)
    _assert_same(_run(model, {"x": x}), _run(split, {"x": x}), 1)


def test_graph_output_names_kept():
    split = _split(_topk_model((1, 16), 9), 4)
    assert [o.name for o in split.graph.output] == ["values", "indices"]


def test_idempotent():
    model = ir.from_proto(_topk_model((1, 16), 9))
    assert split_large_topk(model, max_k=4).modified
    again = split_large_topk(model, max_k=4)
    assert not again.modified
    assert sum(n.op_type == "TopK" for n in model.graph) == 3


def test_small_k_untouched():
    assert not split_large_topk(_topk_model((1, 16), 4), max_k=4).modified


def test_non_constant_k_is_reported_not_raised(caplog):
    p = SplitLargeTopKPass(max_k=4)
    with caplog.at_level(logging.WARNING):
        result = p(ir.from_proto(_topk_model((1, 16), 9, const_k=False)))
    assert not result.modified
    assert len(p.skipped) == 1 and "not a constant" in p.skipped[0] and "'select'" in p.skipped[0]
    assert "not a constant" in caplog.text


def test_dtype_taken_from_values_output_when_input_untyped():
    model = _topk_model((1, 16), 9)
    node = model.graph.node[0]
    node.input[0] = "s"
    model.graph.node.insert(0, helper.make_node("Neg", ["x"], ["s"]))  # "s" has no value_info
    split = _split(model, 4)
    x = np.random.default_rng(3).standard_normal((1, 16)).astype(np.float32)
    _assert_same(_run(model, {"x": x}), _run(split, {"x": x}), 0)
