"""`tokensieve export --optimize --precision int8 [--calib DIR]`: the ORT-optimized pair verified like the export,
int8 Q/DQ copies compared with fp32 (kept-token overlap, cosine), a TensorRT-RTX int8 engine built from the Q/DQ graph,
each pair timed; the precision checks of `tokensieve build` (int8 <=> a symmetric Q/DQ graph).

One CLI export of the tiny ViT (with calibration images) serves every test; the engine tests need TensorRT-RTX."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from PIL import Image

from tokensieve import api
from tokensieve.cli import main
from tokensieve.runtime.tensorrt_flavors import available_flavors

RTX = available_flavors()["tensorrt_rtx"] is not None
needs_rtx = pytest.mark.skipif(not RTX, reason="tensorrt-rtx is not installed")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    gen = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(gen.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory, images):
    out = tmp_path_factory.mktemp("int8") / "out"
    argv = ["export", "--model", "tiny", "--prune", "cls-topk@1:0.5", "-o", str(out), "--optimize", "--precision",
            "int8", "--calib", str(images), "--verify-inputs", "3", "--bench-blocks", "1", "--bench-iters", "2"]
    if not RTX:
        argv.append("--no-build")
    assert main(argv) == 0
    return out


def _report(folder):
    return json.loads((folder / "report.json").read_text())


def test_optimized_pair_fuses_alike_and_verifies(folder):
    r = _report(folder)
    fused = r["optimize"]["fused"]
    assert fused["model"].get("SkipLayerNormalization", 0) == fused["dense"].get("SkipLayerNormalization", 0) > 0
    assert r["optimize"]["verify"]["passed"] and all(r["optimize"]["verify"]["indices_match"])
    for name in api.OPTIMIZED.values():
        assert (folder / name).is_file()
    # the report names the files where they are, not in the staging folder they were written in
    assert r["optimize"]["files"] == {k: str(folder / v) for k, v in api.OPTIMIZED.items()}
    assert r["int8"]["files"] == {k: str(folder / v) for k, v in api.QUANTIZED.items()}
    assert r["bench_optimized"]["dense"]["median_ms"] > 0 and r["bench_optimized"]["ideal_speedup"] == r["ideal_speedup"]


def test_int8_copies_are_symmetric_and_close_to_fp32(folder):
    r = _report(folder)
    q = r["int8"]
    assert q["calibration"] == "images" and q["symmetric"] is True
    assert q["kept_overlap"][0] >= 0.9 and q["cosine"]["min"] >= 0.99, q
    model = onnx.load(str(folder / api.QUANTIZED["model"]))
    inits = {i.name: i for i in model.graph.initializer}
    zero_points = [n.input[2] for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    assert zero_points and all(not numpy_helper.to_array(inits[z]).any() for z in zero_points)
    assert "bench_int8" in r


@needs_rtx
def test_int8_engine_is_built_from_the_qdq_graph(folder):
    r = _report(folder)
    engine = folder / "model.rtx-sm86.int8.engine"
    meta = json.loads((folder / (engine.name + ".json")).read_text())
    assert engine.is_file() and meta["precision"] == "int8" and meta["onnx"]["file"] == api.QUANTIZED["model"]
    assert [e["file"] for e in r["engines"]] == [engine.name]


@needs_rtx
def test_build_precision_must_match_the_graph(folder, tmp_path, capsys):
    """int8 of a float graph, fp32 of a Q/DQ graph and int8 of an asymmetric Q/DQ graph: one line each, exit 2."""
    asym = tmp_path / "asym"
    asym.mkdir()
    for name in ("model.onnx", "model.debug.onnx", "dense.onnx", "report.json", api.WEIGHTS):
        (asym / name).write_bytes((folder / name).read_bytes())
    assert main(["quantize", str(asym)]) == 0          # ORT's usual asymmetric activations
    capsys.readouterr()
    cases = [(folder / "model.onnx", "int8", "has none"), (folder / api.QUANTIZED["model"], "fp32", "--precision int8"),
             (asym / api.QUANTIZED["model"], "int8", "nonzero zero points")]
    for onnx_path, precision, want in cases:
        code = main(["build", str(onnx_path), "--precision", precision, "-o", str(tmp_path / "x.engine")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and want in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x.engine").exists()


def test_flag_errors(tmp_path, capsys):
    assert main(["export", "--model", "tiny", "-o", str(tmp_path / "o"), "--calib", str(tmp_path)]) == 2
    assert "add --precision int8" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_reexport_removes_stale_optimized_and_int8_files(folder, tmp_path):
    out = tmp_path / "again"
    out.mkdir()
    for p in folder.iterdir():
        if p.is_file():
            (out / p.name).write_bytes(p.read_bytes())
    assert main(["export", "--model", "tiny", "--prune", "cls-topk@1:0.5", "-o", str(out), "--no-build", "--no-bench",
                 "--verify-inputs", "1"]) == 0
    left = {p.name for p in out.iterdir()}
    assert not left & {*api.OPTIMIZED.values(), *api.QUANTIZED.values()}, left
    assert not any(n.endswith(".engine") for n in left)
