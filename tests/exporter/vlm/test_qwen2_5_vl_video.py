"""Qwen2.5-VL videos (grid t > 1) exported in parts: the windowed tower per temporal step, and the M-RoPE time spacing
second_per_grid (HF's second_per_grid_ts) fixed at export.

A tiny random-init Qwen2_5_VLForConditionalGeneration (test_qwen2_5_vl's, windows of 2 x 2 merged tokens,
tokens_per_second 2): one video of grid (3, 6, 8) -> 3 temporal patches of a 3 x 4 merged grid, 36 video tokens; each
step tiles into 4 windows (2 partial), 12 windows in all. second_per_grid 1.25 s -> time step 2.5 (floored: temporal
patches at s + 0, 2, 5, while the text after the video continues at s + 4: the time axis runs past it, as in HF).
One CLI export (attn-mean:16: export_vlm + verify_vlm), whose K = 16 prefill and decode the video methods' vision parts
(evs, holitom) reuse, and a keep-all vision + prefill (K = 36) with the same decode against HF.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

import tokensieve.exporter.vlm.qwen2_vl_adapter as qa
from test_qwen2_vl_parts import _pixels, _tiny_qwen2_vl

from tokensieve import vlm_api
from tokensieve.cli import main
from tokensieve.errors import ConfigError
from tokensieve.exporter.vlm.fastv import parse_fastv
from tokensieve.exporter.vlm.qwen2_5_vl import Qwen25VLVisionPrune, VideoLayout, window_groups
from tokensieve.exporter.vlm.qwen2_5_vl_adapter import Qwen25VLAdapter
from tokensieve.vlm_api import build_vlm, plan_vlm, verify_vlm, write_parts

GRID = (3, 6, 8)
SECONDS = 1.25      # seconds per temporal patch: time step tokens_per_second (2) x 1.25 = 2.5
N_VID = 36          # 3 x (6 / 2) x (8 / 2)
KEEP = 16           # evs keeps the whole first frame (12 tokens) and 4 more
VISION = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
              spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[0, 2],
              initializer_range=0.1, tokens_per_second=2)


@pytest.fixture(scope="module")
def model():
    """The tiny model; its language model and special tokens are the tiny Qwen2-VL's."""
    qwen2 = _tiny_qwen2_vl().config
    tokens = {f"{k}_token_id": getattr(qwen2, f"{k}_token_id")
              for k in ("image", "video", "vision_start", "vision_end")}
    text = {k: v for k, v in qwen2.text_config.to_dict().items() if k != "model_type"}
    torch.manual_seed(0)
    cfg = Qwen2_5_VLConfig(vision_config=VISION, text_config=text, **tokens)
    cfg._attn_implementation = "sdpa"
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def layout(model):
    return plan_vlm(model, "uniform:1.0", grid=GRID, second_per_grid=SECONDS).layout


@pytest.fixture(scope="module")
def prompt(model, layout):
    return qa.sample_prompt(model.config, layout)


@pytest.fixture(scope="module")
def cli_run(model, tmp_path_factory):
    """`tokensieve export-vlm DIR --prune attn-mean:16 --grid 3,6,8 --seconds-per-grid 1.25 --no-build` on a
    save_pretrained folder (export_vlm + verify_vlm, 4 greedy tokens) -> (folder, exit code, stdout, stderr, the
    VlmExportResult its export_vlm call returned)."""
    root = tmp_path_factory.mktemp("qwen25_video")
    folder = root / "model"
    model.save_pretrained(folder)
    results, real = [], vlm_api.export_vlm
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        mp.setattr(vlm_api, "export_vlm", lambda *a, **kw: results.append(real(*a, **kw)) or results[-1])
        rc = main(["export-vlm", str(folder), "--prune", f"attn-mean:{KEEP}", "--grid", "3,6,8", "--seconds-per-grid",
                   str(SECONDS), "-o", str(root / "out"), "--steps", "4", "--no-build"])
    return folder, rc, stdout.getvalue(), stderr.getvalue(), results[0] if results else None


@pytest.fixture(scope="module")
def exported(cli_run):
    assert cli_run[1] == 0 and cli_run[4] is not None, cli_run[3]
    return cli_run[4]


def _with_vision(model, exported, method, keep, tmp_path, options=""):
    """`exported` with another outer stage: its vision part exported and written alone, the LM parts of K = keep
    (the prefill depends on K only; decode on nothing of the stage) taken from `exported` when keep == KEEP."""
    plan = plan_vlm(model, f"{method}{options}:{keep}", grid=GRID, second_per_grid=SECONDS)
    adapter = Qwen25VLAdapter(model)
    vision = adapter.vision_module(plan)
    exporters = adapter.part_exporters(plan, vision)
    parts = {"vision": exporters["vision"]()} | ({} if keep == KEEP else {"prefill": exporters["prefill"]()})
    paths, _ = write_parts(parts, tmp_path)
    paths = {"prefill": exported.paths["prefill"], "decode": exported.paths["decode"]} | paths
    return dataclasses.replace(exported, vision=vision, keep=keep, num_image_tokens=keep, num_tokens=N_VID,
                               prune=plan.prune, method=method, options=dict(vision.options), paths=paths,
                               out_dir=tmp_path, engines={})


def _hf_video(layout, pixels, prompt, model, seconds=SECONDS):
    mm = (prompt == model.config.video_token_id).int() * 2
    return dict(pixel_values_videos=pixels, video_grid_thw=layout.grid_thw, mm_token_type_ids=mm,
                second_per_grid_ts=torch.tensor([seconds]))


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert msg and "\n" not in msg, msg
    return msg


# --------------------------------------------------------------------------- layout and positions


def test_layout_and_time_spaced_positions(model, layout, prompt):
    """The plan's VideoLayout carries second_per_grid; the prompt's M-RoPE ids equal HF's get_rope_index with
    second_per_grid_ts: temporal patch i at s + floor(2.5 i) = s + 0, 2, 5, the text after it at s + 4. Control: the
    Qwen2-VL rule (time_interval 1: s + i) gives other ids."""
    assert isinstance(layout, VideoLayout) and layout.second_per_grid == SECONDS and layout.num_merged == N_VID
    s = 4                                                                  # 3 text tokens + <vision_start>
    pos = qa.prompt_mrope_positions(model, prompt, layout)
    mask = prompt == model.config.video_token_id
    want, _ = model.model.get_rope_index(prompt, mm_token_type_ids=mask.int() * 2, video_grid_thw=layout.grid_thw,
                                         second_per_grid_ts=torch.tensor([SECONDS]))
    assert torch.equal(pos, want)
    video = pos[:, 0, s:s + N_VID]
    assert sorted(set(video[0].tolist())) == [s, s + 2, s + 5]
    assert video[:, 12].tolist() == [s + 2, s, s] and pos[0, 0, s + N_VID + 1] == s + 4 + 1  # <vision_end> at s + 4
    qwen2_rule = qa.prompt_mrope_positions(model, prompt, dataclasses.replace(layout, second_per_grid=0.5))
    assert sorted(set(qwen2_rule[0, 0, s:s + N_VID].tolist())) == [s, s + 1, s + 2]  # 2 x 0.5: time_interval 1


def test_windows_per_temporal_step_and_keep_all_equals_hf(model, layout):
    """The constant windows are HF's per-step window segments (12 windows: 4 a step, 2 of them partial); keep = every
    token equals HF's get_video_features to 1e-5. Control: the windows of the steps stacked as one image (1, 18, 8)
    (the same natural patch order), whose windows cross step boundaries, change the features by > 1e-3."""
    from transformers.vision_utils import get_vision_window_index

    members, valid, _ = window_groups(model.config.vision_config, layout)
    index, cu = get_vision_window_index(layout.grid_thw, 2, 16, 4)
    permuted = (index[:, None] * 4 + torch.arange(4)).reshape(-1)
    hf = [sorted(permuted[a:b].tolist()) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    assert [sorted(m[v].tolist()) for m, v in zip(members, valid)] == hf
    assert valid.sum(1).tolist() == [16, 16, 8, 8] * 3
    assert all(max(m) // 48 == min(m) // 48 for m in hf)                  # a window never spans two steps
    x = _pixels(layout, 7)
    vision = Qwen25VLVisionPrune(model.model.visual, layout, "attn-mean", N_VID).eval()
    with torch.no_grad():
        feats, keep = vision(x)
        want = model.model.get_video_features(x, layout.grid_thw).pooler_output[0]
    assert keep.tolist() == list(range(N_VID))
    torch.testing.assert_close(feats, want, atol=1e-5, rtol=0)
    stacked = Qwen25VLVisionPrune(model.model.visual, layout, "attn-mean", N_VID).eval()
    members, valid, slot = window_groups(model.config.vision_config, dataclasses.replace(layout, t=1, h=18))
    assert any(max(m[v]) // 48 != min(m[v]) // 48 for m, v in zip(members, valid))  # a window spans two steps
    stacked.window_members, stacked.window_slot, stacked.window_mask = members, slot, valid[:, None, None, :]
    with torch.no_grad():
        assert (stacked(x)[0] - want).abs().max() > 1e-3


# --------------------------------------------------------------------------- export + verify


def test_cli_exports_and_verifies_attn_mean(cli_run):
    """attn-mean:16 from the CLI: export + verify PASS (ORT greedy ids and keep_idx == the eager pruned reference,
    logits within 1e-4); the summary names the spacing; the manifest records video, the grid and second_per_grid."""
    _, rc, stdout, stderr, result = cli_run
    assert rc == 0, stderr
    line = next(li for li in stdout.splitlines() if "verify" in li)
    assert "PASS" in line and "4 greedy tokens identical, keep_idx identical" in line, stdout
    assert float(line.split("max |Δ logits| ")[1].split()[0]) <= 1e-4
    assert f"video tokens    {N_VID} merged tokens -> {KEEP} kept (1.25 s per temporal patch" in stdout
    manifest = json.loads(result.paths["manifest"].read_text())
    assert (manifest["model_type"], manifest["modality"], manifest["grid_thw"]) == ("qwen2_5_vl", "video", list(GRID))
    assert manifest["layout"]["second_per_grid"] == SECONDS and manifest["keep"] == KEEP
    assert manifest["placeholder_token_id"] == 201 and manifest["verification"]["status"] == "passed"


def test_keep_all_ort_equals_hf_generate(model, layout, prompt, exported, tmp_path):
    """Every token kept (uniform:36: its vision part and K = 36 prefill, the shared decode): ORT's video features
    equal HF's get_video_features (1e-5), its greedy tokens HF's generate with second_per_grid_ts, the prefill logits
    HF's forward within 1e-4. Control: the same parts with Qwen2-VL's time spacing (interval 1) give other logits
    and tokens."""
    full = _with_vision(model, exported, "uniform", N_VID, tmp_path)
    x = _pixels(layout, 1)
    vision = {}
    tokens, logits = qa.greedy_onnx(model, full.paths, layout, x, prompt, steps=8, vision_out=vision)
    hf = _hf_video(layout, x, prompt, model)
    with torch.no_grad():
        gen = model.generate(input_ids=prompt, **hf, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        want = model(input_ids=prompt, **hf).logits[:, -1]
        feats = model.model.get_video_features(x, layout.grid_thw).pooler_output[0]
    assert tokens == gen[0, prompt.shape[1]:].tolist()
    assert (logits - want).abs().max() <= 1e-4
    assert vision["keep_idx"].tolist() == list(range(N_VID))
    assert np.abs(vision["image_features"] - feats.numpy()).max() <= 1e-5
    unspaced = dataclasses.replace(layout, second_per_grid=0.5)  # tokens_per_second 2 x 0.5: Qwen2-VL's interval 1
    other, other_logits = qa.greedy_onnx(model, full.paths, unspaced, x, prompt, steps=8)
    assert (other_logits - want).abs().max() > 1e-3 and other != tokens


@pytest.mark.parametrize("method, options", [("evs", ""), ("holitom", "(tau=-0.5,knn=3)")])
def test_pruned_video_verifies(model, exported, tmp_path, method, options):
    """The video methods (attn-mean, a CLS-free image method, is the CLI's export): vision part exported alone with
    the K = 16 LM parts; verify_vlm: ORT greedy ids and keep_idx == the eager pruned reference, logits within 1e-4 (holitom with
    tau=-0.5: its temporal merges happen on random pixels). evs keeps the whole first frame."""
    result = _with_vision(model, exported, method, KEEP, tmp_path, options)
    report = verify_vlm(result, max_new_tokens=4)
    assert report.passed and report.tokens_match and report.keep_idx_match, report.to_dict()
    assert report.max_abs_diff_logits <= 1e-4 and report.max_abs_diff_features <= 1e-4
    with torch.no_grad():
        keep = result.vision(_pixels(result.layout, 0))[1].tolist()
    assert len(keep) == KEEP and keep != exported.vision(_pixels(result.layout, 0))[1].tolist()
    if method == "evs":
        assert keep[:12] == list(range(12))
    if method == "holitom":  # the build test's fp16 engine of a merging video part
        pytest.importorskip("tensorrt_rtx")
        from tokensieve import api

        info = api.build(result.paths["vision"], tmp_path / "fp16.engine", target="rtx-sm86", precision="fp16")
        assert {t["name"]: t["shape"] for t in info.metadata["io_tensors"]}["keep_idx"] == [KEEP]


def test_fastv_inner_on_the_video_matches_its_reference(model, layout, prompt, exported):
    """Inner FastV on the video (fastv@0:8 of the 16 kept): the torch FastV parts' greedy tokens, kept tokens and
    logits equal the independent eager FastV reference on the time-spaced positions."""
    spec = parse_fastv("fastv@0:8", 2, KEEP)
    x = _pixels(layout, 3)
    logits = []
    tokens, _ = qa.greedy_eager(model, exported.vision, x, prompt, steps=4, inner=spec, logits_out=logits)
    ref = qa.greedy_fastv_reference(model, exported.vision, x, prompt, spec, steps=4)
    assert tokens == ref.tokens[0].tolist()
    assert (torch.stack(logits) - ref.logits).abs().max() <= 1e-4


def test_build_vlm_builds_the_video_parts(exported):
    """TensorRT-RTX (SM86, no GPU needed) builds the three video parts, fp32 and fp16."""
    pytest.importorskip("tensorrt_rtx")
    for precision in ("fp32", "fp16"):
        infos = build_vlm(exported, precision=precision, max_sequence=64)
        io_ = {t["name"]: t["shape"] for t in infos["vision"].metadata["io_tensors"]}
        assert io_ == {"pixel_values": [144, 96], "image_features": [KEEP, 64], "keep_idx": [KEEP]}
        engines = json.loads(exported.paths["manifest"].read_text())["engines"]
        assert {e["precision"] for e in engines.values()} == {precision} and len(engines) == 3


# --------------------------------------------------------------------------- refusals


def test_refusals(model):
    """One-line ConfigErrors: a video without second_per_grid, a value <= 0 / NaN / inf / a bool, one for an image,
    one for Qwen2-VL, a video grid the layout cannot hold."""
    cases = [(dict(grid=GRID), "pass second_per_grid=S"),
             (dict(grid=GRID, second_per_grid=0), "> 0"), (dict(grid=GRID, second_per_grid=-1.0), "> 0"),
             (dict(grid=GRID, second_per_grid=float("nan")), "> 0"),
             (dict(grid=GRID, second_per_grid=float("inf")), "> 0"), (dict(grid=GRID, second_per_grid=True), "> 0"),
             (dict(grid=(1, 6, 8), second_per_grid=1.0), "is an image"),
             (dict(grid=(3, 5, 8), second_per_grid=1.0), "multiples of spatial_merge_size"),
             (dict(grid=(0, 6, 8), second_per_grid=1.0), "must be >= 1")]
    for kwargs, words in cases:
        with pytest.raises(ConfigError) as e:
            plan_vlm(model, "attn-mean:0.5", **kwargs)
        assert words in _one_line(e), kwargs
    with pytest.raises(ConfigError) as e:
        plan_vlm(_tiny_qwen2_vl(), "attn-mean:0.5", grid=(3, 4, 4), second_per_grid=1.0)
    assert "Qwen2-VL takes no seconds per temporal patch" in _one_line(e)
    assert not isinstance(plan_vlm(model, "attn-mean:0.5", grid=(1, 6, 8)).layout, VideoLayout)  # an image: none


def test_cli_refusals(cli_run, tmp_path, capsys):
    """`tokensieve export-vlm`: a video without --seconds-per-grid, --seconds-per-grid 0 / -1, or with an image grid:
    one line, exit 2, nothing written."""
    folder = cli_run[0]
    for extra, words in [(["--grid", "3,6,8"], "--seconds-per-grid S"),
                         (["--grid", "3,6,8", "--seconds-per-grid", "0"], "> 0"),
                         (["--grid", "3,6,8", "--seconds-per-grid", "-1"], "> 0"),
                         (["--grid", "1,6,8", "--seconds-per-grid", "1"], "is an image"),
                         (["--grid", "3,6,7", "--seconds-per-grid", "1"], "multiples of spatial_merge_size")]:
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        capsys.readouterr()
        assert main(["export-vlm", str(folder), "--prune", "attn-mean:4", *extra, "-o", str(out), "--no-build"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("tokensieve export-vlm: error: ") and words in err[0], (extra, err)
        assert not out.exists()
