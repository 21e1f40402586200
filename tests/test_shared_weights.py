"""An export's model.onnx, model.debug.onnx and dense.onnx share one weights file (weights.onnx.data): each distinct
tensor stored once, the graphs unchanged in what they compute, the folder still movable; one saved part stays inline."""
from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tiny_models import build
from tokensieve import api
from tokensieve.cli import main


@pytest.fixture(scope="module")
def exported():
    model, x = build("vit")
    return api.export(model, x, "cls-topk@1:0.5")


def _run(model: bytes | str, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def test_three_graphs_one_weights_file(exported, tmp_path):
    paths = api.save(exported, tmp_path)
    weights = tmp_path / api.WEIGHTS
    assert paths["weights"] == weights and weights.is_file()
    assert not list(tmp_path.glob("*.onnx.data")) or list(tmp_path.glob("*.onnx.data")) == [weights]
    stored = {}
    for key in ("model", "debug", "dense"):
        proto = onnx.load(str(paths[key]), load_external_data=False)
        for t in proto.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                ext = {e.key: e.value for e in t.external_data}
                assert ext["location"] == api.WEIGHTS and int(ext["offset"]) % 64 == 0
                stored[(int(ext["offset"]), int(ext["length"]))] = t.name
            else:
                assert len(t.raw_data) < 1024, t.name   # only shape constants stay inline
    # every distinct tensor once: the file is the sum of the distinct spans (plus alignment), not three copies
    spans = sorted(stored)
    assert all(a[0] + a[1] <= b[0] for a, b in zip(spans, spans[1:]))   # no overlapping spans
    assert weights.stat().st_size == spans[-1][0] + spans[-1][1]
    dense_bytes = sum(len(t.raw_data) for t in exported.dense_onnx.graph.initializer if len(t.raw_data) >= 1024)
    assert weights.stat().st_size < 1.2 * dense_bytes
    # the in-memory protos keep their weights, and the files compute what they compute
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in exported.onnx_model.graph.initializer)
    x = np.random.default_rng(0).standard_normal(tuple(exported.input_shape)).astype(np.float32)
    for key, proto in (("model", exported.onnx_model), ("dense", exported.dense_onnx)):
        for got, want in zip(_run(str(paths[key]), x), _run(proto.SerializeToString(), x)):
            np.testing.assert_array_equal(got, want)
    # a copied folder still loads (locations are relative)
    moved = shutil.copytree(tmp_path, tmp_path.parent / "moved")
    assert len(_run(str(moved / "model.onnx"), x)) == len(_run(str(paths["model"]), x))


def test_one_part_stays_inline_and_a_stale_data_file_goes(exported, tmp_path):
    (tmp_path / "model.onnx.data").write_bytes(b"old")
    api.save(exported, tmp_path, parts=("model", "dense"))
    assert not (tmp_path / "model.onnx.data").exists() and (tmp_path / api.WEIGHTS).is_file()
    single = tmp_path / "single"
    paths = api.save(exported, single, parts=("debug",))
    assert not (single / api.WEIGHTS).exists() and set(paths) == {"debug"}
    proto = onnx.load(str(paths["debug"]), load_external_data=False)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


def test_missing_weights_file_is_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export", "--model", "tiny", "--prune", "cls-topk@1:0.5", "-o", str(out), "--no-build", "--no-bench",
                 "--verify-inputs", "1"]) == 0
    (out / api.WEIGHTS).unlink()
    capsys.readouterr()
    assert main(["verify", str(out), "--inputs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and api.WEIGHTS in err, err
