"""`tokensieve bench` / tokensieve.benchmark on the tiny built-in ViT export: JSON, markdown, PNG, sweep, errors."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from tokensieve import benchmark  # noqa: E402
from tokensieve.benchmark import BenchSettings, parse_batches, parse_sweep, time_models  # noqa: E402
from tokensieve.cli import main  # noqa: E402
from tokensieve.errors import ConfigError  # noqa: E402

HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
FAST = ["--blocks", "2", "--iters", "2", "--warmup", "1"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "out"
    assert main(["export", "--model", "tiny", "--prune", "cls-topk@1,2:0.5", "-o", str(out), "--no-build",
                 "--no-bench", "--verify-inputs", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def benched(exported, tmp_path_factory):
    """One `tokensieve bench` run: batches 1 and 2, a 2-point sweep of stage 0, every output file."""
    d = tmp_path_factory.mktemp("files")
    files = {"json": d / "b.json", "md": d / "b.md", "png": d / "b.png"}
    args = ["bench", str(exported), "--batch", "1,2", *FAST, "--sweep", "0.3,0.7", "--json", str(files["json"]),
            "--md", str(files["md"])] + (["--plot", str(files["png"])] if HAVE_MPL else [])
    assert main(args) == 0
    return exported, files


def test_json_has_every_measurement(benched):
    out, files = benched
    report = json.loads((out / "report.json").read_text())
    r = json.loads(files["json"].read_text())
    assert r["schema"] == "tokensieve.bench/1" and r["backend"] == "onnxruntime"
    assert r["device"].startswith("onnxruntime:")
    assert r["tokens_per_block"] == report["tokens_per_block"] == [65, 65, 33, 17]
    assert math.isclose(r["ideal_speedup"], report["macs_dense"] / report["macs_pruned"])
    assert [x["batch"] for x in r["results"]] == [1, 2]
    for x in r["results"]:
        for name in ("dense", "pruned"):
            s = x[name]
            assert s["count"] == 2 * 2  # blocks * iters
            assert 0 < s["min_ms"] <= s["median_ms"] <= s["p90_ms"] <= s["p99_ms"] <= s["max_ms"]
            assert math.isclose(s["throughput_ips"], x["batch"] * 1e3 / s["median_ms"])
            assert s["memory"]["kind"] == "host_rss_delta" and s["memory"]["peak_bytes"] >= 0
        assert math.isclose(x["speedup"], x["dense"]["median_ms"] / x["pruned"]["median_ms"])
        assert math.isclose(x["ratio_to_ideal"], x["speedup"] / r["ideal_speedup"])


def test_sweep_reexports_each_keep(benched):
    _, files = benched
    sweep = json.loads(files["json"].read_text())["sweep"]
    assert sweep["stage"] == 0 and sweep["after_block"] == 1 and sweep["batch"] == 1
    pts = sweep["points"]
    assert [p["keep"] for p in pts] == ["0.3", "0.7"]
    assert [p["tokens"] for p in pts] == [1 + math.ceil(0.3 * 64), 1 + math.ceil(0.7 * 64)]
    assert [p["recipe"] for p in pts] == ["cls-topk@1:0.3+cls-topk@2:0.5", "cls-topk@1:0.7+cls-topk@2:0.5"]
    assert pts[0]["ideal_speedup"] > pts[1]["ideal_speedup"] > 1
    for p in pts:
        assert math.isclose(p["speedup"], sweep["dense"]["median_ms"] / p["latency"]["median_ms"])
        assert p["tokens_per_block"][2] == p["tokens"]


def test_markdown_table(benched, exported):
    _, files = benched
    md = files["md"].read_text()
    lines = md.splitlines()
    header = lines.index("| batch | model | median ms | p90 ms | p99 ms | images/s | peak MiB | speedup | MAC-ideal | ratio |")
    rows = lines[header + 2: header + 6]
    assert [row.split("|")[1:3] for row in rows] == [[" 1 ", " dense "], [" 1 ", " pruned "], [" 2 ", " dense "],
                                                      [" 2 ", " pruned "]]
    assert all(row.count("|") == 11 for row in rows)
    assert "tokens 65→33→17" in lines[0] and "Token sweep: stage 0 (after block 1)" in md
    assert "| 0.3 | 21 |" in md and "| 0.7 | 46 |" in md
    assert not list(files["md"].parent.glob(".*"))  # written atomically: no temp files left
    assert not list(exported.glob(".sweep-*"))      # the sweep's exports are removed


@pytest.mark.skipif(not HAVE_MPL, reason="matplotlib is not installed (tokensieve[plot])")
def test_png_is_valid(benched):
    import matplotlib.image

    _, files = benched
    assert files["png"].read_bytes()[:8] == PNG_MAGIC
    img = matplotlib.image.imread(files["png"])
    assert img.ndim == 3 and img.shape[1] > img.shape[0] > 100  # two panels side by side
    assert float(np.std(img)) > 0.01                              # not blank


def test_stdout_is_the_markdown(exported, capsys):
    assert main(["bench", str(exported), *FAST]) == 0
    stdout = capsys.readouterr().out
    assert stdout.startswith("**tokensieve bench** `tiny`") and "| 1 | pruned |" in stdout and "speedup" in stdout


@pytest.mark.parametrize("text", ["", "0", "1,,2", "a", "1,1", "-1", "1.5", "8 32"])
def test_bad_batch_lists_are_one_line(text, exported, capsys):
    with pytest.raises(ConfigError) as e:
        parse_batches(text)
    assert "--batch" in _one_line(e)
    assert main(["bench", str(exported), "--batch", text]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tokensieve bench: error: --batch")


def test_parse_batches_and_sweep():
    assert parse_batches("1,8,32") == (1, 8, 32) and parse_batches(" 4 ") == (4,)
    assert parse_sweep("0.3, 0.70,98") == ("0.3", "0.7", "98")
    for bad, words in [("0.5", "at least two"), ("0.5,abc", "not a number"), ("0.5,1.5", "out of range"),
                       ("0.5,0.50", "twice")]:
        with pytest.raises(ConfigError) as e:
            parse_sweep(bad)
        assert words in _one_line(e)


def test_bad_sweep_stage_fails_before_timing(exported, capsys):
    assert main(["bench", str(exported), "--sweep", "0.3,0.5", "--sweep-stage", "2", *FAST]) == 2
    captured = capsys.readouterr()
    assert "--sweep-stage 2 does not exist" in captured.err and "block 1/" not in captured.err


def test_options_must_fit_the_backend():
    with pytest.raises(ConfigError) as e:
        BenchSettings(backend="onnxruntime", plugins="lib.so")
    assert "--plugins does not apply to --backend onnxruntime; it is an option of --backend tensorrt" == _one_line(e)
    with pytest.raises(ConfigError) as e:
        BenchSettings(backend="tensorrt", threads=2)
    assert "--threads" in _one_line(e) and "onnxruntime" in str(e.value)
    with pytest.raises(ConfigError) as e:
        BenchSettings(backend="cuda")
    assert "onnxruntime, tensorrt" in _one_line(e)


def test_missing_matplotlib_is_one_line(exported, monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with pytest.raises(ConfigError) as e:
        benchmark.require_matplotlib()
    assert _one_line(e) == "--plot needs matplotlib: pip install tokensieve[plot]"
    assert main(["bench", str(exported), "--plot", str(tmp_path / "b.png"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "pip install tokensieve[plot]" in err and "block 1/" not in err  # refused before timing
    assert not (tmp_path / "b.png").exists()


class _FakeRunner:
    """Records the life cycle, so the test can check that only one model is resident at a time."""

    log: list = []
    active: set = set()

    def __init__(self, path, *, name):
        self.name = name

    def activate(self):
        assert not _FakeRunner.active, f"{self.name} activated while {_FakeRunner.active} is resident"
        _FakeRunner.active.add(self.name)
        _FakeRunner.log.append(("activate", self.name))
        return self

    def deactivate(self):
        _FakeRunner.active.discard(self.name)

    device_label = "fake"

    def make_random_feeds(self, batch, seed):
        return {"x": np.zeros((batch, 2), np.float32)}

    def infer(self, feeds):
        assert self.name in _FakeRunner.active
        _FakeRunner.log.append(("infer", self.name))
        return {}

    def memory_usage(self):
        return {"kind": "fake", "peak_bytes": 10 if self.name == "dense" else 5}


def test_time_models_keeps_one_model_resident():
    _FakeRunner.log, _FakeRunner.active = [], set()
    stats = time_models(_FakeRunner, {"dense": Path("d"), "pruned": Path("p")}, batch=3, blocks=4, iters=2, warmup=1)
    activations = [n for op, n in _FakeRunner.log if op == "activate"]
    assert activations == ["dense", "pruned", "dense", "pruned", "dense"]  # A B B A A B B A: reload on change only
    assert not _FakeRunner.active
    assert stats["dense"]["count"] == stats["pruned"]["count"] == 8
    assert stats["dense"]["memory"] == {"kind": "fake", "peak_bytes": 10} and stats["pruned"]["device"] == "fake"


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None, reason="tensorrt-rtx is not installed")
def test_tensorrt_backend_builds_dense_engine_on_demand(exported, tmp_path, capsys):
    import shutil

    from tokensieve import api
    from tokensieve.runtime.tensorrt_flavors import local_compute_capability

    out = tmp_path / "out"
    shutil.copytree(exported, out)
    assert main(["bench", str(out), "--backend", "tensorrt", *FAST]) == 2
    assert "holds no engine built from model.onnx" in capsys.readouterr().err
    api.build(out / "model.onnx", target="rtx-sm86", precision="fp16", max_batch=2)  # -> model.rtx-sm86.fp16.engine
    rc = main(["bench", str(out), "--backend", "tensorrt", "--batch", "1", *FAST])
    captured = capsys.readouterr()
    assert "building dense.rtx-sm86.fp16.engine for rtx-sm86 (max batch 2)" in captured.err
    meta = json.loads((out / "dense.rtx-sm86.fp16.engine.json").read_text())
    assert meta["target"] == "rtx-sm86" and meta["optimization_profile"]["pixel_values"]["max"][0] == 2
    assert meta["precision"] == "fp16"  # the model engine's precision, so the pair compares like with like
    assert [e["file"] for e in json.loads((out / "report.json").read_text())["engines"]] == [
        "model.rtx-sm86.fp16.engine", "dense.rtx-sm86.fp16.engine"]
    assert meta["onnx"]["file"] == "dense.onnx" and meta["tokensieve"] == {"dense": True}
    if local_compute_capability() is None:  # no GPU: the runner refuses in one line after the checks passed
        assert rc == 2 and "needs an NVIDIA GPU" in captured.err.strip().splitlines()[-1]


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None, reason="tensorrt-rtx is not installed")
def test_truncated_model_engine_is_refused_before_the_dense_engine_is_built(exported, tmp_path, capsys):
    import shutil

    from tokensieve import api

    out = tmp_path / "out"
    shutil.copytree(exported, out)
    engine = api.build(out / "model.onnx", target="rtx-sm86", max_batch=2).engine_path
    engine.write_bytes(engine.read_bytes()[:1000])
    assert main(["bench", str(out), "--backend", "tensorrt", *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "is 1000 bytes but its metadata records" in err[-1] and "tokensieve build --target rtx-sm86" in err[-1]
    assert not list(out.glob("dense*.engine"))
