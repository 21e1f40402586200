"""`tokensieve tune --images`: the Pareto front and the budget choice on synthetic points (pure), the grid flags, and
two end-to-end sweeps on the toy ViT (real exports, ONNX Runtime timing and evaluation) with and without labels."""
from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokensieve.cli import main
from tokensieve.errors import ConfigError
from tokensieve.pareto import (SweepPoint, check_max_drop, default_after_blocks, pareto_front, parse_after_blocks,
                               parse_keeps, parse_methods, within_budget)

P = SweepPoint


# ------------------------------------------------------------------ the front


def test_front_dominance_ties_and_dense():
    pts = [P("dense", 10.0, 0.95), P("a", 5.0, 0.90), P("b", 6.0, 0.85),   # b: slower and worse than a
           P("c", 5.0, 0.90),                                               # c ties a exactly: both stay
           P("d", 7.0, 0.90), P("e", 5.0, 0.80), P("f", 8.0, 0.94)]         # d, e: equal on one axis, worse on the other
    assert pareto_front(pts) == {"dense", "a", "c", "f"}


def test_front_drops_dense_when_a_recipe_is_as_accurate_and_faster():
    assert pareto_front([P("dense", 10.0, 0.9), P("a", 9.0, 0.9)]) == {"a"}
    assert pareto_front([P("dense", 10.0, 0.9), P("a", 10.0, 0.9)]) == {"dense", "a"}   # identical: a tie
    assert pareto_front([P("dense", 10.0, 0.9), P("a", 11.0, 0.95)]) == {"dense", "a"}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 6), st.integers(0, 6)), min_size=1, max_size=12))
def test_front_properties(raw):
    pts = [P(f"p{i}", float(lat), acc / 6) for i, (lat, acc) in enumerate(raw)]
    front = pareto_front(pts)

    def dominates(q, p):
        return (q.latency_ms <= p.latency_ms and q.accuracy >= p.accuracy
                and (q.latency_ms, q.accuracy) != (p.latency_ms, p.accuracy))

    by = {p.name: p for p in pts}
    assert front and all(not dominates(by[a], by[b]) for a in front for b in front)     # mutually non-dominated
    assert all(any(dominates(by[f], p) for f in front) for p in pts if p.name not in front)
    fastest = min(p.latency_ms for p in pts)
    assert max(p.accuracy for p in pts if p.latency_ms == fastest) in {by[f].accuracy for f in front}


# ------------------------------------------------------------------ the budget choice


def test_budget_takes_the_fastest_within_the_drop():
    dense = P("dense", 10.0, 0.90)
    pts = [dense, P("fast", 4.0, 0.80), P("mid", 6.0, 0.896), P("mid2", 6.0, 0.898), P("slow", 9.0, 0.91)]
    assert [p.name for p in within_budget(pts, dense, 0.5)] == ["mid2", "mid", "slow"]  # equal latency: better first
    assert within_budget(pts, dense, 10.0)[0].name == "fast"
    assert [p.name for p in within_budget(pts, dense, 0.0)] == ["slow"]   # more accurate than dense: a drop < 0


def test_budget_never_slower_than_dense():
    dense = P("dense", 10.0, 0.90)
    pts = [dense, P("same", 10.0, 0.90), P("slower", 10.5, 0.95)]
    assert within_budget(pts, dense, 100.0) == []            # nothing faster: dense stays
    assert within_budget([dense, P("a", 5.0, 0.80)], dense, 2.0) == []   # faster but 10 pp worse: dense stays


def test_budget_edge_counts_exactly():
    # 0.5 pp of 200 images is one image: exactly at the budget is within it, whatever the float rounding
    dense = P("dense", 10.0, 181 / 200)
    assert [p.name for p in within_budget([dense, P("a", 5.0, 180 / 200)], dense, 0.5)] == ["a"]
    assert within_budget([dense, P("a", 5.0, 179 / 200)], dense, 0.5) == []


@pytest.mark.parametrize("bad", [math.nan, -0.1, 100.5, math.inf, True, "1"])
def test_max_drop_out_of_range(bad):
    with pytest.raises(ConfigError, match="--max-drop"):
        check_max_drop(bad)


# ------------------------------------------------------------------ the grid


def test_default_after_blocks():
    assert default_after_blocks(12) == ((3,), (3, 6, 9))
    assert default_after_blocks(6) == ((1,), (1, 3, 4))
    assert default_after_blocks(4) == ((1,), (1, 2))       # never after the last block
    assert default_after_blocks(2) == ((0,),)


def test_grid_parsers():
    assert parse_methods("cls-topk, tome") == ("cls-topk", "tome")
    assert parse_keeps("0.5,0.25") == (0.5, 0.25)
    assert parse_after_blocks(["3", "3,6,9"]) == ((3,), (3, 6, 9))


@pytest.mark.parametrize("fn,arg,match", [
    (parse_methods, "cls-topk,nope", "unknown method 'nope'"),
    (parse_methods, "tome,tome", "twice"),
    (parse_keeps, "0.5,", "empty entries"),
    (parse_keeps, "1", "> 0 and < 1"),
    (parse_keeps, "nan", "> 0 and < 1"),
    (parse_keeps, "half", "not a number"),
    (parse_after_blocks, ["3", "-1"], "not a block index"),
    (parse_after_blocks, ["6,3"], "increasing order"),
    (parse_after_blocks, ["3", "3"], "twice"),
])
def test_grid_parser_errors(fn, arg, match):
    with pytest.raises(ConfigError, match=match):
        fn(arg)


# ------------------------------------------------------------------ CLI errors (before any model is loaded)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from tokensieve import toy

    root = tmp_path_factory.mktemp("pareto")
    return {"root": root, "labelled": toy.write_image_folder(root / "labelled", 16),
            "unlabelled": toy.write_image_folder(root / "unlabelled", 16, labels=False)}


@pytest.mark.parametrize("args,match", [
    (["--max-drop", "nan"], "argument --max-drop"),
    (["--max-drop", "101"], "<= 100"),
    (["--max-drop", "-1"], "argument --max-drop"),
    (["--images", "{root}/nope"], "does not exist"),
    (["--images", "{root}/empty"], "No images"),
    (["--keeps", "0.5,2"], "keep ratio"),
    (["--methods", "cls-topk,bogus"], "unknown method"),
    (["--time-budget", "0"], "argument --time-budget"),
    (["--prune", "cls-topk@1:0.5"], "drop --prune"),
])
def test_cli_errors_are_one_line(images, tmp_path, capsys, args, match):
    (images["root"] / "empty").mkdir(exist_ok=True)
    argv = ["tune", "--model", "toy", "-o", str(tmp_path / "t.toml")]
    if "--images" not in args:
        argv += ["--images", str(images["labelled"])]
    rc = main(argv + [a.format(root=images["root"]) for a in args])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("tokensieve tune: error: ") and match in err[0], err
    assert not list(tmp_path.iterdir())


def test_images_only_flags_need_images(tmp_path, capsys):
    rc = main(["tune", "--model", "tiny", "-o", str(tmp_path / "t.toml"), "--max-drop", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == "tokensieve tune: error: --max-drop applies to the accuracy sweep only; add --images DIR"


# ------------------------------------------------------------------ end to end on the toy ViT


FAST = ["--blocks", "2", "--iters", "3", "--warmup", "1"]


@pytest.fixture(scope="module")
def shared_exports():
    """api.export memoized by recipe for this module's sweeps: both load the same toy weights, so the unlabelled
    sweep reuses the labelled one's dense and cls-topk@1:0.5 exports (~8 s each on this machine) instead of
    repeating them; everything after the export (eager screening, timing, ONNX Runtime check) runs again."""
    from tokensieve import api

    real, cache = api.export, {}

    def export(model, example, recipe, **kw):
        key = (str(recipe.shorthand() if hasattr(recipe, "shorthand") else recipe), tuple(example.shape))
        if key not in cache:
            cache[key] = real(model, example, recipe, **kw)
        return cache[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(api, "export", export)
        yield cache


@pytest.fixture(scope="module")
def labelled_run(images, shared_exports):
    """2 methods x 2 keeps at block 1 with a time budget that runs out after the first candidate."""
    import contextlib
    import io

    out = images["root"] / "lab"
    buf, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
        rc = main(["tune", "--model", "toy", "--images", str(images["labelled"]), "--methods", "cls-topk,random",
                   "--keeps", "0.5,0.7", "--after-blocks", "1", "--time-budget", "0.001", "--max-drop", "100",
                   "-o", str(out / "tuned.toml"), *FAST])
    assert rc == 0, err.getvalue()
    return {"out": out, "printed": buf.getvalue(), "log": err.getvalue(),
            "report": json.loads((out / "tuned.pareto.json").read_text())}


def test_labelled_sweep_report(labelled_run, images):
    import torch

    from tokensieve import toy
    from tokensieve.models import load_model

    r = labelled_run["report"]
    assert r["metric"] == "top1" and r["num_images"] == 16 and r["grid"]["candidates"] == 4
    # the time budget ran out at once: one candidate swept (always at least one), three reported as not swept
    assert r["grid"]["swept"] == 1 and r["grid"]["not_swept"] == 3
    c0, *rest = r["candidates"]
    assert c0["status"] == "ok" and c0["recipe"] == "cls-topk@1:0.5" and c0["tokens"] == [65, 33]
    assert [x["status"] for x in rest] == ["not swept"] * 3 and "time budget" in rest[0]["reason"]
    # dense top-1 counted independently: the toy model on the same held-out images, labels by class-folder name
    model, _ = load_model("toy")
    x, y = toy.make_images(16, toy.HELDOUT_SEED)
    with torch.no_grad():
        hits = int((model(pixel_values=toy.to_pixels(x)).logits.argmax(-1).numpy() == y).sum())
    assert r["dense"]["accuracy"]["count"] == hits
    # dense and the candidate timed in one run, ratios from it
    for row in (r["dense"], c0):
        assert row["latency"]["count"] == 2 * 3 and row["latency"]["median_ms"] > 0
    assert c0["speedup"] == pytest.approx(r["dense"]["latency"]["median_ms"] / c0["latency"]["median_ms"])
    assert set(r["front"]) <= {"dense", "c0"} and r["front"]
    assert r["dense"]["on_front"] == ("dense" in r["front"])


def test_labelled_sweep_choice_and_files(labelled_run):
    from tokensieve.recipe import load_recipe

    r, out = labelled_run["report"], labelled_run["out"]
    (choice,) = r["choices"]
    assert choice["max_drop"] == 100
    c0, dense = r["candidates"][0], r["dense"]
    if c0["latency"]["median_ms"] < dense["latency"]["median_ms"]:   # within a 100 pp budget: chosen if faster
        assert choice["chosen"] == "c0" and choice["recipe"] == "cls-topk@1:0.5"
        # the winner's accuracy comes from its ONNX on ONNX Runtime, against dense.onnx on the same images
        onnx = choice["onnx"]
        assert onnx["backend"].startswith("CPU") or "CPU" in onnx["backend"]
        assert onnx["dense_top1"]["count"] == dense["accuracy"]["count"]
        assert abs(onnx["top1"]["count"] - c0["accuracy"]["count"]) <= 1      # ONNX vs eager: at most one flip
        assert load_recipe(out / "tuned.toml").shorthand() == "cls-topk@1:0.5"
        assert r["recipe_file"] == str(out / "tuned.toml") and "wrote" in labelled_run["printed"]
    else:                                                           # never slower than dense
        assert choice["chosen"] == "dense" and not (out / "tuned.toml").exists() and r["recipe_file"] is None
    md = (out / "tuned.pareto.md").read_text()
    assert "## Pareto front" in md and "Dense baseline" in md and "cls-topk@1:0.5" in md and "not swept" in md
    if "matplotlib" in sys.modules or _has_matplotlib():
        assert (out / "tuned.pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "skipping the Pareto plot" in labelled_run["log"]


def _has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def test_unlabelled_sweep_uses_agreement(images, tmp_path, capsys, shared_exports, labelled_run):
    out = tmp_path / "t.json"
    rc = main(["tune", "--model", "toy", "--images", str(images["unlabelled"]), "--methods", "cls-topk", "--keeps",
               "0.5", "--after-blocks", "1", "--max-drop", "100", "-o", str(tmp_path / "t.json"), "--json",
               str(tmp_path / "front.json"), *FAST])
    assert rc == 0, capsys.readouterr().err
    r = json.loads((tmp_path / "front.json").read_text())
    assert r["metric"] == "agreement_top1" and r["classes"] == []
    assert r["dense"]["accuracy"]["value"] == 1.0          # dense agrees with itself
    (c0,) = r["candidates"]
    assert c0["status"] == "ok" and 0 <= c0["accuracy"]["value"] <= 1
    assert np.isclose(c0["drop_pp"], 100 * (1 - c0["accuracy"]["value"]))
    (choice,) = r["choices"]
    if choice["chosen"] == "c0":
        assert "top1" not in choice["onnx"] and choice["onnx"]["drop_pp"] == pytest.approx(
            100 * (1 - choice["onnx"]["agreement_top1"]["value"]))
        assert json.loads(out.read_text())["stages"][0]["method"] == "cls-topk"
    else:
        assert not out.exists()
    assert "agreement" in capsys.readouterr().out


def test_pareto_toy_script_writes_the_docs_files(tmp_path, shared_exports, labelled_run, capsys):
    """scripts/pareto_toy.py end to end on a 1-candidate grid (exports shared with the sweeps above)."""
    from tokensieve.scripts import pareto_toy

    assert pareto_toy.main(["--images", "16", "--methods", "cls-topk", "--keeps", "0.5", "--after-blocks", "1",
                            "--blocks", "2", "--iters", "3", "--warmup", "1", "--out-dir", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "pareto.json").read_text())
    assert r["model"] == "toy" and r["threads"] == 1 and [c["max_drop"] for c in r["choices"]] == [0.5, 2.0]
    assert r["images"].startswith("toy held-out split, first 16") and r["metric"] == "top1"
    md = (tmp_path / "pareto.md").read_text()
    assert md.startswith("# Pareto front on the toy ViT") and "Generated by `python -m tokensieve.scripts.pareto_toy`" in md
    assert "| 0.5 |" in md and "| 2 |" in md and "Dense baseline" in md and md in capsys.readouterr().out
    if _has_matplotlib():
        assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
