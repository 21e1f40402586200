"""TrtRunner: metadata refusals before deserializing (CPU, on a real TensorRT-RTX engine), and numerics on a GPU."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from gpu_target import engine_target
from tokensieve.cli import main
from tokensieve.errors import ConfigError, TargetError
from tokensieve.runtime import RUNNERS, OrtRunner, TrtRunner
from tokensieve.runtime import engine_metadata
from tokensieve.runtime.tensorrt_flavors import available_flavors, local_compute_capability

trt = pytest.importorskip("tensorrt_rtx")

C_IN, C_OUT, MAX_BATCH = 4, 3, 4


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


def _linear_onnx(path: Path) -> Path:
    """y = relu(x @ W + b), x: float32 [batch, 4]."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((C_IN, C_OUT)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(C_OUT).astype(np.float32), "b")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", C_IN])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", C_OUT])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["z"]),
             helper.make_node("Relu", ["z"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "linear", [x], [y], initializer=[w, b]),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A real engine from `tokensieve build` (TensorRT-RTX, sm86, profile 1..4)."""
    d = tmp_path_factory.mktemp("engine")
    onnx_path = _linear_onnx(d / "linear.onnx")
    assert main(["build", str(onnx_path), "--target", "rtx-sm86", "--max-batch", str(MAX_BATCH)]) == 0
    return d / "linear.rtx-sm86.fp32.engine"  # the default name: per target and precision


@pytest.fixture
def engine(built, tmp_path) -> Path:
    """A private copy of the built engine + metadata, free to edit."""
    dst = tmp_path / "m.engine"
    shutil.copy(built, dst)
    shutil.copy(engine_metadata.metadata_path_for(built), engine_metadata.metadata_path_for(dst))
    return dst


def _edit_meta(engine: Path, **changes) -> dict:
    path = engine_metadata.metadata_path_for(engine)
    meta = json.loads(path.read_text()) | changes
    path.write_text(json.dumps(meta))
    return meta


def test_registered_under_one_name():
    assert RUNNERS["tensorrt"] is TrtRunner and RUNNERS["onnxruntime"] is OrtRunner
    assert TrtRunner.artifact_suffix == ".engine" and OrtRunner.artifact_suffix == ".onnx"


def test_metadata_binds_io_and_checks_pass(engine):
    meta = json.loads(engine_metadata.metadata_path_for(engine).read_text())
    assert meta["engine_sha256"] == hashlib.sha256(engine.read_bytes()).hexdigest()
    r = TrtRunner(engine)  # installed flavor/version match, size and sha match: accepted
    assert r.flavor == "tensorrt_rtx" and r.name == "tensorrt_rtx:m.engine" and not r.is_active
    assert r.input_specs == [("x", (None, C_IN), np.dtype(np.float32))]
    assert r.output_names == ["y"]
    assert r.batch_range == (1, MAX_BATCH)
    feeds = r.make_random_feeds(batch=3, seed=2)
    assert feeds["x"].shape == (3, C_IN) and feeds["x"].dtype == np.float32


@pytest.mark.parametrize("feeds, words", [
    ({"x": np.zeros((MAX_BATCH + 1, C_IN), np.float32)}, f"outside the engine's profile 1..{MAX_BATCH}"),
    ({"x": np.zeros((2, C_IN + 1), np.float32)}, "expects (?, 4)"),
    ({"x": np.zeros((2, C_IN), np.float64)}, "expects float32"),
    ({"z": np.zeros((2, C_IN), np.float32)}, "unknown input"),
])
def test_bad_feeds_fail_before_the_engine_is_touched(engine, feeds, words):
    r = TrtRunner(engine)
    with pytest.raises(ConfigError) as e:
        r.infer(feeds)
    assert words in _one_line(e)
    assert not r.is_active


@pytest.mark.parametrize("changes, words", [
    ({"tensorrt_version": "0.9.0"}, "but TensorRT-RTX " + trt.__version__ + " is installed"),
    ({"flavor": "tensorrt_llm"}, "unknown TensorRT flavor"),
    *([({"flavor": "tensorrt"}, "TensorRT is not installed")] if available_flavors()["tensorrt"] is None else []),
    ({"engine_size_bytes": 12}, "metadata records 12"),
    ({"engine_sha256": "0" * 64}, "does not match the sha256"),
    ({"io_tensors": []}, "lists no io_tensors"),
    ({"io_tensors": [{"name": "x", "shape": [-1, 4], "dtype": "bfloat16", "mode": "input"}]}, "dtype bfloat16"),
])
def test_mismatching_metadata_is_refused(engine, changes, words):
    _edit_meta(engine, **changes)
    with pytest.raises(TargetError) as e:
        TrtRunner(engine)
    msg = _one_line(e)
    assert words in msg and "tokensieve build" in msg


def test_other_gpu_is_refused_with_the_right_target(engine, monkeypatch):
    monkeypatch.setattr(engine_metadata, "local_compute_capability", lambda: "8.9")
    with pytest.raises(TargetError) as e:
        TrtRunner(engine)
    assert "compute capability 8.6 but this GPU is 8.9" in _one_line(e) and "--target rtx-sm89" in str(e.value)
    monkeypatch.setattr(engine_metadata, "local_compute_capability", lambda: "9.0")  # H100: no RTX target
    with pytest.raises(TargetError) as e:
        TrtRunner(engine)
    assert "--target local" in _one_line(e)


def test_truncated_engine_is_refused(engine):
    data = engine.read_bytes()
    engine.write_bytes(data[: len(data) // 2])
    with pytest.raises(TargetError) as e:
        TrtRunner(engine)
    assert f"is {len(data) // 2} bytes but its metadata records {len(data)}" in _one_line(e)
    assert "tokensieve build --target rtx-sm86" in str(e.value)


def test_garbage_engine_is_refused(engine):
    size = engine.stat().st_size
    engine.write_bytes(b"\0garbage" * (size // 8) + b"x" * (size % 8))  # same size, other bytes
    with pytest.raises(TargetError) as e:
        TrtRunner(engine)
    assert "sha256" in _one_line(e)


def test_garbage_engine_with_matching_metadata_fails_in_one_line(engine):
    """Metadata edited to describe garbage: the checks pass, deserializing (or, without a GPU, activating) fails."""
    engine.write_bytes(b"not a TensorRT plan")
    _edit_meta(engine, engine_size_bytes=engine.stat().st_size, engine_sha256=hashlib.sha256(engine.read_bytes()).hexdigest())
    r = TrtRunner(engine)
    with pytest.raises(TargetError) as e:
        r.activate()
    assert "GPU" in _one_line(e) or "could not deserialize" in str(e.value)
    assert not r.is_active


def test_missing_metadata_or_engine(engine, tmp_path):
    engine_metadata.metadata_path_for(engine).unlink()
    with pytest.raises(TargetError) as e:
        TrtRunner(engine)
    assert "tokensieve build" in _one_line(e)
    with pytest.raises(TargetError) as e:
        TrtRunner(tmp_path / "nope.engine")
    assert "does not exist" in _one_line(e)


def test_missing_plugin_library_names_plugins_flag(engine, tmp_path):
    _edit_meta(engine, plugins=[{"file": "libtokensieve_plugins.so", "sha256": "0" * 64, "embedded": False}])
    with pytest.raises(TargetError) as e:
        TrtRunner(engine)
    assert "libtokensieve_plugins.so" in _one_line(e) and "--plugins" in str(e.value)
    with pytest.raises(TargetError) as e:
        TrtRunner(engine, plugins=tmp_path / "nope.so")
    assert "nope.so" in _one_line(e) and "--plugins" in str(e.value)
    _edit_meta(engine, plugins=[{"file": "libtokensieve_plugins.so", "sha256": "0" * 64, "embedded": True}])
    with pytest.raises(TargetError) as e:  # embedded plugin code runs only when the user allows it, not the metadata
        TrtRunner(engine)
    assert "TOKENSIEVE_ALLOW_ENGINE_HOST_CODE=1" in _one_line(e)
    TrtRunner(engine, allow_host_code=True)  # embedded in the plan: no library needed


@pytest.mark.skipif(local_compute_capability() is not None, reason="this machine has a GPU")
def test_activate_without_gpu_is_one_line(engine):
    with pytest.raises(TargetError) as e:
        TrtRunner(engine).activate()
    assert "--backend onnxruntime" in _one_line(e)


# ------------------------------------------------------------------------------------------ GPU


@pytest.fixture(scope="module")
def tiny_vit_gpu(tmp_path_factory):
    """The tiny HF ViT exported with one pruning stage, and its engine for this GPU."""
    from tiny_models import build
    from tokensieve import api

    model, example = build("vit")
    result = api.export(model, example, "cls-topk@1:0.5")
    out = tmp_path_factory.mktemp("vit")
    paths = api.save(result, out)
    api.build(paths["model"], out / "model.engine", target=engine_target(), max_batch=4)
    return paths["model"], out / "model.engine"


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 3])
def test_engine_matches_onnxruntime(tiny_vit_gpu, batch):
    onnx_path, engine_path = tiny_vit_gpu
    with OrtRunner(onnx_path) as ort_runner, TrtRunner(engine_path) as trt_runner:
        feeds = ort_runner.make_random_feeds(batch=batch, seed=batch)
        want = ort_runner.infer(feeds)
        got = trt_runner.infer(feeds)
        assert list(got) == list(want)
        for name in want:
            assert got[name].shape == want[name].shape
            assert float(np.abs(got[name] - want[name]).max()) <= 1e-3
        assert trt_runner.inference_time > 0
        mem = trt_runner.memory_usage()
        assert mem["kind"] == "device" and mem["io_bytes"] > 0 and mem["engine_bytes"] == engine_path.stat().st_size


@pytest.mark.gpu
def test_cuda_graph_gives_the_same_output(tiny_vit_gpu):
    _, engine_path = tiny_vit_gpu
    with TrtRunner(engine_path) as plain, TrtRunner(engine_path, cuda_graph=True) as graphed:
        for batch in (2, 4, 2):  # one graph per batch, replayed when the batch comes back
            feeds = plain.make_random_feeds(batch=batch, seed=batch)
            want = plain.infer(feeds)
            for _ in range(3):  # warm-up + capture, then replays
                got = graphed.infer(feeds)
                for name in want:
                    np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-5)
        other = graphed.infer(graphed.make_random_feeds(batch=2, seed=99))  # replay reads the new input
        assert not np.allclose(other[plain.output_names[0]], want[plain.output_names[0]])


@pytest.mark.gpu
def test_reactivation_and_profile_limit(tiny_vit_gpu):
    _, engine_path = tiny_vit_gpu
    r = TrtRunner(engine_path)
    feeds = r.make_random_feeds(batch=2)
    first = r.infer(feeds)  # activates on first use
    r.deactivate()
    assert not r.is_active
    with r:
        np.testing.assert_array_equal(r.infer(feeds)[r.output_names[0]], first[r.output_names[0]])
        with pytest.raises(ConfigError) as e:
            r.infer(r.make_random_feeds(batch=5))
        assert "--max-batch 5" in _one_line(e)


def test_cuda_graph_refused_for_a_data_dependent_engine_on_standard_tensorrt(engine, monkeypatch):
    """adaptive(compact=true) engines compute the token count on the device: stream capture cannot record that."""
    import tokensieve.runtime.tensorrt_runner as runner_module

    _edit_meta(engine, flavor="tensorrt", data_dependent_shapes=True)
    monkeypatch.setattr(runner_module, "check_engine_compatible", lambda meta: None)  # no TensorRT 10 here
    with pytest.raises(TargetError) as e:
        TrtRunner(engine, cuda_graph=True)
    assert "data-dependent token axis" in _one_line(e) and "without --cuda-graph" in str(e.value)
    assert TrtRunner(engine).flavor == "tensorrt"  # without CUDA graphs it is accepted
    _edit_meta(engine, data_dependent_shapes=False)
    assert TrtRunner(engine, cuda_graph=True).cuda_graph


def test_builder_records_data_dependent_shapes(built):
    assert json.loads(engine_metadata.metadata_path_for(built).read_text())["data_dependent_shapes"] is False
