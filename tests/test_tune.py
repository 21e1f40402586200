"""`tokensieve tune`: the staircase logic on injected timing tables (pure), and one end-to-end run on the tiny model."""
from __future__ import annotations

import json
import tomllib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokensieve.errors import ConfigError
from tokensieve.recipe import load_recipe, parse_recipe, resolve_recipe
from tokensieve.tune import Step, candidate_keeps, choose, find_steps, median_noise, recipe_file_text, snap_keep


def table(ks, ms):
    return dict(zip(ks, ms))


# ------------------------------------------------------------------ find_steps


def test_find_steps_clean_staircase():
    pts = table(range(10, 22, 2), [1.0, 1.0, 1.01, 2.0, 2.0, 3.0])
    assert find_steps(pts, tol=0.02) == [Step(10, 14, 1.0), Step(16, 18, 2.0), Step(20, 20, 3.0)]


def test_find_steps_steady_slope_does_not_chain():
    # +1.5 % per point: each neighbour is within tol, but the step is measured from its lowest point
    pts = {k: 1.0 * 1.015 ** i for i, k in enumerate(range(0, 20, 2))}
    steps = find_steps(pts, tol=0.02)
    assert all(s.last - s.first <= 2 for s in steps)
    assert len(steps) == 5


def test_find_steps_flat_and_drop():
    assert find_steps(table([1, 2, 3], [5.0, 5.0, 5.0])) == [Step(1, 3, 5.0)]
    # a drop below floor*(1-tol) starts a new (lower) step: non-monotone staircases stay visible
    assert find_steps(table([1, 2, 3], [5.0, 4.0, 4.0])) == [Step(1, 1, 5.0), Step(2, 3, 4.0)]


# ------------------------------------------------------------------ snap_keep


def test_snap_to_right_edge_of_requested_step():
    pts = table([10, 12, 14, 16, 18], [1.0, 1.0, 1.0, 2.0, 2.0])
    assert snap_keep(pts, 12, dense_ms=3.0).keep == 14
    assert snap_keep(pts, 16, dense_ms=3.0).keep == 18   # at the start of a step: take the whole step


def test_snap_requested_already_at_right_edge():
    s = snap_keep(table([10, 12, 14], [1.0, 1.5, 2.0]), 12, dense_ms=3.0)
    assert s.keep == 12 and "right edge" in s.reason


def test_snap_ties_go_to_the_larger_k():
    assert snap_keep(table([10, 12, 14, 16], [1.0, 1.0, 1.0, 1.0]), 10, dense_ms=2.0).keep == 16
    # exactly at the tolerance counts as the same time
    assert snap_keep(table([10, 12], [1.0, 1.02]), 10, dense_ms=2.0, tol=0.02).keep == 12


def test_snap_flat_staircase():
    flat = table([10, 12, 14], [1.0, 1.0, 1.0])
    assert snap_keep(flat, 12, dense_ms=2.0).keep == 14          # below dense: all the tokens for free
    dropped = snap_keep(flat, 12, dense_ms=1.0)                  # as slow as dense: pruning does not pay
    assert dropped.keep is None and "dense" in dropped.reason
    assert snap_keep(flat, 12, dense_ms=1.01, tol=0.02).keep is None   # within noise of dense: not faster


def test_snap_monotone_increasing_keeps_requested():
    pts = table([10, 12, 14, 16], [1.0, 1.1, 1.2, 1.3])
    assert snap_keep(pts, 12, dense_ms=2.0).keep == 12


def test_snap_monotone_decreasing_takes_largest():
    pts = table([10, 12, 14, 16], [1.3, 1.2, 1.1, 1.0])
    assert snap_keep(pts, 12, dense_ms=2.0).keep == 16


def test_snap_non_monotone_dip_is_taken():
    # an aligned count beyond the requested one is cheaper (GPU tiles): more tokens AND less time
    pts = table([12, 14, 16, 18], [1.5, 1.5, 1.0, 1.6])
    assert snap_keep(pts, 12, dense_ms=2.0).keep == 16


def test_snap_does_not_jump_over_a_dearer_k():
    # one lucky point at the far end of the window (noise, or a step beyond a dearer one) is not taken
    pts = table([10, 12, 14, 16, 18], [1.0, 1.0, 1.3, 1.3, 0.99])
    assert snap_keep(pts, 10, dense_ms=2.0).keep == 12


def test_snap_noisy_sweep_keeps_requested():
    pts = table([10, 12, 14], [1.0, 1.0, 1.0])
    s = snap_keep(pts, 10, dense_ms=2.0, tol=0.02, noise=0.011)
    assert s.keep == 10 and "noise" in s.reason
    assert snap_keep(pts, 10, dense_ms=2.0, tol=0.02, noise=0.009).keep == 14


def test_median_noise():
    quiet = [10.0 + 0.01 * (i % 5) for i in range(80)]
    spread = [10.0 * (1 + (i % 7)) for i in range(80)]
    assert median_noise(quiet) < 0.001 < 0.05 < median_noise(spread)
    # a heavy slow tail (a quarter of the calls 3x slower) leaves the median, and its noise, alone
    tailed = [10.0 + 0.01 * (i % 5) if i % 4 else 30.0 for i in range(80)]
    assert median_noise(tailed) < 0.002


def test_snap_requested_slower_than_dense_goes_to_fastest_step():
    # Eliopoulos et al.: the requested budget is slower than dense; a smaller one is not
    pts = table([10, 12, 14, 16], [0.5, 0.5, 1.2, 1.2])
    s = snap_keep(pts, 14, dense_ms=1.0)
    assert s.keep == 12 and "not faster than dense" in s.reason
    assert snap_keep(pts, None, dense_ms=1.0).keep == 12          # requested K not measurable here


def test_snap_never_slower_than_dense():
    pts = table([10, 12, 14], [2.0, 2.5, 3.0])
    assert snap_keep(pts, 12, dense_ms=1.9).keep is None


def test_snap_bad_input():
    with pytest.raises(ConfigError):
        snap_keep({}, 1, dense_ms=1.0)
    with pytest.raises(ConfigError):
        snap_keep({1: 1.0}, 1, dense_ms=2.0, tol=-0.1)


@settings(max_examples=300, deadline=None)
@given(ms=st.lists(st.floats(0.1, 10.0), min_size=1, max_size=12), dense=st.floats(0.1, 10.0),
       req=st.integers(0, 11), tol=st.sampled_from([0.0, 0.01, 0.05]))
def test_snap_properties(ms, dense, req, tol):
    pts = {10 + 2 * i: t for i, t in enumerate(ms)}
    requested = 10 + 2 * min(req, len(ms) - 1)
    s = snap_keep(pts, requested, dense, tol)
    faster = {k for k, t in pts.items() if t < dense * (1 - tol)}
    if not faster:
        assert s.keep is None
        return
    assert s.keep in faster                                     # never a K slower than dense
    if requested in faster:
        assert s.keep >= requested                               # never fewer tokens than asked
        walk = [k for k in sorted(pts) if requested <= k <= s.keep]
        assert all(k in faster and pts[k] <= pts[requested] * (1 + tol) for k in walk)   # same time all the way
        up = [k for k in sorted(pts) if k > s.keep]
        assert not up or up[0] not in faster or pts[up[0]] > pts[requested] * (1 + tol)  # the step ends there
    else:
        assert pts[s.keep] <= min(pts[k] for k in faster) * (1 + tol)
    steps = s.steps
    assert [k for x in steps for k in (x.first, x.last)] == sorted(k for x in steps for k in (x.first, x.last))
    assert steps[0].first == min(pts) and steps[-1].last == max(pts)


# ------------------------------------------------------------------ candidates, final choice, recipe files


@pytest.mark.parametrize("requested,n,window,most", [(138, 196, 0.1, 21), (138, 196, 0.1, 11), (32, 64, 0.1, 5),
                                                     (1, 10, 0.2, 5), (9, 10, 0.5, 5), (98, 139, 0.1, 7)])
def test_candidate_keeps(requested, n, window, most):
    ks = candidate_keeps(requested, n, window, most)
    half = -(-window * n // 1)
    assert requested in ks and len(ks) <= most and ks == sorted(set(ks))
    assert all(1 <= k < n and abs(k - requested) <= half for k in ks)
    steps = {b - a for a, b in zip(ks, ks[1:])}
    assert len(steps) <= 1                                      # one regular grid


def test_candidate_keeps_bad_window():
    with pytest.raises(ConfigError, match="--window"):
        candidate_keeps(10, 20, 0.0, 5)
    with pytest.raises(ConfigError, match="--candidates"):
        candidate_keeps(10, 20, 0.1, 1)


def test_choose_falls_back_to_dense():
    assert choose(10.0, 8.0, 7.0)[0] == "snapped"
    assert choose(10.0, 8.0, 8.1, tol=0.02)[0] == "snapped"    # same time as requested, within tol
    chosen, msg = choose(10.0, 8.0, 10.5)
    assert chosen == "dense" and "falling back to dense" in msg
    assert choose(10.0, 10.5, 10.0)[0] == "dense"               # a tie with dense is not faster
    assert choose(10.0, 8.0, None)[0] == "dense"                # every stage dropped
    chosen, msg = choose(10.0, 8.0, 9.0, tol=0.02)              # beats dense, but dearer than requested
    assert chosen == "requested" and "more than requested" in msg


@pytest.mark.parametrize("suffix", [".toml", ".json", ".yaml"])
def test_recipe_file_round_trip(tmp_path, suffix):
    recipe = parse_recipe("cls-topk(fuse=true)@3:140+ttv@6:98+cls-topk@9:69")
    path = tmp_path / f"r{suffix}"
    path.write_text(recipe_file_text(recipe, suffix))
    assert load_recipe(path) == recipe
    if suffix == ".toml":
        assert tomllib.loads(path.read_text())["stage"][0]["params"] == {"fuse": True}


# ------------------------------------------------------------------ end to end (tiny model, real ONNX Runtime)


def test_tune_end_to_end(tmp_path, capsys):
    from tokensieve.cli import main

    out, js, png = tmp_path / "tuned.toml", tmp_path / "tune.json", tmp_path / "tune.png"
    rc = main(["tune", "--model", "tiny", "--prune", "cls-topk@1,2:0.5", "-o", str(out), "--json", str(js), "--plot", str(png),
               "--window", "0.1", "--candidates", "4", "--sweep-blocks", "2", "--sweep-iters", "3", "--blocks", "2",
               "--iters", "5", "--warmup", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    report = json.loads(js.read_text())
    assert {"model", "backend", "sweep_backend", "batch", "window", "tol", "requested", "snapped", "dense", "stages", "chosen",
            "message", "seconds", "recipe_file", "chosen_shorthand"} <= set(report)
    assert report["backend"].startswith("onnxruntime:")
    for row in ("dense", "requested", "snapped"):
        assert report[row]["median_ms"] > 0 and report[row]["p90_ms"] >= report[row]["median_ms"]
        assert report[row]["count"] == 2 * 5
    assert report["requested"]["keep"] == [32, 16]
    for s in report["stages"]:
        lo, hi = s["window"]
        assert lo <= s["requested_keep"] <= hi
        assert s["snapped_keep"] is None or lo <= s["snapped_keep"] <= hi
        assert 2 <= len(s["candidates"]) <= 4
        assert {c["keep"] for c in s["candidates"]} >= {s["requested_keep"]}
        assert s["dense_block"]["tokens"] == s["tokens_in"] and s["dense_block"]["median_ms"] > 0
    snapped_keep = [s["snapped_keep"] for s in report["stages"] if s["snapped_keep"] is not None]
    assert report["snapped"]["keep"] == snapped_keep                 # the snapped model was exported with them
    assert report["chosen"] in ("snapped", "requested", "dense")
    if report["chosen"] == "dense":
        assert not out.exists() and report["recipe_file"] is None and "dense" in report["message"]
    else:
        row = report[report["chosen"]]
        assert row["median_ms"] < report["dense"]["median_ms"]
        recipe = load_recipe(out)                                     # the file parses ...
        assert recipe.to_dict() == row["recipe"] and recipe.shorthand() == report["chosen_shorthand"]
        stages = resolve_recipe(recipe, 4, 65, 1)                    # ... and resolves to the exported tokens
        assert [65] + [s.tokens_out for s in stages] == row["tokens"]
        assert f"wrote {out}" in printed
    assert report["snapped"]["recipe"] == parse_recipe(
        "+".join(f"cls-topk@{s['after_block']}:{s['snapped_keep']}" for s in report["stages"]
                 if s["snapped_keep"] is not None) or "dense").to_dict()
    for word in ("requested", "snapped", "dense", "chosen:"):
        assert word in printed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000  # one panel per swept stage


@pytest.mark.parametrize("args,match", [
    (["--prune", "cls-topk@1:abc"], "not a number"),
    (["-o", "tuned.txt"], "must be a recipe file"),
    (["--window", "0"], "--window"),
    (["--tol", "-1"], "--tol"),
    (["--prune", "dense"], "at least one stage"),
])
def test_tune_bad_arguments_one_line(tmp_path, capsys, args, match):
    from tokensieve.cli import main

    argv = ["tune", "--model", "tiny", "--prune", "cls-topk@1:0.5", "-o", str(tmp_path / "t.toml")]
    for flag, value in zip(args[::2], args[1::2]):
        i = argv.index(flag) if flag in argv else None
        if i is None:
            argv += [flag, value]
        else:
            argv[i + 1] = value if flag != "-o" else str(tmp_path / value)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tokensieve tune: error: ") and match in err[0]


@pytest.mark.skipif(not __import__("importlib").util.find_spec("tensorrt_rtx"), reason="tensorrt-rtx is not installed")
def test_tensorrt_factory_builds_an_engine_next_to_the_onnx_and_reuses_it(tmp_path):
    """`tune --backend tensorrt`: one engine per ONNX file, built once; the runner binds from its metadata."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from tokensieve.runtime import TrtRunner
    from tokensieve.tune import TrtRunnerFactory

    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["pixel_values", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], [w])
    path = tmp_path / "block5.n99.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    factory = TrtRunnerFactory(target="rtx-sm86", max_batch=2)
    assert factory.backend == "tensorrt:rtx-sm86 fp32"
    runner = factory(path, "n99")
    engine = tmp_path / "block5.n99.engine"
    assert isinstance(runner, TrtRunner) and runner.engine_path == engine and runner.name == "n99"
    assert runner.batch_range == (1, 2) and not runner.is_active
    built = engine.stat().st_mtime_ns
    factory(path, "again")
    assert engine.stat().st_mtime_ns == built  # reused, not rebuilt


@pytest.mark.parametrize("extra,match", [
    (["--target", "rtx-sm99"], "rtx-sm99"),
    (["--plugins", "missing.so"], "does not exist"),
    ([], "none was found"),
])
def test_tune_tensorrt_backend_refuses_before_the_sweep(tmp_path, capsys, extra, match):
    """Without a GPU (this machine) `tune --backend tensorrt` stops at once with one line, nothing written."""
    from tokensieve.cli import main
    from tokensieve.runtime.tensorrt_flavors import local_compute_capability

    if local_compute_capability() is not None and not extra:
        pytest.skip("a GPU is present: the tensorrt backend would run")
    out = tmp_path / "t.toml"
    argv = ["tune", "--model", "tiny", "--prune", "cls-topk@1:0.5", "-o", str(out), "--backend", "tensorrt", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err
    assert not out.exists()


@pytest.mark.gpu
def test_tune_on_tensorrt_end_to_end(tmp_path, capsys):
    from gpu_target import engine_target
    from tokensieve.cli import main

    target = engine_target()
    js = tmp_path / "tune.json"
    rc = main(["tune", "--model", "tiny", "--prune", "cls-topk@1:0.5", "-o", str(tmp_path / "t.toml"), "--json", str(js),
               "--backend", "tensorrt", "--target", target, "--sweep-blocks", "2", "--sweep-iters", "5",
               "--blocks", "2", "--iters", "5"])
    assert rc == 0
    report = json.loads(js.read_text())
    assert report["backend"].startswith(f"tensorrt:{target}") and report["stages"][0]["steps"]
