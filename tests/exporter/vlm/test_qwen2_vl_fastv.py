"""FastV inside Qwen2-VL's LLM prefill (exporter/vlm/qwen2_vl_fastv.py), images and videos, with M-RoPE: ORT greedy
generation vs an eager reference that scores with HF's own eager attention probabilities and re-runs HF's decoder
layers by hand (no cache).

Two exports per module (~14 s and ~11 s): an image, grid (1, 8, 8), on test_qwen2_vl_parts' tiny Qwen2-VL with a
3-layer language model, no outer pruning (uniform:1.0 keeps all 16) + fastv@1:0.5 (R = 8: layers 0..1 see every
token, layer 2 the pruned sequence); a video, grid (3, 4, 4), on the 2-layer _tiny_qwen2_vl itself, ToDRE-style
(outer attn-mean keeps K = 8 of 12, fastv@0:0.5 keeps R = 4 of those 8: the first layer scores), exported through
`tokensieve export-vlm --inner` (the CLI test reads its output). HoliTom's inner merge (fastv(merge=true)@0:0.5) on
that video exports only its prefill (~6 s) and reuses the video export's vision and decode parts; so does
fastv(debias=true)@0:0.5 with a bias from calibrate_qwen2_fastv_bias (~6 s).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import re

import numpy as np
import pytest
import torch

import tokensieve.exporter.vlm.qwen2_vl_adapter as vlm
from test_qwen2_vl_parts import _tiny_qwen2_vl
from tokensieve.cli import main
from tokensieve.errors import ConfigError
from tokensieve.exporter.vlm import fastv as fv
from tokensieve.exporter.vlm import qwen2_vl_fastv as qf
from tokensieve.exporter.vlm.fastv import fastv_score_reference, parse_fastv
from tokensieve.exporter.vlm.qwen2_vl import Qwen2VLVisionPrune, image_layout
from tokensieve.graph_passes.onnx.check_static import FORBIDDEN_OPS
from tokensieve.runtime.onnxruntime_runner import OrtRunner
from tokensieve.vlm_api import QWEN2_VL_PROMPT_LEN, build_vlm, export_vlm, plan_vlm, verify_vlm, write_parts

LAYER, LAYERS, STEPS, ATOL = 1, 3, 6, 1e-4   # the image export's FastV layer and LM depth (the video's: 0 and 2)
IMAGE_GRID, IMAGE_K, IMAGE_R = (1, 8, 8), 16, 8
VIDEO_GRID, VIDEO_K, VIDEO_R = (3, 4, 4), 8, 4
BEFORE, AFTER = [5, 6, 7], [8, 9, 10, 11]


@pytest.fixture(scope="module")
def model():
    """_tiny_qwen2_vl's config with a 3-layer language model (fastv@1: two full-length layers, one pruned)."""
    from transformers import Qwen2VLForConditionalGeneration

    cfg = copy.deepcopy(_tiny_qwen2_vl().config)
    cfg.text_config.num_hidden_layers = LAYERS
    cfg.text_config.layer_types = ["full_attention"] * LAYERS
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def video_model():
    return _tiny_qwen2_vl()


@pytest.fixture(scope="module")
def image(model, tmp_path_factory):
    return export_vlm(model, tmp_path_factory.mktemp("qwen_fastv_image"), "uniform:1.0", grid=IMAGE_GRID,
                      inner=f"fastv@{LAYER}:0.5")


@pytest.fixture(scope="module")
def cli_run(video_model, tmp_path_factory):
    """`tokensieve export-vlm CKPT --prune attn-mean:8 --grid 3,4,4 --inner fastv@0:0.5 --no-build` on a
    save_pretrained copy of `video_model` -> (checkpoint, exit code, stdout, stderr, the VlmExportResult of its
    export_vlm call: the `video` fixture, so the file pays for one video export)."""
    from tokensieve import vlm_api

    root = tmp_path_factory.mktemp("qwen_fastv_video")
    ckpt = root / "ckpt"
    video_model.save_pretrained(ckpt)
    results, real = [], vlm_api.export_vlm
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        mp.setattr(vlm_api, "export_vlm", lambda *a, **kw: results.append(real(*a, **kw)) or results[-1])
        rc = main(["export-vlm", str(ckpt), "--prune", f"attn-mean:{VIDEO_K}", "--grid", "3,4,4", "--inner",
                   "fastv@0:0.5", "-o", str(root / "out"), "--steps", "3", "--no-build"])
    return ckpt, rc, stdout.getvalue(), stderr.getvalue(), results[0] if results else None


@pytest.fixture(scope="module")
def video(cli_run):
    assert cli_run[1] == 0 and cli_run[4] is not None, cli_run[3]
    return cli_run[4]


def _pixels(layout, seed):
    return torch.randn(layout.num_patches, layout.patch_dim, generator=torch.Generator().manual_seed(seed))


def _prompt(model, layout):
    return vlm.vision_prompt(model.config, layout, BEFORE, AFTER)


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert msg and "\n" not in msg, msg
    return msg


def _prefill_inputs(model, vision, pixels):
    """The outer stage's output as the FastV prefill takes it: (outer-pruned ids (1, T), features (K, H), M-RoPE ids
    (3, 1, T))."""
    layout = vision.layout
    prompt = _prompt(model, layout)
    with torch.no_grad():
        feats, keep = vision(pixels)
    pos, cols, _ = vlm.pruned_mrope_positions(vlm.prompt_mrope_positions(model, prompt, layout),
                                              prompt == vlm.placeholder_token_id(model.config, layout), keep)
    return prompt.gather(1, cols), feats, pos


# --------------------------------------------------------------------------- ORT == the eager reference


@pytest.mark.parametrize("which", ["image", "video"])
def test_ort_greedy_matches_eager_reference(which, request):
    """ORT's greedy ids, the kept image (video) tokens, the kept prompt columns and every step's logits equal the
    independent eager FastV reference (the image through verify_vlm, the video by hand: its verify_vlm ran in the CLI
    fixture); the prefill's caches are T long for layers 0..L and T - (K - R) after; the manifest records the spec."""
    result = request.getfixturevalue(which)
    model, spec, layout = result.model, result.inner, result.layout
    k, r, layer = (IMAGE_K, IMAGE_R, LAYER) if which == "image" else (VIDEO_K, VIDEO_R, 0)
    assert (result.keep, spec.keep, spec.num_image_tokens, spec.layer) == (k, r, k, layer)
    manifest = json.loads(result.paths["manifest"].read_text())
    assert manifest["inner"] == spec.to_dict() == result.to_dict()["inner"]
    assert manifest["inner"]["keep"] == r and manifest["modality"] == which
    x, prompt = _pixels(layout, 1), _prompt(model, layout)
    want = vlm.greedy_fastv_reference(model, result.vision, x, prompt, spec, STEPS)
    if which == "image":
        report = verify_vlm(result, prompt, x, max_new_tokens=STEPS)
        assert report.passed and report.tokens_match and report.inner_keep_idx_match is True, report.to_dict()
        assert report.keep_idx_match is True and report.max_abs_diff_logits <= ATOL
        assert report.tokens == want.tokens.tolist()
    else:
        got = {}
        tokens, first = vlm.greedy_onnx(model, result.paths, layout, x, prompt, STEPS, inner_out=got)
        assert tokens == want.tokens[0].tolist()
        np.testing.assert_array_equal(got["image_keep_idx"], want.image_keep_idx[0].numpy())
        np.testing.assert_array_equal(got["keep_idx"], want.keep_idx[0].numpy())
        assert got["logits"].shape == (STEPS, 1, model.config.text_config.vocab_size)
        assert np.abs(got["logits"] - want.logits.numpy()).max() <= ATOL
        assert np.array_equal(got["logits"][0], first.numpy())
    ids, feats, pos = _prefill_inputs(model, result.vision, x)
    with OrtRunner(result.paths["prefill"]) as pre:
        out = pre.infer({"input_ids": ids.numpy(), "image_features": feats.numpy(), "position_ids": pos.numpy()})
    t, layers = ids.shape[1], spec.num_layers
    assert [out[f"present.{i}.key"].shape[2] for i in range(layers)] == \
        [t] * (layer + 1) + [t - (k - r)] * (layers - layer - 1)
    assert out["keep_idx"].tolist() == want.keep_idx[0].tolist()
    assert out["image_keep_idx"].tolist() == want.image_keep_idx[0].tolist() and r < k


def test_all_kept_equals_plain_parts_and_hf_generate(model):
    """R = all image tokens: the FastV torch parts give the plain parts' greedy ids and logits and so does the eager
    FastV reference, for an image and a video prompt; for the image, the reference also gives HF Qwen2-VL's own
    forward logits and `generate` (the plain parts == HF for a video: test_qwen2_vl_video)."""
    for grid in (IMAGE_GRID, VIDEO_GRID):
        layout = image_layout(model.config.vision_config, grid)
        n = layout.num_merged
        vision = Qwen2VLVisionPrune(model.model.visual, layout, "uniform", n).eval()
        spec = parse_fastv(f"fastv@{LAYER}:1.0", LAYERS, n)
        x, prompt = _pixels(layout, 3), _prompt(model, layout)
        tokens, logits = vlm.greedy_eager(model, vision, x, prompt, 4)
        fastv_tokens, fastv_logits = vlm.greedy_eager(model, vision, x, prompt, 4, inner=spec)
        assert fastv_tokens == tokens
        torch.testing.assert_close(fastv_logits, logits, atol=1e-5, rtol=0)
        ref = vlm.greedy_fastv_reference(model, vision, x, prompt, spec, 4)
        assert ref.tokens[0].tolist() == tokens and ref.image_keep_idx[0].tolist() == list(range(n))
        torch.testing.assert_close(ref.logits[0], logits, atol=1e-5, rtol=0)
        if layout.is_video:
            continue
        hf = {"pixel_values": x, "image_grid_thw": layout.grid_thw,
              "mm_token_type_ids": (prompt == model.config.image_token_id).int()}
        with torch.no_grad():
            want = model(input_ids=prompt, **hf).logits[:, -1]
            gen = model.generate(input_ids=prompt, **hf, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
        torch.testing.assert_close(ref.logits[0], want, atol=1e-5, rtol=0)
        assert gen[0, prompt.shape[1]:].tolist() == tokens


# --------------------------------------------------------------------------- the score row and its M-RoPE


def test_score_row_is_hf_attention_and_wrong_rope_changes_the_selection(image, video, monkeypatch):
    """The prefill's recomputed score row is HF's eager attention probabilities at layer L (M-RoPE applied as
    Qwen2VLAttention does), for an image (L = 1) and a video (L = 0). Controls: the query rotated by 1-D RoPE at its
    sequence index, or 1-D position ids for the whole prompt, change the kept tokens, so the reference checks above
    can fail."""
    real = fv.fastv_scores
    for result in (image, video):
        model = result.model
        prefill = qf.Qwen2VLFastvPrefill(model, result.inner, result.layout.is_video).eval()
        seen = {}
        monkeypatch.setattr(fv, "fastv_scores", lambda *a: seen.setdefault("scores", real(*a)))
        ids, feats, pos = _prefill_inputs(model, result.vision, _pixels(result.layout, 0))
        with torch.no_grad():
            good = prefill(ids, feats, pos)
        lm = model.model.language_model
        embeds = lm.embed_tokens(ids).detach().clone()
        embeds[ids == prefill.placeholder_id] = feats
        want = fastv_score_reference(model, embeds, torch.ones_like(ids), pos, result.inner.layer)
        torch.testing.assert_close(seen["scores"], want, atol=1e-6, rtol=0)

        def one_d_query(attn, h, keys, cos, sin, valid):  # RoPE at index T - 1, not the M-RoPE position
            cos, sin = lm.rotary_emb(h, torch.full((3, 1, 1), keys.shape[2] - 1))
            return real(attn, h, keys, cos, sin, valid)

        monkeypatch.setattr(fv, "fastv_scores", one_d_query)
        with torch.no_grad():
            wrong_query = prefill(ids, feats, pos)
        monkeypatch.setattr(fv, "fastv_scores", real)
        assert int(pos[0, 0, -1]) < ids.shape[1] - 1  # the M-RoPE position of the last token is not its index
        one_d = torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, 1, -1)
        with torch.no_grad():
            flat = prefill(ids, feats, one_d)
        assert wrong_query[-1].tolist() != good[-1].tolist()
        assert flat[-1].tolist() != good[-1].tolist() and (flat[0] - good[0]).abs().max() > 0.1


def test_debias_and_uniform_options_match_the_reference(model, image):
    """LLaVA's FastV options on Qwen2-VL, eager (the selection ops are LLaVA's, exported and ORT-checked in
    test_fastv.py): fastv(debias=true,uniform=0.5) in the torch prefill keeps exactly the reference's tokens, which
    include the U = 4 fixed evenly spaced ordinals and differ from plain FastV's; greedy ids equal the reference's."""
    ramp = np.linspace(0.0, 0.05, IMAGE_K)  # a bias favouring the first image tokens
    spec = parse_fastv(f"fastv(debias=true,uniform=0.5)@{LAYER}:{IMAGE_R}", LAYERS, IMAGE_K, ramp)
    x, prompt = _pixels(image.layout, 4), _prompt(model, image.layout)
    ids, feats, pos = _prefill_inputs(model, image.vision, x)
    with torch.no_grad():
        got = qf.Qwen2VLFastvPrefill(model, spec).eval()(ids, feats, pos)[-1]
        plain = qf.Qwen2VLFastvPrefill(model, image.inner).eval()(ids, feats, pos)[-1]
    ref = vlm.greedy_fastv_reference(model, image.vision, x, prompt, spec, 4)
    assert got.tolist() == ref.image_keep_idx[0].tolist() != plain.tolist()
    assert set(spec.uniform_ordinals) <= set(got.tolist()) and len(spec.uniform_ordinals) == 4
    tokens, _ = vlm.greedy_eager(model, image.vision, x, prompt, 4, inner=spec)
    assert tokens == ref.tokens[0].tolist()


# --------------------------------------------------------------------------- HoliTom's inner merge


@pytest.fixture(scope="module")
def merged_video(video, tmp_path_factory):
    """fastv(merge=true)@0:0.5 on the video export: only lm_prefill.onnx (merging changes neither vision_prune nor
    lm_decode) -> (spec, the parts' paths with the merging prefill, its op census)."""
    spec = parse_fastv("fastv(merge=true)@0:0.5", 2, VIDEO_K)
    assert spec == dataclasses.replace(video.inner, merge=True)
    prompt_len = max(QWEN2_VL_PROMPT_LEN, spec.num_image_tokens + 2)
    paths, ops = write_parts({"prefill": qf.export_fastv_prefill(video.model, spec, prompt_len, video=True)},
                             tmp_path_factory.mktemp("qwen_fastv_merge"))
    return spec, dict(video.paths, prefill=paths["prefill"]), ops["prefill"]


def test_merge_ort_matches_eager_holitom_and_changes_logits(video, merged_video):
    """A video, fastv(merge=true) (HoliTom's inner merge into the kept video tokens): ORT greedy ids, kept tokens,
    kept columns and every step's logits equal the eager reference (HoliTom's literal loop); the torch prefill agrees.
    Control: plain FastV keeps the same tokens on the same video but gives other logits."""
    spec, paths, ops = merged_video
    model, layout = video.model, video.layout
    assert not set(ops) & set(FORBIDDEN_OPS) and ops.get("Pow", 0) >= 1
    x, prompt = _pixels(layout, 1), _prompt(model, layout)
    want = vlm.greedy_fastv_reference(model, video.vision, x, prompt, spec, STEPS)
    got, plain = {}, {}
    tokens, _ = vlm.greedy_onnx(model, paths, layout, x, prompt, STEPS, inner_out=got)
    assert tokens == want.tokens[0].tolist()
    np.testing.assert_array_equal(got["image_keep_idx"], want.image_keep_idx[0].numpy())
    np.testing.assert_array_equal(got["keep_idx"], want.keep_idx[0].numpy())
    assert np.abs(got["logits"] - want.logits.numpy()).max() <= ATOL
    eager_tokens, _ = vlm.greedy_eager(model, video.vision, x, prompt, STEPS, inner=spec)
    assert eager_tokens == tokens
    vlm.greedy_onnx(model, video.paths, layout, x, prompt, STEPS, inner_out=plain)
    np.testing.assert_array_equal(plain["image_keep_idx"], got["image_keep_idx"])
    assert np.abs(plain["logits"][0] - got["logits"][0]).max() > 1e-3


# --------------------------------------------------------------------------- debias: calibrate_qwen2_fastv_bias


def _cal_pixels(layout, count, seed):
    return torch.randn(count, layout.num_patches, layout.patch_dim, generator=torch.Generator().manual_seed(seed))


def test_calibrated_bias_is_the_mean_of_reference_score_rows(model, monkeypatch):
    """An image with real outer pruning (attn-mean keeps 8 of 16, other columns per image) at L = 1: the bias is the
    per-ordinal mean, over the samples, of fastv_score_reference's row at the placeholders of each outer-pruned prompt
    with its gathered M-RoPE ids (a hand loop; prompts of different lengths per sample); a (S, N, D) tensor with one
    shared prompt equals the list form; one sample's bias is the score row the exported prefill module recomputes
    (so debias subtracts the score it selects by)."""
    from tokensieve.vlm_api import calibrate_qwen2_fastv_bias  # re-exported next to calibrate_fastv_bias

    assert calibrate_qwen2_fastv_bias is vlm.calibrate_qwen2_fastv_bias
    layout = image_layout(model.config.vision_config, IMAGE_GRID)
    vision = Qwen2VLVisionPrune(model.model.visual, layout, "attn-mean", 8).eval()
    pixels = _cal_pixels(layout, 3, 20)
    prompts = [vlm.vision_prompt(model.config, layout, BEFORE[:n], AFTER[:n + 1]) for n in (1, 2, 3)]
    lm, rows = model.model.language_model, []
    for x, prompt in zip(pixels, prompts):  # the hand loop
        with torch.no_grad():
            feats, keep = vision(x)
        is_image = prompt == model.config.image_token_id
        pos, cols, _ = vlm.pruned_mrope_positions(vlm.prompt_mrope_positions(model, prompt, layout), is_image, keep)
        ids = prompt.gather(1, cols)
        embeds = lm.embed_tokens(ids).detach().clone()
        embeds[ids == model.config.image_token_id] = feats
        score = fastv_score_reference(model, embeds, torch.ones_like(ids), pos, LAYER)[0]
        rows.append(score[ids[0] == model.config.image_token_id].double().numpy())
    want = np.mean(rows, axis=0)
    bias = vlm.calibrate_qwen2_fastv_bias(model, vision, list(pixels), prompts, LAYER)
    assert bias.dtype == np.float64 and bias.shape == (8,) and (bias > 0).all()
    np.testing.assert_allclose(bias, want, rtol=1e-12, atol=0)
    assert np.abs(rows[0] - rows[1]).max() > 1e-4  # the samples differ: a mean, not one row
    shared = vlm.calibrate_qwen2_fastv_bias(model, vision, pixels, prompts[1], LAYER)
    np.testing.assert_array_equal(shared, vlm.calibrate_qwen2_fastv_bias(model, vision, list(pixels), [prompts[1]] * 3,
                                                                         LAYER))
    real, seen = fv.fastv_scores, {}
    monkeypatch.setattr(fv, "fastv_scores", lambda *a: seen.setdefault("scores", real(*a)))
    one = vlm.calibrate_qwen2_fastv_bias(model, vision, pixels[:1], _prompt(model, layout), LAYER)
    spec = parse_fastv(f"fastv(debias=true)@{LAYER}:4", LAYERS, 8, one)
    ids, feats, pos = _prefill_inputs(model, vision, pixels[0])
    with torch.no_grad():
        qf.Qwen2VLFastvPrefill(model, spec).eval()(ids, feats, pos)
    np.testing.assert_allclose(seen["scores"][0, ids[0] == model.config.image_token_id].numpy(), one, atol=1e-6,
                               rtol=0)


def test_calibrated_debias_export_verifies_and_moves_selection(video, tmp_path_factory):
    """fastv(debias=true)@0:0.5 on the video, bias calibrated on 6 other videos through the export's own outer stage:
    plan_vlm accepts it, its prefill (exported here, next to the video export's vision and decode parts, which debias
    does not change) passes verify_vlm (ORT greedy ids, kept tokens, logits == the eager reference subtracting the
    same bias); control: on the verify input the bias keeps other video tokens than plain FastV."""
    model = video.model  # the CLI's loaded copy, whose vision tower video.vision runs
    bias = vlm.calibrate_qwen2_fastv_bias(model, video.vision, _cal_pixels(video.layout, 6, 103),
                                         _prompt(model, video.layout), 0)
    inner = "fastv(debias=true)@0:0.5"
    spec = plan_vlm(model, f"attn-mean:{VIDEO_K}", grid=VIDEO_GRID, inner=inner, inner_bias=bias).inner
    assert spec == dataclasses.replace(video.inner, bias=tuple(bias.tolist()))
    prompt_len = max(QWEN2_VL_PROMPT_LEN, spec.num_image_tokens + 2)
    paths, _ = write_parts({"prefill": qf.export_fastv_prefill(model, spec, prompt_len, video=True)},
                           tmp_path_factory.mktemp("qwen_fastv_debias"))
    debiased = dataclasses.replace(video, paths=dict(video.paths, prefill=paths["prefill"]), inner=spec)
    report = verify_vlm(debiased, max_new_tokens=STEPS)
    assert report.passed and report.inner_keep_idx_match is True, report.to_dict()
    x, prompt = _pixels(video.layout, 0), vlm.sample_prompt(model.config, video.layout)  # verify's input
    got, plain = {}, vlm.greedy_fastv_reference(model, video.vision, x, prompt, video.inner, 1)
    vlm.greedy_onnx(model, debiased.paths, video.layout, x, prompt, 1, inner_out=got)
    assert got["image_keep_idx"].tolist() != plain.image_keep_idx[0].tolist()


@pytest.mark.parametrize("change, match", [
    ({"vision": "not a module"}, "vision must be the outer stage, a Qwen2VLVisionPrune"),
    ({"layer": 2}, "layer 2 is out of range; the language model has 3 layers"),
    ({"layer": -1}, "layer -1 is out of range"),
    ({"pixel_values": []}, "holds no calibration sample"),
    ({"pixel_values": torch.zeros(64, 96)}, "must be (S, N, patch_dim)"),
    ({"pixel_values": [torch.zeros(64, 5)]}, "calibration sample 0: pixel_values has shape (64, 5)"),
    ({"input_ids": torch.zeros(3, 30, dtype=torch.long)}, "input_ids must be (1, T)"),
    ({"input_ids": "prompt"}, "input_ids must be"),
    ({"prompt": "no_end"}, "calibration sample 0: FastV scores the image tokens with the last prompt position"),
    ({"prompt": "video"}, "calibration sample 0: the prompt holds [0] image tokens"),
])
def test_bad_calibration_input_is_one_line(model, change, match):
    change = dict(change)
    layout = image_layout(model.config.vision_config, IMAGE_GRID)
    vision = Qwen2VLVisionPrune(model.model.visual, layout, "uniform", IMAGE_K).eval()
    prompt = {"no_end": vlm.image_prompt(model.config, layout, BEFORE, [])[:, :-1],
              "video": vlm.vision_prompt(model.config, image_layout(model.config.vision_config, VIDEO_GRID), BEFORE,
                                         AFTER)}.get(change.pop("prompt", None), _prompt(model, layout))
    args = {"vision": vision, "pixel_values": _cal_pixels(layout, 2, 0), "input_ids": prompt, "layer": LAYER} | change
    with pytest.raises(ConfigError, match=re.escape(match)) as e:
        vlm.calibrate_qwen2_fastv_bias(model, args["vision"], args["pixel_values"], args["input_ids"], args["layer"])
    _one_line(e)


# --------------------------------------------------------------------------- engines


def test_fastv_parts_build_rtx_engines(image):
    """TensorRT-RTX builds the three parts (SM86, no GPU); the profiles follow FastV: the prompt holds at least K + 1
    tokens, opt = the K + 9 verify prompt, decode's layer-2 caches get pruned_past_sequence = past_sequence - (K - R)
    (the other two: past_sequence)."""
    pytest.importorskip("tensorrt_rtx")
    infos = build_vlm(image, max_sequence=64)
    engines = json.loads(image.paths["manifest"].read_text())["engines"]
    d, opt = IMAGE_K - IMAGE_R, IMAGE_K + 9
    assert engines["prefill"]["dims"] == {"sequence": {"min": IMAGE_K + 1, "opt": opt, "max": 64}}
    assert engines["prefill"]["profile"]["position_ids"]["max"] == [3, 1, 64]
    assert engines["decode"]["dims"]["pruned_past_sequence"] == {"min": 0, "opt": opt - d, "max": 64 - d}
    assert engines["decode"]["profile"]["past.2.key"]["max"] == [1, 2, 64 - d, 16]
    assert engines["decode"]["profile"]["past.1.key"]["max"] == [1, 2, 64, 16]
    assert all(i.size_bytes > 0 for i in infos.values())
    assert not [w for i in infos.values() for w in i.metadata["build_warnings"] if "self-consistent" in w]


@pytest.mark.gpu
def test_fastv_tensorrt_greedy_equals_onnxruntime(model, image):
    """On the GPU: the FastV engines keep the same image tokens and give ORT's greedy ids (logits within 1e-3)."""
    from gpu_target import engine_target

    build_vlm(image, target=engine_target(), max_sequence=64)
    x, prompt = _pixels(image.layout, 0), _prompt(model, image.layout)
    want, got = {}, {}
    want_tokens, _ = vlm.greedy_onnx(model, image.paths, image.layout, x, prompt, STEPS, inner_out=want)
    tokens, _ = vlm.greedy_onnx(model, image.paths, image.layout, x, prompt, STEPS, backend="tensorrt", inner_out=got)
    np.testing.assert_array_equal(got["image_keep_idx"], want["image_keep_idx"])
    assert tokens == want_tokens
    np.testing.assert_allclose(got["logits"], want["logits"], atol=1e-3, rtol=0)


# --------------------------------------------------------------------------- bad input, CLI


@pytest.mark.parametrize("prune, inner, kwargs, match", [
    ("uniform:1.0", "fastv@2:8", {}, "layer 2 is out of range; the language model has 3 layers"),
    ("uniform:1.0", "fastv@-1:8", {}, "out of range"),
    ("uniform:1.0", "fastv@1:17", {}, "keep=17 is out of range; the prompt carries 16 image tokens"),
    ("attn-mean:8", "fastv@1:9", {}, "keep=9 is out of range; the prompt carries 8 image tokens"),  # R of the K
    ("uniform:1.0", "fastv@1:0", {}, "keep count 0 is out of range"),
    ("uniform:1.0", "fastv@1:1.5", {}, "ratio 1.5 is out of range"),
    ("uniform:1.0", "fastv:8", {}, "Cannot parse"),
    ("uniform:1.0", "fastv(merge=1)@1:8", {}, "merge='1' must be true or false"),
    ("uniform:1.0", "fastv(debias=true)@1:8", {}, "needs the per-position bias"),
    ("uniform:1.0", "fastv(debias=true)@1:8", {"inner_bias": [0.0] * 3}, "inner_bias must be 16 finite floats"),
    ("uniform:1.0", None, {"inner_bias": [0.0] * 16}, "pass inner too"),
])
def test_bad_inner_is_one_line(model, tmp_path, prune, inner, kwargs, match):
    with pytest.raises(ConfigError, match=match) as e:
        export_vlm(model, tmp_path, prune, grid=IMAGE_GRID, inner=inner, **kwargs)
    _one_line(e)
    assert not any(tmp_path.iterdir())  # nothing written


def test_prompt_ending_with_a_placeholder_is_one_line(model, image):
    """FastV scores with the last prompt position: a prompt ending on a (kept) placeholder is refused in one line by
    the ORT pipeline (before any part runs) and by the eager reference."""
    layout = image.layout
    prompt = vlm.image_prompt(model.config, layout, BEFORE, [])[:, :-1]  # no <vision_end>: ends with a placeholder
    x = _pixels(layout, 0)
    for call in (lambda: vlm.greedy_onnx(model, image.paths, layout, x, prompt, 2),
                 lambda: vlm.greedy_fastv_reference(model, image.vision, x, prompt, image.inner, 2),
                 lambda: vlm.greedy_eager(model, image.vision, x, prompt, 2, inner=image.inner)):
        with pytest.raises(ConfigError, match="must end with a text token") as e:
            call()
        _one_line(e)
    assert plan_vlm(model, "uniform:1.0", grid=IMAGE_GRID, inner="fastv@1:0.5").inner == image.inner


def test_cli_exports_and_verifies_a_video_with_fastv(cli_run, tmp_path, capsys):
    """`tokensieve export-vlm DIR --grid 3,4,4 --prune attn-mean:8 --inner fastv@0:0.5`: export + verify PASS with the
    kept video tokens identical, the summary names the inner stage and its MAC saving; bad --inner values are one
    line (exit 2) and write nothing."""
    ckpt, rc, stdout, stderr, result = cli_run
    assert rc == 0, stderr
    assert f"video tokens    12 merged tokens -> {VIDEO_K} kept" in stdout
    assert f"inner (FastV)   {VIDEO_K} -> {VIDEO_R} video tokens after LLM layer 0" in stdout
    macs = float(stdout.split("prefill MACs x")[1].split()[0])
    assert 0.5 < macs < 1.0
    assert "verify          PASS" in stdout and "FastV kept image tokens identical" in stdout
    assert json.loads(result.paths["manifest"].read_text())["inner"]["keep"] == VIDEO_R
    for inner, words in [("fastv(debias=true)@0:4", "needs the calibrated bias: pass --inner-bias"),
                         ("fastv@1:4", "layer 1 is out of range")]:
        out = tmp_path / inner
        assert main(["export-vlm", str(ckpt), "--prune", "attn-mean:8", "--grid", "3,4,4", "--inner", inner,
                     "-o", str(out), "--no-build"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("tokensieve export-vlm: error: ") and words in err[0], err
        assert not out.exists()
