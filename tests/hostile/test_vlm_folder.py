"""`tokensieve export-vlm` writes its folder like `tokensieve export`: one writer at a time (a second one fails at once
with one line), everything staged and swapped in at the end with the manifest last, so an interrupted run (Ctrl-C:
exit 130) leaves the previous complete export byte for byte (or no folder, if it created it), and a killed run's
staging folder and temp files are removed by the next run.

The heavy steps (tracing and converting the three parts, ~12 s for the tiny LLaVA; greedy verification) are stand-ins
here: `export_vlm` writes each part file tagged with its run (through the same atomic writer) and the real manifest,
`verify_vlm` passes. Everything around them (argument checks, plan_vlm on a real tiny LLaVA, the lock, the staging
folder, the swap, the messages) is the real command; tests/exporter/vlm/test_export_vlm_cli.py runs it with the real steps.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from tokensieve import cli_vlm, vlm_api
from tokensieve.cli import main
from tokensieve.fileio import write_bytes_atomic
from tokensieve.manifest import read_vlm_manifest

PARTS = ("vision_prune.onnx", "lm_prefill.onnx", "lm_decode.onnx", "embed_tokens.npy")
ENGINES = tuple(f"{p}.engine{ext}" for p in ("vision_prune", "lm_prefill", "lm_decode") for ext in ("", ".json"))


@pytest.fixture(scope="module")
def tiny_llava():
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_id=127,
                                                     projector_hidden_act="gelu")).eval()


class Runs:
    """Stand-ins for the heavy steps; `during(out_dir, run)` is called once each run has written half its parts."""

    def __init__(self):
        self.tag, self.during = "", None

    def export_vlm(self, model, out_dir, prune="cls-topk:0.25", **kw):
        plan = vlm_api.plan_vlm(model, prune)
        out, paths = Path(out_dir), {}
        for i, (key, name) in enumerate(zip(("vision", "prefill", "decode", "embed"), PARTS)):
            if i == 2 and self.during is not None:
                self.during(out, self.tag)
            paths[key] = write_bytes_atomic(out / name, f"{self.tag} {name}".encode())
        result = vlm_api.VlmExportResult(
            plan.model_type, out, paths, plan.prune, plan.stage.method, {}, plan.keep, plan.num_tokens,
            plan.num_image_tokens, plan.layout, {}, {}, {k: p.stat().st_size for k, p in paths.items()},
            {"vision": 0.1}, model, None, plan.inner, plan.max_positions)
        vlm_api._write_manifest(result)  # the real manifest, tokensieve.manifest's schema
        return result

    def verify_vlm(self, result, **kw):
        return vlm_api.VlmVerifyReport(result.model_type, 2, kw.get("max_new_tokens", 1), 1e-4, True, True, 0.0, 0.0,
                                       [[1], [2]], 0.0)

    def run(self, model_dir: Path, out: Path, tag: str) -> int:
        self.tag = tag
        return main(["export-vlm", str(model_dir), "-o", str(out), "--steps", "1", "--no-build"])


@pytest.fixture
def runs(tmp_path, monkeypatch, tiny_llava):
    (tmp_path / "llava").mkdir()
    (tmp_path / "llava" / "config.json").write_text(json.dumps({"model_type": "llava"}))
    r = Runs()
    monkeypatch.setattr(cli_vlm, "load_vlm", lambda path: ("llava", tiny_llava))
    monkeypatch.setattr(vlm_api, "export_vlm", r.export_vlm)
    monkeypatch.setattr(vlm_api, "verify_vlm", r.verify_vlm)
    return r


def folder(out: Path) -> dict[str, bytes]:
    return {p.name: b"<folder>" if p.is_dir() else p.read_bytes() for p in sorted(out.iterdir())}


def assert_complete(out: Path, tag: str) -> None:
    files = folder(out)
    assert sorted(files) == sorted([*PARTS, "llava_parts.json"]), sorted(files)  # no staging folder, no temp file
    assert all(files[name] == f"{tag} {name}".encode() for name in PARTS), files
    manifest = read_vlm_manifest(out)  # the real reader: complete and listing these files
    assert set(manifest.files.values()) == set(PARTS) and manifest.prune == "cls-topk@1:0.25"


def test_second_writer_fails_and_nothing_mixes(runs, tmp_path, capsys):
    """While run 1 is midway (half its parts written), run 2 into the same folder fails at once with one line and
    writes nothing; run 1 then swaps in exactly its own files, and the previous export's engines it did not rebuild
    are removed (and named)."""
    out, src = tmp_path / "out", tmp_path / "llava"
    assert runs.run(src, out, "old") == 0
    for name in ENGINES:  # an earlier build's engines: stale once the parts are replaced
        (out / name).write_text("engine")
    seen = {}

    def second(stage: Path, tag: str):
        runs.during = None
        before = folder(out)
        seen["rc"] = runs.run(src, out, "second")
        seen["err"] = capsys.readouterr().err
        seen["untouched"] = folder(out) == before and sorted(p.name for p in stage.iterdir()) == sorted(
            [*PARTS[:2]])
        runs.tag = tag

    runs.during = second
    assert runs.run(src, out, "first") == 0
    err = capsys.readouterr().err
    assert seen["rc"] == 2 and seen["untouched"], seen
    last = seen["err"].strip().splitlines()[-1]
    assert last.startswith("tokensieve export-vlm: error: Another tokensieve export is writing into ") and \
        len(last) <= 200 and "Traceback" not in seen["err"], seen["err"]
    assert_complete(out, "first")
    assert "removed stale engines of an earlier export: " + ", ".join(ENGINES) in err, err


@pytest.mark.parametrize("previous", [True, False], ids=["re-export", "new folder"])
def test_ctrl_c_midway_keeps_previous_export(runs, tmp_path, capsys, previous):
    """Ctrl-C after half the parts are written: exit 130, one line, and the folder is the previous export byte for
    byte (no staging folder, no temp file), or gone if this run created it."""
    out, src = tmp_path / "out", tmp_path / "llava"
    if previous:
        assert runs.run(src, out, "old") == 0
    before = folder(out) if previous else None
    runs.during = lambda stage, tag: os.kill(os.getpid(), signal.SIGINT)
    assert runs.run(src, out, "new") == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "tokensieve: interrupted" and "Traceback" not in err, err
    if previous:
        assert folder(out) == before
        assert_complete(out, "old")
    else:
        assert not out.exists()


def test_killed_runs_leftovers_are_removed(runs, tmp_path):
    """What a SIGKILL-ed run leaves (its staging folder with parts, an unlocked temp file of a part) goes with the
    next run; a file the export does not own stays."""
    out, src = tmp_path / "out", tmp_path / "llava"
    assert runs.run(src, out, "old") == 0
    stage = out / ".tokensieve-staging-k1ll3d00"
    stage.mkdir()
    (stage / "vision_prune.onnx").write_text("killed")
    (out / ".lm_prefill.onnx.abcd1234.tmp").write_text("killed")
    (out / "notes.txt").write_text("mine")
    assert runs.run(src, out, "new") == 0
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    assert_complete(out, "new")
