"""A VLM export's manifest records its verification, and `tokensieve inspect` shows it: PASS, FAILED verification
(exit 1, as for a ViT export whose report.json records a failure) or UNVERIFIED (--no-verify, or a manifest without
the record: the Python API's export_vlm alone). A hand-edited record of the wrong shape is one line, exit 2. And the
folder lock names no wrong command: a ViT `tokensieve export` and a `tokensieve export-vlm` that meet in one folder
say "Another tokensieve export or export-vlm is writing into ...".

As in test_vlm_folder.py, the heavy steps (tracing the parts, greedy decoding) are stand-ins: the parts are files
tagged with their run and verify_vlm returns a given VlmVerifyReport; the argument checks, plan_vlm on a real tiny
LLaVA, the staging folder, record_verification, the manifest's writer and reader and `inspect` are the real code
(tests/exporter/vlm/test_export_vlm_cli.py runs export-vlm with the real steps).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from test_vlm_folder import Runs, tiny_llava  # noqa: F401 - tiny_llava is a module-scoped fixture

from tokensieve import api, cli_vlm, vlm_api
from tokensieve.cli import main
from tokensieve.errors import ConfigError
from tokensieve.manifest import read_vlm_manifest

WHEN = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def report(passed: bool) -> vlm_api.VlmVerifyReport:
    """A verify_vlm report of batch 2, 1 step: identical, or tokens that differ with logits 0.25 apart."""
    return vlm_api.VlmVerifyReport("llava", 2, 1, 1e-4, passed, True, 0.0 if passed else 0.25, 0.0,
                                   [[1], [2]], 0.0)


@pytest.fixture
def runs(tmp_path, monkeypatch, tiny_llava):  # noqa: F811 - the imported fixture
    (tmp_path / "llava").mkdir()
    (tmp_path / "llava" / "config.json").write_text(json.dumps({"model_type": "llava"}))
    r = Runs()
    r.report = report(True)
    monkeypatch.setattr(cli_vlm, "load_vlm", lambda path: ("llava", tiny_llava))
    monkeypatch.setattr(vlm_api, "export_vlm", r.export_vlm)
    monkeypatch.setattr(vlm_api, "verify_vlm", lambda result, **kw: r.report)
    return r


def export_vlm(tmp_path: Path, capsys, *flags: str) -> tuple[int, str, dict]:
    """export-vlm of the stand-in LLaVA into tmp_path/out -> (exit code, stdout, the manifest as written)."""
    out = tmp_path / "out"
    code = main(["export-vlm", str(tmp_path / "llava"), "-o", str(out), "--steps", "1", "--no-build", *flags])
    text = capsys.readouterr().out
    return code, text, json.loads((out / "llava_parts.json").read_text())


def inspect(folder: Path, capsys) -> tuple[int, str]:
    """`tokensieve inspect FOLDER` -> (exit code, its verify line)."""
    code = main(["inspect", str(folder)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    lines = [line for line in captured.out.splitlines() if line.startswith("  verify")]
    assert len(lines) == 1, captured.out
    return code, lines[0]


def test_a_passed_verification_is_recorded_and_shown(runs, tmp_path, capsys):
    code, text, manifest = export_vlm(tmp_path, capsys)
    assert code == 0 and "verify          PASS: batch 2, 1 greedy tokens identical" in text
    v = manifest["verification"]
    assert v == {"status": "passed", "when": v["when"], "backend": "onnxruntime", "batch": 2, "steps": 1,
                 "tokens_match": True, "keep_idx_match": True, "inner_keep_idx_match": None,
                 "max_abs_diff_logits": 0.0, "max_abs_diff_features": 0.0, "atol": 1e-4}
    assert WHEN.fullmatch(v["when"]), v["when"]
    assert read_vlm_manifest(tmp_path / "out").verification == v  # the reader takes it back as written
    code, line = inspect(tmp_path / "out", capsys)
    when = v["when"].replace("T", " ").removesuffix("Z")
    assert code == 0 and line == ("  verify        PASS: 1 greedy tokens identical, keep_idx identical, max |Δ logits| "
                                  f"0.0e+00 (atol 0.0001); batch 2 vs eager on onnxruntime ({when} UTC)"), line


def test_a_failed_verification_is_recorded_and_inspect_exits_1(runs, tmp_path, capsys):
    runs.report = report(False)
    code, text, manifest = export_vlm(tmp_path, capsys)
    assert code == 1 and "verify          FAIL: batch 2, 1 greedy tokens DIFFER" in text  # swapped in, exit 1
    v = manifest["verification"]
    assert v["status"] == "failed" and v["tokens_match"] is False and v["max_abs_diff_logits"] == 0.25
    code, line = inspect(tmp_path / "out", capsys)
    assert code == 1 and line.startswith("  verify        FAILED verification: 1 greedy tokens DIFFER, keep_idx "
                                         "identical, max |Δ logits| 2.5e-01 (atol 0.0001); batch 2"), line


def test_no_verify_is_recorded_as_not_run_and_shown_unverified(runs, tmp_path, capsys):
    code, text, manifest = export_vlm(tmp_path, capsys, "--no-verify")
    assert code == 0 and "verify          UNVERIFIED: skipped (--no-verify)" in text
    assert set(manifest["verification"]) == {"status", "when"} and manifest["verification"]["status"] == "not run"
    code, line = inspect(tmp_path / "out", capsys)
    assert code == 0 and line.startswith("  verify        UNVERIFIED: exported with --no-verify ("), line


def test_a_reexport_replaces_the_record(runs, tmp_path, capsys):
    """A failed export, then a passing re-export into the folder: the manifest says passed (and the reverse)."""
    runs.report = report(False)
    assert export_vlm(tmp_path, capsys)[2]["verification"]["status"] == "failed"
    runs.report = report(True)
    assert export_vlm(tmp_path, capsys)[2]["verification"]["status"] == "passed"
    assert export_vlm(tmp_path, capsys, "--no-verify")[2]["verification"]["status"] == "not run"


def test_the_api_export_alone_is_unverified_until_recorded(runs, tmp_path, capsys, tiny_llava):  # noqa: F811
    """export_vlm writes a manifest without a record: inspect says UNVERIFIED; record_verification adds it."""
    out = tmp_path / "api"
    out.mkdir()  # the stand-in writes into an existing folder
    result = vlm_api.export_vlm(tiny_llava, out)
    assert "verification" not in json.loads((out / "llava_parts.json").read_text())
    code, line = inspect(out, capsys)
    assert code == 0 and line.startswith("  verify        UNVERIFIED: the manifest records no verification"), line
    vlm_api.record_verification(result, report(False))
    code, line = inspect(out, capsys)
    assert code == 1 and "FAILED verification" in line


@pytest.mark.parametrize("entry, why", [
    ({"status": "great", "when": "2026-01-01T00:00:00Z"}, "an unknown status"),
    ({"status": "passed", "when": "2026-01-01T00:00:00Z"}, "no counts"),
    ({"status": "failed", "when": "2026-01-01T00:00:00Z", "backend": "onnxruntime", "batch": 2, "steps": 1,
      "tokens_match": "no", "keep_idx_match": True, "max_abs_diff_logits": 0.1, "atol": 1e-4}, "a string flag"),
    ({"status": "not run", "when": "x" * 10_000}, "a huge time"),
    ("passed", "not an object"),
])
def test_a_malformed_record_is_one_line(runs, tmp_path, capsys, entry, why):
    export_vlm(tmp_path, capsys)
    path = tmp_path / "out" / "llava_parts.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"verification": entry}))
    assert main(["inspect", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "verification holds" in lines[0] and "re-export" in lines[0], err
    assert len(lines[0]) <= 300 and "Traceback" not in err


# ------------------------------------------------------------------------------------------ the folder lock


BUSY = "Another tokensieve export is writing into "


def test_export_vlm_meets_a_vit_export(runs, tmp_path, capsys, monkeypatch):
    """A ViT `tokensieve export` holds the folder (its real lock; the work inside is a stand-in that starts an
    export-vlm there): the export-vlm fails at once with one line naming neither command wrongly, writing nothing."""
    out, seen = tmp_path / "out", {}

    def vit_export_midway(*args, **kwargs):
        seen["files"] = sorted(p.name for p in out.iterdir())
        seen["rc"] = main(["export-vlm", str(tmp_path / "llava"), "-o", str(out), "--steps", "1", "--no-build"])
        seen["err"] = capsys.readouterr().err
        seen["after"] = sorted(p.name for p in out.iterdir())
        raise ConfigError("stand-in export stops here")

    monkeypatch.setattr(api, "_export_folder", vit_export_midway)
    assert main(["export", "--model", "tiny", "--prune", "dense", "-o", str(out), "--no-build", "--no-bench"]) == 2
    assert "stand-in export stops here" in capsys.readouterr().err
    assert seen["rc"] == 2 and seen["after"] == seen["files"], seen
    last = seen["err"].strip().splitlines()[-1]
    assert last == f"tokensieve export-vlm: error: {BUSY}{str(out)!r}; wait for it or pass another -o", last
    assert "Traceback" not in seen["err"]


def test_a_vit_export_meets_export_vlm(runs, tmp_path, capsys):
    """The reverse: while export-vlm writes (half its parts staged), a ViT export into the folder fails with the same
    line; export-vlm then completes."""
    out, seen = tmp_path / "out", {}

    def during(stage, tag):
        runs.during = None
        with pytest.raises(ConfigError) as e:
            api.export_folder("tiny", "dense", out, build=False, bench=False)
        seen["msg"] = str(e.value)

    runs.during = during
    code, _, manifest = export_vlm(tmp_path, capsys)
    assert code == 0 and manifest["verification"]["status"] == "passed"
    assert seen["msg"].startswith(BUSY), seen
