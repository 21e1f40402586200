"""compact_to_plugin: the `adaptive(compact=true)` cut (ReduceSum · ReduceMax [· Max] · two Slices) becomes one
data-dependent TokenCompact node, the rest of the graph stays as it was, the substituted ONNX computes the same
outputs (onnx.reference with a numpy TokenCompact against ONNX Runtime on the standard form), near misses are
declined, and the plugin form builds a TensorRT-RTX sm86 engine without the builder's "kOPT ... Using one(s)"."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from plugin_refs import run_engine, token_compact_reference
from tiny_models import build
from tokensieve import api
from tokensieve.cli import main
from tokensieve.runtime import OrtRunner
from tokensieve.runtime.engine_metadata import metadata_path_for
from tokensieve.targets.tensorrt.compact_to_plugin import OP_TYPE, compact_to_plugin, plugin_substitutions
from tokensieve.runtime.tensorrt_flavors import RTX_COMPUTE_CAPABILITIES, available_flavors, local_compute_capability
from tokensieve.targets.tensorrt.plugin_nodes import PLUGIN_DOMAIN

requires_rtx = pytest.mark.skipif(available_flavors()["tensorrt_rtx"] is None, reason="tensorrt-rtx is not installed")
KOPT = "Was not able to infer kOPT"
# the standard-form nodes one cut has; the substitution swaps them for TokenCompact + Cast + Unsqueeze + Slice(valid)
CUT_OPS = Counter({"Cast": 1, "ReduceSum": 1, "ReduceMax": 1, "Slice": 2})
PLUGIN_OPS = Counter({OP_TYPE: 1, "Cast": 1, "Unsqueeze": 1, "Constant": 1, "Slice": 1})


class TokenCompact(OpRun):
    """The plugin for onnx.reference: test_plugins' numpy mirror of the CUDA kernels (the data-dependent form)."""

    op_domain = PLUGIN_DOMAIN

    def _run(self, x, keep, capacity=None, dynamic=None, opt_count=None, min_count=None, plugin_version=None,
             plugin_namespace=None):
        assert dynamic == 1 and opt_count == capacity
        return token_compact_reference(x, keep, capacity, dynamic=True, min_count=min_count)


# ------------------------------------------------------------------------------------------- a hand-built cut


def _cut_model(n: int = 9, c: int = 4, *, min_tokens: int | None = None, x_axis: int = 1, x_start: int = 0,
               valid_start: int = 0, mask: int = TensorProto.BOOL, noop_with_empty_axes: int = 0,
               tokens: int | str | None = None) -> onnx.ModelProto:
    """t [B,N,C], valid [B,N] -> y = Σ_valid Relu(t) over the cut tokens [B,C], and the cut's shape [3].

    The defaults are exactly exporter/onnx_translations.compact_valid; each keyword makes one near miss.
    """
    tokens = n if tokens is None else tokens
    ints = lambda name, v: helper.make_tensor(name, TensorProto.INT64, [len(v)], v)  # noqa: E731
    inits = [ints("zero", [0]), ints("one", [1]), ints("x_axes", [x_axis]), ints("x_start", [x_start]),
             ints("v_start", [valid_start]), ints("last", [-1])]
    nodes = [helper.make_node("Relu", ["t"], ["x"], name="pre"),
             helper.make_node("Cast", ["valid"], ["valid_i64"], to=TensorProto.INT64, name="cast"),
             helper.make_node("ReduceSum", ["valid_i64", "one"], ["count"], keepdims=0, name="count"),
             helper.make_node("ReduceMax", ["count"], ["s"], keepdims=1, noop_with_empty_axes=noop_with_empty_axes,
                              name="largest")]
    s = "s"
    if min_tokens is not None:
        inits.append(ints("min_tokens", [min_tokens]))
        nodes.append(helper.make_node("Max", ["s", "min_tokens"], ["s_min"], name="at_least"))
        s = "s_min"
    nodes += [helper.make_node("Slice", ["x", "x_start", s, "x_axes"], ["x_c"], name="cut_x"),
              helper.make_node("Slice", ["valid", "v_start", s, "one"], ["valid_c"], name="cut_valid"),
              helper.make_node("Cast", ["valid_c"], ["weight"], to=TensorProto.FLOAT, name="weight"),
              helper.make_node("Unsqueeze", ["weight", "last"], ["weight3"], name="weight3"),
              helper.make_node("Mul", ["x_c", "weight3"], ["masked"], name="masked"),
              helper.make_node("ReduceSum", ["masked", "one"], ["y"], keepdims=0, name="pool"),
              helper.make_node("Shape", ["x_c"], ["cut_shape"], name="cut_shape")]
    graph = helper.make_graph(nodes, "cut", [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["B", tokens, c]),
                                             helper.make_tensor_value_info("valid", mask, ["B", tokens])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", c]),
                               helper.make_tensor_value_info("cut_shape", TensorProto.INT64, [3])], inits)
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def _substituted(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    result = compact_to_plugin(model)
    return ir.to_proto(result.model), result.modified


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def _key(node: onnx.NodeProto) -> tuple:
    return (node.name, node.op_type, tuple(node.input), tuple(node.output),
            tuple(sorted((a.name, str(helper.get_attribute_value(a))) for a in node.attribute)))


def _valid_first(rng, batch: int, n: int, counts=None) -> np.ndarray:
    counts = rng.integers(1, n + 1, batch) if counts is None else counts
    return np.arange(n)[None, :] < np.asarray(counts)[:, None]


@pytest.mark.parametrize("min_tokens", [None, 3])
def test_the_cut_becomes_one_token_compact(min_tokens):
    model = _cut_model(min_tokens=min_tokens)
    sub, modified = _substituted(model)
    assert modified
    replaced = CUT_OPS + (Counter({"Max": 1}) if min_tokens is not None else Counter())
    assert _ops(sub) == _ops(model) - replaced + PLUGIN_OPS
    (node,) = [n for n in sub.graph.node if n.op_type == OP_TYPE]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert node.domain == PLUGIN_DOMAIN and list(node.input) == ["x", "valid"] and node.output[0] == "x_c"
    assert attrs | {"plugin_version": b"1", "plugin_namespace": b"tokensieve"} == attrs
    assert (attrs["capacity"], attrs["dynamic"], attrs["opt_count"], attrs["min_count"]) == (9, 1, 9, min_tokens or 0)
    untouched = {"pre", "weight", "weight3", "masked", "pool", "cut_shape"}
    assert {_key(n) for n in model.graph.node if n.name in untouched} <= {_key(n) for n in sub.graph.node}
    assert [o.name for o in sub.graph.output] == ["y", "cut_shape"]
    onnx.checker.check_model(sub, full_check=True)
    (entry,) = plugin_substitutions(sub)
    assert entry["capacity"] == 9 and entry["tokens"] == "x" and entry["replaced_nodes"] == 5 + (min_tokens is not None)


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 4), n=st.integers(2, 12), min_tokens=st.sampled_from([None, 0, 2, 12]),
       seed=st.integers(0, 2**16))
def test_substituted_cut_computes_the_same_outputs(batch, n, min_tokens, seed):
    """Rows beyond a sample's count differ (invalid tokens vs zeros) but are masked: same y, same cut shape."""
    min_tokens = None if min_tokens is None else min(min_tokens, n)
    model = _cut_model(n=n, min_tokens=min_tokens)
    sub, modified = _substituted(model)
    assert modified
    rng = np.random.default_rng(seed)
    feeds = {"t": rng.standard_normal((batch, n, 4)).astype(np.float32), "valid": _valid_first(rng, batch, n)}
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = ReferenceEvaluator(sub, new_ops=[TokenCompact]).run(None, feeds)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[1], want[1])


def test_idempotent():
    sub, _ = _substituted(_cut_model(min_tokens=2))
    again, modified = _substituted(sub)
    assert not modified and [_key(n) for n in again.graph.node] == [_key(n) for n in sub.graph.node]


@pytest.mark.parametrize("change", [
    {"x_axis": 2},                       # cuts the channel axis
    {"x_start": 1},                      # drops the first token
    {"valid_start": 1},
    {"mask": TensorProto.INT32},         # ReduceSum would count mask values, not kept tokens
    {"noop_with_empty_axes": 1},         # ReduceMax is then an identity
    {"min_tokens": 10},                  # more than the 9 slots
    {"tokens": "N"},                     # no static token axis: no capacity
], ids=lambda c: next(iter(c)))
def test_near_miss_is_declined(change):
    model = _cut_model(**change)
    sub, modified = _substituted(model)
    assert not modified and _ops(sub) == _ops(model)


# ------------------------------------------------------------------------------------------- exported ViTs

RECIPES = {"compact": "adaptive(compact=true)@1:0.75",
           "capped+compact": "adaptive@1:0.75+adaptive(compact=true)@2:0.75"}  # only the last stage may compact


@pytest.fixture(scope="module", params=list(RECIPES))
def exported(request, tmp_path_factory):
    """(ExportResult, saved paths, substituted model.onnx, the pass's `modified`)."""
    result = api.export(*build("vit"), RECIPES[request.param])
    paths = api.save(result, tmp_path_factory.mktemp(request.param.replace("+", "_")), parts=("model",))  # no dense
    sub, modified = _substituted(result.onnx_model)
    return result, paths, sub, modified


def test_one_token_compact_per_compacted_stage(exported):
    result, _, sub, modified = exported
    compacted = [s for s in result.stages if dict(s.stage.params).get("compact")]
    assert modified and len(compacted) == 1  # only the last stage may compact
    subs = plugin_substitutions(sub)
    assert [s["capacity"] for s in subs] == [s.tokens_out for s in compacted]
    assert _ops(sub) == _ops(result.onnx_model) - CUT_OPS + PLUGIN_OPS  # the capped stage and the rest: unchanged
    replaced = {n.name for n in result.onnx_model.graph.node} - {n.name for n in sub.graph.node}
    assert len(replaced) == subs[0]["replaced_nodes"]
    assert not compact_to_plugin(sub).modified


def test_exported_plugin_form_gives_the_same_logits(exported):
    """Batch 3: the samples' valid counts differ, so the plugin's zero rows stand where ORT keeps invalid tokens."""
    result, paths, sub, _ = exported
    evaluator = ReferenceEvaluator(sub, new_ops=[TokenCompact])
    with OrtRunner(paths["model"]) as runner:
        for batch, seed in ((1, 1), (1, 2), (3, 1), (3, 2)):
            feeds = runner.make_random_feeds(batch=batch, seed=seed)
            want = runner.infer(feeds)
            got = dict(zip(want, evaluator.run(None, feeds)))
            np.testing.assert_allclose(got[result.output_name], want[result.output_name], atol=1e-5, rtol=0)


@requires_rtx
def test_plugin_form_builds_rtx_sm86_without_the_kopt_warning(exported, plugin_lib, tmp_path):
    result, paths, *_ = exported
    standard = api.build(paths["model"], tmp_path / "standard.engine", target="rtx-sm86")
    assert any(KOPT in w for w in standard.metadata["build_warnings"])  # what the plugin is for
    info = api.build(paths["model"], tmp_path / "plugin.engine", target="rtx-sm86", plugin_library=plugin_lib)
    assert not any(KOPT in w for w in info.metadata["build_warnings"]), info.metadata["build_warnings"]
    (entry,) = info.metadata["plugin_substitutions"]
    assert entry["op"] == f"{PLUGIN_DOMAIN}::{OP_TYPE}" and entry["form"] == "dynamic"
    io = {t["name"]: t["shape"] for t in info.metadata["io_tensors"]}
    assert io == {"pixel_values": [-1, *result.input_shape[1:]], result.output_name: io[result.output_name]}


@requires_rtx
def test_cli_build_with_plugins_fp16(exported, plugin_lib, tmp_path):
    _, paths, *_ = exported
    engine = tmp_path / "fp16.engine"
    assert main(["build", str(paths["model"]), "-o", str(engine), "--precision", "fp16",
                 "--plugins", str(plugin_lib)]) == 0
    meta = json.loads(metadata_path_for(engine).read_text())
    assert [s["op"] for s in meta["plugin_substitutions"]] == [f"{PLUGIN_DOMAIN}::{OP_TYPE}"]
    assert not any(KOPT in w for w in meta["build_warnings"])


@pytest.mark.gpu
def test_plugin_engine_matches_onnxruntime_on_gpu(exported, plugin_lib, tmp_path):
    cc = local_compute_capability()
    if cc is None:
        pytest.skip("needs an NVIDIA GPU")
    sm = "sm" + cc.replace(".", "")
    flavor = "tensorrt" if available_flavors()["tensorrt"] else "tensorrt_rtx"
    if flavor == "tensorrt_rtx" and sm not in RTX_COMPUTE_CAPABILITIES:
        pytest.skip(f"TensorRT-RTX cannot target {sm} and standard TensorRT is not installed")
    result, paths, *_ = exported
    engine = tmp_path / "plugin.engine"
    target = "local" if flavor == "tensorrt" else f"rtx-{sm}"
    api.build(paths["model"], engine, target=target, plugin_library=plugin_lib)
    with OrtRunner(paths["model"]) as runner:
        for batch in (1, 3):
            feeds = runner.make_random_feeds(batch=batch, seed=batch)
            want = runner.infer(feeds)[result.output_name]
            got = run_engine(engine, flavor, feeds, plugin_lib)[result.output_name]
            np.testing.assert_allclose(got, want, atol=2e-2, rtol=0)  # TF32 matmuls
