"""Qwen3-VL through the VLM adapter interface: the vision tower with its DeepStack levels, the interleaved M-RoPE,
export_vlm + verify_vlm for an image and a timestamped video, the CLI, the refusals, the engines.

A tiny random-init Qwen3VLForConditionalGeneration (no hub): 3 vision blocks, DeepStack levels after blocks 0 and 1
(into LM layers 0 and 1 of 3), a 4 x 4 learned position table resampled to the grid, an interleaved M-RoPE of
mrope_section (2, 3, 3). An image of grid (1, 8, 8) -> 16 merged tokens; a video of grid (2, 8, 8) -> 2 timestamped
steps of 16. One full export, attn-mean:0.5 on the image (the CLI: export_vlm + verify_vlm; the engines), then only
vision_prune + lm_prefill (the time budget; lm_decode is the CLI's) of keep-all on the image (against HF) and of
divprune:0.5 on the video (verify_vlm).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

import tokensieve.exporter.vlm.qwen3_vl_adapter as q3
import tokensieve.vlm_api as vlm_api
from tokensieve.cli import main
from tokensieve.errors import ConfigError
from tokensieve.exporter.vlm.families import adapter_by_type, adapter_for
from tokensieve.exporter.vlm.qwen2_vl import image_layout
from tokensieve.exporter.vlm.qwen2_vl_adapter import vision_prompt
from tokensieve.exporter.vlm.qwen3_vl import Qwen3VLPrefill, Qwen3VLVisionPrune, exportable_mrope, mrope_axes
from tokensieve.exporter.vlm.qwen3_vl_adapter import Qwen3VLAdapter
from tokensieve.vlm_api import build_vlm, plan_vlm, verify_vlm, write_parts

IMAGE, VIDEO = (1, 8, 8), (2, 8, 8)
N_IMG = 16
VISION = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
              spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16, deepstack_visual_indexes=[0, 1],
              initializer_range=0.1)
# initializer_range 0.1 (HF: 0.02) so positions and the DeepStack levels move the logits visibly (the controls)
TEXT = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, head_dim=16,
            num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1, max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
            bos_token_id=1, eos_token_id=2, pad_token_id=0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = Qwen3VLConfig(vision_config=VISION, text_config=TEXT, image_token_id=200, video_token_id=201,
                        vision_start_token_id=202, vision_end_token_id=203)
    cfg._attn_implementation = "sdpa"
    return Qwen3VLForConditionalGeneration(cfg).eval()


def _layout(model, grid):
    return image_layout(model.config.vision_config, grid)


def _pixels(layout, seed):
    return torch.randn(layout.num_patches, layout.patch_dim, generator=torch.Generator().manual_seed(seed))


def _hf_inputs(model, layout, x, prompt) -> dict:
    """HF's keyword arguments for one image or video with the prompt's mm_token_type_ids (image 1, video 2)."""
    token = model.config.video_token_id if layout.is_video else model.config.image_token_id
    mm = (prompt == token).int() * (2 if layout.is_video else 1)
    pixels = dict(pixel_values_videos=x, video_grid_thw=layout.grid_thw) if layout.is_video else \
        dict(pixel_values=x, image_grid_thw=layout.grid_thw)
    return dict(input_ids=prompt, mm_token_type_ids=mm, **pixels)


def _hf_generate(model, layout, x, prompt, steps=8) -> list[int]:
    with torch.no_grad():
        gen = model.generate(**_hf_inputs(model, layout, x, prompt), max_new_tokens=steps, min_new_tokens=steps,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return gen[0, prompt.shape[1]:].tolist()


@pytest.fixture(scope="module")
def cli_run(model, tmp_path_factory):
    """`tokensieve export-vlm DIR --prune attn-mean:0.5 --grid 1,8,8 -o OUT --no-build` on a save_pretrained folder
    (export_vlm + verify_vlm, 8 greedy tokens) -> (model folder, OUT, exit code, stdout, the VlmExportResult its
    export_vlm returned, caught on the way: build_vlm and _parts take it)."""
    root = tmp_path_factory.mktemp("qwen3_cli")
    folder, out = root / "model", root / "out"
    model.save_pretrained(folder)
    stdout, results, export = io.StringIO(), [], vlm_api.export_vlm

    def catching(*args, **kwargs):
        results.append(export(*args, **kwargs))
        return results[-1]

    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setattr(vlm_api, "export_vlm", catching)
        rc = main(["export-vlm", str(folder), "--prune", "attn-mean:0.5", "--grid", "1,8,8", "-o", str(out),
                   "--no-build"])
    return folder, out, rc, stdout.getvalue(), results[0]


def _parts(model, prune: str, grid, cli_run, out) -> vlm_api.VlmExportResult:
    """vision_prune and lm_prefill of `prune` on `grid` from the adapter's exporters, written by vlm_api.write_parts,
    with the CLI export's lm_decode (the decode step depends on neither K nor the modality): the time budget."""
    plan = plan_vlm(model, prune, grid=grid)
    adapter = Qwen3VLAdapter(model)
    vision = adapter.vision_module(plan)
    exporters = adapter.part_exporters(plan, vision)
    paths, _ = write_parts({"vision": exporters["vision"](), "prefill": exporters["prefill"]()}, out)
    base = cli_run[4]
    return dataclasses.replace(base, vision=vision, keep=plan.keep, num_tokens=plan.num_tokens, layout=plan.layout,
                               num_image_tokens=plan.num_image_tokens, prune=plan.prune, method=plan.stage.method,
                               options=dict(vision.options), paths={**base.paths, **paths})


@pytest.fixture(scope="module")
def full(model, cli_run, tmp_path_factory):
    """Every image token kept (uniform:1.0): the parts compared with HF."""
    return _parts(model, "uniform:1.0", IMAGE, cli_run, tmp_path_factory.mktemp("qwen3_full"))


# --------------------------------------------------------------------------- eager: the tower and the rotary


@pytest.mark.parametrize("grid", [IMAGE, VIDEO])
def test_keep_all_equals_hf_image_features_and_deepstack(model, grid):
    """keep = every token: image_features and every DeepStack level equal HF's get_image_features (pooler_output,
    deepstack_features; a video: the per-step attention segments) to 1e-6, keep_idx is 0..N-1."""
    layout = _layout(model, grid)
    x = _pixels(layout, 7)
    vision = Qwen3VLVisionPrune(model.model.visual, layout, "uniform", layout.num_merged).eval()
    with torch.no_grad():
        feats, keep, deep = vision(x)
        hf = model.model.get_image_features(x, layout.grid_thw)
    assert keep.tolist() == list(range(layout.num_merged)) and deep.shape == (2, layout.num_merged, 64)
    torch.testing.assert_close(feats, hf.pooler_output[0], atol=1e-6, rtol=0)
    for level, want in zip(deep, hf.deepstack_features, strict=True):
        torch.testing.assert_close(level, want[0], atol=1e-6, rtol=0)


def test_pruned_deepstack_levels_are_gathered_with_keep_idx(model):
    """attn-mean:0.5: every DeepStack level holds the rows of the kept tokens (keep_idx of the unpruned levels)."""
    layout = _layout(model, IMAGE)
    x = _pixels(layout, 3)
    pruned = Qwen3VLVisionPrune(model.model.visual, layout, "attn-mean", 8).eval()
    every = Qwen3VLVisionPrune(model.model.visual, layout, "uniform", N_IMG).eval()
    with torch.no_grad():
        feats, keep, deep = pruned(x)
        all_feats, _, all_deep = every(x)
    assert keep.tolist() != list(range(8))  # a real selection
    torch.testing.assert_close(feats, all_feats[keep], atol=1e-6, rtol=0)
    torch.testing.assert_close(deep, all_deep[:, keep], atol=1e-6, rtol=0)


def test_exportable_mrope_equals_hf_rotary(model):
    """The select-based interleaving gives HF's Qwen3VLTextRotaryEmbedding cos/sin exactly on random (3, 1, T) ids;
    the axes are interleaved t h w t h w ... (not Qwen2-VL's contiguous sections)."""
    rotary = model.model.language_model.rotary_emb
    pos = torch.randint(0, 50, (3, 1, 11))
    x = torch.zeros(1, 11, 64)
    want = rotary(x, pos)
    with exportable_mrope(rotary):
        got = rotary(x, pos)
    assert "recomposition_frequencies" not in vars(rotary)  # the instance is as before
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert mrope_axes([2, 3, 3], 8).tolist() == [0, 1, 2, 0, 1, 2, 0, 1]


# --------------------------------------------------------------------------- export_vlm + verify_vlm


def test_keep_all_ort_greedy_equals_hf_generate(model, full):
    """Every token kept: the exported parts' 8 greedy tokens on ONNX Runtime equal HF's generate, the prefill logits
    HF's forward within 1e-4, vision_prune's outputs HF's image features and DeepStack levels within 1e-5."""
    prompt, x = q3.qwen3_sample_prompt(model.config, full.layout), _pixels(full.layout, 11)
    vision, logits = {}, []
    tokens, _ = q3.greedy_onnx(model, full.paths, full.layout, x, prompt, steps=8, vision_out=vision,
                               logits_out=logits)
    with torch.no_grad():
        want = model(**_hf_inputs(model, full.layout, x, prompt)).logits[:, -1]
        hf = model.model.get_image_features(x, full.layout.grid_thw)
    assert tokens == _hf_generate(model, full.layout, x, prompt)
    assert (logits[0] - want).abs().max() <= 1e-4
    assert vision["keep_idx"].tolist() == list(range(N_IMG))
    assert np.abs(vision["image_features"] - hf.pooler_output[0].numpy()).max() <= 1e-5
    assert np.abs(vision["deepstack_features"] - torch.stack([f[0] for f in hf.deepstack_features]).numpy()).max() \
        <= 1e-5


def test_cli_export_vlm_attn_mean(cli_run):
    """attn-mean:0.5 from the CLI: export_vlm + verify_vlm PASS (8 greedy tokens and keep_idx identical to the eager
    pruned reference, logits within 1e-4); the manifest names the family."""
    folder, out, rc, stdout, _ = cli_run
    line = next(li for li in stdout.splitlines() if "verify" in li)
    assert rc == 0 and "PASS" in line and "8 greedy tokens identical, keep_idx identical" in line, stdout
    assert float(line.split("max |Δ logits| ")[1].split()[0]) <= 1e-4
    assert "Qwen3-VL" in stdout and "16 merged tokens -> 8 kept" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["model_type"], manifest["method"], manifest["keep"]) == ("qwen3_vl", "attn-mean", 8)


def test_video_keep_all_equals_hf_generate_and_pruned_verifies(model, cli_run, tmp_path):
    """A video of 2 timestamped steps: with every token kept the eager parts' greedy tokens equal HF's generate (HF
    splits the grid per step, positions after each timestamp); divprune:0.5 exported: ORT greedy tokens and keep_idx
    equal the eager pruned reference, logits within 1e-4."""
    layout = _layout(model, VIDEO)
    x, prompt = _pixels(layout, 5), q3.qwen3_sample_prompt(model.config, layout)
    every = Qwen3VLVisionPrune(model.model.visual, layout, "uniform", layout.num_merged).eval()
    tokens, _ = q3.greedy_eager(model, every, x, prompt, steps=8)
    assert tokens == _hf_generate(model, layout, x, prompt)
    result = _parts(model, "divprune:0.5", VIDEO, cli_run, tmp_path)
    report = verify_vlm(result, max_new_tokens=8)
    assert report.passed and report.tokens_match and report.keep_idx_match, report.to_dict()
    assert report.max_abs_diff_logits <= 1e-4 and report.max_abs_diff_features <= 1e-4


def test_fastv_after_the_deepstack_layers_verifies(model, cli_run, tmp_path):
    """attn-mean:0.5 + fastv@1:0.5 (after layer 1, the last one DeepStack adds to): the FastV prefill (DeepStack
    hooks in the shared layer loop) and decode exported; verify_vlm: ORT greedy tokens, keep_idx and FastV's kept
    tokens equal the eager reference (HF's eager attention row, layers re-run by hand), logits within 1e-4."""
    plan = plan_vlm(model, "attn-mean:0.5", grid=IMAGE, inner="fastv@1:0.5")
    exporters = Qwen3VLAdapter(model).part_exporters(plan, cli_run[4].vision)
    paths, _ = write_parts({k: make() for k, make in exporters.items() if k != "vision"}, tmp_path)
    result = dataclasses.replace(cli_run[4], inner=plan.inner, paths={**cli_run[4].paths, **paths})
    report = verify_vlm(result, max_new_tokens=8)
    assert report.passed and report.tokens_match and report.inner_keep_idx_match, report.to_dict()
    assert report.max_abs_diff_logits <= 1e-4


# --------------------------------------------------------------------------- controls


def _pruned_prefill_inputs(model, vision, x):
    """The eager pruned prompt of `vision` on x -> (ids, feats, deepstack, M-RoPE ids (3, 1, T'))."""
    prompt = q3.qwen3_sample_prompt(model.config, vision.layout)
    with torch.no_grad():
        feats, keep, deep = vision(x)
    pos, cols, _ = q3.qwen3_positions(model, prompt, vision.layout, keep)
    return prompt.gather(1, cols), feats, deep, pos


def test_controls_1d_positions_and_deepstack_index_change_the_output(model):
    """(a) 1-D positions (0..T'-1 on all three axes) instead of the interleaved M-RoPE ids change the prefill logits;
    (b) DeepStack levels gathered with another index than the features' keep_idx change them too (attn-mean:0.5, the
    same pruned prompt)."""
    layout = _layout(model, IMAGE)
    x = _pixels(layout, 2)
    vision = Qwen3VLVisionPrune(model.model.visual, layout, "attn-mean", 8).eval()
    prefill = Qwen3VLPrefill(model).eval()
    ids, feats, deep, pos = _pruned_prefill_inputs(model, vision, x)
    with torch.no_grad():
        want = prefill(ids, feats, deep, pos)[0]
        flat = torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, 1, -1)
        one_d = prefill(ids, feats, deep, flat)[0]
        vision.deepstack_index = torch.arange(8)  # not keep_idx: the first 8 tokens' levels
        _, keep, other = vision(x)
    assert not torch.equal(pos, flat) and keep.tolist() != list(range(8))
    assert (one_d - want).abs().max() > 1e-3
    with torch.no_grad():
        assert (prefill(ids, feats, other, pos)[0] - want).abs().max() > 1e-3


# --------------------------------------------------------------------------- the family and its refusals


def test_registry_and_refusals(model, cli_run, capsys):
    """The registry picks Qwen3VLAdapter; one-line ConfigErrors name Qwen3-VL: a merging method (holitom: no keep
    index for the DeepStack levels), a [CLS] method, FastV before the last DeepStack layer (@0 with levels into
    layers 0 and 1), a video prompt without timestamped steps; the CLI exits 2 with one line."""
    assert type(adapter_for(model)) is Qwen3VLAdapter and adapter_by_type("qwen3_vl") is Qwen3VLAdapter
    layout = _layout(model, VIDEO)
    untimed = vision_prompt(model.config, layout, [3, 4, 5], [6, 7])  # Qwen2-VL's one contiguous block
    every = Qwen3VLVisionPrune(model.model.visual, layout, "uniform", layout.num_merged).eval()
    cases = [(lambda: plan_vlm(model, "holitom:0.5", grid=VIDEO), "DeepStack"),
             (lambda: plan_vlm(model, "cls-topk:0.5", grid=IMAGE), "Qwen3-VL's vision tower"),
             (lambda: Qwen3VLAdapter(model).part_exporters(plan_vlm(model, "uniform:1.0", grid=IMAGE,
                                                                    inner="fastv@0:0.5"), None), "DeepStack"),
             (lambda: q3.greedy_eager(model, every, _pixels(layout, 0), untimed), "timestamp")]
    for call, words in cases:
        with pytest.raises(ConfigError) as e:
            call()
        assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert plan_vlm(model, "evs:0.5", grid=VIDEO).keep == 16  # a gathering video method applies
    folder, out = cli_run[0], cli_run[1]
    for extra in (["--grid", "2,8,8", "--prune", "holitom:0.5"], ["--grid", "1,8,8", "--inner", "fastv@0:0.5"]):
        capsys.readouterr()
        assert main(["export-vlm", str(folder), "-o", str(out.parent / "refused"), "--no-build", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("tokensieve export-vlm: error: "), err


# --------------------------------------------------------------------------- engines


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_build_vlm_builds_the_three_parts(cli_run, precision):
    """TensorRT-RTX builds vision_prune (with its DeepStack output), lm_prefill (DeepStack hooks, the select-based
    M-RoPE) and lm_decode, fp32 and fp16."""
    pytest.importorskip("tensorrt_rtx")
    result = cli_run[4]
    infos = build_vlm(result, precision=precision, max_sequence=64)
    assert set(infos) == {"vision", "prefill", "decode"}
    io_shapes = {t["name"]: t["shape"] for t in infos["vision"].metadata["io_tensors"]}
    assert io_shapes == {"pixel_values": [64, 96], "image_features": [8, 64], "keep_idx": [8],
                         "deepstack_features": [2, 8, 64]}
    engines = json.loads(result.paths["manifest"].read_text())["engines"]
    assert set(engines) == set(infos) and all((result.out_dir / e["file"]).is_file() for e in engines.values())
