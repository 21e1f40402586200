"""scripts/gpu_check.sh --dry-run end to end on the tiny config: the path shim install, the harness compile (shared
with test_kernel_harness through the build cache), one export into torch programs, the CPU latency table, JSON + MD.
What needs a GPU (kernels, sanitizer, CUDA timing) is only recorded as skipped here."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tokensieve.scripts import gpu_check

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
HAS_NVCC = shutil.which("nvcc") is not None or Path("/usr/local/cuda/bin/nvcc").is_file()


def test_dry_run_end_to_end_through_the_shim(tmp_path):
    out = tmp_path / "gpu check"  # a space in the path: the shell script must quote it
    env = os.environ | {"PYTHON": sys.executable, "GPU_CHECK_INSTALL": "shim"}
    args = [str(SCRIPT), str(out), "--dry-run", "--tiny", "--recipes", "divprune@0:0.5", "--batches", "2",
            "--blocks", "1", "--iters", "1"] + ([] if HAS_NVCC else ["--skip-kernels"])
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "using the path shim" in proc.stdout
    report = json.loads((out / "gpu_check.json").read_text())
    sections = report["sections"]
    assert report["schema"] == gpu_check.SCHEMA and report["dry_run"] is True
    assert not [n for n, s in sections.items() if s["status"] == "failed"]
    assert sections["environment"]["result"]["cuda_available"] in (True, False)
    if HAS_NVCC:
        assert Path(sections["harness_build"]["result"]["lib"]).is_file()
        for name in ("kernel_correctness", "sanitizer", "divprune_timing"):
            assert sections[name]["status"] == "skipped" and "dry run" in sections[name]["note"]
    rows = sections["latency_table"]["result"]
    assert [(r["recipe"], r["dtype"], r["batch"]) for r in rows] == [("divprune@0:0.5", "fp32", 2),
                                                                    ("divprune@0:0.5", "fp16", 2)]
    assert sections["export:tiny-2-blocks:divprune@0:0.5"]["result"]["tokens"] == [65, 33]
    for r in rows:
        assert r["mode"] == {"dense": "eager", "pruned": "eager"}
        assert r["dense_ms"] > 0 and r["pruned_ms"] > 0 and r["ideal_speedup"] > 1
        assert abs(r["ratio_to_ideal"] - r["speedup"] / r["ideal_speedup"]) < 1e-9
    # the .pt2 programs go to a temporary folder, deleted at the end: OUT (what a GPU session brings back) stays small
    assert {p.name for p in out.iterdir()} <= {"gpu_check.json", "gpu_check.md", ".shim", "nvidia-smi.txt"}
    md = (out / "gpu_check.md").read_text()
    assert "DRY RUN" in md and "| tiny-2-blocks | divprune@0:0.5 | fp16 | 2 |" in md


def test_budget_skips_sections_with_a_note(tmp_path):
    """With no budget left every timed section is skipped (recorded, not failed) and the report is still written."""
    code = gpu_check.main([str(tmp_path), "--dry-run", "--tiny", "--budget-s", "0", "--skip-kernels"])
    assert code == 0
    sections = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    key = "export:tiny-2-blocks:divprune@0:0.5"
    assert sections[key]["status"] == "skipped" and "budget" in sections[key]["note"]
    assert sections["latency_table"]["result"] == []
    assert f"| {key} | skipped |" in (tmp_path / "gpu_check.md").read_text()


def test_without_a_gpu_a_real_run_stops_at_once(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert gpu_check.main([str(tmp_path), "--tiny"]) == 2
    assert "environment" in json.loads((tmp_path / "gpu_check.json").read_text())["sections"]


def test_usage_error_is_one_line():
    proc = subprocess.run([str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("usage:") and proc.stderr.count("\n") == 1
