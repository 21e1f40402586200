"""scripts/bench_methods.py end to end on the 2-block tiny ViT (stage after block 0): JSON + markdown table with
measured rows."""
from __future__ import annotations

import json

from tokensieve.scripts import bench_methods


def test_base_method_strips_parameters():
    assert bench_methods.base_method("tome(prop_attn=true)") == "tome" and bench_methods.base_method("ttv") == "ttv"


def test_bench_methods_writes_table_and_json(two_block_vit, tmp_path):
    rc = bench_methods.main(["--model", str(two_block_vit), "--after-block", "0", "--methods",
                             "cls-topk;tome(prop_attn=true)", "--blocks", "1", "--iters", "2", "-o", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "methods.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"cls-topk", "tome(prop_attn=true)"}
    for r in rows.values():
        assert r["verified"] is True
        assert r["tokens"] == [65, 33]
        assert r["dense_ms"] > 0 and r["pruned_ms"] > 0 and r["stage_ms"] > 0
        assert 0 < r["overhead_pct"] < 100
        assert r["ideal_speedup"] > 1.0
        assert abs(r["ratio"] - r["speedup"] / r["ideal_speedup"]) < 1e-9
    md = (tmp_path / "methods.md").read_text()
    assert "| cls-topk | 65→33 | yes |" in md and "| tome(prop_attn=true) | 65→33 | yes |" in md
