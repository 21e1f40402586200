"""diversity_to_plugin: DivPrune / MMR greedy selections (unrolled and Loop forms) become one DiversitySelect node per
stage, the rest of the graph stays as it was, and the substituted ONNX computes the same kept indices (onnx.reference
with the method's own math standing in for the plugin) and builds a TensorRT-RTX sm86 engine without a GPU."""
from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from plugin_refs import diversity_select_reference
from tiny_models import build
from gpu_target import engine_target
from tokensieve import api
from tokensieve.cli import main
from tokensieve.errors import ConfigError
from tokensieve.graph_passes.methods.diversity import cosine_similarity, divprune_first, greedy_select
from tokensieve.runtime import OrtRunner
from tokensieve.targets.tensorrt import BuildSpec, plugins
from tokensieve.targets.tensorrt.diversity_to_plugin import OP_TYPE, diversity_to_plugin, plugin_substitutions
from tokensieve.runtime.tensorrt_flavors import available_flavors
from tokensieve.targets.tensorrt.plugin_nodes import PLUGIN_DOMAIN

# case -> (tiny model, recipe): both methods in both export forms, MMR with λ = 0.3 so that λ and 1 - λ differ;
# SigLIP has no prefix token (no `+ p` after the selection)
CASES = {
    "unrolled": ("vit", "divprune@1:0.5+mmr(lam=0.3)@2:0.5"),
    "loop": ("vit", "divprune(loop=true)@1:0.5+mmr(loop=true)@2:0.5"),
    "no-prefix": ("siglip_vision", "divprune@2:0.4"),
}
SELECTION_OPS = {"ArgMin", "ArgMax", "Loop", "TopK"}  # in these models they occur only in the greedy selections
requires_rtx = pytest.mark.skipif(available_flavors()["tensorrt_rtx"] is None, reason="tensorrt-rtx is not installed")

@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(name, ExportResult, saved paths, substituted debug ONNX, pass result)."""
    model_name, recipe = CASES[request.param]
    result = api.export(*build(model_name), recipe)
    paths = api.save(result, tmp_path_factory.mktemp(request.param), parts=("model", "debug"))  # no dense.onnx
    substituted = diversity_to_plugin(result.debug_onnx)
    return request.param, result, paths, ir.to_proto(substituted.model), substituted


def _plugin_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == PLUGIN_DOMAIN and n.op_type == OP_TYPE]


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _key(node: onnx.NodeProto) -> tuple:
    return (node.name, node.op_type, node.domain, tuple(node.input), tuple(node.output),
            tuple(sorted((a.name, str(onnx.helper.get_attribute_value(a))) for a in node.attribute)))


def _ancestors(model: onnx.ModelProto, values: set[str], stop: frozenset = frozenset()) -> set[tuple]:
    """Keys of the nodes `values` depend on (not looking past the values in `stop`)."""
    producer = {out: n for n in model.graph.node for out in n.output}
    seen, todo = set(), [v for v in values if v not in stop]
    while todo:
        node = producer.get(todo.pop())
        if node is None or _key(node) in seen:
            continue
        seen.add(_key(node))
        todo += [v for v in node.input if v and v not in stop]
    return seen


# ------------------------------------------------------------------------------------------- structure


def test_one_plugin_node_per_stage_with_the_stage_parameters(case):
    name, result, _, sub, res = case
    nodes = _plugin_nodes(sub)
    assert res.modified and len(nodes) == len(result.stages)
    assert not SELECTION_OPS & {n.op_type for n in sub.graph.node}
    assert {o.domain: o.version for o in sub.opset_import}[PLUGIN_DOMAIN] == 1
    consumers = {v: [n for n in sub.graph.node if v in n.input] for n in nodes for v in n.output}
    for node, stage in zip(nodes, result.stages):
        a, method = _attrs(node), stage.stage.method
        assert (a["plugin_version"], a["plugin_namespace"]) == (b"1", b"tokensieve")
        assert a["k"] == stage.keep and a["mode"] == (0 if method == "divprune" else 1)
        (cast,) = consumers[node.output[0]]
        assert cast.op_type == "Cast" and _attrs(cast)["to"] == onnx.TensorProto.INT64
        if method == "divprune":  # reads the full tokens, skips the prefix itself: no Add after the Cast
            assert a["num_prefix_tokens"] == result.layout.num_prefix_tokens and len(node.input) == 1
        else:  # reads the patch tokens and their normalized importance; the exporter's `+ p` stays
            assert a["num_prefix_tokens"] == 0 and len(node.input) == 2
            assert a["lambda"] == pytest.approx(stage.options["lam"], abs=1e-7)
    assert [s["k"] for s in plugin_substitutions(sub)] == [s.keep for s in result.stages]
    assert {s["form"] for s in plugin_substitutions(sub)} == {"loop" if name == "loop" else "unrolled"}


def test_rest_of_the_graph_is_unchanged_and_nothing_is_left_dead(case):
    _, result, _, sub, _ = case
    std = result.debug_onnx
    nodes = _plugin_nodes(sub)
    new_values = {o for n in nodes for o in n.output}
    casts = [n for n in sub.graph.node if set(n.input) & new_values]
    new = {_key(n) for n in nodes + casts}
    kept = {_key(n) for n in sub.graph.node} - new
    assert kept <= {_key(n) for n in std.graph.node}  # every other node is an original node, untouched
    # ... and exactly the original nodes still needed: those the outputs and the plugin inputs depend on
    needed = {o.name for o in sub.graph.output} | {v for n in sub.graph.node for v in n.input}
    stop = frozenset(o for n in casts for o in n.output)  # produced by the Casts now
    assert kept == _ancestors(std, needed - stop, stop)
    assert kept | new == _ancestors(sub, {o.name for o in sub.graph.output})  # no dead nodes
    removed = Counter(n.op_type for n in std.graph.node if _key(n) not in kept)
    assert removed["TopK"] == len(result.stages) and removed.keys() <= {
        "ReduceL2", "Clip", "Div", "Transpose", "MatMul", "Add", "Mul", "Slice", "Where", "ReduceMax", "Unsqueeze",
        "ArgMin", "ArgMax", "Expand", "GatherElements", "Equal", "Max", "Sub", "Concat", "Squeeze", "TopK", "Loop",
        "Shape"}
    assert [(o.name, o.type) for o in sub.graph.output] == [(o.name, o.type) for o in std.graph.output]
    onnx.checker.check_model(sub)


def test_idempotent(case):
    *_, sub, _ = case
    again = diversity_to_plugin(sub)
    assert not again.modified
    assert [_key(n) for n in ir.to_proto(again.model).graph.node] == [_key(n) for n in sub.graph.node]


_DENSE = {}  # tiny model -> its dense ONNX: converted once (the "unrolled" and "loop" cases share the ViT)


def test_graph_without_a_diversity_selection_is_left_alone(case):
    name, result, *_ = case
    model_name = CASES[name][0]
    if model_name not in _DENSE:
        _DENSE[model_name] = result.dense_onnx
    assert not diversity_to_plugin(_DENSE[model_name]).modified


def _mutated(model: onnx.ModelProto, op_type: str, edit) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    edit(next(n for n in m.graph.node if n.op_type == op_type), m)
    return m


def _substituted_stages(model: onnx.ModelProto) -> int:
    return len(_plugin_nodes(ir.to_proto(diversity_to_plugin(model).model)))


def test_a_chain_that_is_not_the_greedy_selection_is_declined(case):
    """One edit in the first stage's selection: that stage keeps its standard form, the others are substituted."""
    name, result, *_ = case
    std, others = result.debug_onnx, len(result.stages) - 1
    if name == "loop":  # the Loop body's state update takes a min instead of a max
        def edit(loop, m):
            next(n for n in loop.attribute[0].g.node if n.op_type == "Max").op_type = "Min"
        assert _substituted_stages(_mutated(std, "Loop", edit)) == others
    else:
        assert _substituted_stages(_mutated(std, "Max", lambda n, m: setattr(n, "op_type", "Min"))) == others

    def descending(topk, m):  # the picks sorted descending instead of ascending
        del topk.attribute[:]
        topk.attribute.extend([onnx.helper.make_attribute("largest", 1), onnx.helper.make_attribute("sorted", 1)])
    assert _substituted_stages(_mutated(std, "TopK", descending)) == others


def test_mmr_weight_that_does_not_match_the_similarity_scale_is_declined(case):
    name, result, *_ = case
    if "mmr" not in CASES[name][1]:
        pytest.skip("no MMR stage")

    def edit(argmax, m):  # gain = importance * λ: give the gain Mul a different λ than S's (1 - λ)
        producer = {o: n for n in m.graph.node for o in n.output}
        importance = producer[argmax.input[0]].input[0]  # the first pick: argmax(Unsqueeze(importance))
        mul = next(n for n in m.graph.node if n.op_type == "Mul" and importance in n.input)
        m.graph.initializer.append(onnx.numpy_helper.from_array(np.array(0.1, np.float32), "other_lambda"))
        mul.input[1] = "other_lambda"
    assert _substituted_stages(_mutated(result.debug_onnx, "ArgMax", edit)) == len(result.stages) - 1


# ------------------------------------------------------------------------------------------- numerics (CPU)


def standard_selection(x: np.ndarray, k: int, mode: int, lam: float, num_prefix_tokens: int,
                       importance: np.ndarray | None = None) -> np.ndarray:
    """DiversitySelect's contract computed with the standard form's own functions (graph_passes/methods/diversity)."""
    p = num_prefix_tokens
    sim = cosine_similarity(torch.from_numpy(x[:, p:]))
    if mode == 0:
        picks = greedy_select(sim, divprune_first(sim), k)
    else:
        gain = torch.from_numpy(importance[:, p:]) * lam
        picks = greedy_select(sim * (1.0 - lam), torch.zeros_like(gain), k, gain=gain)
    return (np.sort(picks.numpy(), axis=-1) + p).astype(np.int32)


class DiversitySelect(OpRun):  # onnx.reference matches ops by class name
    """DiversitySelect for onnx.reference, computing what the plugin must compute."""

    op_domain = PLUGIN_DOMAIN

    def _run(self, features, importance=None, **_):
        return (standard_selection(features, self.k, self.mode, getattr(self, "lambda"), self.num_prefix_tokens,
                                   importance),)


def test_substituted_graph_keeps_the_same_tokens(case):
    """Index conventions (prefix, Cast, the kept `+ p`, importance, λ): the same kept indices and outputs as ORT."""
    _, result, paths, sub, _ = case
    evaluator = ReferenceEvaluator(sub, new_ops=[DiversitySelect])
    with OrtRunner(paths["debug"]) as ort_runner:
        for seed in (1, 2):
            feeds = ort_runner.make_random_feeds(batch=3, seed=seed)
            want = ort_runner.infer(feeds)
            got = dict(zip(want, evaluator.run(None, feeds)))
            for name, value in want.items():
                if name.startswith("kept_idx."):
                    assert got[name].dtype == value.dtype and np.array_equal(got[name], value), name
                else:
                    np.testing.assert_allclose(got[name], value, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", [0, 1])
def test_kernel_reference_agrees_with_the_standard_form(mode):
    """The numpy mirror of the CUDA kernel (test_plugins) against what the substitution assumes the plugin computes."""
    rng = np.random.default_rng(mode)
    x = rng.standard_normal((4, 17, 8)).astype(np.float32)
    importance = rng.random((4, 17)).astype(np.float32)
    np.testing.assert_array_equal(diversity_select_reference(x, 6, mode, 0.6, 1, importance),
                                  standard_selection(x, 6, mode, 0.6, 1, importance))


# ------------------------------------------------------------------------------------------- engines


@requires_rtx
def test_substituted_onnx_builds_rtx_sm86_engine(case, plugin_lib, tmp_path):
    name, result, paths, *_ = case
    info = api.build(paths["model"], tmp_path / "model.engine", target="rtx-sm86", plugin_library=plugin_lib)
    subs = info.metadata["plugin_substitutions"]
    assert [(s["method"], s["k"]) for s in subs] == [(s.stage.method, s.keep) for s in result.stages]
    assert all(s["replaced_nodes"] > 0 and s["node"] for s in subs)
    assert info.metadata["plugins"][0]["file"] == plugin_lib.name
    io = {t["name"]: t["shape"] for t in info.metadata["io_tensors"]}
    assert io == {"pixel_values": [-1, *result.input_shape[1:]], result.output_name: io[result.output_name]}


@requires_rtx
def test_without_plugin_library_the_standard_form_is_built(case, tmp_path):
    name, _, paths, *_ = case
    if name != "unrolled":
        pytest.skip("one standard-form build is enough")
    info = api.build(paths["model"], tmp_path / "model.engine", target="rtx-sm86")
    assert info.metadata["plugin_substitutions"] == [] and info.metadata["plugins"] == []  # schema 2: always written


def test_missing_plugin_library_is_one_line_naming_the_flag(tmp_path, capsys):
    missing = tmp_path / "libtokensieve_plugins.so"
    with pytest.raises(ConfigError) as e:
        BuildSpec(plugin_library=str(missing))
    msg = str(e.value)
    assert "\n" not in msg and "--plugins" in msg and plugins.PLUGIN_LIB_ENV in msg and str(missing) in msg
    out = tmp_path / "out"
    assert main(["export", "--model", "tiny", "--prune", "divprune@1:0.5", "-o", str(out), "--plugins", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tokensieve export: error: --plugins") and "\n" not in err and plugins.PLUGIN_LIB_ENV in err
    assert not out.exists()  # refused before exporting anything
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(b"")
    assert main(["build", str(onnx_path), "--plugins", str(missing)]) == 2
    assert "--plugins" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_plugin_engine_keeps_the_tokens_onnxruntime_keeps(case, plugin_lib, tmp_path):
    """The substituted engine's kept indices against ONNX Runtime on the standard form (debug ONNX: kept_idx outputs)."""
    from tokensieve.runtime import TrtRunner

    _, result, paths, *_ = case
    method = {f"kept_idx.{s.stage.after_block}": s.stage.method for s in result.stages}
    debug = tmp_path / "model.debug.onnx"
    shutil.copy(paths["debug"], debug)
    engine = tmp_path / "model.debug.engine"
    api.build(debug, engine, target=engine_target(), max_batch=4, plugin_library=plugin_lib)
    differ = []
    with OrtRunner(paths["debug"]) as ort_runner, TrtRunner(engine, plugins=plugin_lib) as trt_runner:
        for batch in (1, 4):
            feeds = ort_runner.make_random_feeds(batch=batch, seed=batch)
            want, got = ort_runner.infer(feeds), trt_runner.infer(feeds)
            differ += [out for out in method if not np.array_equal(got[out].astype(np.int64), want[out])]
    assert not differ
