"""Engine build options (opt batch, timing cache, workspace, builder optimization level, layer info), engine files
named per target and precision and listed in an export folder's report, and the Jetson (`--target local` on TensorRT
10.x, sm87) path, on a stand-in TensorRT (tests/fake_tensorrt.py) and on TensorRT-RTX where it is installed."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import fake_tensorrt  # noqa: E402 - tests/fake_tensorrt.py

from tokensieve import api  # noqa: E402
from tokensieve.cli import main  # noqa: E402
from tokensieve.errors import ConfigError  # noqa: E402
from tokensieve.runtime import tensorrt_flavors  # noqa: E402
from tokensieve.targets.base import BuildSpec, engine_file_name, is_engine_file_name, parse_target  # noqa: E402

HAVE_RTX = importlib.util.find_spec("tensorrt_rtx") is not None


def _score_model(path: Path) -> Path:
    """x [batch, 17, 8] -> MatMul -> ReduceMean (scores) -> TopK(6): values and indices; batch is dynamic."""
    import numpy as np

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 8)).astype("float32"), "w")
    k = numpy_helper.from_array(np.array([6], dtype="int64"), "k")
    axes = numpy_helper.from_array(np.array([-1], dtype="int64"), "axes")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
             helper.make_node("ReduceMean", ["h", "axes"], ["s"], name="score", keepdims=0),
             helper.make_node("TopK", ["s", "k"], ["vals", "idx"], name="select", axis=-1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 17, 8])],
                              [helper.make_tensor_value_info("vals", TensorProto.FLOAT, ["batch", 6]),
                               helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch", 6])], [w, k, axes])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


@pytest.fixture
def orin(monkeypatch):
    """JetPack 6's TensorRT 10.3 on a Jetson Orin (compute capability 8.7), as far as the builder can tell."""
    trt = fake_tensorrt.install(monkeypatch, "8.7")
    yield trt
    tensorrt_flavors._try_import.cache_clear()  # forget the fake once sys.modules is restored


def test_jetson_local_build_uses_every_option(orin, tmp_path):
    onnx_path = _score_model(tmp_path / "model.onnx")
    cache, layers = tmp_path / "caches" / "orin.cache", tmp_path / "layers.json"
    info = api.build(onnx_path, target="local", precision="fp16", max_batch=4, opt_batch=2, workspace_mib=256,
                     builder_optimization_level=5, timing_cache=cache, layer_info=layers)
    assert info.engine_path == tmp_path / "model.local-sm87.fp16.engine"  # named per GPU and precision
    m = info.metadata
    assert (m["flavor"], m["tensorrt_version"], m["compute_capability"], m["target"]) == ("tensorrt", "10.3.0", "8.7",
                                                                                           "local")
    assert m["build_options"] == {"opt_batch": 2, "workspace_mib": 256, "builder_optimization_level": 5,
                                  "timing_cache": "orin.cache", "layer_info": "layers.json"}
    assert m["optimization_profile"]["x"] == {"min": [1, 17, 8], "opt": [2, 17, 8], "max": [4, 17, 8]}
    first = fake_tensorrt.log[-1]
    # TensorRT 10.x is weakly typed: FP16 flag, and the score / TopK layers pinned to fp32 (obeyed)
    assert {"FP16", "OBEY_PRECISION_CONSTRAINTS"} <= set(first["flags"]) and "score" in first["pinned_fp32"]
    assert first["pools"] == {orin.MemoryPoolType.WORKSPACE: 256 << 20} and first["level"] == 5
    assert first["verbosity"] is orin.ProfilingVerbosity.DETAILED and first["cache_hits"] == 0
    inspected = {lay["Name"]: lay["Precision"] for lay in json.loads(layers.read_text())["Layers"]}
    assert list(inspected) == ["proj", "score", "select"] and inspected["score"] == "FP32"  # the inspector's JSON
    saved = json.loads(cache.read_bytes())["entries"]
    assert saved and not list(cache.parent.glob(".*"))  # created (folder too), no temp file left

    # a second build (another precision: another file) reuses the cache: every layer is a hit
    info2 = api.build(onnx_path, target="local", precision="fp32", max_batch=4, timing_cache=cache)
    assert info2.engine_path.name == "model.local-sm87.fp32.engine" and info.engine_path.is_file()
    assert fake_tensorrt.log[-1]["cache_hits"] == len(saved) and fake_tensorrt.log[-1]["level"] == 3
    assert "FP16" not in fake_tensorrt.log[-1]["flags"]
    assert info2.metadata["build_options"]["builder_optimization_level"] == 3  # TensorRT's default, recorded


def test_timing_cache_of_another_gpu_or_garbage_is_one_line(orin, tmp_path):
    onnx_path = _score_model(tmp_path / "model.onnx")
    cache = tmp_path / "t.cache"
    cache.write_bytes(b"\x00not a cache")
    with pytest.raises(ConfigError, match="is not a TensorRT timing cache; delete it"):
        api.build(onnx_path, target="local", timing_cache=cache)
    cache.write_text(json.dumps({"device": "8.6", "entries": []}))
    with pytest.raises(ConfigError, match="made by another TensorRT version or GPU"):
        api.build(onnx_path, target="local", timing_cache=cache)
    assert not list(tmp_path.glob("*.engine"))


def test_build_in_an_export_folder_is_listed_in_its_report(orin, tmp_path):
    """`tokensieve build` of an export folder's ONNX into it adds the engine to report.json's "engines" (what
    `inspect` lists); a rebuild of the same file replaces its entry; an engine elsewhere leaves the report alone."""
    folder = tmp_path / "exp"
    folder.mkdir()
    _score_model(folder / "model.onnx")
    (folder / "report.json").write_text(json.dumps({"schema": api.REPORT_SCHEMA, "engines": []}))
    assert main(["build", str(folder / "model.onnx"), "--target", "local", "--precision", "fp16"]) == 0
    assert main(["build", str(folder / "model.onnx"), "--target", "local", "--precision", "fp16"]) == 0
    assert main(["build", str(folder / "model.onnx"), "--target", "local", "-o", str(tmp_path / "elsewhere.engine")]) == 0
    engines = json.loads((folder / "report.json").read_text())["engines"]
    assert engines == [{"file": "model.local-sm87.fp16.engine", "metadata": "model.local-sm87.fp16.engine.json",
                        "onnx": "model.onnx", "target": "local", "precision": "fp16"}]
    assert api.folder_engines(folder) == ["model.local-sm87.fp16.engine"]


def test_engine_file_names():
    assert engine_file_name("model", "rtx-sm89", "fp16") == "model.rtx-sm89.fp16.engine"
    assert engine_file_name("dense", "local", "fp32", "8.7") == "dense.local-sm87.fp32.engine"
    stems = ("model", "dense")
    assert all(is_engine_file_name(n, stems) for n in ("model.rtx-sm89.fp16.engine", "dense.local-sm87.fp32.engine",
                                                        "model.local.fp16.engine"))
    assert not any(is_engine_file_name(n, stems) for n in ("model.engine", "mine.engine", "model.rtx-sm87.fp16.engine",
                                                            "other.rtx-sm86.fp32.engine", "model.rtx-sm86.int3.engine"))


@pytest.mark.parametrize("kwargs, words", [
    ({"builder_optimization_level": 6}, "--builder-opt-level 6 must be 0..5"),
    ({"workspace_mib": 0}, "--workspace 0 must be a positive"),
    ({"opt_batch": 9, "max_batch": 8}, "min <= opt <= max"),
    ({"timing_cache": "t.cache"}, "TensorRT-RTX (rtx-sm86) keeps no timing cache"),
    ({"layer_info": "l.json"}, "--layer-info reads the built engine back"),
])
def test_bad_options_fail_before_building(kwargs, words, monkeypatch):
    monkeypatch.setattr("tokensieve.targets.base.local_compute_capability", lambda: None)  # no GPU here
    with pytest.raises(ConfigError) as e:
        BuildSpec(target="rtx-sm86", **kwargs)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_rtx_sm87_says_what_to_use():
    with pytest.raises(ConfigError) as e:
        parse_target("rtx-sm87")
    assert "cannot build for sm87 (Jetson Orin): use --target local on that device" in str(e.value)


def test_cli_refuses_bad_engine_flags(capsys, tmp_path):
    onnx_path = _score_model(tmp_path / "model.onnx")
    assert main(["build", str(onnx_path), "--builder-opt-level", "7"]) == 2
    assert main(["build", str(onnx_path), "--target", "rtx-sm87"]) == 2
    assert main(["build", str(onnx_path), "--timing-cache", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and "--builder-opt-level" in err[0] and "--target local" in err[1] and "timing" in err[2]
    assert not list(tmp_path.glob("*.engine"))


@pytest.mark.skipif(not HAVE_RTX, reason="tensorrt-rtx is not installed")
def test_rtx_build_records_options(tmp_path):
    onnx_path = _score_model(tmp_path / "model.onnx")
    info = api.build(onnx_path, target="rtx-sm89", max_batch=4, opt_batch=3, workspace_mib=64,
                     builder_optimization_level=0)
    assert info.engine_path.name == "model.rtx-sm89.fp32.engine"
    assert info.metadata["build_options"] == {"opt_batch": 3, "workspace_mib": 64, "builder_optimization_level": 0,
                                                   "timing_cache": None, "layer_info": None}
    assert info.metadata["optimization_profile"]["x"]["opt"] == [3, 17, 8]


def test_export_without_tensorrt_finishes_with_a_hint(monkeypatch, tmp_path, capsys):
    """A plain install (no TensorRT flavor): the export completes its ONNX result, skips step 4 with the reason, and
    the summary's engine line says how to get one; `inspect` repeats it."""
    monkeypatch.setattr(tensorrt_flavors, "available_flavors", lambda: {"tensorrt_rtx": None, "tensorrt": None})
    out = tmp_path / "out"
    assert main(["export", "--model", "tiny", "--prune", "cls-topk@1:0.5", "-o", str(out), "--no-bench",
                 "--verify-inputs", "1"]) == 0
    captured = capsys.readouterr()
    assert "[4/5] engine build skipped (TensorRT-RTX is not installed)" in captured.err
    hint = (f"engine          none: TensorRT-RTX is not installed: pip install 'tokensieve[rtx]', then tokensieve "
            f"build {out / 'model.onnx'} --target rtx-sm86")
    assert hint in captured.out and "error" not in captured.err
    report = json.loads((out / "report.json").read_text())
    assert report["engines"] == [] and "build" not in report and not list(out.glob("*.engine"))
    assert main(["inspect", str(out)]) == 0
    assert "none: TensorRT-RTX is not installed: pip install" in capsys.readouterr().out


def test_target_interface_names_the_engine_too(orin, tmp_path):
    from tokensieve.targets.registry import TARGETS

    info = TARGETS["tensorrt"].build(_score_model(tmp_path / "model.onnx"), BuildSpec(target="local", precision="fp16"))
    assert info.engine_path == tmp_path / "model.local-sm87.fp16.engine" and info.metadata_path.is_file()
