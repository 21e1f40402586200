"""The `tokensieve` CLI: one end-to-end export of a tiny HF ViT, the follow-up subcommands, and one-line errors.

The end-to-end export runs once per module in a subprocess (`python -m tokensieve.cli`); the follow-up
commands and the error cases call `tokensieve.cli.main([...])` in-process, which is equivalent for
errors because main() only catches TokenSieveError: anything else propagates (= a traceback) and fails.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tokensieve.cli import main  # noqa: E402

HAVE_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
FAST = ["--no-build", "--no-bench", "--verify-inputs", "1"]
RECIPE = "cls-topk@1,2:0.5"
ENGINE = "model.rtx-sm86.fp32.engine"  # the export's engine: named per target and precision
ARTIFACTS = ["model.onnx", "model.debug.onnx", "dense.onnx", "report.json"] + (
    [ENGINE, ENGINE + ".json"] if HAVE_RTX else [])
# stderr lines a failing export may print before its error line: progress, and transformers' weight-loading bar
PROGRESS = re.compile(r"^(\[\d/5\] |\s+block \d+/\d+: |Loading weights)")


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("PYTHONWARNINGS", None)
    return env


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokensieve.cli", *map(str, args)], capture_output=True, text=True,
                          env=_env(), cwd=cwd, timeout=300)


# ------------------------------------------------------------------------------------------ tiny models


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory) -> Path:
    from transformers import ViTConfig, ViTForImageClassification

    path = tmp_path_factory.mktemp("models") / "tiny-vit"
    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32,
                    patch_size=8, num_labels=5, attn_implementation="sdpa")
    ViTForImageClassification(cfg).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory) -> Path:
    """A vision transformer without [CLS] (SigLIP pools with an attention head over the patch tokens)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    path = tmp_path_factory.mktemp("models") / "tiny-siglip"
    torch.manual_seed(0)
    cfg = SiglipVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8)
    SiglipVisionModel(cfg).eval().save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def exported(vit_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "out"
    args = ["export", "--model", vit_dir, "--prune", RECIPE, "-o", out, "--bench-blocks", 2, "--bench-iters", 3]
    if not HAVE_RTX:
        args.append("--no-build")
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_export_end_to_end(exported, vit_dir):
    out, proc = exported
    assert "Traceback" not in proc.stderr
    assert re.search(r"^\s+tokens\s+17→9→5\s+\(blocks 1, 2 prune\)", proc.stdout, re.M), proc.stdout
    assert "verify          PASS" in proc.stdout
    assert "speedup" in proc.stdout and "MAC-ideal" in proc.stdout
    assert ("engine          tensorrt_rtx" in proc.stdout) == HAVE_RTX
    for name in ARTIFACTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temp files left behind"

    report = json.loads((out / "report.json").read_text())
    assert report["model"] == str(vit_dir)
    assert report["recipe_shorthand"] == "cls-topk@1:0.5+cls-topk@2:0.5"
    assert report["layout"]["num_tokens"] == 17 and report["layout"]["num_prefix_tokens"] == 1
    assert [s["tokens_out"] for s in report["stages"]] == [9, 5]
    assert report["tokens_per_block"] == [17, 17, 9, 5]
    assert report["verify"]["passed"] is True
    assert report["verify"]["indices_match"] == [True, True]
    assert report["bench"]["speedup"] > 0
    assert report["ideal_speedup"] > 1
    if HAVE_RTX:
        assert report["build"]["flavor"] == "tensorrt_rtx"
        meta = json.loads((out / (ENGINE + ".json")).read_text())
        assert meta["tokensieve"]["tokens_per_block"] == [17, 17, 9, 5]


def test_verify(exported, capsys):
    out, _ = exported
    assert main(["verify", str(out), "--inputs", "2", "--batch", "2"]) == 0
    stdout = capsys.readouterr().out
    assert stdout.count("identical") == 2 and "PASS" in stdout


def test_bench(exported, tmp_path, capsys):
    out, _ = exported
    assert main(["bench", str(out), "--blocks", "2", "--iters", "3", "--warmup", "1", "--json", str(tmp_path / "b.json")]) == 0
    stdout = capsys.readouterr().out
    assert "dense" in stdout and "pruned" in stdout and "speedup" in stdout
    assert json.loads((tmp_path / "b.json").read_text())["results"][0]["speedup"] > 0


def test_inspect_onnx(exported, capsys):
    out, _ = exported
    assert main(["inspect", str(out / "model.onnx")]) == 0
    stdout = capsys.readouterr().out
    assert "inputs:  pixel_values ['batch', 3, 32, 32]" in stdout
    assert "outputs: logits ['batch', 5]" in stdout
    assert re.search(r"pruning: [1-9]\d* TopK", stdout), stdout


def test_inspect_export_folder(exported, tmp_path, capsys):
    """`inspect OUT/`: recipe, tokens, verification, files, the engine checked against its metadata (exit 0); a copy
    with dense.onnx gone and a changed engine names both problems (exit 1); a folder that is no export: one line."""
    out, _ = exported
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "recipe cls-topk@1:0.5+cls-topk@2:0.5" in text
    assert re.search(r"tokens\s+17→9→5 over \d+ blocks", text) and "verify        PASS" in text
    assert "dense         dense.onnx\n" in text
    assert ("file OK (size, sha256 match)" if HAVE_RTX else "none (exported with --no-build)") in text
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "dense.onnx").unlink()
    if HAVE_RTX:
        with open(broken / ENGINE, "ab") as f:
            f.write(b"x")
    assert main(["inspect", str(broken)]) == 1
    text = capsys.readouterr().out
    assert "dense.onnx: MISSING" in text and (not HAVE_RTX or f"{ENGINE}: PROBLEM: Engine" in text)
    run_error(capsys, "inspect", tmp_path, match="holds no report.json")


@pytest.mark.skipif(not HAVE_RTX, reason="needs tensorrt_rtx to have built the engine")
def test_inspect_engine(exported, capsys):
    out, _ = exported
    assert main(["inspect", str(out / ENGINE)]) == 0
    captured = capsys.readouterr()
    meta = json.loads(captured.out)  # stdout is the metadata JSON alone; the file check goes to stderr
    assert captured.err == "engine file: OK (size, sha256 match)\n"
    assert meta["target"] == "rtx-sm86"
    assert meta["tokensieve"]["recipe"]["stages"][0]["after_block"] == 1


@pytest.mark.skipif(not HAVE_RTX, reason="needs tensorrt_rtx (builds engines without a GPU)")
def test_build(exported, capsys):
    out, _ = exported
    assert main(["build", str(out / "model.onnx"), "-o", str(out / "other.engine"), "--max-batch", "2"]) == 0
    assert "built" in capsys.readouterr().out
    assert (out / "other.engine").stat().st_size > 0
    assert json.loads((out / "other.engine.json").read_text())["optimization_profile"]["pixel_values"]["max"][0] == 2


@pytest.mark.skipif(not HAVE_RTX, reason="needs tensorrt_rtx (builds engines without a GPU)")
def test_reexport_without_build_removes_stale_engines(exported, vit_dir, tmp_path, capsys):
    """A --no-build re-export into a folder holding an earlier export's engine and a dense one (`tokensieve build` of
    dense.onnx, as `bench --backend tensorrt` makes it; listed in report.json, so `inspect` shows both) deletes both
    with their .json (built from the ONNX it replaces), says so in one line, and keeps every other file, engines under
    other names included."""
    out = tmp_path / "out"
    shutil.copytree(exported[0], out)
    assert main(["build", str(out / "dense.onnx"), "--max-batch", "2"]) == 0  # -> out/dense.rtx-sm86.fp32.engine
    dense = "dense.rtx-sm86.fp32.engine"
    listed = [e["file"] for e in json.loads((out / "report.json").read_text())["engines"]]
    assert listed[0] == ENGINE and listed[-1] == dense  # (test_build's other.engine, if it ran, in between)
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert [ln.split(":")[0].split()[-1] for ln in capsys.readouterr().out.splitlines() if "  engine " in ln] == listed
    stale = [dense, dense + ".json", ENGINE, ENGINE + ".json"]
    assert all((out / name).stat().st_size > 0 for name in stale)
    (out / "notes.txt").write_text("mine")
    (out / "mine.engine").write_bytes(b"a user's engine")
    capsys.readouterr()
    assert main(["export", "--model", str(vit_dir), "--prune", "cls-topk@1:0.5", "-o", str(out), *FAST]) == 0
    captured = capsys.readouterr()
    assert [ln for ln in captured.err.splitlines() if "removed" in ln] == [
        "      removed stale engines of an earlier export: " + ", ".join(stale)], captured.err
    names = {p.name for p in out.iterdir()}
    assert not set(stale) & names, sorted(names)
    assert {"notes.txt", "mine.engine", "model.onnx", "dense.onnx", "report.json"} <= names
    assert (out / "mine.engine").read_bytes() == b"a user's engine"
    report = json.loads((out / "report.json").read_text())
    assert "build" not in report and report["engines"] == [] and report["recipe_shorthand"] == "cls-topk@1:0.5"
    assert not any(n.endswith((".engine", ".engine,")) and n not in ("mine.engine", "mine.engine,", "other.engine,")
                   for n in captured.out.split())  # the summary's file list names no engine of ours (test_build's stays)
    assert "removed" not in exported[1].stderr  # the first export into a fresh folder removed nothing


def test_methods(capsys):
    assert main(["methods"]) == 0
    stdout = capsys.readouterr().out
    assert stdout.startswith("cls-topk") and "needs [CLS]: yes" in stdout


def test_help_runs_without_a_subcommand(capsys):
    assert main([]) == 2
    assert "export" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ bad input


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.is_dir() else []


def assert_cli_error(cmd: str, rc: int, stdout: str, stderr: str, match: str) -> str:
    """Exit 2, no traceback, and exactly one error line, the last on stderr, after progress lines only."""
    assert rc == 2, (rc, stdout, stderr)
    assert "Traceback" not in stderr, stderr
    lines = [ln.lstrip("\r") for ln in stderr.split("\n") if ln.strip()]  # tqdm bars start with a carriage return
    prefix = f"tokensieve {cmd}: error: "
    errors = [ln for ln in lines if ln.startswith(prefix)]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    assert all(PROGRESS.match(ln) for ln in lines[:-1]), f"unexpected stderr lines:\n{stderr}"
    assert match in errors[0], errors[0]
    assert stdout == ""
    return errors[0]


def run_error(capsys, cmd: str, *args, match: str) -> str:
    rc = main([cmd, *map(str, args)])
    captured = capsys.readouterr()
    return assert_cli_error(cmd, rc, captured.out, captured.err, match)


BAD_RECIPES = {
    "unknown method": ("evit@1:0.5", "Unknown method 'evit'"),
    "keep ratio 0": ("cls-topk@1:0.0", "keep ratio 0.0 is out of range"),
    "keep count 0": ("cls-topk@1:0", "keep count 0 is out of range"),
    "keep ratio 1.5": ("cls-topk@1:1.5", "keep ratio 1.5 is out of range"),
    "malformed": ("cls-topk@1", "Cannot parse recipe"),
    "block out of range": ("cls-topk@99:0.5", "the model has blocks 0..3"),
    "K >= tokens": ("cls-topk@1:16", "keep=16 must be below the 16 patch tokens"),
    "K >= tokens, second stage": ("cls-topk@1:0.5+cls-topk@2:8", "keep=8 must be below the 8 patch tokens"),
}


@pytest.mark.parametrize("recipe, match", BAD_RECIPES.values(), ids=BAD_RECIPES.keys())
def test_export_bad_recipe(vit_dir, tmp_path, capsys, recipe, match):
    out = tmp_path / "out"
    run_error(capsys, "export", "--model", vit_dir, "--prune", recipe, "-o", out, *FAST, match=match)
    assert not out.exists(), files_under(out)


def test_export_bad_recipe_file(vit_dir, tmp_path, capsys):
    (tmp_path / "r.toml").write_text('[[stage]]\nmethod = "cls-topk"\nafter_block = 1\nkeep = 0.5\nalpha = 2\n')
    out = tmp_path / "out"
    run_error(capsys, "export", "--model", vit_dir, "--prune", tmp_path / "r.toml", "-o", out, *FAST,
              match="unknown field(s) ['alpha']")
    run_error(capsys, "export", "--model", vit_dir, "--prune", tmp_path / "missing.yaml", "-o", out, *FAST,
              match="Cannot read recipe file")
    assert not out.exists()


def test_export_model_without_cls(siglip_dir, tmp_path, capsys):
    out = tmp_path / "out"
    run_error(capsys, "export", "--model", siglip_dir, "--prune", "cls-topk@0:0.5", "-o", out, *FAST,
              match="this model has no [CLS] token")
    assert not out.exists(), files_under(out)


def test_export_unwritable_output(vit_dir, tmp_path, capsys):
    (tmp_path / "afile").write_text("not a folder")
    out = tmp_path / "afile" / "out"
    run_error(capsys, "export", "--model", vit_dir, "--prune", RECIPE, "-o", out, *FAST,
              match="Cannot create output folder")
    assert (tmp_path / "afile").read_text() == "not a folder"
    assert files_under(tmp_path) == ["afile"]


def test_export_bad_target_fails_before_exporting(vit_dir, tmp_path, capsys):
    out = tmp_path / "out"
    msg = run_error(capsys, "export", "--model", vit_dir, "--prune", RECIPE, "-o", out, "--target", "rtx-sm99",
                    "--no-bench", "--verify-inputs", "1", match="Unknown TensorRT target 'rtx-sm99'")
    assert "[1/5]" not in msg
    assert not out.exists(), files_under(out)


def test_export_keeps_existing_output_folder(vit_dir, tmp_path, capsys):
    """An error must not delete a folder the user made, nor write into it."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    run_error(capsys, "export", "--model", vit_dir, "--prune", "cls-topk@99:0.5", "-o", out, *FAST,
              match="the model has blocks 0..3")
    assert files_under(out) == ["mine.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    run_error(capsys, "export", "--model", vit_dir, "--prune", "cls-topk@99:0.5", "-o", empty, *FAST,
              match="the model has blocks 0..3")
    assert empty.is_dir() and files_under(empty) == []


def _garbage_config(tmp_path: Path) -> Path:
    d = tmp_path / "garbage"
    d.mkdir()
    (d / "config.json").write_text("{ this is not json")
    return d


def _weightless_config(tmp_path: Path) -> Path:
    d = tmp_path / "no-weights"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "vit", "architectures": ["ViTForImageClassification"],
                                               "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                               "intermediate_size": 64, "image_size": 32, "patch_size": 8}))
    return d


def _unknown_model_type(tmp_path: Path) -> Path:
    d = tmp_path / "unknown-type"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "definitely-not-a-model"}))
    return d


def _empty_dir(tmp_path: Path) -> Path:
    d = tmp_path / "empty-model"
    d.mkdir()
    return d


BAD_MODELS = {
    "nonexistent path": (lambda t: t / "does-not-exist", "is neither a built-in model"),
    "folder without config.json": (_empty_dir, "has no config.json"),
    "garbage config.json": (_garbage_config, "Cannot load model folder"),
    "config.json without weights": (_weightless_config, "Cannot load model folder"),
    "unknown model_type": (_unknown_model_type, "Cannot load model folder"),
}


@pytest.mark.parametrize("make, match", BAD_MODELS.values(), ids=BAD_MODELS.keys())
def test_export_unreadable_model(tmp_path, capsys, make, match):
    model = make(tmp_path)
    out = tmp_path / "out"
    run_error(capsys, "export", "--model", model, "--prune", RECIPE, "-o", out, *FAST, match=match)
    assert not out.exists(), files_under(out)


def test_verify_folder_without_report(tmp_path, capsys):
    run_error(capsys, "verify", tmp_path, match="has no report.json")
    run_error(capsys, "verify", tmp_path / "missing", match="has no report.json")
    (tmp_path / "report.json").write_text("{ truncated")
    run_error(capsys, "verify", tmp_path, match="Cannot read")
    assert files_under(tmp_path) == ["report.json"]


def test_bench_folder_without_report(tmp_path, capsys):
    run_error(capsys, "bench", tmp_path, "--blocks", 1, "--iters", 1, match="has no report.json")


def test_build_missing_onnx(tmp_path, capsys):
    run_error(capsys, "build", tmp_path / "missing.onnx", "-o", tmp_path / "sub" / "x.engine",
              match="does not exist")
    assert files_under(tmp_path) == []


def test_build_bad_target(tmp_path, capsys):
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(b"not used: the target is checked first")
    for target in ("bogus", "rtx-sm99", "sm86"):
        run_error(capsys, "build", onnx_path, "--target", target, "-o", tmp_path / "sub" / "x.engine",
                  match=f"Unknown TensorRT target {target!r}")
    assert files_under(tmp_path) == ["m.onnx"]


def test_inspect_garbage_onnx(tmp_path, capsys):
    (tmp_path / "bad.onnx").write_bytes(b"\x00garbage\xff not a protobuf")
    run_error(capsys, "inspect", tmp_path / "bad.onnx", match="is not a readable ONNX file")
    run_error(capsys, "inspect", tmp_path / "missing.onnx", match="does not exist")


def test_inspect_garbage_engine(tmp_path, capsys):
    (tmp_path / "bad.engine").write_bytes(b"garbage")
    run_error(capsys, "inspect", tmp_path / "bad.engine", match="No engine metadata")
    (tmp_path / "bad.engine.json").write_text("{ truncated")
    run_error(capsys, "inspect", tmp_path / "bad.engine", match="is unreadable (JSONDecodeError")
    (tmp_path / "bad.engine.json").write_text('{"some": "json"}')
    run_error(capsys, "inspect", tmp_path / "bad.engine", match="is not tokensieve engine metadata")


def _fake_engine(tmp_path: Path, payload: bytes = b"plan bytes " * 100, **changes) -> Path:
    """A stand-in engine file and the `<engine>.json` the builder would write for it (inspect never parses plans)."""
    import hashlib

    engine = tmp_path / "m.engine"
    engine.write_bytes(payload)
    meta = {"schema": "tokensieve.tensorrt-engine/1", "flavor": "tensorrt_rtx", "tensorrt_version": "1.7.1.116",
            "target": "rtx-sm86", "engine_size_bytes": len(payload),
            "engine_sha256": hashlib.sha256(payload).hexdigest()} | changes
    (tmp_path / "m.engine.json").write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))
    return engine


def test_inspect_engine_checks_the_file_against_its_metadata(tmp_path, capsys):
    engine = _fake_engine(tmp_path)
    assert main(["inspect", str(engine)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["engine_size_bytes"] == 1100
    assert captured.err == "engine file: OK (size, sha256 match)\n"

    _fake_engine(tmp_path, engine_sha256=None)  # metadata from before engine_sha256 existed: size only
    assert main(["inspect", str(engine)]) == 0
    assert capsys.readouterr().err == "engine file: OK (size matches; the metadata records no sha256)\n"


@pytest.mark.parametrize("corrupt, match", [
    (lambda e: e.write_bytes(e.read_bytes()[:-100]), "is 1000 bytes but its metadata records 1100"),  # truncated copy
    (lambda e: e.write_bytes(b"P" + e.read_bytes()[1:]), "does not match the sha256 in its metadata"),  # same size
])
def test_inspect_engine_that_differs_from_its_metadata_is_a_one_line_error(tmp_path, capsys, corrupt, match):
    engine = _fake_engine(tmp_path)
    corrupt(engine)
    line = run_error(capsys, "inspect", engine, match=match)
    assert line.endswith("rebuild it with `tokensieve build --target rtx-sm86`"), line


def test_error_in_a_subprocess(vit_dir, tmp_path):
    """The real process: exit status 2, one stderr line, no traceback, no output folder (module entry point)."""
    out = tmp_path / "out"
    proc = cli("export", "--model", vit_dir, "--prune", "cls-topk@1:16", "-o", out, *FAST)
    assert_cli_error("export", proc.returncode, proc.stdout, proc.stderr, match="keep=16 must be below")
    assert not out.exists()


# ------------------------------------------------------------------------------------------ terminals and pipes

_PRINTS_ARROWS = """
import sys
from tokensieve import cli

class Arrows(cli.Tool):
    '''Print arrows.'''
    name = "arrows"
    def run(self, args):
        for _ in range(20000):
            print("197→139→98")
        return 0

cli.TOOLS.append(Arrows())
sys.exit(cli.main(["arrows"]))
"""


def test_ascii_stdout_does_not_crash_on_arrows():
    env = dict(os.environ, PYTHONIOENCODING="ascii", LANG="C", LC_ALL="C")
    p = subprocess.run([sys.executable, "-c", _PRINTS_ARROWS], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0 and p.stderr == ""
    assert p.stdout.splitlines()[0] == "197?139?98"


def test_closed_pipe_exits_quietly():
    p = subprocess.run(f"{shlex.quote(sys.executable)} -c {shlex.quote(_PRINTS_ARROWS)} | head -n 1", shell=True,
                       capture_output=True, text=True, timeout=120, executable="/bin/bash")
    assert p.stdout == "197→139→98\n"
    assert p.stderr == "", p.stderr  # no traceback, no "Exception ignored" line


def test_optimize_fuses_pruned_like_dense_verifies_and_cleans_up_on_failure(exported, tmp_path, capsys, monkeypatch):
    """`tokensieve optimize OUT`: ORT's transformer optimizer on both sides, the same fusion counts, verified against
    eager; a failed verification (here: a tolerance no float graph meets, forced) leaves no optimized file."""
    import shutil

    from tokensieve import api
    from tokensieve.cli import main

    folder = tmp_path / "out"
    shutil.copytree(exported[0], folder)
    assert main(["optimize", str(folder)]) == 0
    text = capsys.readouterr().out
    assert "SkipLayerNormalization" in text and "verify            PASS" in text
    row = next(ln.split() for ln in text.splitlines() if ln.strip().startswith("SkipLayerNormalization"))
    assert row[1] == row[2] and int(row[1]) > 0  # dense == pruned fusions
    assert all((folder / n).is_file() for n in api.OPTIMIZED.values())
    real = api.verify_onnx
    monkeypatch.setattr(api, "verify_onnx", lambda *a, **k: dataclasses.replace(real(*a, **k), max_abs_diff=1.0))
    assert main(["optimize", str(folder)]) == 2
    assert not any((folder / n).exists() for n in api.OPTIMIZED.values())


def test_quantize_writes_int8_copies_close_to_fp32(exported, tmp_path, capsys):
    """`tokensieve quantize OUT` (random calibration, with a warning): int8 QDQ copies of the three graphs, compared
    with fp32 by kept-token overlap and output cosine (not by equality)."""
    import shutil

    import onnx

    from tokensieve import api
    from tokensieve.cli import main

    folder = tmp_path / "out"
    shutil.copytree(exported[0], folder)
    assert main(["quantize", str(folder)]) == 0
    out, err = capsys.readouterr()
    assert "calibrating on random inputs" in err
    line = next(ln for ln in out.splitlines() if ln.startswith("vs fp32"))
    overlap = [float(v.rstrip("%,")) for v in re.findall(r"[\d.]+%", line)]
    cosine = float(re.search(r"cosine min ([\d.]+)", line).group(1))
    assert overlap and min(overlap) > 80 and cosine > 0.95, line  # random weights and calibration: loose
    for name in api.QUANTIZED.values():
        ops = {n.op_type for n in onnx.load(str(folder / name)).graph.node}
        assert "QuantizeLinear" in ops and "DequantizeLinear" in ops, name


def test_every_option_of_every_command_has_help():
    import argparse

    from tokensieve.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {a.option_strings or a.dest}" for name, sp in sub.choices.items() for a in sp._actions
               if not isinstance(a, argparse._HelpAction) and not a.help]
    assert not missing, missing
