"""scripts/bench_video.py end to end on a small Qwen2-VL video (grid 2,4,4: 32 patches, 8 video tokens): dense vs
holitom, JSON + table; bad arguments are one line."""
from __future__ import annotations

import json

import pytest

from tokensieve.scripts import bench_video

SMALL = ["--vision-layers", "1", "--text-layers", "2", "--grid", "2,4,4", "--text", "8"]


def test_bench_video_writes_table_and_json(tmp_path):
    """dense vs holitom+merge: HoliTom whole, outer holitom (8 -> 4 tokens) + its inner merge after LLM layer 0
    (4 -> 2)."""
    rc = bench_video.main([*SMALL, "--variants", "dense,holitom+merge", "--keep", "0.5", "--inner-layer", "0",
                           "--blocks", "1", "--iters", "1", "-o", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "video.json").read_text())
    assert data["meta"]["grid"] == [2, 4, 4] and data["meta"]["video_tokens"] == 8
    variant = data["meta"]["variants"]["holitom+merge"]
    assert variant["options"] == {"tau": 0.8, "knn": 7, "beta": -1.0} and "merge=true" in variant["inner"]
    dense, holitom = data["rows"]
    assert (dense["prune"], holitom["prune"]) == ("uniform:1.0", "holitom:0.5")
    assert (dense["kept_tokens"], holitom["kept_tokens"], holitom["kept_after_inner"]) == (8, 4, 2)
    # 8 text + <vision_start> + <vision_end> around the kept video tokens; decode's cache is that prompt, shorter by
    # the 2 merged-away tokens in the layer after the inner stage
    assert (dense["prompt_tokens"], holitom["prompt_tokens"]) == (18, 14)
    assert (dense["decode_cache"], holitom["decode_cache"]) == ([18, 18], [14, 12])
    for part in bench_video.PARTS:
        assert dense[part]["speedup"] == 1.0 and dense[part]["mac_ideal"] == 1.0
        assert abs(holitom[part]["ratio"] - holitom[part]["speedup"] / holitom[part]["mac_ideal"]) < 1e-9
        assert holitom[part]["median_ms"] > 0 and holitom[part]["p90_ms"] >= holitom[part]["median_ms"]
    # the pruned prompt is shorter: fewer prefill and decode MACs; the vision part runs the same tower plus holitom's
    # clustering (pairwise distances, assignment MatMul), so it costs more MACs than dense's TopK over all tokens
    assert holitom["prefill"]["macs"] < dense["prefill"]["macs"]
    assert holitom["decode"]["macs"] < dense["decode"]["macs"]
    assert holitom["vision"]["macs"] > dense["vision"]["macs"]
    # dense vision MACs by hand (1 block, 32 patches of 384 channels, 2 steps x 16 patches attending within a step,
    # 8 merged tokens): Conv3d patch embedding (C_in·kT·kH·kW = 3·2·14·14 = 1176) + qkv + SDPA (q·kᵀ and p·v, head dim 64) + proj + MLP (x4) + merger (1536 -> 1536 -> 512)
    n, c, merged = 32, 384, 8
    by_hand = (n * c * 1176 + n * c * 3 * c + 2 * 6 * 16 * 16 * (64 + 64) + n * c * c + 2 * n * c * 4 * c
               + merged * 1536 * 1536 + merged * 1536 * 512)
    assert dense["vision"]["macs"] == by_hand
    assert dense["selection_overhead_ms"] == 0.0
    assert abs(holitom["selection_overhead_ms"] - holitom["vision"]["median_ms"] + dense["vision"]["median_ms"]) < 1e-9
    assert abs(holitom["ttft_ms"] - holitom["vision"]["median_ms"] - holitom["prefill"]["median_ms"]) < 1e-9
    table = (tmp_path / "video.md").read_text()
    assert "| holitom+merge | holitom:0.5 + fastv(merge=true)@0:2 | 4→2 | 14 | prefill |" in table
    assert "| decode (cache 14/12) |" in table and "| decode (cache 18) |" in table
    assert "time to first token (vision + prefill medians)" in table


@pytest.mark.parametrize("args, needle", [
    (["--variants", "holitom"], "must start with dense"),
    (["--variants", "dense,evs,evs"], "must start with dense"),
    (["--variants", "dense,evs+drop"], "the part after '+' must be one of fastv, merge"),
    (["--grid", "1,4,4"], "T >= 2 temporal patches"),
    (["--grid", "8,16"], "must be T,H,W"),
    (["--text", "1"], "--text 1 must be >= 2"),
    # checked by plan_vlm for every variant before any export: EVS keeps the whole first frame (4 tokens) but K = 2
    ([*SMALL, "--variants", "dense,evs", "--keep", "0.25"], "variant evs (evs:0.25, --grid 2,4,4)"),
])
def test_bad_arguments_are_one_line(tmp_path, capsys, args, needle):
    assert bench_video.main([*args, "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and err.startswith("bench_video: error:")
    assert not (tmp_path / "video.json").exists()


def test_variant_that_does_not_verify_stops_with_one_line(tmp_path, capsys, monkeypatch):
    """A verify_vlm report that fails (here: the ORT greedy ids differ) stops the run before any timing: exit 2."""
    from types import SimpleNamespace

    from tokensieve import vlm_api

    report = vlm_api.VlmVerifyReport(model_type="qwen2_vl", batch=1, max_new_tokens=2, atol=1e-4, tokens_match=False,
                                     keep_idx_match=True, max_abs_diff_logits=0.5, max_abs_diff_features=0.0,
                                     tokens=[[3, 4]], seconds=0.0)
    monkeypatch.setattr(vlm_api, "export_vlm", lambda model, out, prune, grid, inner=None: SimpleNamespace(prune=prune))
    monkeypatch.setattr(vlm_api, "verify_vlm", lambda result, **kw: report)
    assert bench_video.main([*SMALL, "--variants", "dense,holitom", "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("bench_video: error: variant dense (uniform:1.0) does not match eager: tokens_match=False")
    assert not (tmp_path / "video.json").exists()
