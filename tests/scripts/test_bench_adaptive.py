"""scripts/bench_adaptive.py end to end on the 2-block tiny ViT: dense / capped / compact=true in one run, JSON +
table."""
from __future__ import annotations

import json

import pytest

from tokensieve.errors import ConfigError
from tokensieve.scripts import bench_adaptive


@pytest.mark.parametrize("recipe,want", [
    ("adaptive@4:0.9", "adaptive(compact=true)@4:0.9"),
    ("adaptive(threshold=1.2)@4:50", "adaptive(threshold=1.2,compact=true)@4:50"),
])
def test_compact_recipe(recipe, want):
    assert bench_adaptive.compact_recipe(recipe) == want


@pytest.mark.parametrize("recipe", ["cls-topk@4:0.5", "adaptive@1:0.9+adaptive@2:0.9", "adaptive(compact=true)@4:0.9"])
def test_compact_recipe_refuses_other_recipes(recipe):
    with pytest.raises(ConfigError, match="one capped adaptive stage"):
        bench_adaptive.compact_recipe(recipe)


def test_bench_adaptive_writes_table_and_json(two_block_vit, tmp_path):
    rc = bench_adaptive.main(["--model", str(two_block_vit), "--recipe", "adaptive@0:0.9", "--batch", "1", "--blocks",
                              "1", "--iters", "2", "-o", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "adaptive.json").read_text())
    (row,) = data["rows"]
    assert row["batch"] == 1 and row["cap"] == 58 and data["meta"]["tokens_capped"] == [65, 59]
    assert 1 <= row["largest_count"] < row["cap"]  # random-init attention keeps about half: the cut is real
    assert row["counts"] == [row["largest_count"]]
    assert row["ideal_at_count"] > row["ideal_at_cap"] > 1.0
    assert abs(row["speedup_compact"] - row["dense_ms"] / row["compact_ms"]) < 1e-9
    assert abs(row["ratio_compact"] - row["speedup_compact"] / row["ideal_at_count"]) < 1e-9
    assert f"| 1 | 58 | {row['largest_count']} |" in (tmp_path / "adaptive.md").read_text()
