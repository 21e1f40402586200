"""lint_for_tensorrt names the nodes TensorRT-RTX rejects; each flagged model is confirmed to fail a real RTX build."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from tokensieve.errors import ConfigError, TargetError  # noqa: E402
from tokensieve.targets.tensorrt.lint import LintIssue, lint_for_tensorrt, raise_on_lint  # noqa: E402

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
F = TensorProto.FLOAT


def _vi(name, shape, dtype=F):
    return helper.make_tensor_value_info(name, dtype, shape)


def _model(nodes, inputs, outputs, inits=(), extra_opsets=()):
    return helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits)),
                             opset_imports=[helper.make_opsetid("", 18), *extra_opsets])


def _k(k):
    return numpy_helper.from_array(np.array([k], np.int64), "k")


def _topk(k, n=8000):
    return _model([helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=-1, largest=1, sorted=0, name="select")],
                  [_vi("x", [1, n])], [_vi("v", [1, k]), _vi("i", [1, k], TensorProto.INT64)], [_k(k)])


def _scatter(op, **attrs):
    idx_shape = [2, 1] if op == "ScatterND" else [2]
    extra = {"axis": 0} if op == "ScatterElements" else {}
    return _model([helper.make_node(op, ["x", "idx", "u"], ["y"], name="acc", **extra, **attrs)],
                  [_vi("x", [4]), _vi("idx", idx_shape, TensorProto.INT64), _vi("u", [2])], [_vi("y", [4])])


BAD = {
    "nonzero": (_model([helper.make_node("NonZero", ["x"], ["y"], name="nz")], [_vi("x", [4])],
                       [_vi("y", [1, None], TensorProto.INT64)]), "nz", "NonZero"),
    "scatternd_add": (_scatter("ScatterND", reduction="add"), "acc", "ScatterND"),
    "scatterelements_add": (_scatter("ScatterElements", reduction="add"), "acc", "ScatterElements"),
    "topk_5000": (_topk(5000), "select", "TopK"),
    "custom_domain": (_model([helper.make_node("Foo", ["x"], ["y"], domain="acme", name="foo")], [_vi("x", [4])],
                             [_vi("y", [4])], extra_opsets=[helper.make_opsetid("acme", 1)]), "foo", "acme::Foo"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_flags_node(case):
    model, node, op = BAD[case]
    issues = lint_for_tensorrt(model)
    assert [(i.node, i.op, i.severity) for i in issues] == [(node, op, "error")]
    assert "\n" not in str(issues[0]) and issues[0].fix


@pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx not installed")
@pytest.mark.parametrize("case", sorted(BAD))
def test_flagged_model_really_fails_rtx_build(case, tmp_path):
    from tokensieve.targets.tensorrt import BuildSpec, build_engine
    path = tmp_path / f"{case}.onnx"
    onnx.save(BAD[case][0], str(path))
    if case == "topk_5000":  # the builder splits a large TopK before parsing (split_large_topk), so it builds
        info = build_engine(path, tmp_path / f"{case}.engine", BuildSpec(target="rtx-sm86"))
        assert info.engine_path.stat().st_size > 0
        return
    with pytest.raises(TargetError) as e:  # the lint refuses it before the parser, with one line naming the node
        build_engine(path, tmp_path / f"{case}.engine", BuildSpec(target="rtx-sm86"))
    assert "\n" not in str(e.value) and BAD[case][1] in str(e.value)
    assert not list(tmp_path.glob("*.engine*"))


def test_clean_models_pass():
    assert lint_for_tensorrt(_topk(3840)) == []
    assert lint_for_tensorrt(_scatter("ScatterElements")) == []
    assert lint_for_tensorrt(_scatter("ScatterND", reduction="none")) == []
    plugin = _model([helper.make_node("TokenCompact", ["x"], ["y"], domain="tokensieve", name="tc")],
                    [_vi("x", [4])], [_vi("y", [4])], extra_opsets=[helper.make_opsetid("tokensieve", 1)])
    assert lint_for_tensorrt(plugin) == []


def test_nonzero_allowed_on_standard_tensorrt():
    assert lint_for_tensorrt(BAD["nonzero"][0], flavor="tensorrt") == []
    with pytest.raises(ConfigError):
        lint_for_tensorrt(BAD["nonzero"][0], flavor="trt")


def test_topk_k_from_constant_node_and_subgraph():
    kc = helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.array([4000], np.int64)))
    body = helper.make_graph([helper.make_node("TopK", ["x", "k"], ["v", "i"], name="inner")], "body",
                             [], [_vi("v", [1, 4000]), _vi("i", [1, 4000], TensorProto.INT64)])
    cond = helper.make_node("If", ["c"], ["v", "i"], then_branch=body, else_branch=body, name="branch")
    model = _model([kc, cond], [_vi("x", [1, 8000]), _vi("c", [], TensorProto.BOOL)],
                   [_vi("v", [1, 4000]), _vi("i", [1, 4000], TensorProto.INT64)])
    issues = lint_for_tensorrt(model)
    assert sorted(i.node for i in issues) == ["branch/else_branch/inner", "branch/then_branch/inner"]


def test_loop_with_dynamic_trip_count_warns():
    body = helper.make_graph([helper.make_node("Identity", ["cond_in"], ["cond_out"])], "body",
                             [_vi("iter", [], TensorProto.INT64), _vi("cond_in", [], TensorProto.BOOL)],
                             [_vi("cond_out", [], TensorProto.BOOL)])
    model = _model([helper.make_node("Loop", ["n", ""], [], body=body, name="loop")],
                   [_vi("n", [], TensorProto.INT64)], [])
    issues = lint_for_tensorrt(model)
    assert [(i.node, i.severity) for i in issues] == [("loop", "warning")]
    raise_on_lint(issues)  # warnings alone do not block
    with pytest.raises(TargetError):
        raise_on_lint(issues, include_warnings=True)


def test_raise_on_lint_one_line_with_count():
    raise_on_lint([])
    issues = lint_for_tensorrt(BAD["topk_5000"][0]) + lint_for_tensorrt(BAD["nonzero"][0])
    with pytest.raises(TargetError) as e:
        raise_on_lint(issues)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("2 node(s)") and "'select'" in msg and "split_large_topk" in msg
    assert isinstance(issues[0], LintIssue)


@pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx not installed")
def test_split_large_topk_makes_it_build(tmp_path: Path):
    import onnx_ir as ir

    from tokensieve.targets.tensorrt.split_large_topk import split_large_topk
    from tokensieve.targets.tensorrt import BuildSpec, build_engine
    fixed = ir.to_proto(split_large_topk(BAD["topk_5000"][0]).model)
    assert lint_for_tensorrt(fixed) == []
    onnx.save(fixed, str(tmp_path / "split.onnx"))
    info = build_engine(tmp_path / "split.onnx", tmp_path / "split.engine", BuildSpec(target="rtx-sm86"))
    assert info.size_bytes > 0


def test_idempotent():
    """The lint's lowering pass edits nothing: a clean model comes back unchanged, run after run; a flagged one
    raises the lint's one-line TargetError itself."""
    import onnx_ir as ir

    from tokensieve.targets.tensorrt.lint import LintForTensorRTPass

    model = ir.from_proto(_topk(3840))
    before = ir.to_proto(model).SerializeToString()
    for _ in range(2):
        assert not LintForTensorRTPass()(model).modified
        assert ir.to_proto(model).SerializeToString() == before
    with pytest.raises(TargetError, match=r"^1 node\(s\) TensorRT will reject; first: node 'select' \(TopK\)"):
        LintForTensorRTPass()(ir.from_proto(_topk(5000)))
