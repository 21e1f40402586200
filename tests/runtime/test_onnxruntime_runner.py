"""OrtRunner on hand-built ONNX models: numerics, feed checks, load errors, random feeds."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tokensieve.errors import ConfigError, TargetError
from tokensieve.runtime.onnxruntime_runner import OrtRunner, default_providers


def _save(tmp_path, graph, name="m.onnx"):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


@pytest.fixture
def add_model(tmp_path):
    """y = x + b, x: float32 [batch, 3]; ids: int64 [batch] passes through an Identity."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    ids_out = helper.make_tensor_value_info("ids_out", TensorProto.INT64, ["batch"])
    b = helper.make_tensor("b", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["y"]), helper.make_node("Identity", ["ids"], ["ids_out"])],
        "add", [x, ids], [y, ids_out], initializer=[b],
    )
    return _save(tmp_path, graph)


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_infer_matches_numpy(add_model):
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    ids = np.array([4, 5], dtype=np.int64)
    with OrtRunner(add_model, threads=1, spinning=False) as r:
        assert r.is_active
        opts = r._session.get_session_options()
        assert opts.intra_op_num_threads == 1
        assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        out = r.infer({"x": x, "ids": ids})
        assert r.inference_time is not None and r.inference_time > 0
        assert r.last_inference_time() == r.inference_time
    assert not r.is_active
    assert list(out) == ["y", "ids_out"]
    np.testing.assert_array_equal(out["y"], x + np.array([1, 2, 3], dtype=np.float32))
    np.testing.assert_array_equal(out["ids_out"], ids)


def test_metadata(add_model):
    with OrtRunner(add_model, name="dense") as r:
        assert r.name == "dense"
        assert r.input_specs == [("x", ("batch", 3), np.dtype(np.float32)), ("ids", ("batch",), np.dtype(np.int64))]
        assert r.output_names == ["y", "ids_out"]
        assert "CPUExecutionProvider" in r.active_providers


def test_lazy_activation_and_reactivation(add_model):
    r = OrtRunner(add_model)
    assert not r.is_active
    assert r.output_names == ["y", "ids_out"]  # first use builds the session
    r.deactivate()
    with r:
        r.infer(r.make_random_feeds(batch=2))


def test_default_providers_end_with_cpu():
    assert default_providers()[-1] == "CPUExecutionProvider"


@pytest.mark.parametrize(
    "feeds, fragment",
    [
        ({"x": np.zeros((1, 4), np.float32), "ids": np.zeros(1, np.int64)},
         "input 'x' has shape (1, 4) but the model expects (batch, 3); resize your input"),
        ({"x": np.zeros((1, 1, 3), np.float32), "ids": np.zeros(1, np.int64)},
         "input 'x' has shape (1, 1, 3) but the model expects (batch, 3)"),
        ({"x": np.zeros((1, 3), np.float64), "ids": np.zeros(1, np.int64)},
         "input 'x' has dtype float64 but the model expects float32"),
        ({"x": np.zeros((1, 3), np.float32)}, "missing input(s) ['ids']"),
        ({"x": np.zeros((1, 3), np.float32), "ids": np.zeros(1, np.int64), "pixel_values": np.zeros(1)},
         "unknown input(s) ['pixel_values']"),
        ({"x": [[0.0, 0.0, 0.0]], "ids": np.zeros(1, np.int64)}, "input 'x' is a list, not a numpy array"),
    ],
)
def test_bad_feeds_are_one_line_config_errors(add_model, feeds, fragment):
    with OrtRunner(add_model) as r:
        with pytest.raises(ConfigError) as e:
            r.infer(feeds)
        assert fragment in _one_line(e)
        assert r.inference_time is None


def test_inconsistent_dynamic_dims_raise_target_error(tmp_path):
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n"])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n"])
    c = helper.make_tensor_value_info("c", TensorProto.FLOAT, ["n"])
    path = _save(tmp_path, helper.make_graph([helper.make_node("Add", ["a", "b"], ["c"])], "g", [a, b], [c]))
    with OrtRunner(path) as r:
        with pytest.raises(TargetError) as e:
            r.infer({"a": np.zeros(2, np.float32), "b": np.zeros(3, np.float32)})
        assert _one_line(e).startswith("ONNX Runtime failed to run")


def test_missing_file_is_target_error(tmp_path):
    with pytest.raises(TargetError) as e:
        OrtRunner(tmp_path / "nope.onnx")
    assert "does not exist" in _one_line(e)


def test_corrupt_file_is_target_error(tmp_path):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(b"\x08\xff\xff\xffnot a protobuf" * 7)
    with pytest.raises(TargetError) as e:
        OrtRunner(path).activate()
    msg = _one_line(e)
    assert msg.startswith(f"ONNX Runtime cannot load {str(path)!r}")
    assert "Traceback" not in msg


def test_bad_options_are_config_errors(add_model):
    with pytest.raises(ConfigError):
        OrtRunner(add_model, threads=0)
    with pytest.raises(ConfigError) as e:
        OrtRunner(add_model, providers=["NoSuchExecutionProvider"])
    assert "not available" in _one_line(e)


@pytest.mark.parametrize("batch", [1, 3])
def test_make_random_feeds(add_model, batch):
    with OrtRunner(add_model) as r:
        feeds = r.make_random_feeds(batch=batch, seed=1)
        assert {k: (v.shape, v.dtype) for k, v in feeds.items()} == {
            "x": ((batch, 3), np.dtype(np.float32)),
            "ids": ((batch,), np.dtype(np.int64)),
        }
        np.testing.assert_array_equal(feeds["x"], r.make_random_feeds(batch=batch, seed=1)["x"])  # seeded
        assert r.infer(feeds)["y"].shape == (batch, 3)
        with pytest.raises(ConfigError):
            r.make_random_feeds(batch=0)


def test_static_model_random_feeds(tmp_path):
    x = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [1, 3, 4, 4])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 4, 4])
    path = _save(tmp_path, helper.make_graph([helper.make_node("Relu", ["pixel_values"], ["out"])], "g", [x], [y]))
    with OrtRunner(path) as r:
        feeds = r.make_random_feeds(batch=8)  # static dims stay as they are
        assert feeds["pixel_values"].shape == (1, 3, 4, 4)
        np.testing.assert_array_equal(r.infer(feeds)["out"], np.maximum(feeds["pixel_values"], 0))
        with pytest.raises(ConfigError) as e:
            r.infer({"pixel_values": np.zeros((1, 3, 2, 2), np.float32)})
        assert _one_line(e) == (
            "input 'pixel_values' has shape (1, 3, 2, 2) but the model expects (1, 3, 4, 4); resize your input"
        )
