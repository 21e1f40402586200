"""Fault injection: `tokensieve export` and `tokensieve build` killed at seeded random points (SIGKILL and SIGINT).

After each kill the output folder holds the previous complete result (the same bytes), or a complete new one (the
signal came after the swap), or no result (no report.json / no engine metadata) with files of one run only: never a
mix. A Ctrl-C run exits 130 with one line and leaves no staging folder or temp file; a SIGKILL-ed run's leftovers are
removed by the next run (the next export at its start, the next build when it writes); a rerun (after a sample of the
kills) succeeds and leaves exactly the export's files.

Kill points: an export's run is measured first (stamped progress lines), then each kill lands in one of five windows
in turn: early in the trace, in the ONNX conversion and writing, in verification, in the engine build, or in the
final swap (there by a hook that signals the child just before its K-th rename/unlink in the folder, K random). A
build's kills land at random times over its measured run, or (one in four) in its final renames by the same hook.

The children are forked from a fork server (forkserver.py) that imported torch once. Default: 5 export kills (one
per window) and 12 build kills per signal (34 kills: 87 s here); the full run, 20 per kind (80 kills: 222 s
here):
    TOKENSIEVE_FAULT_POINTS=20 .venv/bin/python -m pytest -n 0 tests/hostile/test_faults.py
TOKENSIEVE_FAULT_SEED picks another seed (default 0).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
from forkserver import ForkServer, stamps

POINTS = int(os.environ.get("TOKENSIEVE_FAULT_POINTS") or 0)
EXPORT_POINTS = POINTS or 5     # per signal
BUILD_POINTS = POINTS or 12     # per signal
SEED = int(os.environ.get("TOKENSIEVE_FAULT_SEED") or 0)
SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGINT": signal.SIGINT}
WINDOWS = ("trace", "onnx", "verify", "build", "swap")
PREVIOUS_RECIPE, NEW_RECIPE = "cls-topk@1:0.5", "dense"


def _has_rtx() -> str | None:
    try:
        import tensorrt_rtx  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"tensorrt_rtx does not import ({type(e).__name__}: {e}); the engine build cannot run here"
    return None


NO_RTX = _has_rtx()


def visible(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.startswith(".") and p.is_file()}


def hidden(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name.startswith(".")} if folder.is_dir() else set()


def restore(folder: Path, files: dict[str, bytes]) -> None:
    """Make the visible files of `folder` exactly `files` (hidden leftovers of killed runs stay)."""
    folder.mkdir(parents=True, exist_ok=True)
    for p in folder.iterdir():
        if not p.name.startswith(".") and p.name not in files:
            p.unlink()
    for name, data in files.items():
        (folder / name).write_bytes(data)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def one_line_interrupt(log: Path) -> None:
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]
    assert text.strip().splitlines()[-1] == "tokensieve: interrupted", text[-1000:]


def wait_for_line(log: Path, first_word: str, timeout: float = 60.0) -> None:
    """Poll the child's log until a stamped progress line starting with `first_word` is in it."""
    end = time.monotonic() + timeout
    while not log.exists() or first_word not in stamps(log):
        assert time.monotonic() < end, f"no {first_word} line in {log}: {log.read_text()[-2000:]}"
        time.sleep(0.002)


@pytest.fixture(scope="module")
def server():
    fs = ForkServer()
    yield fs
    fs.close()


# ------------------------------------------------------------------------------------------------------ export


ENGINE = "model.rtx-sm86.fp32.engine"  # an export's engine (default target and precision)


def complete_new_export(files: dict[str, bytes], ref: dict[str, bytes]) -> None:
    """`files` is a whole export of NEW_RECIPE: the reference's file set, its ONNX bytes, a report of that recipe,
    an engine whose metadata matches it and model.onnx."""
    assert set(files) == set(ref), sorted(files)
    for name in ("model.onnx", "model.debug.onnx", "dense.onnx"):
        assert files[name] == ref[name], name
    report = json.loads(files["report.json"])
    assert report["recipe_shorthand"] == json.loads(ref["report.json"])["recipe_shorthand"]
    if ENGINE in ref:
        meta = json.loads(files[ENGINE + ".json"])
        assert meta["engine_sha256"] == sha(files[ENGINE])
        assert meta["onnx"]["sha256"] == sha(files["model.onnx"])


def check_export_state(files: dict[str, bytes], previous: dict[str, bytes], ref: dict[str, bytes]) -> str:
    """-> "previous", "new" or "absent"; fails on a mix of two runs."""
    if files == previous:
        return "previous"
    if "report.json" in files:
        complete_new_export(files, ref)
        return "new"
    runs = set()
    for name, data in files.items():
        old, new = data == previous.get(name), name in ref and (
            data == ref[name] if name.endswith(".onnx") else data != previous.get(name))
        assert old or new, f"{name} belongs to neither run"
        if old != new:
            runs.add("previous" if old else "new")
    assert len(runs) <= 1, f"files of two runs side by side: {sorted(files)}"
    if ENGINE in files and ENGINE + ".json" in files:
        assert json.loads(files[ENGINE + ".json"])["engine_sha256"] == sha(files[ENGINE])
    return "absent"


@pytest.fixture(scope="module")
def export_setup(server, tmp_path_factory):
    """The previous result (PREVIOUS_RECIPE), and one measured NEW_RECIPE run over it: phase times, the number of
    renames/unlinks of its swap, its files (the reference a complete new result is compared with)."""
    base = tmp_path_factory.mktemp("faults")
    build = [] if NO_RTX is None else ["--no-build"]
    prev_dir = base / "previous"
    assert server.run(["export", "--model", "tiny", "--prune", PREVIOUS_RECIPE, "--no-bench", "-o", prev_dir, *build],
                      base / "previous.log") == 0, (base / "previous.log").read_text()[-2000:]
    previous = visible(prev_dir)
    ref_dir = base / "reference"
    restore(ref_dir, previous)
    argv = ["export", "--model", "tiny", "--prune", NEW_RECIPE, "--no-bench", "--verify-inputs", "2", *build]
    t0 = time.monotonic()
    code = server.run([*argv, "-o", ref_dir], base / "reference.log", stamp=True,
                      hook={"folder": str(ref_dir), "at": 0, "signal": 0, "count_file": str(base / "ops")})
    t_end = time.monotonic() - t0
    assert code == 0, (base / "reference.log").read_text()[-2000:]
    at = {k: v - t0 for k, v in stamps(base / "reference.log").items()}
    t2, t3, t4, t5 = at["[2/5]"], at["[3/5]"], at["[4/5]"], at["[5/5]"]
    # window -> (the progress line it starts from, seconds after it): anchored, so a slower run is hit alike
    windows = {"trace": ("[2/5]", 0, 0.3 * (t3 - t2)), "onnx": ("[2/5]", 0.3 * (t3 - t2), t3 - t2),
               "verify": ("[3/5]", 0, t4 - t3), "build": ("[4/5]", 0, t5 - t4)}
    ref = visible(ref_dir)
    assert hidden(ref_dir) == set()
    complete_new_export(ref, ref)
    ops = int((base / "ops").read_text())
    assert ops >= 2 * len(ref), ops  # the old files go, the new ones move in
    print(f"\nexport run {t_end:.2f} s: kill windows {({k: (a, round(b, 3), round(c, 3)) for k, (a, b, c) in windows.items()})}"
          f", {ops} renames/unlinks in the swap")
    return dict(base=base, argv=argv, previous=previous, ref=ref, windows=windows, ops=ops)


@pytest.mark.parametrize("signame", list(SIGNALS))
def test_a_killed_export_leaves_the_previous_result_or_none(server, export_setup, signame):
    s, sig = export_setup, SIGNALS[signame]
    rng = random.Random(f"{SEED}-export-{signame}")
    out = s["base"] / f"out-{signame}"
    reruns = {rng.randrange(EXPORT_POINTS)}
    landed, outcomes = [], []
    for i in range(EXPORT_POINTS):
        window = WINDOWS[i % len(WINDOWS)]
        restore(out, s["previous"])
        before = hidden(out)
        log = s["base"] / f"{signame}-{i}.log"
        if window == "swap":
            pid = server.spawn([*s["argv"], "-o", out], log, stamp=True,
                               hook={"folder": str(out), "at": rng.randint(1, s["ops"]), "signal": int(sig)})
        else:
            anchor, lo, hi = s["windows"][window]
            pid = server.spawn([*s["argv"], "-o", out], log, stamp=True)
            wait_for_line(log, anchor)
            time.sleep(rng.uniform(lo, hi))
            os.kill(pid, sig)
        code = server.wait(pid)
        seen = list(stamps(log))
        landed.append(f"{window}:{seen[-1] if seen else '-'}:{code}")
        after = hidden(out)
        if sig == signal.SIGINT:
            assert code in (130, 0), (code, log.read_text()[-2000:])
            if code == 130:
                one_line_interrupt(log)
            assert after == set(), f"Ctrl-C left {sorted(after)}"
        else:
            assert code in (-signal.SIGKILL, 0), (code, log.read_text()[-2000:])
            assert not (before & after), f"leftovers of the killed run before were not removed: {before & after}"
        state = check_export_state(visible(out), s["previous"], s["ref"])
        if code == 0:
            assert state == "new"
        outcomes.append(state)
        if i in reruns:
            rerun_log = s["base"] / f"{signame}-{i}-rerun.log"
            assert server.run([*s["argv"], "-o", out], rerun_log) == 0, rerun_log.read_text()[-2000:]
            complete_new_export(visible(out), s["ref"])
            assert hidden(out) == set()
    print(f"\n{signame}: {len(landed)} export kills (window:last step:exit) {landed}; states {outcomes}")


# ------------------------------------------------------------------------------------------------------ build


@pytest.fixture(scope="module")
def build_setup(server, export_setup):
    if NO_RTX:
        pytest.skip(NO_RTX)
    base = export_setup["base"]
    onnx = base / "previous" / "model.onnx"
    prev_dir = base / "engine-previous"
    assert server.run(["build", onnx, "-o", prev_dir / "model.engine", "--max-batch", "4"], base / "b0.log") == 0
    previous = visible(prev_dir)
    ref_dir = base / "engine-reference"
    restore(ref_dir, previous)
    argv = ["build", onnx, "-o"]
    t0 = time.monotonic()
    code = server.run([*argv, ref_dir / "model.engine"], base / "b1.log",
                      hook={"folder": str(ref_dir), "at": 0, "signal": 0, "count_file": str(base / "bops")})
    t_end = time.monotonic() - t0
    assert code == 0, (base / "b1.log").read_text()[-2000:]
    ref = visible(ref_dir)
    check_build_state(ref, previous, onnx)
    ops = int((base / "bops").read_text())
    print(f"\nbuild run {t_end:.2f} s, {ops} renames/unlinks at its end")
    return dict(base=base, argv=argv, onnx=onnx, previous=previous, t_end=t_end, ops=ops)


def check_build_state(files: dict[str, bytes], previous: dict[str, bytes], onnx: Path) -> str:
    """-> "previous", "new" or "absent" (an engine without its metadata); fails on metadata beside another engine."""
    if files == previous:
        return "previous"
    assert set(files) <= {"model.engine", "model.engine.json"}, sorted(files)
    if "model.engine.json" not in files:
        return "absent"
    assert "model.engine" in files, "engine metadata without its engine"
    meta = json.loads(files["model.engine.json"])
    assert meta["engine_sha256"] == sha(files["model.engine"]), "metadata of another engine"
    assert files["model.engine"] != previous["model.engine"] and meta["onnx"]["sha256"] == sha(onnx.read_bytes())
    return "new"


@pytest.mark.parametrize("signame", list(SIGNALS))
def test_a_killed_build_leaves_the_previous_engine_or_none(server, build_setup, signame):
    s, sig = build_setup, SIGNALS[signame]
    rng = random.Random(f"{SEED}-build-{signame}")
    out = s["base"] / f"engine-{signame}"
    reruns = set(rng.sample(range(BUILD_POINTS), min(2, BUILD_POINTS)))
    outcomes = []
    for i in range(BUILD_POINTS):
        restore(out, s["previous"])
        log = s["base"] / f"b-{signame}-{i}.log"
        argv = [*s["argv"], out / "model.engine"]
        if i % 4 == 3:
            pid = server.spawn(argv, log, hook={"folder": str(out), "at": rng.randint(1, s["ops"]), "signal": int(sig)})
        else:
            pid = server.spawn(argv, log)
            time.sleep(rng.uniform(0.02, 0.8 * s["t_end"]))  # the last fifth: the writes, and the exit
            os.kill(pid, sig)
        code = server.wait(pid)
        if sig == signal.SIGINT:
            assert code in (130, 0), (code, log.read_text()[-2000:])
            if code == 130:
                one_line_interrupt(log)
            assert hidden(out) == set(), f"Ctrl-C left {sorted(hidden(out))}"
        else:
            assert code in (-signal.SIGKILL, 0), (code, log.read_text()[-2000:])
        state = check_build_state(visible(out), s["previous"], s["onnx"])
        if code == 0:
            assert state == "new"
        outcomes.append(f"{state}:{code}")
        if i in reruns:
            rerun_log = s["base"] / f"b-{signame}-{i}-rerun.log"
            assert server.run(argv, rerun_log) == 0, rerun_log.read_text()[-2000:]
            assert check_build_state(visible(out), s["previous"], s["onnx"]) == "new"
            assert hidden(out) == set(), f"the rerun left {sorted(hidden(out))}"
    print(f"\n{signame}: {len(outcomes)} build kills (state:exit) {outcomes}")
    shutil.rmtree(out, ignore_errors=True)
