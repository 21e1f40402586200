"""FastV (inner visual-token pruning inside the LLM prefill) for the LLaVA parts: ORT greedy generation vs an eager
FastV reference that runs HF's decoder layers by hand (HF eager attention probabilities for the score, no cache).

One tiny random-init LLaVA with a 3-layer Llama (layers 0..1 keep every token, layer 2 sees the pruned sequence),
no outer pruning (cls-topk:1.0 -> 16 image tokens), FastV after layer 1 keeping 6 of the 16 image tokens; exported
once per module (~20 s). The CLI test exports the 2-layer `tiny_llava` once more (R = N control, ~18 s).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from test_llava_parts import _one_line, tiny_llava
from tokensieve.cli import main
from tokensieve.errors import ConfigError
from tokensieve.exporter.vlm.fastv import (FastvPrefill, calibrate_fastv_bias, parse_fastv, prefill_macs,
                                           reference_fastv_generate)
from tokensieve.exporter.vlm.llava import llava_layout
from tokensieve.graph_passes.onnx.check_static import FORBIDDEN_OPS
from tokensieve.runtime.llava_pipeline import LlavaOrtPipeline
from tokensieve.vlm_api import export_llava, llava_prompt, reference_generate, unpruned_generate, verify_llava

N, R, LAYER, STEPS, ATOL = 16, 6, 1, 8, 1e-5
IMAGE = 127


@pytest.fixture(scope="module")
def model():
    return tiny_llava(text_layers=3)  # two full-length layers, one pruned


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    return export_llava(model, tmp_path_factory.mktemp("fastv"), "cls-topk:1.0", inner=f"fastv@{LAYER}:{R}")


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _features(model, pixels):
    """HF LLaVA's own projected features of every patch (B, N, H)."""
    with torch.no_grad():
        return torch.stack(list(model.model.get_image_features(pixel_values=pixels).pooler_output))


def test_ort_greedy_matches_eager_fastv(exported):
    """verify_llava: 8 greedy ids, the kept image tokens and every step's logits of ORT equal the eager FastV."""
    assert exported.inner.layer == LAYER and exported.inner.keep == R and exported.num_image_tokens == N
    report = verify_llava(exported, batch=2, max_new_tokens=STEPS)
    assert report.tokens_match and report.inner_keep_idx_match and report.passed, report.to_dict()
    assert report.max_abs_diff_logits <= ATOL, report.to_dict()


@pytest.mark.parametrize("batch", [1, 3])
def test_batch_and_left_padding_match_eager(exported, model, pixels, batch):
    """Exported at batch 2; batch 1 and 3 (row 0 left-padded by 2) run with per-layer key masks and match eager."""
    ids = llava_prompt(exported.layout, N, batch, before=5, seed=batch)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[0, :2], ids[0, :2] = 0, 0
    with LlavaOrtPipeline(exported.out_dir) as pipe:
        got = pipe.generate(ids.numpy(), pixels[:batch].numpy(), STEPS, attention_mask=mask.numpy())
    want = reference_generate(model, exported.vision, ids, pixels[:batch], STEPS, mask, inner=exported.inner)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.inner_keep_idx, want.inner_keep_idx)
    np.testing.assert_allclose(got.logits, want.logits, atol=ATOL, rtol=0)


def test_prefill_keeps_text_and_top_image_tokens(exported, model, pixels):
    """The prefill's own outputs: keep_idx = every text position + the R kept image positions (ascending); caches of
    layers 0..L hold T tokens, later layers T - (N - R); the kept image tokens are the top-R of HF's eager layer-L
    attention row of the last position (head mean), not the first R."""
    ids = llava_prompt(exported.layout, N, 2, seed=5)
    t = ids.shape[1]
    with LlavaOrtPipeline(exported.out_dir) as pipe:
        embeds = pipe.embed_prompt(ids.numpy(), pipe.image_features(pixels[:2].numpy())[0])
        image_pos = pipe._image_positions(ids.numpy(), np.ones_like(ids.numpy()))
        out = pipe.prefill.infer({"inputs_embeds": embeds, "attention_mask": np.ones_like(ids.numpy()),
                                  "position_ids": np.arange(t)[None].repeat(2, 0), "image_positions": image_pos})
    assert [out[f"present.{i}.key"].shape[2] for i in range(3)] == [t, t, t - (N - R)]
    keep, image_keep = out["keep_idx"], out["image_keep_idx"]
    text = np.nonzero(ids[0].numpy() != IMAGE)[0]
    for b in range(2):
        np.testing.assert_array_equal(keep[b], np.sort(np.concatenate([text, image_pos[b, image_keep[b]]])))
    eager = reference_fastv_generate(model, ids, torch.from_numpy(embeds[ids.numpy() == IMAGE].reshape(2, N, -1)),
                                     exported.inner, IMAGE, 1)
    np.testing.assert_array_equal(image_keep, eager.image_keep_idx.numpy())
    np.testing.assert_array_equal(keep, eager.keep_idx.numpy())
    assert (np.diff(image_keep, axis=1) > 0).all() and not (image_keep == np.arange(R)).all(axis=1).all()


def test_all_image_tokens_equal_unpruned_and_fewer_change_logits(model, pixels):
    """Control: the eager FastV with R = N is HF LLaVA's own generate (every patch); R < N changes the logits."""
    ids = llava_prompt(llava_layout(model), N, 3, seed=2)
    tokens, logits = unpruned_generate(model, ids, pixels, STEPS)
    features = _features(model, pixels)
    full = reference_fastv_generate(model, ids, features, parse_fastv(f"fastv@{LAYER}:{N}", 3, N), IMAGE, STEPS)
    np.testing.assert_array_equal(full.tokens.numpy(), tokens)
    np.testing.assert_allclose(full.logits.numpy(), logits, atol=ATOL, rtol=0)
    pruned = reference_fastv_generate(model, ids, features, parse_fastv(f"fastv@{LAYER}:{R}", 3, N), IMAGE, STEPS)
    assert np.abs(pruned.logits.numpy() - logits).max() > 1e-3
    # and pruning after layer 0 instead differs from pruning after layer 1
    early = reference_fastv_generate(model, ids, features, parse_fastv(f"fastv@0:{R}", 3, N), IMAGE, STEPS)
    assert np.abs(early.logits.numpy() - pruned.logits.numpy()).max() > 1e-4


def test_prefill_graph_op_census(exported):
    """No NonZero/ScatterND/If/Loop; TopK (image scores, keep positions) + GatherElements do the pruning; the pruned
    layers' K/V get their own sequence symbol in prefill and decode."""
    census = exported.prefill_ops
    assert not set(census) & set(FORBIDDEN_OPS), census
    assert census.get("TopK", 0) >= 2 and census.get("GatherElements", 0) >= 1 and census.get("Softmax", 0) >= 4
    prefill = onnx.load(str(exported.paths["prefill"]))
    dims = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in prefill.graph.output}
    assert dims["image_keep_idx"] == ["batch", R] and dims["keep_idx"][0] == "batch"
    assert dims["present.0.key"][2] == dims["present.1.key"][2] == "sequence"
    assert dims["present.2.key"][2] == dims["keep_idx"][1] != "sequence"
    decode = onnx.load(str(exported.paths["decode"]))
    ins = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in decode.graph.input}
    assert ins["past.1.key"][2] == "past_sequence" and ins["past.2.key"][2] == "pruned_past_sequence"
    assert not set(op.op_type for op in decode.graph.node) & set(FORBIDDEN_OPS)


def test_prefill_macs_shrink(model, exported):
    layout, cfg, t = exported.layout, model.config.text_config, N + 7
    dense, pruned = prefill_macs(layout, cfg, t, None), prefill_macs(layout, cfg, t, exported.inner)
    assert pruned < dense
    full = prefill_macs(layout, cfg, t, parse_fastv(f"fastv@{LAYER}:{N}", 3, N))
    assert full > dense  # R = N saves nothing and pays the score row


def test_debiased_score_is_exported_module_and_reference(model, pixels):
    """fastv(debias=true): the prefill module and the eager reference subtract the same per-position bias; a strong
    bias moves the selection (the arithmetic is applied), a calibrated one is the batch mean of the scores."""
    layout = llava_layout(model)
    features = _features(model, pixels)
    ids = llava_prompt(layout, N, 3, seed=7)
    bias = calibrate_fastv_bias(model, ids, features, LAYER, IMAGE)
    assert bias.shape == (N,) and (bias > 0).all()
    ramp = np.linspace(1.0, 0.0, N)  # penalises early image tokens
    plain = reference_fastv_generate(model, ids, features, parse_fastv(f"fastv@{LAYER}:{R}", 3, N), IMAGE, 1)
    for b in (bias, ramp):
        spec = parse_fastv(f"fastv(debias=true)@{LAYER}:{R}", 3, N, b)
        want = reference_fastv_generate(model, ids, features, spec, IMAGE, 1)
        embeds = model.model.language_model.embed_tokens(ids).detach().clone()
        embeds[ids == IMAGE] = features.reshape(-1, embeds.shape[-1])
        t = ids.shape[1]
        with torch.no_grad():
            out = FastvPrefill(model, spec).eval()(embeds, torch.ones_like(ids), torch.arange(t).expand(3, -1),
                                                   torch.nonzero(ids == IMAGE)[:, 1].view(3, N))
        np.testing.assert_array_equal(out[-1].numpy(), want.image_keep_idx.numpy())
        np.testing.assert_allclose(out[0].numpy(), want.logits[0].numpy(), atol=ATOL, rtol=0)
    assert not np.array_equal(want.image_keep_idx.numpy(), plain.image_keep_idx.numpy())  # the ramp moved it
    assert (want.image_keep_idx.numpy() >= N - 2 * R).all()


@pytest.mark.parametrize("inner, match", [
    ("fastv@2:6", "layer 2 is out of range"),     # 3 layers: prune after 0..1
    ("fastv@-1:6", "out of range"),
    ("fastv@1:0", "keep=0 is out of range"),
    ("fastv@1:17", "keep=17 is out of range"),
    ("fastv@1:1.5", "ratio 1.5 is out of range"),
    ("fastv@1:abc", "not a number"),
    ("fastv:6", "Cannot parse"),
    ("fastv(foo=1)@1:6", "one parameter"),
    ("fastv(debias=true)@1:6", "needs the per-position bias"),
])
def test_bad_inner_is_one_line(model, tmp_path, inner, match):
    with pytest.raises(ConfigError, match=match) as e:
        export_llava(model, tmp_path, "cls-topk:1.0", inner=inner)
    _one_line(e)
    assert not any(tmp_path.iterdir())  # nothing written


def test_bad_prompts_are_one_line(exported, model, pixels):
    """No image tokens, an image token as the last position, right padding: one line, in ORT and in eager."""
    layout = exported.layout
    no_image = llava_prompt(layout, 0, 2)
    with LlavaOrtPipeline(exported.out_dir) as pipe:
        with pytest.raises(ConfigError, match="has 0 image tokens") as e:
            pipe.generate(no_image.numpy(), pixels[:2].numpy(), STEPS)
        _one_line(e)
        ends = llava_prompt(layout, N, 2, after=0)
        with pytest.raises(ConfigError, match="end with a text token") as e:
            pipe.generate(ends.numpy(), pixels[:2].numpy(), STEPS)
        _one_line(e)
        ids = llava_prompt(layout, N, 2)
        right = torch.ones_like(ids)
        right[0, -1] = 0
        with pytest.raises(ConfigError, match="left-padded") as e:
            pipe.generate(ids.numpy(), pixels[:2].numpy(), STEPS, attention_mask=right.numpy())
        _one_line(e)
    with pytest.raises(ConfigError, match="has 0 image tokens") as e:
        reference_fastv_generate(model, no_image, torch.zeros(2, 0, 32), exported.inner, IMAGE)
    _one_line(e)


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava_ckpt")
    tiny_llava().save_pretrained(path)
    return path


def test_cli_inner_fastv_all_tokens_equals_unpruned(llava_dir, tmp_path, capsys, pixels):
    """`export-vlm --inner fastv@0:16` passes its own verify, and (R = N control) the exported ORT pipeline gives HF
    LLaVA's unpruned greedy generation exactly."""
    out = tmp_path / "out"
    assert main(["export-vlm", str(llava_dir), "--prune", "cls-topk:1.0", "--inner", f"fastv@0:{N}", "-o", str(out),
                 "--steps", "4"]) == 0
    text = capsys.readouterr().out
    assert "inner (FastV)   16 -> 16 image tokens after LLM layer 0" in text and "verify          PASS" in text
    assert "FastV kept image tokens identical" in text
    model = tiny_llava()
    ids = llava_prompt(llava_layout(model), N, 3, seed=4)
    with LlavaOrtPipeline(out) as pipe:
        got = pipe.generate(ids.numpy(), pixels.numpy(), STEPS)
    tokens, logits = unpruned_generate(model, ids, pixels, STEPS)
    np.testing.assert_array_equal(got.tokens, tokens)
    np.testing.assert_allclose(got.logits, logits, atol=ATOL, rtol=0)
    np.testing.assert_array_equal(got.inner_keep_idx, np.arange(N)[None].repeat(3, 0))


@pytest.mark.parametrize("args, match", [
    (["--inner", "fastv@1:4"], "layer 1 is out of range"),   # tiny_llava has 2 LLM layers
    (["--inner", "fastv@0:5", "--prune", "cls-topk:4"], "keep=5 is out of range"),
    (["--inner", "fastv@0"], "Cannot parse"),
    (["--inner", "fastv(debias=true)@0:4"], "calibrated bias"),
])
def test_cli_bad_inner_is_one_line(llava_dir, tmp_path, capsys, args, match):
    out = tmp_path / "out"
    assert main(["export-vlm", str(llava_dir), "-o", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tokensieve export-vlm: error: "), err
    assert match in err[0], err
    assert not out.exists()
