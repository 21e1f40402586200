"""targets/onnxruntime: ORT's transformer optimizer and int8 QDQ quantization on a pruned export (optimize.py,
quantize.py). The optimized graph fuses like the dense one and computes the same; int8 keeps the score math in float
(a control without that exclusion quantizes it) and stays close to fp32 in kept tokens and outputs."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch

from tiny_models import build
from tokensieve import api
from tokensieve.errors import ConfigError, TargetError
from tokensieve.runtime import OrtRunner
from tokensieve.targets.onnxruntime.optimize import optimize_onnx
from tokensieve.targets.onnxruntime.quantize import quantize_int8, score_only_nodes

RECIPE = "cls-topk@1,2:0.5"


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    model, x = build("vit")
    result = api.export(model, x, RECIPE)
    return api.save(result, tmp_path_factory.mktemp("ort-target")), tuple(x.shape)


def _inputs(shape, n: int, batch: int, seed: int) -> list[np.ndarray]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *shape[1:], generator=gen).numpy() for _ in range(n)]


def _run(path, xs) -> list[list[np.ndarray]]:
    with OrtRunner(path) as r:
        return [list(r.infer({"pixel_values": x}).values()) for x in xs]


def test_optimized_pruned_model_fuses_like_dense_and_computes_the_same(export, tmp_path):
    paths, shape = export
    pruned = optimize_onnx(paths["model"], tmp_path / "model.opt.onnx")
    dense = optimize_onnx(paths["dense"], tmp_path / "dense.opt.onnx")
    assert pruned["SkipLayerNormalization"] == dense["SkipLayerNormalization"] == 8
    assert pruned == dense
    debug = optimize_onnx(paths["debug"], tmp_path / "debug.opt.onnx")
    assert debug == pruned
    xs = _inputs(shape, 3, 2, 1)
    for (out, *kept), (ref, *ref_kept) in zip(_run(tmp_path / "debug.opt.onnx", xs), _run(paths["debug"], xs)):
        np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
        for k, rk in zip(kept, ref_kept, strict=True):
            np.testing.assert_array_equal(k, rk)


def test_optimizer_error_is_one_line(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(TargetError) as e:
        optimize_onnx(bad, tmp_path / "out.onnx")
    assert "\n" not in str(e.value) and "--optimize" in str(e.value)
    assert not (tmp_path / "out.onnx").exists()


def _float_inputs_of(model: onnx.ModelProto, names: list[str]) -> bool:
    """Whether none of the named nodes reads a DequantizeLinear output (they compute in float)."""
    dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return not any(i in dq for n in model.graph.node if n.name in names for i in n.input)


def test_score_nodes_are_the_attention_row_math_only(export):
    paths, _ = export
    model = onnx.load(str(paths["debug"]))
    score = score_only_nodes(model)
    ops = collections.Counter(n.op_type for n in model.graph.node if n.name in score)
    assert ops["Softmax"] == 2 and ops["MatMul"] == 2       # one [CLS] row per stage: q·kᵀ, softmax
    assert not any(n.op_type in ("LayerNormalization", "TopK") for n in model.graph.node if n.name in score)
    linear = [n for n in model.graph.node if n.op_type == "MatMul" and any(i.startswith("val_") or "weight" in i
                                                                             for i in n.input[1:])]
    assert linear and not any(n.name in score for n in linear)  # no projection of the model itself


def test_int8_keeps_scores_in_float_and_stays_close_to_fp32(export, tmp_path):
    paths, shape = export
    calib = [{"pixel_values": x} for x in _inputs(shape, 4, 4, 2)]
    summary = quantize_int8(paths["debug"], tmp_path / "int8.onnx", calib)
    q = onnx.load(str(tmp_path / "int8.onnx"))
    assert summary["quantize_linear"] > 10 and summary["calibration_batches"] == 4
    assert _float_inputs_of(q, summary["score_nodes_float"])
    xs = _inputs(shape, 4, 4, 3)
    overlap, cosine = [], []
    for (out, *kept), (ref, *ref_kept) in zip(_run(tmp_path / "int8.onnx", xs), _run(paths["debug"], xs)):
        cosine.extend((out * ref).sum(-1) / np.linalg.norm(out, axis=-1) / np.linalg.norm(ref, axis=-1))
        for k, rk in zip(kept, ref_kept, strict=True):
            overlap.extend(len(set(a) & set(b)) / len(b) for a, b in zip(k, rk))
    assert min(cosine) > 0.99 and np.mean(overlap) > 0.9, (min(cosine), np.mean(overlap))
    assert np.isfinite(cosine).all()


def test_control_without_the_exclusion_the_score_matmul_is_quantized(export, tmp_path, monkeypatch):
    import tokensieve.targets.onnxruntime.quantize as qz

    paths, shape = export
    score = score_only_nodes(onnx.load(str(paths["debug"])))
    monkeypatch.setattr(qz, "score_only_nodes", lambda model: [])
    calib = [{"pixel_values": x} for x in _inputs(shape, 2, 2, 2)]
    qz.quantize_int8(paths["debug"], tmp_path / "all.onnx", calib)
    q = onnx.load(str(tmp_path / "all.onnx"))
    matmuls = [n for n in score if any(m.name == n and m.op_type == "MatMul" for m in q.graph.node)]
    assert matmuls and not _float_inputs_of(q, matmuls)


def test_int8_without_calibration_is_one_line(export, tmp_path):
    paths, _ = export
    with pytest.raises(ConfigError) as e:
        quantize_int8(paths["debug"], tmp_path / "int8.onnx", [])
    assert "\n" not in str(e.value) and "calib" in str(e.value)
    assert not (tmp_path / "int8.onnx").exists()
