"""Qwen2.5-VL through the VLM adapter interface: the windowed vision tower exported with static windows, the
Qwen2-VL language-model parts, export_vlm + verify_vlm, the CLI, the engines.

A tiny random-init Qwen2_5_VLForConditionalGeneration: 3 vision blocks (0 and 2 full attention, 1 windowed), one
image of grid (1, 12, 20) patches -> a 6 x 10 merged grid in windows of 4 x 4 merged tokens: 6 windows, 4 of them
partial (64, 64, 32, 32, 32, 16 patches), 60 image tokens. Two full exports (the time budget): keep-all
(uniform:1.0 through export_vlm: against HF, the engine build) and attn-mean:0.5 (the CLI, which runs export_vlm +
verify_vlm); divprune:0.5 exports only its vision part and reuses the CLI's K = 30 LM parts.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLVisionConfig

import tokensieve.exporter.vlm.qwen2_vl_adapter as qa
from test_qwen2_vl_parts import _pixels, _tiny_qwen2_vl

from tokensieve.cli import main
from tokensieve.errors import ConfigError
from tokensieve.exporter.vlm.families import adapter_by_type, adapter_for
from tokensieve.exporter.vlm.qwen2_5_vl import Qwen25VLVisionPrune, window_groups
from tokensieve.exporter.vlm.qwen2_5_vl_adapter import Qwen25VLAdapter
from tokensieve.exporter.vlm.qwen2_vl import image_layout
from tokensieve.graph_passes.onnx.check_static import check_static
from tokensieve.vlm_api import build_vlm, export_vlm, plan_vlm, verify_vlm, write_parts

GRID = (1, 12, 20)
N_IMG = 60          # (12 / 2) * (20 / 2) merged tokens
# window_size 32 px = 4 merged tokens of 2 x 2 patches of 4 px; initializer_range 0.1 (HF: 0.02) so the window
# control moves the features visibly
VISION = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
              spatial_merge_size=2, temporal_patch_size=2, window_size=32, fullatt_block_indexes=[0, 2],
              initializer_range=0.1)
LAYOUT = image_layout(Qwen2_5_VLVisionConfig(**VISION), GRID)


@pytest.fixture(scope="module")
def model():
    """The tiny model; its language model and special tokens are the tiny Qwen2-VL's (the same decoder)."""
    qwen2 = _tiny_qwen2_vl().config
    tokens = {f"{k}_token_id": getattr(qwen2, f"{k}_token_id")
              for k in ("image", "video", "vision_start", "vision_end")}
    text = {k: v for k, v in qwen2.text_config.to_dict().items() if k != "model_type"}
    torch.manual_seed(0)
    cfg = Qwen2_5_VLConfig(vision_config=VISION, text_config=text, **tokens)
    cfg._attn_implementation = "sdpa"
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def full(model, tmp_path_factory):
    """Every token kept (uniform:1.0) through export_vlm: the parts compared with HF, and the engine build."""
    return export_vlm(model, tmp_path_factory.mktemp("qwen25_full"), "uniform:1.0", grid=GRID)


@pytest.fixture(scope="module")
def cli_run(model, tmp_path_factory):
    """`tokensieve export-vlm DIR --prune attn-mean:0.5 --grid 1,12,20 -o OUT --no-build` on a save_pretrained folder
    (export_vlm + verify_vlm, 8 greedy tokens) -> (model folder, OUT, exit code, stdout)."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("qwen25_cli")
    folder, out = root / "model", root / "out"
    model.save_pretrained(folder)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(["export-vlm", str(folder), "--prune", "attn-mean:0.5", "--grid", "1,12,20", "-o", str(out),
                   "--no-build"])
    return folder, out, rc, stdout.getvalue()


# --------------------------------------------------------------------------- the windowed tower, eager


def test_windows_are_hf_segments(model):
    """The constant windows hold exactly HF's window segments (window_index cut at cu_window_seqlens) as patch sets;
    the grid has partial windows, so the key mask is there."""
    from transformers.vision_utils import get_vision_window_index

    members, valid, slot = window_groups(model.config.vision_config, LAYOUT)
    index, cu = get_vision_window_index(LAYOUT.grid_thw, 2, 32, 4)
    permuted = (index[:, None] * 4 + torch.arange(4)).reshape(-1)
    hf = [sorted(permuted[a:b].tolist()) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    assert [sorted(m[v].tolist()) for m, v in zip(members, valid)] == hf
    assert valid.sum(1).tolist() == [64, 64, 32, 32, 32, 16] and members.shape == (6, 64)
    assert torch.equal(members.reshape(-1)[slot], torch.arange(LAYOUT.num_patches))  # slot undoes the gather
    vision = Qwen25VLVisionPrune(model.model.visual, LAYOUT, "attn-mean", 6).eval()
    assert vision.window_mask is not None and vision.full_blocks == {0, 2}


def test_keep_all_equals_hf_image_features_and_window_controls(model):
    """keep = every token: equal to HF's get_image_features (window permutation, cu_window_seqlens, reverse
    permutation) to 1e-5. Controls: the windowed block with full attention, or with HF's segment sizes cut from the
    unpermuted patches, changes the features by > 1e-3."""
    x = _pixels(LAYOUT, 7)
    vision = Qwen25VLVisionPrune(model.model.visual, LAYOUT, "attn-mean", N_IMG).eval()
    with torch.no_grad():
        feats, keep = vision(x)
        want = model.model.get_image_features(x, LAYOUT.grid_thw).pooler_output[0]
    assert keep.tolist() == list(range(N_IMG))
    torch.testing.assert_close(feats, want, atol=1e-5, rtol=0)

    no_windows = Qwen25VLVisionPrune(model.model.visual, LAYOUT, "attn-mean", N_IMG).eval()
    no_windows.full_blocks = frozenset(range(3))  # no windows: plain full attention in block 1
    _, valid, _ = window_groups(model.config.vision_config, LAYOUT)
    sizes = valid.sum(1)
    starts = torch.cumsum(sizes, 0) - sizes
    unpermuted = Qwen25VLVisionPrune(model.model.visual, LAYOUT, "attn-mean", N_IMG).eval()
    unpermuted.window_members = torch.where(valid, starts[:, None] + torch.arange(64), starts[:, None])
    unpermuted.window_slot = torch.arange(6 * 64).reshape(6, 64)[valid]  # members[valid] is 0..N-1 in order
    for control in (no_windows, unpermuted):
        with torch.no_grad():
            assert (control(x)[0] - want).abs().max() > 1e-3


# --------------------------------------------------------------------------- export_vlm + verify_vlm


def test_keep_all_ort_greedy_equals_hf_generate(model, full):
    """Every token kept: the exported parts' greedy tokens on ONNX Runtime equal HF's generate (prefill logits within
    1e-4), their image features HF's get_image_features (1e-5)."""
    result, prompt = full, qa.sample_prompt(model.config, LAYOUT)
    x = _pixels(LAYOUT, 11)
    vision = {}
    tokens, logits = qa.greedy_onnx(model, result.paths, LAYOUT, x, prompt, steps=8, vision_out=vision)
    mm = (prompt == model.config.image_token_id).int()
    with torch.no_grad():
        gen = model.generate(input_ids=prompt, pixel_values=x, image_grid_thw=LAYOUT.grid_thw, mm_token_type_ids=mm,
                             max_new_tokens=8, min_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
        want = model(input_ids=prompt, pixel_values=x, image_grid_thw=LAYOUT.grid_thw, mm_token_type_ids=mm).logits
        hf_feats = model.model.get_image_features(x, LAYOUT.grid_thw).pooler_output[0]
    assert tokens == gen[0, prompt.shape[1]:].tolist()
    assert (logits - want[:, -1]).abs().max() <= 1e-4
    assert vision["keep_idx"].tolist() == list(range(N_IMG))
    assert np.abs(vision["image_features"] - hf_feats.numpy()).max() <= 1e-5


def test_cli_export_vlm_attn_mean(cli_run, capsys):
    """attn-mean:0.5 from the CLI: export_vlm + verify_vlm PASS (8 greedy tokens and keep_idx identical to the eager
    pruned reference, logits within 1e-4), the manifest of the family. A video grid without --seconds-per-grid (its
    M-RoPE time spacing; test_qwen2_5_vl_video.py exports videos): one line, exit 2."""
    folder, out, rc, stdout = cli_run
    line = next(li for li in stdout.splitlines() if "verify" in li)
    assert rc == 0 and "PASS" in line and "8 greedy tokens identical, keep_idx identical" in line, stdout
    assert float(line.split("max |Δ logits| ")[1].split()[0]) <= 1e-4
    assert "Qwen2.5-VL" in stdout and "60 merged tokens -> 30 kept" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["model_type"], manifest["method"], manifest["keep"]) == ("qwen2_5_vl", "attn-mean", 30)
    assert manifest["grid_thw"] == list(GRID)
    check_static(onnx.load(str(out / "vision_prune.onnx")))
    capsys.readouterr()
    assert main(["export-vlm", str(folder), "--prune", "attn-mean:0.5", "--grid", "2,12,20", "-o",
                 str(out.parent / "video"), "--no-build"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tokensieve export-vlm: error: ") and "video" in err[0], err
    assert "--seconds-per-grid" in err[0]


def test_divprune_verifies(model, full, cli_run, tmp_path):
    """divprune:0.5 (a diversity method, the TOKENS score path): its vision part exported by the adapter's exporter
    and written by vlm_api.write_parts, with the K = 30 LM parts export_vlm wrote for attn-mean:0.5 (the LM parts
    depend on K only); verify_vlm: ORT greedy tokens and keep_idx == the eager pruned reference, logits within 1e-4.
    Control: attn-mean keeps other tokens on the same image (the selection is the method's)."""
    plan = plan_vlm(model, "divprune:0.5", grid=GRID)
    adapter = Qwen25VLAdapter(model)
    vision = adapter.vision_module(plan)
    paths, _ = write_parts({"vision": adapter.part_exporters(plan, vision)["vision"]()}, tmp_path)
    lm = cli_run[1]
    result = dataclasses.replace(full, vision=vision, keep=30, num_image_tokens=30, prune=plan.prune, method="divprune",
                                 paths={**paths, "prefill": lm / "lm_prefill.onnx", "decode": lm / "lm_decode.onnx"})
    report = verify_vlm(result, max_new_tokens=8)
    assert report.passed and report.tokens_match and report.keep_idx_match, report.to_dict()
    assert report.max_abs_diff_logits <= 1e-4 and report.max_abs_diff_features <= 1e-4
    x = _pixels(LAYOUT, 0)
    with torch.no_grad():
        kept, other = vision(x)[1], Qwen25VLVisionPrune(model.model.visual, LAYOUT, "attn-mean", 30).eval()(x)[1]
    assert kept.tolist() != other.tolist()


def test_build_vlm_builds_the_three_parts(full):
    """TensorRT-RTX builds vision_prune (windows as constant gathers + a masked SDPA), lm_prefill and lm_decode."""
    pytest.importorskip("tensorrt_rtx")
    infos = build_vlm(full, max_sequence=96)
    assert set(infos) == {"vision", "prefill", "decode"}
    io = {t["name"]: t["shape"] for t in infos["vision"].metadata["io_tensors"]}
    assert io == {"pixel_values": [240, 96], "image_features": [N_IMG, 64], "keep_idx": [N_IMG]}
    engines = json.loads(full.paths["manifest"].read_text())["engines"]
    assert set(engines) == set(infos) and all((full.out_dir / e["file"]).is_file() for e in engines.values())


# --------------------------------------------------------------------------- the family and its refusals


def _one_line(exc_info) -> str:
    assert "\n" not in str(exc_info.value)
    return str(exc_info.value)


def test_registry_and_refusals(model, monkeypatch):
    """The registry picks Qwen25VLAdapter; one-line ConfigErrors name Qwen2.5-VL: a video grid without
    second_per_grid, a [CLS] method, an attention score read from a windowed last block (a hidden-state score still
    applies)."""
    assert type(adapter_for(model)) is Qwen25VLAdapter and adapter_by_type("qwen2_5_vl") is Qwen25VLAdapter
    for call, words in [(lambda: plan_vlm(model, "attn-mean:0.5", grid=(2, 12, 20)), "pass second_per_grid=S"),
                        (lambda: plan_vlm(model, "cls-topk:0.5", grid=GRID), "Qwen2.5-VL's vision tower")]:
        with pytest.raises(ConfigError) as e:
            call()
        assert words in _one_line(e)
    monkeypatch.setattr(model.model.visual, "fullatt_block_indexes", [0])  # the last block (2) windowed
    with pytest.raises(ConfigError) as e:
        plan_vlm(model, "attn-mean:0.5", grid=GRID)
    assert "block 2" in _one_line(e) and "ttv" in str(e.value)
    assert plan_vlm(model, "ttv:0.5", grid=GRID).keep == 30
