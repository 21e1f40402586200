"""scripts/bench_vlm.py end to end on a small LLaVA (64 px: 16 patches): dense vs outer pruning, JSON + table."""
from __future__ import annotations

import json

import pytest

from tokensieve.scripts import bench_vlm


def test_bench_vlm_writes_table_and_json(tmp_path):
    rc = bench_vlm.main(["--vision-layers", "2", "--text-layers", "2", "--image-size", "64", "--variants", "dense,outer",
                         "--prune", "cls-topk:0.25", "--text", "8", "--blocks", "1", "--iters", "2", "-o", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "vlm.json").read_text())
    dense, outer = data["rows"]
    assert (dense["image_tokens"], outer["image_tokens"]) == (16, 4)
    assert (dense["prompt_tokens"], outer["prompt_tokens"]) == (24, 12)
    assert dense["decode_cache"] == [24, 24] and outer["decode_cache"] == [12, 12]
    for part in bench_vlm.PARTS:
        assert dense[part]["speedup"] == 1.0 and dense[part]["mac_ideal"] == 1.0
        assert outer[part]["macs"] < dense[part]["macs"]  # fewer tokens in every part (vision: the projector)
        assert abs(outer[part]["ratio"] - outer[part]["speedup"] / outer[part]["mac_ideal"]) < 1e-9
    # prefill MACs follow the prompt length: 12 of 24 tokens -> 2x fewer linear MACs, 4x fewer attention MACs, the
    # same LM head (last position only)
    assert 1.9 < outer["prefill"]["mac_ideal"] < 2.1
    assert abs(outer["ttft_ms"] - outer["vision"]["median_ms"] - outer["prefill"]["median_ms"]) < 1e-9
    table = (tmp_path / "vlm.md").read_text()
    assert f"| outer | {outer['prune']} | 4 | 12 | prefill |" in table and "time to first token" in table


@pytest.mark.parametrize("args, needle", [
    (["--variants", "outer"], "must start with dense"),
    (["--variants", "dense,dense"], "must start with dense"),
    (["--image-size", "50"], "multiple of 16"),
    (["--text", "1"], "--text must be >= 2"),
])
def test_bad_arguments_are_one_line(tmp_path, capsys, args, needle):
    assert bench_vlm.main([*args, "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and err.startswith("bench_vlm: error:")
