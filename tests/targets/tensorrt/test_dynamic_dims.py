"""Engines for ONNX graphs with dynamic dims other than batch (`BuildSpec.dims`, `tokensieve build --dims`).

CPU: a hand-made [batch, sequence, C] graph and the tiny LLaVA's lm_prefill / lm_decode build TensorRT-RTX sm86
engines whose metadata records the dims; missing dims, bad ranges and bad --dims syntax are one line; TrtRunner
refuses feeds outside the profile before touching the engine. GPU: the prefill/decode engines match ONNX Runtime.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

trt = pytest.importorskip("tensorrt_rtx")

from gpu_target import engine_target  # noqa: E402
from tokensieve.cli import main  # noqa: E402
from tokensieve.errors import ConfigError, TargetError  # noqa: E402
from tokensieve.runtime import OrtRunner, TrtRunner  # noqa: E402
from tokensieve.runtime.tensorrt_flavors import local_compute_capability  # noqa: E402
from tokensieve.targets.tensorrt import BuildSpec, build_engine  # noqa: E402
from tokensieve.targets.base import parse_dims  # noqa: E402

C = 4
SEQ = (1, 8, 32)
LM_DIMS = {"sequence": (1, 16, 64), "past_sequence": (0, 16, 64)}  # decode's mask axis is "past_sequence + 1"


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


def _seq_onnx(path: Path, seq_dim: str | None = "sequence") -> Path:
    """y = relu(x @ W), pooled = mean_seq(y); x: float32 [batch, seq_dim, 4] (seq_dim None: unnamed dynamic)."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((C, C)).astype(np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", seq_dim, C])
    if seq_dim is None:  # neither dim_value nor dim_param: dynamic and nameless
        x.type.tensor_type.shape.dim[1].Clear()
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", seq_dim or "s", C])
    pooled = helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", C])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Relu", ["xw"], ["y"]),
             helper.make_node("ReduceMean", ["y", "axes"], ["pooled"], keepdims=0)]
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    model = helper.make_model(helper.make_graph(nodes, "seq", [x], [y, pooled], initializer=[w, axes]),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def seq_onnx(tmp_path_factory) -> Path:
    return _seq_onnx(tmp_path_factory.mktemp("seq") / "seq.onnx")


@pytest.fixture(scope="module")
def seq_engine(seq_onnx) -> Path:
    engine = seq_onnx.with_suffix(".engine")
    assert main(["build", str(seq_onnx), "--max-batch", "4", "--dims", "sequence=1:8:32,unused=0:1:2",
                 "-o", str(engine)]) == 0
    return engine


def test_sequence_axis_builds_and_is_recorded(seq_engine):
    meta = json.loads(seq_engine.with_name(seq_engine.name + ".json").read_text())
    assert meta["optimization_profile"] == {"x": {"min": [1, 1, C], "opt": [1, 8, C], "max": [4, 32, C]}}
    assert meta["dims"] == {"sequence": {"min": 1, "opt": 8, "max": 32}}  # "unused" names no input: not recorded
    assert meta["input_dim_names"] == {"x": ["batch", "sequence", None]}
    assert [r["shape"] for r in meta["io_tensors"]] == [[-1, -1, C], [-1, -1, C], [-1, C]]


def test_offset_dim_takes_its_base_range(tmp_path):
    """torch.export names FastV decode's mask dim "pruned_past_sequence + 1": it follows --dims pruned_past_sequence."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "past", C])
    m = helper.make_tensor_value_info("m", TensorProto.INT64, ["batch", "past + 1"])
    xs = helper.make_tensor_value_info("xs", TensorProto.FLOAT, ["batch", C])
    ms = helper.make_tensor_value_info("ms", TensorProto.INT64, ["batch"])
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    nodes = [helper.make_node("ReduceSum", ["x", "axes"], ["xs"], keepdims=0),
             helper.make_node("ReduceSum", ["m", "axes"], ["ms"], keepdims=0)]
    model = helper.make_model(helper.make_graph(nodes, "offset", [x, m], [xs, ms], initializer=[axes]),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(tmp_path / "offset.onnx"))
    info = build_engine(tmp_path / "offset.onnx", tmp_path / "offset.engine", BuildSpec(max_batch=2, dims={"past": (0, 4, 16)}))
    assert info.metadata["optimization_profile"]["m"] == {"min": [1, 1], "opt": [1, 5], "max": [2, 17]}
    assert info.metadata["dims"]["past + 1"] == {"min": 1, "opt": 5, "max": 17}
    r = TrtRunner(info.engine_path)
    with pytest.raises(ConfigError) as e:
        r.infer({"x": np.zeros((1, 16, C), np.float32), "m": np.zeros((1, 18), np.int64)})
    assert "'past + 1' = 18, outside the engine's profile 1..17" in _one_line(e) and "--dims past=0:4:17" in str(e.value)
    with pytest.raises(ConfigError) as e:
        build_engine(tmp_path / "offset.onnx", tmp_path / "o2.engine", BuildSpec(dims={"sequence": SEQ}))
    assert "--dims past=MIN:OPT:MAX" in _one_line(e) and "past + 1" not in str(e.value).split("--dims")[1]


def test_without_dims_the_metadata_and_profile_are_unchanged(tmp_path):
    """A batch-only graph: `dims` naming nothing it has changes neither the profile nor the metadata keys."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", C])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", C])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx_path = tmp_path / "relu.onnx"
    onnx.save(model, str(onnx_path))
    plain = build_engine(onnx_path, tmp_path / "a.engine", BuildSpec(max_batch=4)).metadata
    other = build_engine(onnx_path, tmp_path / "b.engine", BuildSpec(max_batch=4, dims={"sequence": SEQ})).metadata
    assert plain["optimization_profile"] == other["optimization_profile"] == {
        "x": {"min": [1, C], "opt": [1, C], "max": [4, C]}}
    assert set(plain) == set(other) and plain["dims"] == plain["input_dim_names"] == {}  # schema 2: always written
    assert plain["engine_size_bytes"] == other["engine_size_bytes"]


@pytest.mark.parametrize("dims, words", [
    ({}, "dynamic dim 'sequence' with no range; give it with --dims sequence=MIN:OPT:MAX"),
    ({"past_sequence": (0, 1, 2)}, "--dims sequence=MIN:OPT:MAX"),
    ({"batch": (1, 2, 4), "sequence": SEQ}, "'batch' is the batch axis; set it with --max-batch"),
])
def test_missing_dim_or_batch_in_dims_is_one_line(seq_onnx, tmp_path, dims, words):
    with pytest.raises(ConfigError) as e:
        build_engine(seq_onnx, tmp_path / "m.engine", BuildSpec(dims=dims))
    assert words in _one_line(e)
    assert not (tmp_path / "m.engine").exists()


def test_unnamed_dynamic_axis_is_one_line(tmp_path):
    path = _seq_onnx(tmp_path / "anon.onnx", seq_dim=None)
    with pytest.raises(ConfigError) as e:
        build_engine(path, tmp_path / "m.engine", BuildSpec(dims={"sequence": SEQ}))
    assert "axis 1 is dynamic but unnamed" in _one_line(e) and "dim_param" in str(e.value)


@pytest.mark.parametrize("dims, words", [
    ({"sequence": (8, 4, 32)}, "0 <= min <= opt <= max"),
    ({"sequence": (-1, 4, 32)}, "0 <= min <= opt <= max"),
    ({"sequence": (0, 0, 0)}, "max >= 1"),
    ({"sequence": (1, 2)}, "not three integers"),
    ({"sequence": (1, 2.5, 4)}, "not three integers"),
    ({"sequence": ("1", 2, 4)}, "not three integers"),
    ({"": (1, 2, 4)}, "not three integers"),
    ([("sequence", (1, 2, 4))], "must map dim names"),
])
def test_bad_ranges_are_one_line(dims, words):
    with pytest.raises(ConfigError) as e:
        BuildSpec(dims=dims)
    assert words in _one_line(e)


def test_zero_minimum_is_accepted():
    assert BuildSpec(dims={"past_sequence": [0, 0, 8]}).dims == {"past_sequence": (0, 0, 8)}


def test_parse_dims():
    assert parse_dims("sequence=1:64:512, past_sequence=0:64:1024") == {"sequence": (1, 64, 512),
                                                                        "past_sequence": (0, 64, 1024)}
    for bad, words in [("sequence=1:64", "NAME=MIN:OPT:MAX"), ("sequence", "NAME=MIN:OPT:MAX"),
                       ("=1:2:3", "NAME=MIN:OPT:MAX"), ("s=a:2:3", "NAME=MIN:OPT:MAX"), ("s=-1:2:3", "NAME=MIN:OPT:MAX"),
                       ("s=1:2:3,s=1:2:4", "twice"), (",", "names no dim"), ("s=4:2:3", "min <= opt <= max")]:
        with pytest.raises(ConfigError) as e:
            parse_dims(bad)
        assert words in _one_line(e), bad


def test_cli_bad_dims_is_one_line(seq_onnx, capsys):
    assert main(["build", str(seq_onnx), "--dims", "sequence=1:8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("tokensieve build: error: --dims entry 'sequence=1:8'")


# -------------------------------------------------------------------------------- runner feed checks (CPU)


def test_runner_checks_sequence_against_the_profile(seq_engine):
    r = TrtRunner(seq_engine)
    assert r.input_specs == [("x", (None, None, C), np.dtype(np.float32))]
    assert r.batch_range == (1, 4) and r.dim_ranges == {"sequence": SEQ}
    assert r.make_random_feeds(batch=3)["x"].shape == (3, SEQ[1], C)  # batch from the argument, sequence = opt
    for seq, words in [(33, "'sequence' = 33, outside the engine's profile 1..32"), (0, "profile 1..32")]:
        with pytest.raises(ConfigError) as e:
            r.infer({"x": np.zeros((2, seq, C), np.float32)})
        assert words in _one_line(e) and "--dims sequence=" in str(e.value)
    with pytest.raises(ConfigError) as e:
        r.infer({"x": np.zeros((5, 8, C), np.float32)})
    assert "--max-batch 5" in _one_line(e)
    assert not r.is_active


# -------------------------------------------------------------------------------- tiny LLaVA LM parts


@pytest.fixture(scope="module")
def llava_parts(tmp_path_factory) -> dict[str, Path]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "exporter" / "vlm"))
    from test_llava_parts import tiny_llava
    from tokensieve.vlm_api import export_vlm

    result = export_vlm(tiny_llava(), tmp_path_factory.mktemp("llava"), "cls-topk:4")
    return {"prefill": result.paths["prefill"], "decode": result.paths["decode"]}


@pytest.fixture(scope="module")
def llava_engines(llava_parts) -> dict[str, tuple[Path, float, int]]:
    """fp32 sm86 engines of lm_prefill and lm_decode; (engine, build seconds, size bytes)."""
    out = {}
    for part, path in llava_parts.items():
        t0 = time.perf_counter()
        info = build_engine(path, path.with_suffix(".engine"), BuildSpec(max_batch=4, dims=LM_DIMS))
        out[part] = (info.engine_path, time.perf_counter() - t0, info.size_bytes)
    print({p: (round(s, 2), n) for p, (_, s, n) in out.items()})
    return out


def test_llava_lm_parts_build_with_dims(llava_engines):
    pre = json.loads(Path(str(llava_engines["prefill"][0]) + ".json").read_text())
    dec = json.loads(Path(str(llava_engines["decode"][0]) + ".json").read_text())
    assert pre["dims"] == {"sequence": {"min": 1, "opt": 16, "max": 64}}
    assert pre["optimization_profile"]["inputs_embeds"]["max"] == [4, 64, 32]
    assert dec["dims"] == {"past_sequence": {"min": 0, "opt": 16, "max": 64},
                           "past_sequence + 1": {"min": 1, "opt": 17, "max": 65}}  # the mask follows past_sequence
    assert dec["optimization_profile"]["past.0.key"] == {"min": [1, 2, 0, 8], "opt": [1, 2, 16, 8], "max": [4, 2, 64, 8]}
    assert dec["input_dim_names"]["attention_mask"] == ["batch", "past_sequence + 1"]
    assert dec["optimization_profile"]["attention_mask"] == {"min": [1, 1], "opt": [1, 17], "max": [4, 65]}


def test_llava_lm_parts_build_fp16(llava_parts, tmp_path):
    for part, path in llava_parts.items():
        info = build_engine(path, tmp_path / f"{part}.fp16.engine", BuildSpec(precision="fp16", dims=LM_DIMS))
        assert info.metadata["precision"] == "fp16" and info.size_bytes > 0
        assert any(r["name"] == "logits" and r["dtype"] == "float32" for r in info.metadata["io_tensors"])


def test_llava_decode_without_past_dims_is_one_line(llava_parts, tmp_path):
    with pytest.raises(ConfigError) as e:
        build_engine(llava_parts["decode"], tmp_path / "d.engine", BuildSpec(dims={"sequence": (1, 16, 64)}))
    assert "--dims past_sequence=MIN:OPT:MAX (BuildSpec.dims)" in _one_line(e)  # one name: the mask follows it


def _prefill_feeds(batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"inputs_embeds": rng.standard_normal((batch, seq, 32)).astype(np.float32),
            "attention_mask": np.ones((batch, seq), np.int64),
            "position_ids": np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()}


def _decode_feeds(present: dict[str, np.ndarray], past: int, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    feeds = {"input_ids": np.random.default_rng(seed).integers(0, 127, (batch, 1)).astype(np.int64),
             "attention_mask": np.ones((batch, past + 1), np.int64),
             "position_ids": np.full((batch, 1), past, np.int64)}
    return feeds | {k.replace("present", "past"): v for k, v in present.items() if k.startswith("present")}


def test_runner_refuses_llava_feeds_outside_the_profile(llava_engines):
    pre, dec = TrtRunner(llava_engines["prefill"][0]), TrtRunner(llava_engines["decode"][0])
    with pytest.raises(ConfigError) as e:
        pre.infer(_prefill_feeds(2, 65))
    assert "'sequence' = 65, outside the engine's profile 1..64" in _one_line(e)
    assert "--dims sequence=1:16:65" in str(e.value)
    feeds = _prefill_feeds(2, 10)
    feeds["attention_mask"] = np.ones((2, 11), np.int64)
    with pytest.raises(ConfigError) as e:
        pre.infer(feeds)
    assert "disagree on dim 'sequence'" in _one_line(e)
    past = {f"present.{i}.{kv}": np.zeros((2, 2, 70, 8), np.float32) for i in range(2) for kv in ("key", "value")}
    with pytest.raises(ConfigError) as e:
        dec.infer(_decode_feeds(past, 64, 2))  # the mask's 65 is in range, past_sequence 70 is not
    assert "'past_sequence' = 70, outside the engine's profile 0..64" in _one_line(e)
    assert not pre.is_active and not dec.is_active


@pytest.mark.skipif(local_compute_capability() is not None, reason="this machine has a GPU")
def test_feeds_inside_the_profile_pass_the_checks(llava_engines):
    """An empty past (past_sequence=0) and a mid-range sequence pass every check; only activating needs a GPU."""
    past = {f"present.{i}.{kv}": np.zeros((1, 2, 0, 8), np.float32) for i in range(2) for kv in ("key", "value")}
    for part, feeds in [("prefill", _prefill_feeds(3, 37)), ("decode", _decode_feeds(past, 0, 1))]:
        with pytest.raises(TargetError) as e:
            TrtRunner(llava_engines[part][0]).infer(feeds)
        assert "needs an NVIDIA GPU" in _one_line(e)


# ------------------------------------------------------------------------------------------ GPU


@pytest.fixture(scope="module")
def llava_gpu_engines(llava_parts, tmp_path_factory) -> dict[str, Path]:
    out, target = tmp_path_factory.mktemp("gpu"), engine_target()
    return {part: build_engine(path, out / f"{part}.engine", BuildSpec(target=target, max_batch=4, dims=LM_DIMS))
            .engine_path for part, path in llava_parts.items()}


def _assert_close(got: dict, want: dict, atol: float = 1e-3) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        assert float(np.abs(got[name] - want[name]).max()) <= atol, name


@pytest.mark.gpu
def test_llava_prefill_and_decode_engines_match_onnxruntime(llava_parts, llava_gpu_engines):
    with OrtRunner(llava_parts["prefill"]) as ort_pre, TrtRunner(llava_gpu_engines["prefill"]) as trt_pre, \
            OrtRunner(llava_parts["decode"]) as ort_dec, TrtRunner(llava_gpu_engines["decode"]) as trt_dec:
        for batch, seq in [(2, 12), (1, 64), (3, 5), (2, 12)]:  # sequence varies within one runner, then comes back
            feeds = _prefill_feeds(batch, seq, seed=seq)
            want = ort_pre.infer(feeds)
            _assert_close(trt_pre.infer(feeds), want)
            step = _decode_feeds(want, seq, batch, seed=seq)
            _assert_close(trt_dec.infer(step), ort_dec.infer(step))


@pytest.mark.gpu
def test_llava_decode_engine_runs_an_empty_past(llava_parts, llava_gpu_engines):
    """past_sequence min 0: TensorRT takes empty past tensors (the profile allows 0)."""
    past = {f"present.{i}.{kv}": np.zeros((2, 2, 0, 8), np.float32) for i in range(2) for kv in ("key", "value")}
    feeds = _decode_feeds(past, 0, 2)
    with OrtRunner(llava_parts["decode"]) as ort_dec, TrtRunner(llava_gpu_engines["decode"]) as trt_dec:
        _assert_close(trt_dec.infer(feeds), ort_dec.infer(feeds))
