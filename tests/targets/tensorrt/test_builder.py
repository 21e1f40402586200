"""TensorRT-RTX builds engines ahead of time without a GPU, so the whole build path runs in CPU CI."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

trt = pytest.importorskip("tensorrt_rtx")
torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

from tokensieve.errors import ConfigError, TargetError  # noqa: E402
from tokensieve.runtime.engine_metadata import check_engine_compatible, read_engine_metadata  # noqa: E402
from tokensieve.runtime.tensorrt_flavors import (RTX_COMPUTE_CAPABILITIES, available_flavors,  # noqa: E402
                                                 local_compute_capability)
from tokensieve.targets.tensorrt import BuildSpec, build_engine, parse_target  # noqa: E402

B, N, C, KEEP = 2, 17, 8, 6  # N = 1 [CLS] + 16 patches


class TinyPrune(torch.nn.Module):
    """Linear -> score -> TopK -> sort -> GatherElements, keeping [CLS] (the token-pruning stage)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(C, C)

    def forward(self, x):
        x = self.proj(x)
        prefix, patches = x[:, :1], x[:, 1:]
        idx = patches.mean(-1).topk(KEEP, dim=-1).indices.sort(dim=-1).values
        return torch.cat([prefix, patches.gather(1, idx.unsqueeze(-1).expand(-1, -1, C))], dim=1)


@pytest.fixture(scope="module")
def pruned_onnx(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "tiny_prune.onnx"
    torch.onnx.export(TinyPrune().eval(), (torch.randn(B, N, C),), str(path), dynamo=True, opset_version=18,
                      input_names=["x"], output_names=["y"], dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"TopK", "GatherElements"} <= ops
    return path


def _save_model(path: Path, nodes, inputs, outputs) -> Path:
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", inputs, outputs),
                                opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def _assert_one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


@pytest.fixture
def out(tmp_path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


def test_build_writes_engine_and_metadata(pruned_onnx, out):
    spec = BuildSpec(target="rtx-sm86", min_batch=1, opt_batch=2, max_batch=4)
    info = build_engine(pruned_onnx, out / "m.engine", spec, extra_metadata={"recipe": {"keep": KEEP}, "tokens_per_block": [N, 1 + KEEP]})
    assert sorted(p.name for p in out.iterdir()) == ["m.engine", "m.engine.json"]  # no temp files left
    assert info.engine_path == out / "m.engine" and info.metadata_path == out / "m.engine.json"
    assert info.size_bytes == (out / "m.engine").stat().st_size > 0
    meta = read_engine_metadata(out / "m.engine")
    assert meta == info.metadata == json.loads(info.metadata_path.read_text())
    assert meta["flavor"] == "tensorrt_rtx" and meta["tensorrt_version"] == trt.__version__
    assert meta["compute_capability"] == "8.6" and meta["precision"] == "fp32"
    assert meta["engine_size_bytes"] == info.size_bytes and meta["build_seconds"] >= 0
    assert meta["onnx"] == {"file": pruned_onnx.name, "sha256": hashlib.sha256(pruned_onnx.read_bytes()).hexdigest()}
    assert meta["io_tensors"] == [
        {"name": "x", "shape": [-1, N, C], "dtype": "float32", "mode": "input"},
        {"name": "y", "shape": [-1, 1 + KEEP, C], "dtype": "float32", "mode": "output"},
    ]
    assert meta["optimization_profile"] == {"x": {"min": [1, N, C], "opt": [2, N, C], "max": [4, N, C]}}
    assert meta["recipe"] == {"keep": KEEP} and meta["tokens_per_block"] == [N, 1 + KEEP]
    check_engine_compatible(meta)  # built here, so it matches (no GPU: compute capability is not compared)


def test_static_input_gets_no_profile(out, tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5])
    model = _save_model(tmp_path / "relu.onnx", [helper.make_node("Relu", ["x"], ["y"])], [x], [y])
    meta = build_engine(model, out / "relu.engine", BuildSpec(target="rtx-sm120")).metadata
    assert meta["optimization_profile"] == {} and meta["compute_capability"] == "12.0"
    assert meta["io_tensors"][0]["shape"] == [3, 5]


@pytest.mark.parametrize("target", ["rtx-sm90", "sm86", "", "cuda", "rtx-sm87"])
def test_bad_target_is_a_config_error(target, out):
    with pytest.raises(ConfigError) as e:
        BuildSpec(target=target)
    assert "rtx-sm86" in _assert_one_line(e)
    with pytest.raises(ConfigError):
        parse_target(target)
    assert not any(out.iterdir())


def test_parse_target():
    assert parse_target("rtx-sm86") == ("tensorrt_rtx", "8.6")
    assert parse_target("RTX-SM121") == ("tensorrt_rtx", "12.1")
    assert parse_target("local") == ("tensorrt", None)


@pytest.mark.parametrize("kwargs, words", [
    ({"precision": "fp8"}, "fp32, fp16, int8"),
    ({"min_batch": 4, "opt_batch": 2}, "min <= opt <= max"),
    ({"min_batch": 0}, "min <= opt <= max"),
    ({"workspace_mib": 0}, "positive"),
])
def test_bad_spec_is_a_config_error(kwargs, words):
    with pytest.raises(ConfigError) as e:
        BuildSpec(**kwargs)
    assert words in _assert_one_line(e)


def test_missing_onnx(out):
    with pytest.raises(ConfigError) as e:
        build_engine(out.parent / "nope.onnx", out / "m.engine", BuildSpec())
    assert "nope.onnx" in _assert_one_line(e)
    assert not any(out.iterdir())


def test_corrupt_onnx(out, tmp_path):
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(TargetError) as e:
        build_engine(bad, out / "m.engine", BuildSpec())
    assert "corrupt.onnx" in _assert_one_line(e)
    assert not any(out.iterdir())


def test_unsupported_op_names_node_and_keeps_old_engine(out, tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])
    i = helper.make_tensor_value_info("i", TensorProto.INT64, [2, 1])
    u = helper.make_tensor_value_info("u", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])
    # ScatterND with a reduction is rejected by the TensorRT ONNX parser (FACTS.md)
    node = helper.make_node("ScatterND", ["x", "i", "u"], ["y"], name="merge_tokens", reduction="add")
    model = _save_model(tmp_path / "scatter.onnx", [node], [x, i, u], [y])
    (out / "m.engine").write_bytes(b"old engine")
    (out / "m.engine.json").write_text("{}")
    with pytest.raises(TargetError) as e:
        build_engine(model, out / "m.engine", BuildSpec())
    msg = _assert_one_line(e)
    assert "merge_tokens" in msg and "ScatterND" in msg
    assert sorted(p.name for p in out.iterdir()) == ["m.engine", "m.engine.json"]
    assert (out / "m.engine").read_bytes() == b"old engine"


def test_read_engine_metadata_missing_or_corrupt(out):
    with pytest.raises(TargetError) as e:
        read_engine_metadata(out / "m.engine")
    assert "tokensieve build" in _assert_one_line(e)
    (out / "m.engine.json").write_text("{not json")
    with pytest.raises(TargetError) as e:
        read_engine_metadata(out / "m.engine")
    _assert_one_line(e)
    (out / "m.engine.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(TargetError):
        read_engine_metadata(out / "m.engine")


@pytest.mark.parametrize("change", [
    {"tensorrt_version": "0.9.0"},
    {"flavor": "tensorrt_llm"},
    *([{"flavor": "tensorrt"}] if available_flavors()["tensorrt"] is None else []),
])
def test_check_engine_compatible_refuses(change):
    meta = {"schema": "tokensieve.tensorrt-engine/1", "flavor": "tensorrt_rtx", "tensorrt_version": trt.__version__,
            "compute_capability": "8.6"}
    check_engine_compatible(meta)
    with pytest.raises(TargetError) as e:
        check_engine_compatible(meta | change)
    assert "tokensieve build" in _assert_one_line(e)


@pytest.mark.skipif(available_flavors()["tensorrt"] is not None, reason="standard TensorRT is installed")
def test_local_target_without_tensorrt(pruned_onnx, out):
    with pytest.raises(TargetError) as e:
        build_engine(pruned_onnx, out / "m.engine", BuildSpec(target="local"))
    assert "standard TensorRT is not installed" in _assert_one_line(e)
    assert not any(out.iterdir())


@pytest.mark.gpu
def test_rtx_engine_deserializes_on_gpu(pruned_onnx, out):
    cc = local_compute_capability()
    sm = "sm" + cc.replace(".", "") if cc else None
    if sm not in RTX_COMPUTE_CAPABILITIES:
        pytest.skip(f"needs a GPU TensorRT-RTX can target, found {cc}")
    info = build_engine(pruned_onnx, out / "m.engine", BuildSpec(target=f"rtx-{sm}"))
    check_engine_compatible(info.metadata)
    engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(info.engine_path.read_bytes())
    assert engine is not None
    assert [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)] == ["x", "y"]


def test_rtx_parser_link(tmp_path):
    from tokensieve.targets.tensorrt.flavors import ensure_rtx_parser_link
    assert ensure_rtx_parser_link(tmp_path) is None  # no libtensorrt_rtx.so.1 here: nothing to do
    (tmp_path / "libtensorrt_rtx.so.1").write_bytes(b"\x7fELF")
    (tmp_path / "libtensorrt_rtx.so").symlink_to("missing.so.1")  # dangling links are replaced
    link = ensure_rtx_parser_link(tmp_path)
    assert link == tmp_path / "libtensorrt_rtx.so" and link.is_symlink()
    assert link.readlink() == Path("libtensorrt_rtx.so.1")
    assert ensure_rtx_parser_link(tmp_path) == link  # idempotent
    assert sorted(p.name for p in tmp_path.iterdir()) == ["libtensorrt_rtx.so", "libtensorrt_rtx.so.1"]
