"""convert_to_fp16: fp32 -> mixed fp16 ONNX; dtype census on hand-built graphs, checked on ONNX Runtime CPU."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ir = pytest.importorskip("onnx_ir")
ort = pytest.importorskip("onnxruntime")

from tokensieve.targets.tensorrt.convert_to_fp16 import convert_to_fp16, fp32_names  # noqa: E402

FLOAT, HALF = ir.DataType.FLOAT, ir.DataType.FLOAT16
RNG = np.random.default_rng(0)


def _t(a: np.ndarray) -> str:
    """A numpy array as ONNX text tensor data."""
    return "{" + ", ".join(repr(float(v)) if a.dtype.kind == "f" else str(int(v)) for v in a.reshape(-1)) + "}"


W = RNG.standard_normal((4, 4)).astype(np.float32)
GAMMA, BIAS = RNG.uniform(0.5, 1.5, 4).astype(np.float32), RNG.standard_normal(4).astype(np.float32)

# A block with a pruning-style score branch: Tanh/ReduceMax feed only TopK (score), LayerNorm/Softmax by op type;
# a float32-min fill (a mask constant), a bool->float Cast, and `bias` read by both fp32 (LN) and fp16 (Add) nodes.
STAGE = f"""
<ir_version: 10, opset_import: ["" : 18]>
stage (float[2,8,4] x) => (float[2,8,4] y, int64[2,3] idx)
    <float[4,4] w = {_t(W)}, float[4] gamma = {_t(GAMMA)}, float[4] bias = {_t(BIAS)}, int64[1] k = {{3}},
     int64[1] last = {{-1}}, float[1] zero = {{0.0}}> {{
    h = MatMul(x, w)
    n = LayerNormalization<axis=-1>(h, gamma, bias)
    a = Softmax<axis=-1>(n)
    m = Mul(a, h)
    pos = Greater(h, zero)
    mask = Cast<to=1>(pos)
    gated = Mul(m, mask)
    fill = Constant<value = float[1] {{-3.4e38}}>()
    floor = Max(gated, fill)
    y = Add(floor, bias)
    t = Tanh(h)
    s = ReduceMax<keepdims=0>(t, last)
    v, idx = TopK(s, k)
}}
"""

# A ReduceMean-based norm; inputs ~1000 make the variance (~1e6) overflow fp16's 65504.
NORM = f"""
<ir_version: 10, opset_import: ["" : 18]>
norm (float[2,8] x) => (float[2,8] y)
    <float[8,8] w = {_t(np.eye(8, dtype=np.float32))}, float[1] eps = {{1e-5}}, float[1] two = {{2.0}},
     int64[1] last = {{-1}}> {{
    h = MatMul(x, w)
    mu = ReduceMean(h, last)
    d = Sub(h, mu)
    sq = Pow(d, two)
    var = ReduceMean(sq, last)
    ve = Add(var, eps)
    sd = Sqrt(ve)
    y = Div(d, sd)
}}
"""


def _model(text: str) -> onnx.ModelProto:
    return ir.to_proto(ir.from_onnx_text(text))


def _convert(proto: onnx.ModelProto) -> ir.Model:
    result = convert_to_fp16(proto)
    assert result.modified
    onnx.checker.check_model(ir.to_proto(result.model), full_check=True)
    return result.model


def _out_dtypes(model: ir.Model) -> dict[str, list]:
    """op type (first original node of that type) -> output dtypes, ignoring the Casts the pass added."""
    census: dict[str, list] = {}
    for node in model.graph:
        if node.metadata_props.get("tokensieve.pass") != "convert_to_fp16":
            census.setdefault(node.op_type, [o.dtype for o in node.outputs])
    return census


def _added_casts(model: ir.Model) -> list[tuple[str, int]]:
    return sorted((n.inputs[0].name, n.attributes["to"].as_int()) for n in model.graph
                  if n.metadata_props.get("tokensieve.pass") == "convert_to_fp16")


def _run(model: onnx.ModelProto | ir.Model, feeds: dict) -> list[np.ndarray]:
    proto = model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_stage_census():
    model = _convert(_model(STAGE))
    census = _out_dtypes(model)
    assert census["MatMul"] == [HALF] and census["Mul"] == [HALF] and census["Max"] == [HALF]
    assert census["Add"] == [HALF]
    assert census["LayerNormalization"] == [FLOAT] and census["Softmax"] == [FLOAT]  # by op type
    assert census["Tanh"] == [FLOAT] and census["ReduceMax"] == [FLOAT]  # score: they feed only TopK's data input
    assert census["TopK"] == [FLOAT, ir.DataType.INT64] and census["Greater"] == [ir.DataType.BOOL]
    mask = next(n for n in model.graph if n.op_type == "Cast" and n.inputs[0].name == "pos")
    assert mask.attributes["to"].as_int() == HALF and mask.outputs[0].dtype == HALF
    inits = model.graph.initializers
    assert inits["w"].dtype == HALF and inits["gamma"].dtype == FLOAT and inits["bias"].dtype == FLOAT
    assert inits["k"].dtype == ir.DataType.INT64
    fill = next(n for n in model.graph if n.op_type == "Constant")
    assert fill.outputs[0].dtype == HALF
    assert fill.attributes["value"].as_tensor().numpy().tolist() == [-65504.0]  # clipped, not -inf
    # one Cast per (value, dtype): x and bias down for fp16 nodes, h up for LN/Greater/Tanh, a down, y back up
    assert _added_casts(model) == sorted([("x", HALF), ("bias", HALF), ("h", FLOAT), ("a", HALF), ("y.fp16", FLOAT)])
    assert [(v.name, v.dtype) for v in model.graph.inputs] == [("x", FLOAT)]
    assert [(v.name, v.dtype) for v in model.graph.outputs] == [("y", FLOAT), ("idx", ir.DataType.INT64)]


def test_stage_matches_fp32_on_onnxruntime():
    proto = _model(STAGE)
    half = _convert(proto)
    for seed in range(4):
        x = np.random.default_rng(seed).standard_normal((2, 8, 4)).astype(np.float32)
        (y32, i32), (y16, i16) = _run(proto, {"x": x}), _run(half, {"x": x})
        assert y16.dtype == np.float32
        np.testing.assert_allclose(y16, y32, rtol=1e-2, atol=1e-2)
        np.testing.assert_array_equal(i16, i32)


def test_reducemean_norm_survives_fp16_overflow():
    proto = _model(NORM)
    half = _convert(proto)
    census = _out_dtypes(half)
    assert census["MatMul"] == [HALF] and census["Sub"] == [HALF] and census["Div"] == [HALF]
    # the variance path stays fp32 end to end: ReduceMean/Pow by op type, Add(var, eps) and Sqrt follow them
    assert census["ReduceMean"] == census["Pow"] == census["Add"] == census["Sqrt"] == [FLOAT]
    assert half.graph.initializers["eps"].dtype == FLOAT and half.graph.initializers["w"].dtype == HALF
    x = (1000 * np.random.default_rng(1).standard_normal((2, 8))).astype(np.float32)
    (want,), (got,) = _run(proto, {"x": x}), _run(half, {"x": x})
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=5e-3)


def test_unknown_op_stays_fp32():
    model = _convert(_model("""
        <ir_version: 10, opset_import: ["" : 18, "tokensieve" : 1]>
        g (float[2,4] x) => (float[2,4] y) <float[2,4] b = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0}> {
            h = Add(x, b)
            y = tokensieve.TokenCompact(h)
        }"""))
    assert _out_dtypes(model) == {"Add": [HALF], "TokenCompact": [FLOAT]}
    assert _added_casts(model) == sorted([("x", HALF), ("h", FLOAT)])


def test_score_read_inside_a_loop_body_stays_fp32():
    """`s` is read only by the Loop's body, whose result feeds TopK: the body's reads count as the Loop's."""
    model = _convert(_model("""
        <ir_version: 10, opset_import: ["" : 18]>
        g (float[4,4] x) => (float[4,4] y, int64[2] idx)
            <int64 trip = {2}, bool go = {1}, int64[1] k = {2}, float[4] zeros = {0.0, 0.0, 0.0, 0.0},
             int64[1] rows = {0}> {
            s = MatMul(x, x)
            y = Relu(x)
            state = Loop(trip, go, zeros) <body = step (int64 i, bool c, float[4] st) => (bool c2, float[4] st2) {
                c2 = Identity(c)
                m = ReduceMax<keepdims=0>(s, rows)
                st2 = Add(st, m)
            }>
            v, idx = TopK(state, k)
        }"""))
    census = _out_dtypes(model)
    assert census["MatMul"] == census["Loop"] == [FLOAT] and census["Relu"] == [HALF]
    assert _added_casts(model) == sorted([("x", HALF), ("y.fp16", FLOAT)])


def test_fp32_names():
    model = ir.from_onnx_text(STAGE)
    for node in model.graph:
        node.name = f"node_{node.outputs[0].name}"
    nodes, values = fp32_names(model)
    assert nodes == {"node_n", "node_a", "node_t", "node_s", "node_v", "node_pos"}  # LN Softmax Tanh ReduceMax TopK >
    assert values == {"n", "a", "t", "s", "v"}


@pytest.mark.parametrize("text", [STAGE, NORM])
def test_idempotent(text):
    once = ir.to_proto(_convert(_model(text)))
    again = convert_to_fp16(once)
    assert not again.modified
    assert ir.to_proto(again.model).SerializeToString() == once.SerializeToString()


@pytest.mark.parametrize("text", [STAGE, NORM])
def test_mark_fp32_nodes_tags_what_fp32_names_names_and_is_idempotent(text):
    """The weakly typed fp16 lowering: the same fp32 nodes tagged for the builder, the graph otherwise unchanged."""
    from tokensieve.targets.base import PIN_FP32_TAG
    from tokensieve.targets.tensorrt.builder import pinned_fp32_names
    from tokensieve.targets.tensorrt.convert_to_fp16 import MarkFp32NodesPass

    model = _named(text)
    ops_before = [n.op_type for n in model.graph]
    assert MarkFp32NodesPass()(model).modified
    tagged = ir.to_proto(model).SerializeToString()
    assert not MarkFp32NodesPass()(model).modified and ir.to_proto(model).SerializeToString() == tagged
    assert [n.op_type for n in model.graph] == ops_before  # no Cast: only shape inference's types and the tags
    assert all(v.dtype != HALF for n in model.graph for v in n.outputs)
    assert any(n.metadata_props.get(PIN_FP32_TAG) == "fp32" for n in model.graph)
    assert pinned_fp32_names(model) == fp32_names(_named(text))


def _named(text: str) -> ir.Model:
    model = ir.from_onnx_text(text)
    for node in model.graph:
        node.name = f"node_{node.outputs[0].name}"
    return model
