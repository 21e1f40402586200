"""Qwen2-VL videos (grid t > 1) exported in parts: per-step vision attention, video placeholders, video M-RoPE.

A tiny random-init Qwen2VLForConditionalGeneration (test_qwen2_vl_parts' builder), one video of grid (3, 4, 4):
3 temporal patches of 4x4 patches -> 48 patch rows, 12 merged video tokens (step-major), pruned to K = 5. t = 3 is
more than max(h, w) / merge = 2, so the text after the video starts below the last time position (HF's rule).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json

import numpy as np
import onnx_ir as ir
import pytest
import torch

import tokensieve.exporter.vlm.qwen2_vl_adapter as vlm
from test_qwen2_vl_parts import _tiny_qwen2_vl
from tokensieve.cli import main
from tokensieve.errors import ConfigError
from tokensieve.exporter.vlm.qwen2_vl import (Qwen2VLPrefill, Qwen2VLVisionPrune, export_vision_prune, image_layout,
                                              placeholder_token_id)
from tokensieve.graph_passes.methods.attention_scores import mean_attention_scores
from tokensieve.graph_passes.onnx.check_static import check_static
from tokensieve.runtime.onnxruntime_runner import OrtRunner
from tokensieve.vlm_api import build_vlm, plan_vlm, verify_vlm

GRID = (3, 4, 4)
KEEP = 5
IMAGE_TOKEN, VIDEO_TOKEN = 200, 201
BEFORE, AFTER = [5, 6, 7], [8, 9, 10, 11]


@pytest.fixture(scope="module")
def model():
    return _tiny_qwen2_vl()


@pytest.fixture(scope="module")
def layout(model):
    return image_layout(model.config.vision_config, GRID)


@pytest.fixture(scope="module")
def prompt(model, layout):
    return vlm.video_prompt(model.config, layout, BEFORE, AFTER)


@pytest.fixture(scope="module")
def cli_run(model, tmp_path_factory):
    """`tokensieve export-vlm CKPT --prune attn-mean:5 --grid 3,4,4 --no-build` on a save_pretrained copy of `model`
    -> (checkpoint, exit code, stdout, stderr, the VlmExportResult its export_vlm call returned). That result is the
    `exported` fixture (the same weights as `model`): the file pays for one three-part export, not two."""
    from tokensieve import vlm_api

    root = tmp_path_factory.mktemp("qwen2_vl_video")
    ckpt = root / "ckpt"
    model.save_pretrained(ckpt)
    results, real = [], vlm_api.export_vlm
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        mp.setattr(vlm_api, "export_vlm", lambda *a, **kw: results.append(real(*a, **kw)) or results[-1])
        rc = main(["export-vlm", str(ckpt), "--prune", f"attn-mean:{KEEP}", "--grid", "3,4,4", "-o", str(root / "out"),
                   "--steps", "2", "--no-build"])
    return ckpt, rc, stdout.getvalue(), stderr.getvalue(), results[0] if results else None


@pytest.fixture(scope="module")
def exported(cli_run):
    """export_vlm(model, out, "attn-mean:5", grid=(3, 4, 4)) as the CLI called it."""
    assert cli_run[1] == 0 and cli_run[4] is not None, cli_run[3]
    return cli_run[4]


def _pixels(layout, seed):
    return torch.randn(layout.num_patches, layout.patch_dim, generator=torch.Generator().manual_seed(seed))


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert msg and "\n" not in msg, msg
    return msg


# --------------------------------------------------------------------------- vision tower


def test_video_layout(model, layout):
    assert layout.is_video and layout.modality == "video" and (layout.num_patches, layout.num_merged) == (48, 12)
    assert layout.frame_patches == 16 and placeholder_token_id(model.config, layout) == VIDEO_TOKEN
    image = image_layout(model.config.vision_config, (1, 4, 4))
    assert not image.is_video and image.modality == "image" and placeholder_token_id(model.config, image) == IMAGE_TOKEN


def test_keep_all_reproduces_hf_video_features(model, layout):
    """keep = every token: the tower with the temporal steps as SDPA's batch equals HF's get_video_features (cu_seqlens
    one segment per step), in order. Control: HF's tower with one segment over all 48 patches differs."""
    x = _pixels(layout, 7)
    vision = Qwen2VLVisionPrune(model.model.visual, layout, "attn-mean", layout.num_merged).eval()
    with torch.no_grad():
        feats, keep = vision(x)
        want = model.model.get_video_features(x, layout.grid_thw).pooler_output[0]
        one_segment = model.model.visual(x, grid_thw=layout.grid_thw,
                                         cu_seqlens=torch.tensor([0, layout.num_patches], dtype=torch.int32))
    assert keep.tolist() == list(range(layout.num_merged)) and feats.shape == want.shape == (12, 64)
    assert (feats - want).abs().max() <= 1e-5
    assert (one_segment.pooler_output - want).abs().max() > 1e-4  # the control: full attention is another tower


def test_attn_mean_scores_per_temporal_step(model, layout):
    """attn-mean on a video: the last block's q/k come as (t, heads, hw, D); the patch scores are the attention each
    patch receives within its step, flattened step-major, then averaged per 2x2 merge group. Control: the same
    scores over one (1, heads, N, D) segment differ."""
    vision = Qwen2VLVisionPrune(model.model.visual, layout, "attn-mean", KEEP).eval()
    seen = {}
    orig = vision._scores
    vision._scores = lambda q, k, s, *a: seen.setdefault("s", (orig(q, k, s, *a), q, k, s))[0]
    with torch.no_grad():
        _, keep = vision(_pixels(layout, 3))
    merged, q, k, s = seen["s"]
    assert q.shape == (3, 2, 16, 16) and merged.shape == (1, 12)
    per_step = torch.cat([mean_attention_scores(q[i:i + 1], k[i:i + 1], s) for i in range(3)], dim=1)  # (1, 48)
    torch.testing.assert_close(merged, per_step.reshape(1, -1, 4).mean(-1))
    assert keep.tolist() == merged[0].topk(KEEP).indices.sort().values.tolist()
    joint = mean_attention_scores(*(t.transpose(0, 1).reshape(1, 2, 48, 16) for t in (q, k)), s)
    assert (joint.reshape(1, -1, 4).mean(-1) - merged).abs().max() > 1e-3


@pytest.mark.parametrize("method, options", [("attn-mean", {}), ("divprune", {}), ("uniform", {}), ("evs", {}),
                                             ("holitom", {"tau": -0.5, "knn": 3})])
def test_vision_prune_ort_matches_eager(model, layout, exported, tmp_path, method, options):
    """The exported video vision_prune (static (48, 96) input, checked static) reproduces the eager keep_idx exactly
    and its features to 1e-4 on new inputs (holitom with tau=-0.5: its temporal merges happen on random pixels)."""
    if method == "attn-mean":
        vision, path = exported.vision, exported.paths["vision"]
    else:
        vision = Qwen2VLVisionPrune(model.model.visual, layout, method, KEEP, options).eval()
        proto = ir.to_proto(export_vision_prune(vision))
        check_static(proto)
        path = tmp_path / "vision_prune.onnx"
        path.write_bytes(proto.SerializeToString())
    with OrtRunner(path) as runner:
        assert [tuple(s) for _, s, _ in runner.input_specs] == [(48, 96)]
        for seed in (0, 1):
            x = _pixels(layout, seed)
            with torch.no_grad():
                feats, keep = vision(x)
            out = runner.infer({"pixel_values": x.numpy()})
            assert out["keep_idx"].tolist() == keep.tolist() == sorted(set(keep.tolist()))
            assert out["image_features"].shape == (KEEP, 64)
            assert np.abs(out["image_features"] - feats.numpy()).max() <= 1e-4
    if method == "uniform":  # fixed positions spread over all 12 tokens, i.e. over every temporal step
        assert keep.tolist() == [0, 3, 6, 8, 11]
    if method == "evs":  # the first frame (4 tokens) is always kept
        assert keep.tolist()[:4] == [0, 1, 2, 3]
    if method in ("evs", "holitom") and importlib.util.find_spec("tensorrt_rtx"):  # the video methods' graphs build
        from tokensieve import api

        for precision in ("fp32", "fp16"):
            info = api.build(path, tmp_path / f"{precision}.engine", target="rtx-sm86", precision=precision)
            assert {t["name"]: t["shape"] for t in info.metadata["io_tensors"]}["keep_idx"] == [KEEP]


def test_video_methods_on_a_static_video(model, layout):
    """A video whose temporal steps are identical: evs and holitom at keep = one frame (4 tokens) return exactly the
    first frame's tokens of the unpruned video (holitom: every later token merges into its position's frame-0 run,
    whose mean is that token); with a changing last frame, holitom(keep=8) keeps that frame's 4 tokens."""
    step = _pixels(layout, 3)[:16]
    still = step.repeat(3, 1)                                                    # (48, 96): 3 identical steps
    with torch.no_grad():
        full, _ = Qwen2VLVisionPrune(model.model.visual, layout, "uniform", 12).eval()(still)
        for method in ("evs", "holitom"):
            feats, keep = Qwen2VLVisionPrune(model.model.visual, layout, method, 4).eval()(still)
            assert keep.tolist() == [0, 1, 2, 3], method
            torch.testing.assert_close(feats, full[:4], rtol=0, atol=1e-5)
        moving = torch.cat([step, step, _pixels(layout, 4)[:16]])
        feats, keep = Qwen2VLVisionPrune(model.model.visual, layout, "holitom", 8).eval()(moving)
    assert keep.tolist() == [0, 1, 2, 3, 8, 9, 10, 11]


# --------------------------------------------------------------------------- prompt, M-RoPE, prefill


def test_video_prompt_and_mrope_positions(model, layout, prompt):
    """video_token placeholders; HF's get_rope_index with video_grid_thw: token (i, r, c) of the video sits at
    (s + i, s + r, s + c), s = 4; the text after it continues at s + max(h, w) / merge = 6 (not after the time
    axis's 6); kept columns keep their positions; keep-all delta == HF's rope delta."""
    s = len(BEFORE) + 1
    assert prompt[0].tolist() == [*BEFORE, 202, *[VIDEO_TOKEN] * 12, 203, *AFTER]
    pos = vlm.prompt_mrope_positions(model, prompt, layout)
    video = [[s + i, s + r, s + c] for i in range(3) for r in range(2) for c in range(2)]
    assert pos[:, 0, s:s + 12].T.tolist() == video
    assert pos[:, 0, s + 12:].tolist() == [list(range(s + 2, s + 2 + 1 + len(AFTER)))] * 3  # <vision_end> + AFTER
    mask = prompt == VIDEO_TOKEN
    hf_pos, hf_delta = model.model.get_rope_index(prompt, mm_token_type_ids=mask.int() * 2,
                                                  video_grid_thw=layout.grid_thw)
    assert torch.equal(pos, hf_pos)
    full, _, delta = vlm.pruned_mrope_positions(pos, mask, torch.arange(12))
    assert torch.equal(full, pos) and torch.equal(delta, hf_delta)
    keep = torch.tensor([1, 4, 11])
    pruned, cols, _ = vlm.pruned_mrope_positions(pos, mask, keep)
    assert pruned[:, 0, s:s + 3].T.tolist() == [video[j] for j in keep.tolist()]
    assert cols.shape[1] == prompt.shape[1] - 12 + 3


def test_keep_all_reproduces_hf_logits_and_generate(model, layout, prompt):
    """K = all tokens: the eager parts on the video prompt (vision + prefill filling video_token_id + decode with the
    delta rule) equal HF's forward (pixel_values_videos, video_grid_thw) and its greedy generate."""
    x = _pixels(layout, 11)
    full = Qwen2VLVisionPrune(model.model.visual, layout, "attn-mean", layout.num_merged).eval()
    tokens, logits = vlm.greedy_eager(model, full, x, prompt, steps=6)
    mm = (prompt == VIDEO_TOKEN).int() * 2
    video = dict(pixel_values_videos=x, video_grid_thw=layout.grid_thw, mm_token_type_ids=mm)
    with torch.no_grad():
        want = model(input_ids=prompt, **video).logits[:, -1]
        gen = model.generate(input_ids=prompt, **video, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    assert (logits - want).abs().max() <= 1e-5
    assert tokens == gen[0, prompt.shape[1]:].tolist()


def test_prefill_fills_the_video_placeholder(model, layout, prompt):
    """Qwen2VLPrefill(video=True) places the features on video_token_id; control: the image prefill leaves the video
    placeholders as text embeddings, and its logits differ."""
    x = _pixels(layout, 2)
    vision = Qwen2VLVisionPrune(model.model.visual, layout, "attn-mean", layout.num_merged).eval()
    pos = vlm.prompt_mrope_positions(model, prompt, layout)
    with torch.no_grad():
        feats, _ = vision(x)
        video, *_ = Qwen2VLPrefill(model, video=True).eval()(prompt, feats, pos)
        image, *_ = Qwen2VLPrefill(model).eval()(prompt, feats, pos)
        embeds = model.model.language_model.embed_tokens(prompt)
        embeds[prompt == VIDEO_TOKEN] = feats
        hidden = model.model.language_model(inputs_embeds=embeds, position_ids=pos).last_hidden_state
        want = model.lm_head(hidden[:, -1])
    torch.testing.assert_close(video, want, atol=1e-6, rtol=0)
    assert (image - want).abs().max() > 1e-3


# --------------------------------------------------------------------------- export_vlm / verify_vlm / CLI


def test_verify_vlm_on_a_video_export(exported, model, layout):
    """verify_vlm: ORT greedy ids == eager, keep_idx identical, logits within atol; the manifest says video and which
    placeholder the prompt carries. Control: against another selection it fails."""
    report = verify_vlm(exported, max_new_tokens=4)
    assert report.passed and report.tokens_match and report.keep_idx_match is True, report.to_dict()
    assert report.max_abs_diff_logits <= 1e-4 and report.max_abs_diff_features <= 1e-4
    manifest = json.loads(exported.paths["manifest"].read_text())
    assert manifest["modality"] == "video" and manifest["grid_thw"] == list(GRID)
    assert manifest["placeholder_token_id"] == VIDEO_TOKEN and manifest["image_tokens"] == 12
    assert manifest["keep"] == KEEP and exported.to_dict()["modality"] == "video" and exported.grid == GRID
    assert exported.num_tokens == 12 and exported.vision_ops["TopK"] == 2
    other = dataclasses.replace(exported, vision=Qwen2VLVisionPrune(model.model.visual, layout, "uniform", KEEP).eval())
    bad = verify_vlm(other, max_new_tokens=1)
    assert bad.keep_idx_match is False and not bad.passed


def test_build_vlm_builds_the_video_parts(exported):
    """build_vlm: TensorRT-RTX builds the three parts of the video export (SM86, no GPU needed); vision_prune's I/O is
    static, the prefill's opt is the K + 9 token verify prompt; the manifest lists the engines."""
    pytest.importorskip("tensorrt_rtx")
    infos = build_vlm(exported, max_sequence=48)
    io = {t["name"]: t["shape"] for t in infos["vision"].metadata["io_tensors"]}
    assert io == {"pixel_values": [48, 96], "image_features": [KEEP, 64], "keep_idx": [KEEP]}
    engines = json.loads(exported.paths["manifest"].read_text())["engines"]
    assert engines["prefill"]["profile"]["position_ids"]["opt"] == [3, 1, KEEP + 9]
    assert all((exported.out_dir / e["file"]).is_file() for e in engines.values())


@pytest.mark.gpu
def test_tensorrt_greedy_equals_onnxruntime_on_a_video(model, layout, prompt, exported):
    """On the GPU: the video engines' greedy ids equal ORT's, the prefill logits within 1e-3 (fp32 with TF32)."""
    from gpu_target import engine_target

    build_vlm(exported, target=engine_target(), max_sequence=48)
    x = _pixels(layout, 0)
    want, want_logits = vlm.greedy_onnx(model, exported.paths, layout, x, prompt, steps=6)
    got, got_logits = vlm.greedy_onnx(model, exported.paths, layout, x, prompt, steps=6, backend="tensorrt")
    assert got == want
    assert (got_logits - want_logits).abs().max() <= 1e-3


def test_cli_exports_and_verifies_a_video(cli_run, tmp_path, capsys):
    """`tokensieve export-vlm DIR --grid 3,4,4`: export + verify PASS, the summary and manifest say video; bad grids
    are one line (exit 2) and write nothing."""
    ckpt, rc, stdout, stderr, result = cli_run
    assert rc == 0, stderr
    assert f"video tokens    12 merged tokens -> {KEEP} kept" in stdout and "verify          PASS" in stdout
    assert "2 greedy tokens identical" in stdout and "keep_idx identical" in stdout
    assert "video grid (3, 4, 4)" in stderr
    manifest = json.loads(result.paths["manifest"].read_text())
    assert manifest["modality"] == "video" and manifest["method"] == "attn-mean" and manifest["keep"] == KEEP
    for grid, words in [("0,4,4", "must be >= 1"), ("2,3,4", "multiples of spatial_merge_size")]:
        assert main(["export-vlm", str(ckpt), "--prune", "attn-mean:4", "--grid", grid, "-o", str(tmp_path / grid),
                     "--no-build"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
        assert not (tmp_path / grid).exists()


# --------------------------------------------------------------------------- bad input: one-line ConfigErrors


@pytest.mark.parametrize("grid, words", [((0, 4, 4), "t=0 must be >= 1"), ((-2, 4, 4), "must be >= 1"),
                                         ((2, 3, 4), "multiples of spatial_merge_size"),
                                         ((2, 4), "(t, h, w)")])
def test_bad_grid(model, grid, words):
    with pytest.raises(ConfigError) as e:
        image_layout(model.config.vision_config, grid)
    assert words in _one_line(e)
    with pytest.raises(ConfigError) as e:
        plan_vlm(model, "attn-mean:2", grid=grid)
    assert words in _one_line(e)


def test_video_refuses_feather_and_mismatched_prompts(model, layout, prompt):
    """feather places its uniform share over one attention map: refused for a video (fine for an image); a video
    prompt needs video tokens of the grid's count and no image tokens."""
    with pytest.raises(ConfigError) as e:
        plan_vlm(model, "feather(mean_attention=true):4", grid=GRID)
    msg = _one_line(e)
    assert "per temporal step" in msg and "attn-mean" in msg and "feather," not in msg
    assert plan_vlm(model, "feather(mean_attention=true):4", grid=(1, 4, 4)).keep == 4
    image = image_layout(model.config.vision_config, (1, 4, 4))
    cases = [(lambda: vlm.image_prompt(model.config, layout, BEFORE, AFTER), "video_prompt()"),
             (lambda: vlm.video_prompt(model.config, image, BEFORE, AFTER), "image_prompt()"),
             (lambda: vlm.prompt_mrope_positions(model, vlm.sample_prompt(model.config, image), layout),
              "[0] video tokens"),
             (lambda: vlm.prompt_mrope_positions(model, torch.cat([prompt, torch.tensor([[IMAGE_TOKEN]])], 1), layout),
              "image tokens (id 200)")]
    for call, words in cases:
        with pytest.raises(ConfigError) as e:
            call()
        assert words in _one_line(e)
