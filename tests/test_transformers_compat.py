"""transformers 4.57 compatibility: block discovery, export and verify on the other module spelling.

tokensieve targets transformers 5.x, where ViT blocks are `vit.encoder.layer.N` -> `layers.N` and CLIP's are
`vision_model.encoder.layers.N` -> `encoder.layers.N` (FACTS.md); block discovery must not depend on either. This
test takes the pins of scripts/transformers-4.57.txt that tests/assets.py installed before the tests (pip
--no-deps --target, under the ignored build/compat/), puts them first on PYTHONPATH of a subprocess, and there
exports tiny random-init ViT and CLIP-vision models with a cls-topk recipe and verifies them against eager on ONNX
Runtime. Without the pins it skips naming the fetch command (fails under CI). Cost on the 2-core machine: ~26 s for
the subprocess (imports, two exports, verify).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from assets import require

REPO = Path(__file__).resolve().parents[1]
PINS = REPO / "scripts" / "transformers-4.57.txt"
RECIPE = "cls-topk@1,2:0.5"
ATOL = 1e-4

# Runs under transformers 4.57: one JSON line per model with its block paths and the verify report.
SCRIPT = f"""
import json, sys
sys.path.insert(0, {str(REPO / "tests")!r})
import transformers
from tiny_models import build
from tokensieve import api

print(json.dumps({{"version": transformers.__version__, "file": transformers.__file__}}))
for name in ("vit", "clip_vision"):
    result = api.export(*build(name), {RECIPE!r})
    report = api.verify(result, num_inputs=4, batch=2, atol={ATOL!r})
    print(json.dumps({{"model": name, "block_paths": result.block_paths, "tokens": result.tokens,
                      "indices_match": report.indices_match, "max_abs_diff": report.max_abs_diff,
                      "passed": report.passed}}))
"""


def test_transformers_4_57_exports_and_verifies_vit_and_clip():
    site = require("transformers-4.57")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    header, results = lines[0], {r["model"]: r for r in lines[1:]}
    assert header["version"].startswith("4.57.") and header["file"].startswith(str(site)), header

    # The 4.57 spelling really was exercised (5.x has neither `vit.encoder.layer` nor `vision_model.encoder`).
    assert results["vit"]["block_paths"] == [f"model.vit.encoder.layer.{i}" for i in range(4)]
    assert results["clip_vision"]["block_paths"] == [f"model.vision_model.encoder.layers.{i}" for i in range(4)]
    for name, r in results.items():
        assert r["tokens"] == [17, 9, 5], (name, r)
        assert r["indices_match"] == [True, True], (name, r)
        assert r["max_abs_diff"] <= ATOL and r["passed"], (name, r)
