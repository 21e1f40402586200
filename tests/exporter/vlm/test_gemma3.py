"""Gemma 3 through the VLM adapter interface: the SigLIP tower + pooling projector with the outer stage on the pooled
image tokens, the prefill with the image-block bidirectional masks of the pruned prompt, LLaVA's decode part,
export_vlm + verify_vlm, the CLI, the engines.

A tiny random-init Gemma3ForConditionalGeneration: SigLIP 32 px / patch 4 = 8 x 8 patches (2 layers), pooled 2 x 2 to
mm_tokens_per_image = 16 image tokens; Gemma 3 decoder of 3 layers, two sliding (window 10, shorter than every prompt
here) and one full (Gemma 3's pattern; 5:1 in the checkpoints). HF zero-initializes the projection, so the fixture
draws it (std 0.3); initializer_range 0.1 so the masks move the logits visibly. One full export (the time budget):
attn-mean:0.5 through the CLI (export_vlm + verify_vlm; its result is caught for the engine build); keep-all
(uniform:1.0, against HF's get_image_features and generate) exports only its K = 16 vision_prune and lm_prefill and
reuses the CLI's lm_decode (it does not depend on K); divprune:0.5 exports only its vision part and reuses the CLI's
K = 8 LM parts; FastV (attn-mean:0.5 + fastv@0:4 through export_vlm + verify_vlm) traces only its two LM parts and
reuses the CLI's vision part.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.gemma3.modeling_gemma3 import create_masks_for_vision_model, get_block_sequence_ids_for_mask

from tokensieve.cli import main
from tokensieve.errors import ConfigError
from tokensieve.exporter.vlm.families import adapter_by_type, adapter_for
from tokensieve.exporter.vlm.gemma3 import (Gemma3FastvPrefill, Gemma3Prefill, Gemma3VisionPrune, gemma3_layout,
                                            image_block_masks, reference_gemma3_fastv_generate)
from tokensieve.exporter.vlm.gemma3_adapter import Gemma3Adapter, gemma3_prompt, greedy_parts
from tokensieve.runtime.onnxruntime_runner import OrtRunner
from tokensieve import vlm_api
from tokensieve.vlm_api import build_vlm, export_vlm, plan_vlm, verify_vlm, write_parts

N_IMG, KEEP, STEPS, IMAGE_ID = 16, 8, 8, 127
INNER = "fastv@0:4"  # after layer 0 (sliding: its window hides the first image tokens from the last query), keep 4


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=32, patch_size=4)
    text = Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=8, vocab_size=128, max_position_embeddings=256,
                            sliding_window=10, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                            query_pre_attn_scalar=8, initializer_range=0.1)
    cfg = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=N_IMG, image_token_index=IMAGE_ID,
                       boi_token_index=125, eoi_token_index=126, initializer_range=0.1)
    cfg._attn_implementation = "sdpa"
    model = Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(
            0, 0.3, generator=torch.Generator().manual_seed(0))
    return model


@pytest.fixture(scope="module")
def cli_run(model, tmp_path_factory):
    """`tokensieve export-vlm DIR --prune attn-mean:0.5 -o OUT --no-build` on a save_pretrained folder (export_vlm +
    verify_vlm, 8 greedy tokens, batch 2) -> (model folder, OUT, exit code, stdout, the VlmExportResult its
    export_vlm returned, caught on the way: build_vlm takes it)."""
    root = tmp_path_factory.mktemp("gemma3_cli")
    folder, out = root / "model", root / "out"
    model.save_pretrained(folder)
    stdout, results, export = io.StringIO(), [], vlm_api.export_vlm

    def catching(*args, **kwargs):
        results.append(export(*args, **kwargs))
        return results[-1]

    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setattr(vlm_api, "export_vlm", catching)
        rc = main(["export-vlm", str(folder), "--prune", "attn-mean:0.5", "-o", str(out), "--no-build"])
    return folder, out, rc, stdout.getvalue(), results[0]


@pytest.fixture(scope="module")
def keep_all(model, cli_run, tmp_path_factory):
    """Every image token kept (uniform:1.0): vision_prune and lm_prefill for K = 16 from the adapter's exporters,
    written by vlm_api.write_parts; lm_decode is the CLI's (it does not depend on K) -> {part: .onnx path}."""
    plan = plan_vlm(model, "uniform:1.0")
    adapter = Gemma3Adapter(model)
    parts = adapter.part_exporters(plan, adapter.vision_module(plan))
    paths, _ = write_parts({key: parts[key]() for key in ("vision", "prefill")}, tmp_path_factory.mktemp("gemma3_all"))
    return {**paths, "decode": cli_run[1] / "lm_decode.onnx"}


@pytest.fixture(scope="module")
def fastv(model, cli_run, tmp_path_factory):
    """attn-mean:0.5 + fastv@0:4 through export_vlm (its FastV lm_prefill / lm_decode traced; vision_prune is the
    CLI's, re-read from its file: the same outer stage) + verify_vlm -> (result, report)."""
    import onnx_ir as ir

    original = Gemma3Adapter.part_exporters

    def part_exporters(self, plan, vision):
        return {**original(self, plan, vision), "vision": lambda: ir.load(cli_run[1] / "vision_prune.onnx")}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Gemma3Adapter, "part_exporters", part_exporters)
        result = export_vlm(model, tmp_path_factory.mktemp("gemma3_fastv"), "attn-mean:0.5", inner=INNER)
    return result, verify_vlm(result, max_new_tokens=STEPS)


def _pixels(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _image(features: torch.Tensor) -> dict:
    return {"image": BaseModelOutputWithPooling(pooler_output=features)}


# --------------------------------------------------------------------------- keep-all == HF


def test_keep_all_equals_hf_image_features_and_generate(model, keep_all):
    """Every token kept: vision_prune on ONNX Runtime gives HF's get_image_features (1e-5) and keep_idx 0..15, and the
    parts' greedy tokens equal HF's generate on the same prompt and image (token_type_ids marking the image tokens,
    as the processor gives them); the prefill's logits are HF's forward's to 1e-4."""
    x = _pixels(2, 3)
    lay = gemma3_layout(model)
    prompt = gemma3_prompt(model.config, lay, N_IMG, 2, seed=5)
    token_type_ids = (prompt == IMAGE_ID).long()
    with OrtRunner(keep_all["vision"]) as v, OrtRunner(keep_all["prefill"]) as p, OrtRunner(keep_all["decode"]) as d:
        got = greedy_parts(v, p, d, prompt.numpy(), x.numpy(), STEPS, IMAGE_ID)
    with torch.no_grad():
        hf_feats = model.model.get_image_features(x).pooler_output
        gen = model.generate(input_ids=prompt, pixel_values=x, token_type_ids=token_type_ids,
                             attention_mask=torch.ones_like(prompt), max_new_tokens=STEPS, min_new_tokens=STEPS,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
        want = model(input_ids=prompt, pixel_values=x, token_type_ids=token_type_ids).logits[:, -1]
    assert np.abs(got.image_features - hf_feats.numpy()).max() <= 1e-5
    assert got.keep_idx.tolist() == [list(range(N_IMG))] * 2
    assert got.tokens.tolist() == gen[:, prompt.shape[1]:].tolist()
    assert np.abs(got.logits[0] - want.numpy()).max() <= 1e-4


def test_masks_are_hf_vision_masks(model):
    """image_block_masks == HF's create_masks_for_vision_model (full and sliding) on a left-padded batch with one
    image block per row, and the image tokens really see later image tokens (not causal)."""
    lay = gemma3_layout(model)
    ids = gemma3_prompt(model.config, lay, 5, 2, seed=1)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    hf = create_masks_for_vision_model(config=model.config.text_config, inputs_embeds=torch.zeros(*ids.shape, 32),
                                       attention_mask=mask, past_key_values=None, position_ids=None,
                                       block_sequence_ids=get_block_sequence_ids_for_mask((ids == IMAGE_ID).long()))
    mine = image_block_masks(ids == IMAGE_ID, mask, lay.sliding_window)
    assert set(mine) == {"full_attention", "sliding_attention"}
    for key, m in mine.items():
        assert torch.equal(m, hf[key].bool()), key
    first = int((ids[0] == IMAGE_ID).nonzero()[0])
    assert bool(mine["full_attention"][0, 0, first, first + 4]) and not bool(mine["full_attention"][0, 0, 0, 1])


# --------------------------------------------------------------------------- pruned: export_vlm + verify_vlm


def test_cli_export_vlm_attn_mean_and_inspect(cli_run, capsys):
    """attn-mean:0.5 from the CLI: export_vlm + verify_vlm PASS (8 greedy tokens and keep_idx identical to the eager
    pruned reference on a batch of 2, logits within 1e-4); the manifest; `tokensieve inspect OUT` shows it."""
    folder, out, rc, stdout, _ = cli_run
    line = next(li for li in stdout.splitlines() if "verify" in li)
    assert rc == 0 and "PASS" in line and "8 greedy tokens identical, keep_idx identical" in line, stdout
    assert "batch 2" in line and float(line.split("max |Δ logits| ")[1].split()[0]) <= 1e-4
    assert "Gemma 3" in stdout and "16 pooled tokens -> 8 kept" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["model_type"], manifest["method"], manifest["keep"], manifest["num_image_tokens"]) == \
        ("gemma3", "attn-mean", KEEP, KEEP)
    assert manifest["verification"]["status"] == "passed" and manifest["placeholder_token_id"] == IMAGE_ID
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "gemma3 image parts (manifest.json)" in shown and "attn-mean:0.5 (keeps 8 of 16 image tokens)" in shown
    assert "verify        PASS" in shown


def test_divprune_verifies(model, cli_run, tmp_path):
    """divprune:0.5 (the TOKENS score path on the pooled tokens): its vision part exported by the adapter and written
    by vlm_api.write_parts, with the K = 8 LM parts the CLI wrote for attn-mean:0.5 (they depend on K only);
    verify_vlm: tokens and keep_idx identical, logits within 1e-4. Control: attn-mean keeps other tokens."""
    plan = plan_vlm(model, "divprune:0.5")
    adapter = Gemma3Adapter(model)
    vision = adapter.vision_module(plan)
    paths, _ = write_parts({"vision": adapter.part_exporters(plan, vision)["vision"]()}, tmp_path)
    lm = cli_run[1]
    for name in ("lm_prefill.onnx", "lm_decode.onnx", "manifest.json"):
        (tmp_path / name).write_bytes((lm / name).read_bytes())
    result = dataclasses.replace(cli_run[4], model=model, out_dir=tmp_path, vision=vision, keep=KEEP, num_image_tokens=KEEP,
                                 prune=plan.prune, method="divprune",
                                 paths={**paths, "prefill": tmp_path / "lm_prefill.onnx",
                                        "decode": tmp_path / "lm_decode.onnx"})
    report = verify_vlm(result, max_new_tokens=STEPS)
    assert report.passed and report.tokens_match and report.keep_idx_match, report.to_dict()
    assert report.max_abs_diff_logits <= 1e-4 and report.max_abs_diff_features <= 1e-5
    x = _pixels(2, 0)
    with torch.no_grad():
        kept = vision(x)[1]
        other = Gemma3VisionPrune(model, plan.layout, "attn-mean", KEEP).eval()(x)[1]
    assert kept.tolist() != other.tolist()


def test_mask_not_following_the_pruned_layout_changes_the_output(model, cli_run):
    """Control: the exported prefill (K = 8 kept image tokens, one bidirectional block) gives HF's logits with
    token_type_ids on the pruned prompt (1e-4); a causal-only mask (no image block: HF without token_type_ids) and
    the image block of the unpruned layout (the kept tokens split where dropped ones were, one block per run of
    originally adjacent kept tokens) each move the logits by more than 1e-2."""
    lay = gemma3_layout(model)
    x, ids = _pixels(2, 0), gemma3_prompt(model.config, lay, KEEP, 2, seed=0)
    vision = Gemma3VisionPrune(model, lay, "attn-mean", KEEP).eval()
    mask, pos = torch.ones_like(ids), torch.arange(ids.shape[1]).expand(2, -1)
    with torch.no_grad():
        feats, keep_idx = vision(x)
        want = model(input_ids=ids, attention_mask=mask, token_type_ids=(ids == IMAGE_ID).long(),
                     mm_encoder_outputs=_image(feats)).logits[:, -1]
        causal = Gemma3Prefill(model, bidirectional=False).eval()(ids, feats, mask, pos)[0]
        # the unpruned layout's blocks: token_type_ids 1 only on kept tokens whose predecessor was kept too, so a
        # dropped token between two kept ones starts a new block
        runs = torch.zeros_like(ids)
        image_cols = (ids == IMAGE_ID).nonzero()[:, 1].reshape(2, KEEP)
        starts = torch.cat([torch.ones(2, 1, dtype=torch.bool), keep_idx[:, 1:] != keep_idx[:, :-1] + 1], dim=1)
        runs.scatter_(1, image_cols, torch.where(starts, 2, 1))  # 2: a run's first token
        block = torch.where(runs > 0, torch.cumsum((runs == 2).long(), 1) - 1, -1)
        split = model(input_ids=ids, mm_encoder_outputs=_image(feats),
                      attention_mask=_split_block_masks(model, ids, block)).logits[:, -1]
    with OrtRunner(cli_run[1] / "lm_prefill.onnx") as runner:
        got = runner.infer({"input_ids": ids.numpy(), "image_features": feats.numpy(), "attention_mask": mask.numpy(),
                            "position_ids": pos.numpy().copy()})["logits"]
    assert np.abs(got - want.numpy()).max() <= 1e-4
    assert bool(starts[:, 1:].any()), "attn-mean kept one contiguous run: the split control would be vacuous"
    assert (causal - want).abs().max() > 1e-2
    assert (split - want).abs().max() > 1e-2


def _split_block_masks(model, ids: torch.Tensor, block: torch.Tensor) -> dict:
    """HF's vision masks for explicit block ids (one block per run): the prepared mask dict HF's forward takes."""
    return create_masks_for_vision_model(config=model.config.text_config, inputs_embeds=torch.zeros(*ids.shape, 32),
                                         attention_mask=torch.ones_like(ids), past_key_values=None,
                                         position_ids=None, block_sequence_ids=block)


# --------------------------------------------------------------------------- FastV inside the prefill


def test_fastv_verifies(fastv):
    """attn-mean:0.5 + fastv@0:4: verify_vlm PASS against gemma3's eager FastV reference (FastV's algorithm on HF
    Gemma 3's own layers and masks): 8 greedy tokens, vision keep_idx, FastV's kept image tokens and kept prompt
    positions identical on a batch of 2, every step's logits within 1e-4; the manifest records the inner stage."""
    result, report = fastv
    assert report.passed and report.tokens_match and report.keep_idx_match and report.inner_keep_idx_match, \
        report.to_dict()
    assert report.max_abs_diff_logits <= 1e-4 and report.batch == 2
    manifest = json.loads(result.paths["manifest"].read_text())
    assert manifest["inner"]["layer"] == 0 and manifest["inner"]["keep"] == 4 and \
        manifest["inner"]["num_image_tokens"] == KEEP


def test_fastv_masks_follow_the_kept_sequence_controls(model):
    """After the drop the masks of layers 1.. are rebuilt on the kept sequence (the kept image tokens one block, the
    sliding window over kept entries) and positions stay the original ones: the eager prefill equals the reference's
    first logits (1e-4) and keeps its tokens; each control moves the logits by more than 1e-2: the unpruned layout's
    masks taken at the kept columns, positions recomputed 0..T'-1 after the drop, and (in the reference) the sliding
    window over original positions instead of kept entries."""
    lay = gemma3_layout(model)
    ids, x = gemma3_prompt(model.config, lay, KEEP, 2, seed=0), _pixels(2, 0)
    plan = plan_vlm(model, "attn-mean:0.5", inner=INNER)
    with torch.no_grad():
        feats, _ = Gemma3VisionPrune(model, lay, "attn-mean", KEEP).eval()(x)
    ref = reference_gemma3_fastv_generate(model, ids, feats, plan.inner, max_new_tokens=1)
    args = (ids, feats, torch.ones_like(ids), torch.arange(ids.shape[1]).expand(2, -1))
    with torch.no_grad():
        got = Gemma3FastvPrefill(model, plan.inner).eval()(*args)
        unpruned = Gemma3FastvPrefill(model, plan.inner, rebuild_masks=False).eval()(*args)[0]
        renumbered = Gemma3FastvPrefill(model, plan.inner, recompute_positions=True).eval()(*args)[0]
    positions_window = reference_gemma3_fastv_generate(model, ids, feats, plan.inner, max_new_tokens=1,
                                                        window_over_positions=True)
    assert (got[0] - ref.logits[0]).abs().max() <= 1e-4
    assert got[-1].tolist() == ref.image_keep_idx.tolist() and got[-2].tolist() == ref.keep_idx.tolist()
    assert ids.shape[1] - (KEEP - 4) > lay.sliding_window  # the window cuts the kept sequence: the choice matters
    for other in (unpruned, renumbered, positions_window.logits[0]):
        assert (other - ref.logits[0]).abs().max() > 1e-2


# --------------------------------------------------------------------------- the family and its refusals


def test_registry_and_refusals(model, cli_run, capsys):
    """The registry picks Gemma3Adapter; [CLS] methods are refused in one line (the CLI: exit 2), as are a grid, a
    video method, fuse, an out-of-range keep and FastV."""
    assert type(adapter_for(model)) is Gemma3Adapter and adapter_by_type("gemma3") is Gemma3Adapter
    folder, out = cli_run[0], cli_run[1]
    capsys.readouterr()
    assert main(["export-vlm", str(folder), "--prune", "cls-topk:0.5", "-o", str(out.parent / "cls"),
                 "--no-build"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tokensieve export-vlm: error: ") and "[CLS]" in err[0], err
    assert "SigLIP" in err[0] and not (out.parent / "cls").exists()
    cases = [(dict(prune="attn-mean:0.5", grid=(1, 8, 8)), "grid"), (dict(prune="evs:0.5"), "video method"),
             (dict(prune="attn-mean(fuse=true):0.5"), "fuse"), (dict(prune="uniform:17"), "outside [1, 16]"),
             (dict(prune="feather:0.5"), "mean_attention=true"), (dict(prune="tome:0.5"), "does not apply"),
             (dict(prune="attn-mean@1:0.5"), "Gemma 3 prunes once"),
             (dict(prune="uniform:1.0", inner="fastv@2:0.5"), "prune after layer 0..1")]
    for kwargs, words in cases:
        with pytest.raises(ConfigError) as e:
            plan_vlm(model, **kwargs)
        assert words in str(e.value) and "\n" not in str(e.value), (kwargs, str(e.value))


def test_build_vlm_builds_the_three_parts(cli_run):
    """TensorRT-RTX builds the CLI export's vision_prune, lm_prefill (the in-graph block masks) and lm_decode. (The
    FastV lm_prefill does not build yet: Myelin CHECK(is_const) failed, docs/vlm_gemma3.md.)"""
    pytest.importorskip("tensorrt_rtx")
    result = cli_run[4]
    infos = build_vlm(result, max_sequence=64)
    assert set(infos) == {"vision", "prefill", "decode"}
    io_shapes = {t["name"]: t["shape"] for t in infos["vision"].metadata["io_tensors"]}
    assert io_shapes["image_features"][1:] == [KEEP, 32] and io_shapes["keep_idx"][1:] == [KEEP]
    engines = json.loads(result.paths["manifest"].read_text())["engines"]
    assert set(engines) == set(infos) and all((result.out_dir / e["file"]).is_file() for e in engines.values())
