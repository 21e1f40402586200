"""adaptive(compact=true): after the stage the exported sequence really shrinks to the largest valid count in the
batch (a data-dependent token axis), and ONNX Runtime still matches the eager reference's per-sample compaction.

End to end per case: identical kept indices and outputs within 1e-4 at batch 1 (where S is exactly p + count) and
batch 3 (S = the largest count; the shorter samples stay masked). The shrink itself is observed, not assumed: the
compaction's output is exposed as an extra ONNX output and its token axis must equal p + the eager count (batch 1)
or p + the largest count (batch 3) on every input, while the graph's I/O shapes stay those of the capped form.
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from method_checks import assert_matches_eager, exported_cases
from tiny_models import build
from tokensieve import api
from tokensieve.errors import ConfigError, ExportError
from tokensieve.graph_passes.blocks import discover_blocks, token_layout
from tokensieve.graph_passes.fx.compact_token_axis import COMPACT, compact_token_axis
from tokensieve.graph_passes.onnx.check_static import check_static, op_census
from tokensieve.graph_passes.pass_manager import PassContext
from tokensieve.graph_passes.pipeline import FX_PASSES, run_fx_passes
from tokensieve.recipe import parse_recipe, resolve_recipe
from tiny_traced import traced_tiny

CASES = {
    "vit-one-stage": ("vit", "adaptive(compact=true)@1:0.75"),
    "vit-capped-then-compact": ("vit", "adaptive@1:0.75+adaptive(compact=true)@2:0.75"),
    "dinov2-sequence": ("dinov2", "adaptive(threshold=1.0,compact=true)@1:12"),          # per-token output padded back
    "registers": ("dinov2_registers", "adaptive@0:0.75+adaptive(compact=true)@2:0.6"),  # [CLS] + 4 registers
}

exported = exported_cases(CASES)


def _compaction_outputs(model: onnx.ModelProto) -> list[str]:
    """The compact_valid Slice output of the tokens (rank 3) - what every later block runs on."""
    names = [n.output[0] for n in model.graph.node if n.op_type == "Slice" and any(
        p.key == "pkg.torch.onnx.fx_node" and "tokensieve.compact_valid" in p.value for p in n.metadata_props)]
    return names


def _session_with(model: onnx.ModelProto, extra: list[str]) -> ort.InferenceSession:
    m = copy.deepcopy(model)
    for name in extra:
        m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_runtime_matches_eager_compaction(exported, batch):
    _, result = exported
    assert_matches_eager(result, num_inputs=10, batch=batch)


@pytest.mark.parametrize("batch", [1, 3])
def test_the_token_axis_really_shrinks_to_the_valid_count(exported, batch):
    case, result = exported
    p = result.layout.num_prefix_tokens
    cap = p + result.stages[-1].keep
    slices = _compaction_outputs(result.debug_onnx)
    assert len(slices) == 2  # tokens and validity
    sess = _session_with(result.debug_onnx, slices)
    gen = torch.Generator().manual_seed(1)
    seen = set()
    for _ in range(8):
        x = torch.randn(batch, *result.input_shape[1:], generator=gen)
        _, kept = result.reference(x)
        counts = (kept[-1] >= 0).sum(-1)
        outs = sess.run(None, {"pixel_values": x.numpy()})
        tokens = next(o for o in outs[-2:] if o.ndim == 3)
        assert tokens.shape[1] == p + int(counts.max()), (case, tokens.shape, counts)
        assert outs[0].shape[1:] == tuple(result.onnx_model.graph.output[0].type.tensor_type.shape.dim[i].dim_value
                                          for i in range(1, outs[0].ndim))  # I/O shapes stay static
        seen.add(tokens.shape[1])
    assert len(seen) > 1 and max(seen) <= cap, (case, seen)  # the length varies with the input, within the cap


def test_only_the_compacted_axis_is_data_dependent(exported):
    _, result = exported
    census = op_census(result.onnx_model)
    assert not {op for op in ("NonZero", "ScatterND", "Loop", "If") if census[op]}
    check_static(result.onnx_model, compacted=True)
    with pytest.raises(ExportError, match="unknown even with batch"):  # without the allowance the check refuses it
        check_static(result.onnx_model)


def test_macs_count_the_cap_and_equal_the_capped_form(exported, monkeypatch):
    case, compact = exported
    if case != "vit-one-stage":
        pytest.skip("one case is enough")
    # the MACs are counted on the traced program, before any ONNX: the capped form's conversion is skipped
    monkeypatch.setattr(api, "to_onnx", lambda *a, **kw: None)
    monkeypatch.setattr(api, "run_onnx_passes", lambda *a, **kw: None)
    capped = api.export(*build("vit"), "adaptive@1:0.75")
    assert compact.macs_pruned == capped.macs_pruned < capped.macs_dense


def test_idempotent():
    """A second run inserts no second compact_valid (it used to) and leaves the graph as it is."""
    _, x, ep = traced_tiny("vit")
    gm = ep.module()
    blocks = discover_blocks(gm)
    layout = token_layout(gm, blocks)
    stages = resolve_recipe(parse_recipe("adaptive(compact=true)@1:0.75"), len(blocks), layout.num_tokens,
                            layout.num_prefix_tokens)
    ctx = PassContext(tuple(blocks), tuple(stages), (x,))
    assert FX_PASSES[-1] is compact_token_axis
    run_fx_passes(gm, ctx, FX_PASSES[:-1])
    assert compact_token_axis(gm, ctx).modified
    code = gm.code
    assert compact_token_axis(gm, ctx).modified is False
    assert gm.code == code
    assert sum(n.target is COMPACT for n in gm.graph.nodes) == 1


@pytest.mark.parametrize("recipe,match", [
    ("adaptive(compact=true)@1:0.75+adaptive@2:0.75", r"compact=true\)@1, which must be the last stage"),
    ("adaptive(compact=true)@1:0.75+cls-topk@2:0.5", "must be the last stage|follows a stateful"),
    ("adaptive(compact=true)@1:1", "compact=true needs a cap of at least 2"),
    ("adaptive(compact=1)@1:0.75", "compact"),
])
def test_bad_compact_recipes_are_one_line(recipe, match):
    with pytest.raises(ConfigError, match=match) as e:
        api.plan(*build("vit"), recipe)
    assert "\n" not in str(e.value)



@pytest.mark.skipif(not __import__("importlib").util.find_spec("tensorrt_rtx"), reason="tensorrt-rtx is not installed")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_standard_form_builds_rtx_sm86_engine(exported, tmp_path, precision):
    """TensorRT-RTX accepts the data-dependent Slice (no plugin): the engine's I/O is the capped form's."""
    case, result = exported
    if case != "dinov2-sequence":
        pytest.skip("one per-token case is enough")
    paths = api.save(result, tmp_path)
    info = api.build(paths["model"], tmp_path / f"model.{precision}.engine", target="rtx-sm86", precision=precision,
                     max_batch=4)
    shapes = {t["name"]: t["shape"] for t in info.metadata["io_tensors"]}
    assert shapes["last_hidden_state"] == [-1, 13, 48]
    assert info.metadata["data_dependent_shapes"] is True  # TrtRunner refuses CUDA graphs on standard TensorRT
    assert info.size_bytes > 0


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 3])
def test_engine_matches_onnxruntime_on_gpu(exported, tmp_path, batch):
    """The standard-form engine (data-dependent Slice) vs ONNX Runtime: max |Δ| <= 1e-3 (fp32, TF32 on)."""
    from gpu_target import engine_target
    from tokensieve.runtime import OrtRunner, TrtRunner

    target = engine_target()
    _, result = exported
    paths = api.save(result, tmp_path)
    info = api.build(paths["model"], tmp_path / "model.engine", target=target, max_batch=4)
    with OrtRunner(paths["model"]) as ref, TrtRunner(info.engine_path) as engine:
        for seed in range(4):
            feeds = ref.make_random_feeds(batch=batch, seed=seed)
            (want,), (got,) = ref.infer(feeds).values(), engine.infer(feeds).values()
            assert got.shape == want.shape
            assert float(np.abs(got - want).max()) <= 1e-3


def test_export_summary_marks_the_compacted_count_as_an_upper_bound(tmp_path):
    from tokensieve.cli import format_report

    report = {"model": "tiny", "recipe_shorthand": "adaptive@1:0.75+adaptive(compact=true)@2:0.75",
              "layout": {"num_tokens": 65}, "macs_dense": 1e9, "macs_pruned": 5e8, "ideal_speedup": 2.0,
              "export_seconds": 1.0,
              "verify": {"passed": True, "num_inputs": 8, "indices_match": [True, True], "max_abs_diff": 1e-7, "atol": 1e-4},
              "stages": [{"after_block": 1, "options": {"compact": False}, "tokens_out": 49},
                         {"after_block": 2, "options": {"compact": True}, "tokens_out": 37}]}
    text = format_report(report, tmp_path)
    assert "65→49→≤37" in text and "at most the cap" in text and "ideal speedup 2.00x (at the cap)" in text
    report["stages"][1]["options"]["compact"] = False
    text = format_report(report, tmp_path)
    assert "65→49→37  (blocks 1, 2 prune)" in text and "(at the cap)" not in text
