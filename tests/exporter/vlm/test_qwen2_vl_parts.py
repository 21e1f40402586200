"""Qwen2-VL exported in parts: vision_prune (CLS-free pruning after the merger), M-RoPE positions, LM prefill/decode.

A tiny random-init Qwen2VLForConditionalGeneration (transformers 5.x), one image of grid (1, 8, 8) patches
-> 16 merged image tokens, pruned to K = 6; every part written with external data (external_data_threshold=0, as a
real Qwen2-VL-2B language model is), so the ORT greedy pipeline and the engine builds below run on <part>.onnx.data.
"""
from __future__ import annotations

import dataclasses

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokensieve.exporter.vlm.qwen2_vl_adapter as vlm
from tokensieve.errors import ConfigError
from tokensieve.exporter.vlm.qwen2_vl import Qwen2VLPrefill, Qwen2VLVisionPrune, export_vision_prune, image_layout
from tokensieve.graph_passes.onnx.check_static import FORBIDDEN_OPS, check_static, op_census
from tokensieve.runtime.onnxruntime_runner import OrtRunner
from tokensieve.vlm_api import build_vlm, export_vlm, verify_llava, verify_vlm

GRID = (1, 8, 8)
KEEP = 6
IMAGE_TOKEN = 200
BEFORE, AFTER = [5, 6, 7], [8, 9, 10, 11]


def _tiny_qwen2_vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    cfg = Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                           temporal_patch_size=2, mlp_ratio=2),
        # initializer_range 0.1 (HF: 0.02) so positions move the logits of a 2-layer model visibly (1-D control)
        text_config=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
                         max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        image_token_id=IMAGE_TOKEN, video_token_id=201, vision_start_token_id=202, vision_end_token_id=203,
    )
    cfg._attn_implementation = "sdpa"
    return Qwen2VLForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return _tiny_qwen2_vl()


@pytest.fixture(scope="module")
def layout(model):
    return image_layout(model.config.vision_config, GRID)


@pytest.fixture(scope="module")
def prompt(model, layout):
    return vlm.image_prompt(model.config, layout, BEFORE, AFTER)


def _pixels(layout, seed):
    return torch.randn(layout.num_patches, layout.patch_dim, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    return export_vlm(model, tmp_path_factory.mktemp("qwen2_vl"), f"attn-mean:{KEEP}", grid=GRID,
                      external_data_threshold=0)


def test_export_result(exported):
    """export_vlm's one result type, filled in for Qwen2-VL; the manifest keeps its keys."""
    assert exported.model_type == "qwen2_vl" and exported.grid == GRID and exported.inner is None
    assert exported.prune == f"attn-mean:{KEEP}" and exported.method == "attn-mean" and exported.keep == KEEP
    assert exported.num_tokens == 16 and exported.num_image_tokens == KEEP
    parts = {"vision", "prefill", "decode"}
    assert set(exported.seconds) == parts and set(exported.external_data) == parts
    assert set(exported.sizes) == parts | {f"{k}_data" for k in parts}
    assert all(exported.sizes[k] == exported.paths[k].stat().st_size > 0 for k in exported.sizes)
    d = json.loads(json.dumps(exported.to_dict()))
    assert d["grid"] == list(GRID) and d["files"]["manifest"] == "manifest.json" and d["vision_ops"]["TopK"] == 2
    manifest = json.loads(exported.paths["manifest"].read_text())
    assert manifest["grid_thw"] == list(GRID) and manifest["keep"] == KEEP and manifest["method"] == "attn-mean"
    assert manifest["files"] == dict(vision="vision_prune.onnx", vision_data="vision_prune.onnx.data",
                                     prefill="lm_prefill.onnx", prefill_data="lm_prefill.onnx.data",
                                     decode="lm_decode.onnx", decode_data="lm_decode.onnx.data")


def test_verify_vlm(exported, model, layout):
    """verify_vlm dispatches to the Qwen2-VL greedy pipeline (batch 1): ORT ids == eager, logits within atol, and
    vision_prune's keep_idx and features == the eager module's; control: against another selection it fails."""
    report = verify_vlm(exported, max_new_tokens=4)
    assert report.model_type == "qwen2_vl" and report.batch == 1 and report.passed, report.to_dict()
    assert report.tokens_match and np.array(report.tokens).shape == (1, 4)
    assert report.keep_idx_match is True and report.max_abs_diff_features <= 1e-4
    assert report.max_abs_diff_logits <= 1e-4
    other = dataclasses.replace(exported, vision=Qwen2VLVisionPrune(model.model.visual, layout, "uniform", KEEP).eval())
    bad = verify_vlm(other, max_new_tokens=1)
    assert bad.keep_idx_match is False and not bad.passed
    for call, words in [(lambda: verify_vlm(exported, batch=2), "batch 1"),
                        (lambda: verify_llava(exported), "use verify_vlm")]:
        with pytest.raises(ConfigError) as e:
            call()
        assert words in _one_line(e)


# --------------------------------------------------------------------------- vision_prune


@pytest.mark.parametrize("method, options", [("attn-mean", {}), ("ttv", {}), ("divprune", {}),
                                             ("attn-mean", {"recycle": True}), ("feather", {"mean_attention": True})])
def test_vision_prune_ort_matches_eager(model, layout, exported, tmp_path, method, options):
    """ORT reproduces the eager module's keep_idx exactly and its features to 1e-4, on new inputs; graph is static."""
    if method == "attn-mean" and not options:
        vision, path = exported.vision, exported.paths["vision"]
    else:
        vision = Qwen2VLVisionPrune(model.model.visual, layout, method, KEEP, options).eval()
        proto = ir.to_proto(export_vision_prune(vision))
        check_static(proto)
        path = tmp_path / "vision_prune.onnx"
        path.write_bytes(proto.SerializeToString())
    with OrtRunner(path) as runner:
        assert [tuple(s) for _, s, _ in runner.input_specs] == [(layout.num_patches, layout.patch_dim)]
        for seed in range(3):
            x = _pixels(layout, seed)
            with torch.no_grad():
                feats, keep = vision(x)
            out = runner.infer({"pixel_values": x.numpy()})
            assert out["keep_idx"].dtype == np.int64 and out["keep_idx"].shape == (KEEP,)
            assert out["keep_idx"].tolist() == keep.tolist() == sorted(set(keep.tolist()))
            assert out["image_features"].shape == (KEEP, model.config.text_config.hidden_size)
            assert np.abs(out["image_features"] - feats.numpy()).max() <= 1e-4
            if options.get("recycle"):  # same kept columns as plain attn-mean, other features
                with torch.no_grad():
                    plain, plain_keep = exported.vision(x)
                assert plain_keep.tolist() == keep.tolist()
                assert np.abs(plain.numpy() - feats.numpy()).max() > 1e-3


def test_vision_prune_op_census(exported):
    """No data-dependent or control-flow ops; one fixed-budget TopK selection, every size static."""
    result = exported
    vision_onnx = onnx.load(str(result.paths["vision"]))
    census = op_census(vision_onnx)
    assert not set(census) & set(FORBIDDEN_OPS)
    assert census["TopK"] == 2 and census["GatherElements"] == 1    # TopK(K) + TopK(sort indices) -> Gather
    assert census["Softmax"] == len(result.vision.visual.blocks) + 1  # one per block + the attn-mean score row
    assert dict(census) == result.vision_ops
    check_static(vision_onnx)
    for part in ("prefill", "decode"):
        assert not set(op_census(onnx.load(str(result.paths[part])))) & set(FORBIDDEN_OPS)


def test_keep_all_reproduces_hf_image_features(model, layout):
    """keep = every image token: the SDPA-over-one-image tower equals HF's get_image_features, in order."""
    x = _pixels(layout, 7)
    vision = Qwen2VLVisionPrune(model.model.visual, layout, "attn-mean", layout.num_merged).eval()
    with torch.no_grad():
        feats, keep = vision(x)
        want = model.model.get_image_features(x, layout.grid_thw).pooler_output[0]
    assert keep.tolist() == list(range(layout.num_merged))
    torch.testing.assert_close(feats, want, atol=1e-6, rtol=0)


def test_scores_are_merge_group_means(model, layout):
    """attn-mean on merged tokens = the library's mean_attention_scores of the last block, averaged per 2x2 group."""
    from tokensieve.graph_passes.methods.attention_scores import mean_attention_scores

    vision = Qwen2VLVisionPrune(model.model.visual, layout, "attn-mean", KEEP).eval()
    seen = {}
    orig = vision._scores
    vision._scores = lambda q, k, s, *a: seen.setdefault("s", (orig(q, k, s, *a), mean_attention_scores(q, k, s)))[0]
    with torch.no_grad():
        _, keep = vision(_pixels(layout, 3))
    merged, patch = seen["s"]
    torch.testing.assert_close(merged, patch.reshape(1, -1, 4).mean(-1))
    assert keep.tolist() == merged[0].topk(KEEP).indices.sort().values.tolist()


# --------------------------------------------------------------------------- M-RoPE positions


def test_pruned_mrope_positions_by_hand(model, layout, prompt):
    """Text columns keep their positions, kept image columns keep their (t, h, w); delta = max + 1 - T'."""
    pos = vlm.prompt_mrope_positions(model, prompt, layout)
    start = len(BEFORE) + 1                                      # first image column (after <vision_start>)
    keep = torch.tensor([0, 3, 5, 15])
    pruned, cols, delta = vlm.pruned_mrope_positions(pos, prompt == IMAGE_TOKEN, keep)
    t_pruned = prompt.shape[1] - layout.num_merged + len(keep)
    assert cols.shape == (1, t_pruned)
    assert cols[0].tolist() == [*range(start), *(start + keep).tolist(), *range(start + 16, prompt.shape[1])]
    # 4x4 merged grid at offset 4 (= start): image token j sits at (t, h, w) = (4, 4 + j // 4, 4 + j % 4)
    assert pruned[:, 0, start:start + 4].T.tolist() == [[4, 4, 4], [4, 4, 7], [4, 5, 5], [4, 7, 7]]
    assert pruned[:, 0, :start].tolist() == [list(range(start))] * 3
    assert pruned[:, 0, start + 4:].tolist() == [list(range(8, 8 + 1 + len(AFTER)))] * 3  # <vision_end> + AFTER
    assert delta.tolist() == [[int(pos.max()) + 1 - t_pruned]]
    assert vlm.decode_position_ids(delta, t_pruned).flatten().tolist() == [int(pos.max()) + 1] * 3


def test_keep_all_delta_is_hf_rope_delta(model, layout, prompt):
    pos, hf_delta = model.model.get_rope_index(prompt, mm_token_type_ids=(prompt == IMAGE_TOKEN).int(),
                                               image_grid_thw=layout.grid_thw)
    pruned, _, delta = vlm.pruned_mrope_positions(pos, prompt == IMAGE_TOKEN, torch.arange(layout.num_merged))
    assert torch.equal(pruned, pos) and torch.equal(delta, hf_delta)


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_pruned_positions_match_python_reference(data):
    """Random prompts (B=2, per-row keep_idx): the gather equals a list-comprehension reference."""
    n, b = data.draw(st.integers(1, 12)), 2
    pre, post = data.draw(st.integers(0, 5)), data.draw(st.integers(0, 5))
    k = data.draw(st.integers(1, n))
    keeps = [sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=k, max_size=k))) for _ in range(b)]
    mask = torch.tensor([[False] * pre + [True] * n + [False] * post] * b)
    pos = torch.randint(0, 50, (3, b, mask.shape[1]))
    pruned, cols, delta = vlm.pruned_mrope_positions(pos, mask, torch.tensor(keeps))
    for r in range(b):
        want = [*range(pre), *[pre + j for j in keeps[r]], *range(pre + n, pre + n + post)]
        assert cols[r].tolist() == want and pruned[:, r].tolist() == pos[:, r, want].tolist()
        assert int(delta[r]) == int(pos[:, r].max()) + 1 - len(want)


# --------------------------------------------------------------------------- LM: controls and the ORT pipeline


def test_keep_all_reproduces_hf_logits_and_generate(model, layout, prompt):
    """K = all tokens: the eager parts (vision + prefill + decode with the delta rule) equal HF's forward/generate."""
    x = _pixels(layout, 11)
    full = Qwen2VLVisionPrune(model.model.visual, layout, "attn-mean", layout.num_merged).eval()
    tokens, logits = vlm.greedy_eager(model, full, x, prompt, steps=8)
    mm = (prompt == IMAGE_TOKEN).int()
    with torch.no_grad():
        want = model(input_ids=prompt, pixel_values=x, image_grid_thw=layout.grid_thw, mm_token_type_ids=mm).logits[:, -1]
        gen = model.generate(input_ids=prompt, pixel_values=x, image_grid_thw=layout.grid_thw, mm_token_type_ids=mm,
                             max_new_tokens=8, min_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=0)
    assert tokens == gen[0, prompt.shape[1]:].tolist()


def test_one_d_positions_change_the_output(model, layout, prompt, exported, monkeypatch):
    """Control: the same pruned prompt with 1-D positions (0..T'-1, then T', T'+1, ...) changes logits and tokens."""
    vision = exported.vision
    x = _pixels(layout, 0)
    tokens, logits = vlm.greedy_eager(model, vision, x, prompt, steps=8)

    def one_d(position_ids, image_mask, keep_idx):
        cols = vlm.kept_columns(image_mask, keep_idx)
        flat = torch.arange(cols.shape[1]).view(1, 1, -1).expand(3, cols.shape[0], -1)
        return flat, cols, torch.zeros(cols.shape[0], 1, dtype=torch.long)

    monkeypatch.setattr(vlm, "pruned_mrope_positions", one_d)
    tokens_1d, logits_1d = vlm.greedy_eager(model, vision, x, prompt, steps=8)
    assert (logits - logits_1d).abs().max() > 0.1
    assert tokens != tokens_1d


def test_ort_greedy_pipeline_matches_eager(model, layout, prompt, exported):
    """vision_prune -> lm_prefill -> lm_decode on ORT: 8 greedy tokens identical to the eager parts, same pruning."""
    result, paths = exported, exported.paths
    for seed in (0, 1):
        x = _pixels(layout, seed)
        want_tokens, want_logits = vlm.greedy_eager(model, result.vision, x, prompt, steps=8)
        tokens, logits = vlm.greedy_onnx(model, paths, layout, x, prompt, steps=8)
        assert tokens == want_tokens
        assert (logits - want_logits).abs().max() <= 1e-4
    parts = ("vision_prune.onnx", "lm_prefill.onnx", "lm_decode.onnx")
    assert {p.name for p in paths.values()} == {*parts, *(f"{p}.data" for p in parts), "manifest.json"}
    assert not list(paths["vision"].parent.glob(".*.tmp"))  # atomic writes leave no temp files


def test_prefill_ignores_dropped_placeholders(model, layout, prompt, exported):
    """The pruned prompt's j-th image placeholder gets feature row j (CumSum + Gather): equal to inputs_embeds."""
    result = exported
    with torch.no_grad():
        feats, keep = result.vision(_pixels(layout, 5))
        pos, cols, _ = vlm.pruned_mrope_positions(vlm.prompt_mrope_positions(model, prompt, layout),
                                                  prompt == IMAGE_TOKEN, keep)
        ids = prompt.gather(1, cols)
        logits, *_ = Qwen2VLPrefill(model).eval()(ids, feats, pos)
        embeds = model.model.language_model.embed_tokens(ids)
        embeds[ids == IMAGE_TOKEN] = feats
        want = model.lm_head(model.model.language_model(inputs_embeds=embeds, position_ids=pos).last_hidden_state[:, -1])
    torch.testing.assert_close(logits, want, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- bad input: one-line ConfigErrors


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("method", ["cls-topk", "mmr", "feather"])
def test_cls_method_is_rejected_naming_cls_free_ones(model, layout, method):
    with pytest.raises(ConfigError) as e:
        Qwen2VLVisionPrune(model.model.visual, layout, method, KEEP)
    msg = _one_line(e)
    assert "[CLS]" in msg and "attn-mean" in msg and "divprune" in msg
    assert ("(or mean_attention=true)" in msg) == (method == "feather")  # feather has a CLS-free score


@pytest.mark.parametrize("method, options, words", [
    ("tome", None, "does not apply"), ("nope", None, "Unknown"), ("attn-mean", {"fuse": True}, "M-RoPE"),
    ("divprune", {"loop": True}, "Loop"), ("ttv", {"bogus": 1}, "unknown option"),
])
def test_unusable_methods_and_options(model, layout, method, options, words):
    with pytest.raises(ConfigError) as e:
        Qwen2VLVisionPrune(model.model.visual, layout, method, KEEP, options)
    assert words in _one_line(e)


@pytest.mark.parametrize("keep", [0, 17])
def test_keep_out_of_range(model, layout, keep):
    with pytest.raises(ConfigError) as e:
        Qwen2VLVisionPrune(model.model.visual, layout, "attn-mean", keep)
    assert "[1, 16]" in _one_line(e)


@pytest.mark.parametrize("keep_idx, words", [([0, 16], "[0, 16)"), ([-1, 3], "[0, 16)"), ([3, 3], "ascending"),
                                             ([5, 2], "ascending")])
def test_bad_keep_idx(model, layout, prompt, keep_idx, words):
    pos = vlm.prompt_mrope_positions(model, prompt, layout)
    with pytest.raises(ConfigError) as e:
        vlm.pruned_mrope_positions(pos, prompt == IMAGE_TOKEN, torch.tensor(keep_idx))
    assert words in _one_line(e)


@pytest.mark.parametrize("grid", [(1, 7, 8), (0, 8, 8), (1, 8)])  # t > 1 is a video: tests/exporter/vlm/test_qwen2_vl_video.py
def test_bad_grid(model, grid):
    with pytest.raises(ConfigError) as e:
        image_layout(model.config.vision_config, grid)
    _one_line(e)


def test_patch_count_and_prompt_mismatch(model, layout, prompt, exported):
    result, paths = exported, exported.paths
    short = torch.zeros(layout.num_patches - 4, layout.patch_dim)
    with pytest.raises(ConfigError) as e:
        vlm.greedy_eager(model, result.vision, short, prompt)
    assert "(64, 96)" in _one_line(e)
    with pytest.raises(ConfigError) as e:
        vlm.greedy_onnx(model, paths, layout, short, prompt)
    _one_line(e)
    with OrtRunner(paths["vision"]) as runner, pytest.raises(ConfigError) as e:  # the ONNX input is static
        runner.infer({"pixel_values": short.numpy()})
    _one_line(e)
    wrong = vlm.image_prompt(model.config, image_layout(model.config.vision_config, (1, 4, 8)), BEFORE, AFTER)
    with pytest.raises(ConfigError) as e:
        vlm.greedy_eager(model, result.vision, _pixels(layout, 0), wrong)
    assert "image tokens" in _one_line(e)


def test_not_a_qwen2_vl_model(model, tmp_path):
    for not_one in (torch.nn.Linear(2, 2), model.model):  # no config / a Qwen2VLModel without lm_head
        with pytest.raises(ConfigError) as e:
            export_vlm(not_one, tmp_path, "attn-mean:6", grid=GRID)
        assert "Qwen2VLForConditionalGeneration" in _one_line(e)
    assert not any(tmp_path.iterdir())


def test_vision_prune_builds_rtx_engine(exported, tmp_path):
    """TensorRT-RTX parses vision_prune.onnx and builds an SM86 engine with static I/O (no GPU needed)."""
    pytest.importorskip("tensorrt_rtx")
    from tokensieve import api

    info = api.build(exported.paths["vision"], tmp_path / "vision_prune.engine", target="rtx-sm86")
    io = {t["name"]: t["shape"] for t in info.metadata["io_tensors"]}
    assert io == {"pixel_values": [64, 96], "image_features": [KEEP, 64], "keep_idx": [KEEP]}
    assert info.metadata["data_dependent_shapes"] is False


def test_build_vlm_builds_the_lm_parts(exported):
    """build_vlm: the external-data LM parts build too (batch 1; prefill `sequence` 1..S with opt = the K + 9 token
    verify prompt, its position_ids [3, 1, sequence] on the same axis; decode `past_sequence` 0..S); the manifest
    lists them for greedy_onnx(backend="tensorrt")."""
    pytest.importorskip("tensorrt_rtx")
    infos = build_vlm(exported, max_sequence=48)
    assert set(infos) == {"vision", "prefill", "decode"}
    engines = json.loads(exported.paths["manifest"].read_text())["engines"]
    assert engines["prefill"]["profile"]["position_ids"] == {"min": [3, 1, 1], "opt": [3, 1, KEEP + 9],
                                                             "max": [3, 1, 48]}
    assert engines["decode"]["dims"]["past_sequence"] == {"min": 0, "opt": KEEP + 9, "max": 48}
    assert all((exported.out_dir / e["file"]).is_file() for e in engines.values())


@pytest.mark.gpu
def test_tensorrt_greedy_equals_onnxruntime(model, layout, prompt, exported):
    """On the GPU: the engines' greedy ids equal ORT's, the prefill logits within 1e-3 (fp32 with TF32)."""
    from gpu_target import engine_target

    build_vlm(exported, target=engine_target(), max_sequence=48)
    x = _pixels(layout, 0)
    want, want_logits = vlm.greedy_onnx(model, exported.paths, layout, x, prompt, steps=8)
    got, got_logits = vlm.greedy_onnx(model, exported.paths, layout, x, prompt, steps=8, backend="tensorrt")
    assert got == want
    assert (got_logits - want_logits).abs().max() <= 1e-3
