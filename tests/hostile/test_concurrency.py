"""Four `tokensieve export` runs into one folder at the same time, with different recipes (forked from one fork
server, forkserver.py): one takes the folder's lock and writes; the others fail at once with one line (they do not
wait, and a loser does not remove the folder the winner is writing into, even when the folder did not exist before).
Afterwards the folder holds one complete export, from one run: report.json's recipe matches the debug model's
kept_idx outputs (blocks, token counts), model.onnx is that model without them (same op census), the engine's
metadata names the same recipe and model.onnx's sha256, and `tokensieve verify` passes. (Without the lock all four
run, four times slower, and may swap their files into the folder at the same time.) Run twice: into a new folder,
then over the first result."""
from __future__ import annotations

import hashlib
import json
import random
import time
from collections import Counter

import onnx
import pytest
from forkserver import ForkServer

RECIPES = ["dense", "cls-topk@1:0.5", "cls-topk@0,2:0.5", "cls-topk@0,1,2:0.7"]
BLOCKS = {"dense": [], "cls-topk@1:0.5": [1], "cls-topk@0,2:0.5": [0, 2], "cls-topk@0,1,2:0.7": [0, 1, 2]}
BUSY = "Another tokensieve export is writing into"


@pytest.fixture(scope="module")
def server():
    fs = ForkServer()
    yield fs
    fs.close()


def _build_flag() -> list[str]:
    try:
        import tensorrt_rtx  # noqa: F401
    except Exception:  # noqa: BLE001 - no TensorRT-RTX: the engine part of the check is skipped
        return ["--no-build"]
    return []


ENGINE = "model.rtx-sm86.fp32.engine"  # the export's engine (default target and precision)


def check_one_run(out) -> dict:
    names = sorted(p.name for p in out.iterdir())
    report = json.loads((out / "report.json").read_text())
    stages = report["stages"]
    expected = {"model.onnx", "model.debug.onnx", "dense.onnx", "report.json", "config.json", "preprocessor_config.json",
                "weights.onnx.data"}
    if "build" in report:
        expected |= {ENGINE, ENGINE + ".json"}
    assert set(names) == expected, names  # no staging folder, no temp file, nothing of another run
    model = onnx.load(str(out / "model.onnx"))
    debug = onnx.load(str(out / "model.debug.onnx"), load_external_data=False)
    census = lambda m: Counter(n.op_type for n in m.graph.node)  # noqa: E731 - the recipes differ in stage count
    assert census(model) == census(debug) and (census(model)["TopK"] > 0) == bool(stages), report["recipe_shorthand"]
    kept = [o for o in debug.graph.output if o.name.startswith("kept_idx.")]
    assert [int(o.name.split(".")[1]) for o in kept] == [s["after_block"] for s in stages]
    assert [o.type.tensor_type.shape.dim[1].dim_value for o in kept] == [s["tokens_out"] - 1 for s in stages]
    if "build" in report:
        meta = json.loads((out / (ENGINE + ".json")).read_text())
        assert meta["tokensieve"]["recipe"] == report["recipe"]
        assert meta["onnx"]["sha256"] == hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest()
        assert meta["engine_sha256"] == hashlib.sha256((out / ENGINE).read_bytes()).hexdigest()
    return report


def test_simultaneous_exports_leave_one_complete_result(server, tmp_path):
    out = tmp_path / "out"
    build = _build_flag()
    for seed, round_ in enumerate(("new folder", "over the first result")):
        pids = {}
        order = random.Random(seed).sample(RECIPES, len(RECIPES))  # the first one started usually wins
        for i, recipe in enumerate(order):
            argv = ["export", "--model", "tiny", "--prune", recipe, "--no-bench", "--verify-inputs", "2", "-o", out,
                    *build]
            pids[recipe] = (server.spawn(argv, tmp_path / f"{i}.log"), tmp_path / f"{i}.log")
        t0 = time.monotonic()
        codes = {recipe: server.wait(pid) for recipe, (pid, _) in pids.items()}
        won = [r for r, c in codes.items() if c == 0]
        assert len(won) == 1, codes  # all four started together: one holds the lock, the others fail at once
        for recipe, code in codes.items():
            log = pids[recipe][1].read_text()
            assert "Traceback" not in log, log[-2000:]
            if code != 0:
                assert code == 2, (recipe, code, log[-2000:])
                errors = [line for line in log.splitlines() if "error:" in line]
                assert errors == [line for line in log.splitlines()[-1:]], log[-2000:]
                assert BUSY in errors[0], errors
        report = check_one_run(out)
        blocks = [s["after_block"] for s in report["stages"]]
        assert blocks in [BLOCKS[r] for r in won], (report["recipe_shorthand"], won)  # a run that exited 0 wrote it
        print(f"\n{round_}: exit codes {codes}; the folder holds {report['recipe_shorthand']!r} "
              f"({time.monotonic() - t0:.1f} s)")
        log = tmp_path / "verify.log"
        assert server.run(["verify", out, "--inputs", "2"], log) == 0, log.read_text()[-2000:]
