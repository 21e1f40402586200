"""api.export + api.verify end to end on the tiny model zoo: ONNX Runtime must match the eager reference.

Each model is exported once (module-scoped fixture, ~5 s each: two torch.export traces, two ONNX conversions).
"""
from __future__ import annotations

import json

import pytest

from tiny_models import TINY_MODEL_INFO, build
from tokensieve import api
from tokensieve.errors import ConfigError
from tokensieve.graph_passes.onnx.check_static import FORBIDDEN_OPS, check_static, op_census

RECIPE = "cls-topk@1,2:0.5"
CLS_MODELS = ["vit", "deit", "dinov2", "dinov2_registers", "clip_vision", "plain_vit"]
GATHER_OPS = {"GatherElements", "GatherND"}


@pytest.fixture(scope="module", params=CLS_MODELS)
def exported(request):
    model, x = build(request.param)
    return request.param, api.export(model, x, RECIPE)


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_runtime_matches_eager_reference(exported, batch):
    _, result = exported
    report = api.verify(result, num_inputs=2, batch=batch)
    assert report.indices_match == [True, True]
    assert report.max_abs_diff <= 1e-4
    assert report.stage_blocks == [1, 2] and report.batch == batch
    assert report.passed


def test_verify_reads_the_saved_debug_onnx(exported, tmp_path):
    _, result = exported
    paths = api.save(result, tmp_path)
    assert all(p.is_file() for p in paths.values())
    assert api.verify(result, paths["debug"], num_inputs=1, batch=2).passed


def test_save_only_some_parts(exported, tmp_path):
    """save(parts=...) writes just those files (the dense ONNX only when asked: it is converted on first use); an
    unknown part is a one-line ConfigError."""
    _, result = exported
    paths = api.save(result, tmp_path, parts=("model",))
    assert set(paths) == {"model"} and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    with pytest.raises(ConfigError, match="choose from model, debug, dense"):
        api.save(result, tmp_path / "x", parts=("engine",))


def test_onnx_is_static_and_uses_topk_and_gather(exported):
    _, result = exported
    for model in (result.onnx_model, result.debug_onnx, result.dense_onnx):
        check_static(model)
        assert not set(op_census(model)) & set(FORBIDDEN_OPS)
    pruned, dense = op_census(result.onnx_model), op_census(result.dense_onnx)
    assert pruned["TopK"] >= len(result.stages)
    assert sum(pruned[op] for op in GATHER_OPS) >= len(result.stages)
    assert "TopK" not in dense


def test_onnx_inputs_and_outputs(exported):
    name, result = exported
    info = TINY_MODEL_INFO[name]
    (inp,) = result.onnx_model.graph.input
    assert inp.name == "pixel_values" and _dims(inp) == ["batch", 3, 32, 32]
    assert [o.name for o in result.onnx_model.graph.output] == [result.output_name]
    debug = {o.name: _dims(o) for o in result.debug_onnx.graph.output}
    assert list(debug) == [result.output_name, "kept_idx.1", "kept_idx.2"]
    assert debug["kept_idx.1"] == ["batch", 8] and debug["kept_idx.2"] == ["batch", 4]
    if result.output_name == "last_hidden_state":  # pruned after block 2: prefix + 4 tokens leave the encoder
        assert debug["last_hidden_state"] == ["batch", info.num_prefix_tokens + 4, 48]


def test_token_counts(exported):
    name, result = exported
    p, n = TINY_MODEL_INFO[name].num_prefix_tokens, TINY_MODEL_INFO[name].seq_len
    assert result.layout.num_prefix_tokens == p and result.layout.num_tokens == n
    assert [s.keep for s in result.stages] == [8, 4]
    assert result.tokens == [n, p + 8, p + 4]
    assert result.tokens_per_block() == [n, n, p + 8, p + 4]
    assert 1 < result.ideal_speedup < n / (p + 4)
    summary = json.loads(json.dumps(result.summary()))
    assert summary["tokens_per_block"] == [n, n, p + 8, p + 4]
    assert summary["recipe_shorthand"] == "cls-topk@1:0.5+cls-topk@2:0.5"


def test_cls_method_on_model_without_cls_raises_config_error():
    model, x = build("siglip_vision")
    with pytest.raises(ConfigError, match=r"\[CLS\]"):
        api.export(model, x, RECIPE)


def test_static_batch_1_export():
    model, x = build("plain_vit")
    result = api.export(model, x[:1], "cls-topk@1:0.5", dynamic_batch=False)
    assert api.verify(result, num_inputs=1, batch=1).passed


def test_dense_onnx_is_converted_on_first_use_and_equals_the_unpruned_model():
    """The dense baseline converts lazily (verification and sweeps never need it), after the passes rewrote the
    pruned graph in place: it must still be the unpruned model, equal to eager."""
    import numpy as np
    import onnxruntime as ort
    import torch

    model, x = build("vit")
    result = api.export(model, x, RECIPE)
    assert "onnx_dense" not in result.seconds
    dense = result.dense_onnx
    assert result.dense_onnx is dense and result.seconds["onnx_dense"] > 0
    assert "TopK" not in op_census(dense)
    batch = torch.randn(3, *x.shape[1:], generator=torch.Generator().manual_seed(1))
    got = ort.InferenceSession(dense.SerializeToString()).run(None, {"pixel_values": batch.numpy()})[0]
    with torch.no_grad():
        want = result.module(batch).numpy()
    assert got.shape == want.shape and np.abs(got - want).max() <= 1e-4


def test_save_over_the_proto_limit_writes_external_data_that_loads(exported, tmp_path, monkeypatch):
    """A model over protobuf's 2 GB limit (forced: limit 0), saved alone, is written as model.onnx + model.onnx.data
    (several parts share weights.onnx.data: test_shared_weights); the .onnx
    names the data file's final name (not the temporary one), ORT runs it to the same outputs, the proto in memory
    keeps its weights, and a later inline save removes the stale .data."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    from tokensieve.exporter import onnx_files

    _, result = exported
    monkeypatch.setattr(onnx_files, "PROTO_LIMIT", 0)
    paths = api.save(result, tmp_path, parts=("model",))
    data = tmp_path / "model.onnx.data"
    assert data.is_file() and data.stat().st_size > 0
    stub = onnx.load(str(paths["model"]), load_external_data=False)
    locations = {e.value for t in stub.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary files left
    assert any(t.raw_data for t in result.onnx_model.graph.initializer)  # not moved out of the proto in memory
    x = torch.randn(2, *result.input_shape[1:], generator=torch.Generator().manual_seed(0)).numpy()
    got = ort.InferenceSession(str(paths["model"])).run(None, {"pixel_values": x})[0]
    want = ort.InferenceSession(result.onnx_model.SerializeToString()).run(None, {"pixel_values": x})[0]
    np.testing.assert_array_equal(got, want)
    monkeypatch.setattr(onnx_files, "PROTO_LIMIT", 2**31 - 1)
    api.save(result, tmp_path, parts=("model",))
    assert not data.exists()
