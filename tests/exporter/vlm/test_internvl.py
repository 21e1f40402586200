"""InternVL through the VLM adapter interface: InternViT + pixel shuffle + projector with the outer stage per tile,
LLaVA's language-model parts, export_vlm + verify_vlm, the CLI, the refusals, the engines.

A tiny random-init InternVLForConditionalGeneration: InternViT 2 layers, 32 px tiles of 4 px patches (8 x 8 patches
+ [CLS]; its [CLS] and position embeddings randomized, HF initializes them to zero), pixel shuffle 0.5 -> 16 image
tokens per tile; Qwen2 2 layers, vocab 128. Exports: keep-all (uniform:1.0) with 1 and with 2 tiles (against HF's
get_image_features and generate), cls-topk:0.5 with 2 tiles through the CLI (export_vlm + verify_vlm), divprune:0.5
with 2 tiles through export_vlm + verify_vlm; the LM parts are traced once (fixture reuse_lm). FastV inside
(cls-topk:0.5 + fastv@0:0.5, 2 tiles) traces LLaVA's two FastV LM parts and reuses the CLI's vision part.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import onnx
import pytest
import torch
import test_adapter
from transformers import InternVLConfig, InternVLForConditionalGeneration, Qwen2Config

from tokensieve.cli import main
from tokensieve.errors import ConfigError
from tokensieve.exporter.vlm.families import adapter_for
from tokensieve.exporter.vlm.internvl import InternVLVisionPrune
from tokensieve.exporter.vlm.internvl_adapter import InternVLAdapter
from tokensieve.exporter.vlm.llava_adapter import LlavaAdapter
from tokensieve.graph_passes.onnx.check_static import check_static
from tokensieve.runtime.llava_pipeline import LlavaPipeline
from tokensieve.vlm_api import build_vlm, export_vlm, plan_vlm, verify_vlm

N_TILE, STEPS = 16, 8   # image tokens per tile: (32 / 4 / 2)^2
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=4, initializer_range=0.1)


def tiny_internvl(**vision) -> InternVLForConditionalGeneration:
    torch.manual_seed(0)
    text = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
                       initializer_range=0.2)  # HF's 0.02 with tied embeddings: one token repeated
    cfg = InternVLConfig(vision_config={**VISION, **vision}, text_config=text.to_dict(), image_token_id=127,
                         downsample_ratio=0.5, vision_feature_layer=-1)
    cfg._attn_implementation = "sdpa"
    model = InternVLForConditionalGeneration(cfg).eval()
    emb = model.model.vision_tower.embeddings
    with torch.no_grad():  # HF initializes both to zero: no position information, a constant [CLS]
        emb.cls_token.normal_(0, 0.5)
        emb.position_embeddings.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_internvl()


@pytest.fixture(scope="module")
def full(model, tmp_path_factory):
    """Every token kept (uniform:1.0), 2 tiles, through export_vlm: all three parts traced."""
    return export_vlm(model, tmp_path_factory.mktemp("internvl_full"), "uniform:1.0", tiles=2)


@pytest.fixture(scope="module")
def reuse_lm(full):
    """Later exports take `full`'s lm_prefill / lm_decode graphs (re-read from its files) instead of tracing them
    again (~8 s): the LM parts depend on neither K nor the tiles (their sequence axes are dynamic). Each still goes
    through export_vlm: its own vision part traced, everything written, the manifest, verify."""
    import onnx_ir as ir

    original = InternVLAdapter.part_exporters

    def part_exporters(self, plan, vision):
        parts = original(self, plan, vision)
        return {**parts, **{key: (lambda key=key: ir.load(full.paths[key])) for key in ("prefill", "decode")}}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(InternVLAdapter, "part_exporters", part_exporters)
        yield


@pytest.fixture(scope="module")
def full_1tile(model, reuse_lm, tmp_path_factory):
    """Every token kept, 1 tile."""
    return export_vlm(model, tmp_path_factory.mktemp("internvl_1tile"), "uniform:1.0", tiles=1)


@pytest.fixture(scope="module")
def cli_run(model, reuse_lm, tmp_path_factory):
    """`tokensieve export-vlm DIR --prune cls-topk:0.5 --tiles 2 -o OUT --no-build` on a save_pretrained folder
    (export_vlm + verify_vlm, 8 greedy tokens) -> (model folder, OUT, exit code, stdout)."""
    root = tmp_path_factory.mktemp("internvl_cli")
    model.save_pretrained(root / "model")
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        rc = main(["export-vlm", str(root / "model"), "--prune", "cls-topk:0.5", "--tiles", "2", "-o", str(root / "out"),
                   "--no-build"])
    return root / "model", root / "out", rc, stdout.getvalue()


def _pixels(tiles: int, seed: int) -> torch.Tensor:
    return torch.randn(tiles, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _one_line(exc_info) -> str:
    assert "\n" not in str(exc_info.value)
    return str(exc_info.value)


# --------------------------------------------------------------------------- keep-all == HF


@pytest.mark.parametrize("export", ["full_1tile", "full"])
def test_keep_all_equals_hf_features_and_generate(model, export, request):
    """Every token kept, 1 and 2 tiles: vision_prune.onnx's features equal HF's get_image_features (the tiles' tokens
    concatenated in order) to 1e-5, keep_idx is every token of every tile, and the parts' greedy tokens on ONNX
    Runtime equal HF's generate with the same pixel_values (prefill logits within 1e-4)."""
    full = request.getfixturevalue(export)
    tiles = full.layout.tiles
    x = _pixels(tiles, 3)
    prompt = full.adapter.sample_prompt(full.layout, tiles * N_TILE, 1, 5)
    with LlavaPipeline(full.out_dir, manifest_name="manifest.json") as pipe:
        got = pipe.generate(prompt.numpy(), x.numpy(), STEPS)
    with torch.no_grad():
        hf = model.model.get_image_features(pixel_values=x).pooler_output           # (T, 16, H)
        gen = model.generate(input_ids=prompt, pixel_values=x, max_new_tokens=STEPS, min_new_tokens=STEPS,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
        logits = model(input_ids=prompt, pixel_values=x).logits[:, -1]
    assert hf.shape == (tiles, N_TILE, 32) and got.image_features.shape == (1, tiles * N_TILE, 32)
    np.testing.assert_allclose(got.image_features[0], hf.reshape(-1, 32).numpy(), atol=1e-5, rtol=0)
    assert got.keep_idx.tolist() == [list(range(N_TILE))] * tiles
    assert got.tokens[0].tolist() == gen[0, prompt.shape[1]:].tolist()
    assert np.abs(got.logits[0] - logits.numpy()).max() <= 1e-4
    check_static(onnx.load(str(full.paths["vision"])))
    inputs = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim]
              for i in onnx.load(str(full.paths["vision"])).graph.input}
    assert inputs == {"pixel_values": [tiles, 3, 32, 32]}


# --------------------------------------------------------------------------- pruned: export_vlm + verify_vlm


def test_cli_cls_topk_verifies_and_inspects(cli_run, capsys):
    """cls-topk:0.5, 2 tiles, from the CLI: export_vlm + verify_vlm PASS (8 greedy tokens and keep_idx identical to
    the eager pruned reference, logits within 1e-4); the manifest; `tokensieve inspect OUT` shows it verified."""
    folder, out, rc, stdout = cli_run
    manifest = json.loads((out / "manifest.json").read_text())
    check = manifest["verification"]  # what verify_vlm found, as the CLI recorded it
    assert rc == 0 and check["status"] == "passed" and "verify          PASS: batch 1, 8 greedy tokens" in stdout, stdout
    assert check["tokens_match"] and check["keep_idx_match"] and check["steps"] == 8
    assert check["max_abs_diff_logits"] <= 1e-4 and check["max_abs_diff_features"] <= 1e-4
    assert "2 tile(s) x 16 tokens -> 8 kept per tile (16 image tokens per prompt)" in stdout
    assert (manifest["model_type"], manifest["prune"], manifest["keep"], manifest["num_image_tokens"],
            manifest["layout"]["tiles"]) == ("internvl", "cls-topk:0.5", 8, 16, 2)
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "internvl image parts" in text and "keeps 8 of 16 image tokens" in text and "PASS" in text, text


def test_divprune_verifies(model, reuse_lm, tmp_path):
    """divprune:0.5 (the TOKENS score path on the projected tokens, its own greedy select) through export_vlm +
    verify_vlm: tokens and keep_idx identical, logits and features within 1e-4."""
    result = export_vlm(model, tmp_path, "divprune:0.5", tiles=2)
    report = verify_vlm(result, max_new_tokens=STEPS)
    assert report.passed and report.tokens_match and report.keep_idx_match, report.to_dict()
    assert report.max_abs_diff_logits <= 1e-4 and report.max_abs_diff_features <= 1e-4
    assert result.prune == "divprune:0.5" and result.num_image_tokens == 16


def test_fastv_inside_verifies(model, cli_run, tmp_path):
    """cls-topk:0.5 + fastv@0:0.5, 2 tiles (FastV keeps 8 of the 16 kept image tokens after layer 0) through
    export_vlm + verify_vlm: LLaVA's FastV lm_prefill / lm_decode traced for InternVL's Qwen2 (vision_prune is the
    CLI's, re-read from its file: the same outer stage and tiles); against the eager FastV reference
    (fastv.reference_fastv_generate on HF's layers): 8 greedy tokens, keep_idx, FastV's kept image tokens and kept
    prompt positions identical, every step's logits within 1e-4."""
    import onnx_ir as ir

    def part_exporters(self, plan, vision):
        parts = LlavaAdapter.part_exporters(self, plan, vision)  # the LM parts: LLaVA's FastV ones, not reuse_lm's
        return {**parts, "vision": lambda: ir.load(cli_run[1] / "vision_prune.onnx")}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(InternVLAdapter, "part_exporters", part_exporters)
        result = export_vlm(model, tmp_path, "cls-topk:0.5", tiles=2, inner="fastv@0:0.5")
    report = verify_vlm(result, max_new_tokens=STEPS)
    assert report.passed and report.tokens_match and report.keep_idx_match and report.inner_keep_idx_match, \
        report.to_dict()
    assert report.max_abs_diff_logits <= 1e-4
    inner = json.loads(result.paths["manifest"].read_text())["inner"]
    assert (inner["layer"], inner["keep"], inner["num_image_tokens"]) == (0, 8, 16)


def test_cls_topk_is_fastervlm_per_tile_and_layout_controls(model):
    """Independent reference: HF's eager attention of the feature layer, [CLS] row, head mean, each image token's
    2 x 2 patch block averaged, top-K per tile, sorted; the features are HF's get_image_features of each tile at
    those tokens. Controls: grouping the patches in contiguous runs of 4 (not the shuffle's 2 x 2 blocks) selects
    other tokens, and each tile's keep_idx applied to the other tile gives other features."""
    x = _pixels(2, 9)
    vision = InternVLVisionPrune(model, plan_vlm(model, "cls-topk:4", tiles=2).layout, "cls-topk", 4, {}).eval()
    eager = copy.deepcopy(model)
    eager.model.vision_tower.config._attn_implementation = "eager"
    with torch.no_grad():
        feats, keep = vision(x)
        att = eager.model.vision_tower(pixel_values=x, output_attentions=True).attentions[-1]     # (2, heads, 65, 65)
        hf = model.model.get_image_features(pixel_values=x).pooler_output                      # (2, 16, H)
    patch = att[:, :, 0, 1:].mean(1).reshape(2, 4, 2, 4, 2)                                  # (tile, r2, dr, c2, dc)
    want = patch.mean((2, 4)).reshape(2, 16).topk(4, dim=-1).indices.sort(-1).values
    assert keep.tolist() == want.tolist()
    picked = hf.gather(1, keep[..., None].expand(-1, -1, hf.shape[-1]))
    torch.testing.assert_close(feats, picked.reshape(1, 8, -1), atol=1e-5, rtol=0)
    runs = att[:, :, 0, 1:].mean(1).reshape(2, 16, 4).mean(-1).topk(4, dim=-1).indices.sort(-1).values
    assert runs.tolist() != keep.tolist()
    swapped = hf.gather(1, keep.flip(0)[..., None].expand(-1, -1, hf.shape[-1])).reshape(1, 8, -1)
    assert keep[0].tolist() != keep[1].tolist() and (swapped - feats).abs().max() > 1e-3


# --------------------------------------------------------------------------- the family and its refusals


def test_family_and_refusals(model, cli_run, capsys):
    """The registry picks InternVLAdapter; one-line ConfigErrors: 0 tiles, a grid, more image tokens than the LM's
    positions, feather / a merging method, a tile grid the 2 x 2 shuffle cannot divide; the CLI: --tiles 0, --grid,
    and `tokensieve export` of the folder (pointed at export-vlm) exit 2 with one line."""
    test_adapter.test_adapters_implement_the_whole_interface(InternVLAdapter)  # called, not collected here
    assert type(adapter_for(model)) is InternVLAdapter
    plan = plan_vlm(model, "attn-mean:0.25", tiles=3)
    assert (plan.keep, plan.num_tokens, plan.num_image_tokens, plan.prune) == (4, 16, 12, "attn-mean:0.25")
    odd = tiny_internvl(image_size=24, patch_size=8)   # 3 x 3 patches: no 2 x 2 blocks
    for call, words in [(lambda: plan_vlm(model, "attn-mean:0.5", tiles=0), "positive integer"),
                        (lambda: plan_vlm(model, "attn-mean:0.5", grid=(1, 8, 8)), "tiles=N"),
                        (lambda: plan_vlm(model, "uniform:1.0", tiles=16), "max_position_embeddings 256"),
                        (lambda: plan_vlm(model, "feather:0.5", tiles=2), "pixel shuffle"),
                        (lambda: plan_vlm(model, "tome:0.5", tiles=2), "merges tokens"),
                        (lambda: plan_vlm(odd, "attn-mean:0.5"), "3 x 3 patch grid")]:
        with pytest.raises(ConfigError) as e:
            call()
        assert words in _one_line(e), str(e.value)
    folder, out = cli_run[0], cli_run[1]
    capsys.readouterr()
    for args, words in [(["--tiles", "0"], "--tiles 0 must be >= 1"), (["--grid", "1,8,8"], "--grid is for Qwen2-VL")]:
        assert main(["export-vlm", str(folder), "-o", str(out.parent / "bad"), "--no-build", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
    assert not (out.parent / "bad").exists()
    assert main(["export", "--model", str(folder), "-o", str(out.parent / "vit")]) == 2  # not a vision encoder
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the "[1/5] loading model" progress line
    assert err.startswith("tokensieve export: error: ") and "InternVL vision-language model" in err, err
    assert "tokensieve export-vlm " in err


def test_build_vlm_builds_the_three_parts(full):
    """TensorRT-RTX builds vision_prune (static T tiles), lm_prefill and lm_decode."""
    pytest.importorskip("tensorrt_rtx")
    infos = build_vlm(full, max_sequence=64)
    io_shapes = {t["name"]: t["shape"] for t in infos["vision"].metadata["io_tensors"]}
    assert io_shapes == {"pixel_values": [2, 3, 32, 32], "image_features": [1, 2 * N_TILE, 32], "keep_idx": [2, N_TILE]}
    engines = json.loads(full.paths["manifest"].read_text())["engines"]
    assert set(engines) == {"vision", "prefill", "decode"} and all((full.out_dir / e["file"]).is_file()
                                                                   for e in engines.values())
