"""FastV (inner visual-token pruning inside the LLM prefill) for the LLaVA parts: ORT greedy generation vs an eager
FastV reference that runs HF's decoder layers by hand (HF eager attention probabilities for the score, no cache).

One tiny random-init LLaVA with a 3-layer Llama (layers 0..1 keep every token, layer 2 sees the pruned sequence),
no outer pruning (cls-topk:1.0 -> 16 image tokens), FastV after layer 1 keeping 6 of the 16 image tokens; exported
once per module (~20 s). fastv(debias=true) with a calibrated bias and FEATHER (fastv(uniform=0.5)) go through
export_llava but export only their prefill (~11 s each), taking the plain export's vision and decode parts (neither
option changes them); HoliTom's inner merge (fastv(merge=true)) writes only its prefill next to those parts too. ToDRE
(outer divprune + inner FastV) is a full export (~20 s). The CLI test exports the 2-layer `tiny_llava` once more (R = N
control, ~18 s).
"""
from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from test_llava_parts import _one_line, tiny_llava
from tokensieve.cli import main
from tokensieve.errors import ConfigError, TargetError
from tokensieve.exporter.vlm.export_part import export_part
from tokensieve.exporter.vlm.fastv import (FastvPrefill, calibrate_fastv_bias, fastv_prefill_spec, merge_into_kept,
                                           parse_fastv, prefill_macs, reference_fastv_generate, reference_merge)
from tokensieve.exporter.vlm.llava import llava_layout
from tokensieve.graph_passes.onnx.check_static import FORBIDDEN_OPS
from tokensieve.runtime.llava_pipeline import LlavaOrtPipeline, LlavaPipeline
from tokensieve.vlm_api import (_write_manifest, build_vlm, export_llava, llava_prompt, reference_generate,
                                unpruned_generate, verify_llava, vlm_profiles, write_parts)

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


# --------------------------------------------------------------------------- debias, FEATHER, ToDRE exported


def _verify_input(layout, batch=2, seed=0):
    """The prompt and images verify_llava draws by default (its seed 0)."""
    size = layout.image_size
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return llava_prompt(layout, N, batch, seed=seed), pixels


def _inner_keep(out_dir, ids, pixels, mask=None):
    with LlavaOrtPipeline(out_dir) as pipe:
        got = pipe.generate(ids.numpy(), pixels.numpy(), 1, attention_mask=None if mask is None else mask.numpy())
    return got.inner_keep_idx


def _export_new_prefill(exported, out, inner, inner_bias=None):
    """export_llava(model, out, "cls-topk:1.0", inner=inner, inner_bias=...) whose vision_prune and lm_decode parts are
    the plain export's (~8 s less): debias and uniform change only the prefill's selection, so the outer stage, the
    FastV layer and R must equal the plain export's (checked); verify_llava then runs the reused parts too."""
    from tokensieve.exporter.vlm.llava_adapter import LlavaAdapter

    real = LlavaAdapter.part_exporters

    def part_exporters(self, plan, vision):
        makers = real(self, plan, vision)
        assert (plan.prune, plan.inner.layer, plan.inner.keep) == (exported.prune, LAYER, R), plan
        return dict(makers, **{key: (lambda key=key: ir.load(exported.paths[key])) for key in ("vision", "decode")})

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LlavaAdapter, "part_exporters", part_exporters)
        return export_llava(exported.model, out, "cls-topk:1.0", inner=inner, inner_bias=inner_bias)


@pytest.fixture(scope="module")
def debiased(model, exported, tmp_path_factory):
    """fastv(debias=true) with the bias calibrated on 8 other prompts/images."""
    layout = llava_layout(model)
    cal_pixels = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    bias = calibrate_fastv_bias(model, llava_prompt(layout, N, 8, seed=11), _features(model, cal_pixels), LAYER, IMAGE)
    return _export_new_prefill(exported, tmp_path_factory.mktemp("fastv_debias"), f"fastv(debias=true)@{LAYER}:{R}",
                               bias)


def test_debiased_export_matches_eager_and_moves_selection(debiased, exported):
    """The known gap: fastv(debias=true) through export_llava -> ORT greedy ids, kept image tokens and logits equal the
    eager reference (which subtracts the same bias); control: on the same input the bias keeps other image tokens
    than plain FastV (so the exported subtraction is live, not folded away)."""
    assert debiased.inner.bias is not None and debiased.inner.shorthand() == f"fastv(debias=true)@{LAYER}:{R}"
    report = verify_llava(debiased, batch=2, max_new_tokens=4)
    assert report.tokens_match and report.inner_keep_idx_match and report.passed, report.to_dict()
    assert report.max_abs_diff_logits <= ATOL, report.to_dict()
    ids, pixels = _verify_input(debiased.layout)
    got, plain = _inner_keep(debiased.out_dir, ids, pixels), _inner_keep(exported.out_dir, ids, pixels)
    want = reference_generate(debiased.model, debiased.vision, ids, pixels, 1, inner=debiased.inner).inner_keep_idx
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, plain), (got, plain)


@pytest.fixture(scope="module")
def feather(exported, tmp_path_factory):
    return _export_new_prefill(exported, tmp_path_factory.mktemp("feather"), f"fastv(uniform=0.5)@{LAYER}:{R}")


def test_feather_export_matches_eager_and_keeps_uniform_ordinals(feather, exported, model, pixels):
    """FEATHER (uniform=0.5, R = 6 -> U = 3 fixed ordinals round(linspace(0, 15, 3)) = 0, 8, 15): verify_llava passes;
    on several inputs (one left-padded row) the ORT kept image tokens contain the 3 fixed ordinals, equal the eager
    reference (a TopK over the other 13 ordinals, no +inf) and differ from plain FastV's on the same input."""
    spec = feather.inner
    assert spec.num_uniform == 3 and spec.uniform_ordinals == (0, 8, 15)
    assert spec.shorthand() == f"fastv(uniform=0.5)@{LAYER}:{R}"
    manifest = json.loads(feather.paths["manifest"].read_text())
    assert manifest["inner"]["uniform"] == 0.5 and manifest["inner"]["num_uniform"] == 3
    report = verify_llava(feather, batch=2, max_new_tokens=4)
    assert report.tokens_match and report.inner_keep_idx_match and report.passed, report.to_dict()
    assert report.max_abs_diff_logits <= ATOL, report.to_dict()
    differs = 0
    for seed in (0, 1, 2):
        ids = llava_prompt(feather.layout, N, 3, before=5, seed=seed)
        mask = torch.ones_like(ids)
        mask[0, :2], ids[0, :2] = 0, 0
        got = _inner_keep(feather.out_dir, ids, pixels, mask)
        want = reference_generate(model, feather.vision, ids, pixels, 1, mask, inner=spec).inner_keep_idx
        np.testing.assert_array_equal(got, want)
        assert np.isin([0, 8, 15], got).all(axis=0).all() and (np.diff(got, axis=1) > 0).all(), got
        differs += int((got != _inner_keep(exported.out_dir, ids, pixels, mask)).any(axis=1).sum())
    assert differs >= 1  # plain FastV keeps other tokens on at least one of the 9 rows


def test_feather_with_debias_is_exact_under_large_scores(model, pixels):
    """uniform + debias in the prefill module and the eager reference: a bias of -1e6 * ramp lifts the debiased
    scores far above any probability (a fixed 'large constant' such as 2 would lose the uniform ordinal 0 to the
    late tokens); the kept set is still the 3 fixed ordinals + the top 3 others, identical in both, and differs from
    uniform-only and from debias-only."""
    layout = llava_layout(model)
    features = _features(model, pixels)
    ids = llava_prompt(layout, N, 3, seed=7)
    ramp = -1e6 * np.linspace(0.0, 1.0, N)  # score - bias grows with the ordinal: the late ones win
    both = parse_fastv(f"fastv(debias=true,uniform=0.5)@{LAYER}:{R}", 3, N, ramp)
    assert both.shorthand() == f"fastv(debias=true,uniform=0.5)@{LAYER}:{R}"
    want = reference_fastv_generate(model, ids, features, both, IMAGE, 1)
    embeds = model.model.language_model.embed_tokens(ids).detach().clone()
    embeds[ids == IMAGE] = features.reshape(-1, embeds.shape[-1])
    t = ids.shape[1]
    with torch.no_grad():
        out = FastvPrefill(model, both).eval()(embeds, torch.ones_like(ids), torch.arange(t).expand(3, -1),
                                               torch.nonzero(ids == IMAGE)[:, 1].view(3, N))
    np.testing.assert_array_equal(out[-1].numpy(), want.image_keep_idx.numpy())
    np.testing.assert_allclose(out[0].numpy(), want.logits[0].numpy(), atol=ATOL, rtol=0)
    np.testing.assert_array_equal(want.image_keep_idx.numpy(), np.array([[0, 8, 12, 13, 14, 15]] * 3))
    for other in (parse_fastv(f"fastv(uniform=0.5)@{LAYER}:{R}", 3, N),
                  parse_fastv(f"fastv(debias=true)@{LAYER}:{R}", 3, N, ramp)):
        alone = reference_fastv_generate(model, ids, features, other, IMAGE, 1)
        assert not np.array_equal(alone.image_keep_idx.numpy(), want.image_keep_idx.numpy())


def test_todre_divprune_outer_fastv_inner(model, tmp_path):
    """ToDRE = diversity first (outer divprune keeps 8 of 16 patches), then task relevance (FastV after LLM layer 1
    keeps 4 of those 8): ORT greedy ids, outer keep_idx, kept image tokens and logits equal the eager pipeline."""
    result = export_llava(model, tmp_path, "divprune:0.5", inner=f"fastv@{LAYER}:0.5")
    assert result.keep == result.num_image_tokens == 8 and result.inner.keep == 4
    report = verify_llava(result, batch=2, max_new_tokens=4)
    assert report.tokens_match and report.keep_idx_match and report.inner_keep_idx_match, report.to_dict()
    assert report.passed and report.max_abs_diff_logits <= ATOL, report.to_dict()


# --------------------------------------------------------------------------- HoliTom's inner merge (merge=true)


def _merge_case(seed, batch, n, r, c, integer):
    """h (B, T, C) with T = n + 5, the n image positions (ascending, random), R kept ordinals (ascending, random).
    integer=True draws every entry from {-2, -1, 1, 2}: parallel and repeated vectors, so exact cosine ties and many
    members per kept token."""
    g = torch.Generator().manual_seed(seed)
    t = n + 5
    if integer:
        h = torch.tensor([-2.0, -1.0, 1.0, 2.0])[torch.randint(0, 4, (batch, t, c), generator=g)]
    else:
        h = torch.randn(batch, t, c, generator=g)
    pos = torch.stack([torch.randperm(t, generator=g)[:n].sort().values for _ in range(batch)])
    keep = torch.stack([torch.randperm(n, generator=g)[:r].sort().values for _ in range(batch)])
    return h, pos, keep


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 3), n=st.integers(1, 24), r_share=st.floats(0.0, 1.0),
       c=st.integers(1, 6), integer=st.booleans())
@example(seed=0, batch=2, n=12, r_share=0.2, c=2, integer=True)   # C = 2, 4 signs: ties on every row
def test_merge_closed_form_equals_holitom_loop(seed, batch, n, r_share, c, integer):
    """merge_into_kept (comparisons, MatMuls, Pow) == HoliTom's literal sequential loop (reference_merge) on random
    inputs, ties in the argmax and several members per kept token included; rows other than the kept image tokens
    are untouched."""
    r = max(1, round(r_share * n))
    h, pos, keep = _merge_case(seed, batch, n, r, c, integer)
    got, want = merge_into_kept(h, pos, keep), reference_merge(h, pos, keep)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    kept = torch.zeros_like(h[..., 0], dtype=torch.bool).scatter_(1, pos.gather(1, keep), True)
    assert torch.equal(got[~kept], h[~kept])
    if r < n and not integer:  # averaging distinct vectors: the merge moved a kept row
        assert not torch.equal(got[kept], h[kept])


def test_merge_weights_and_first_tie_by_hand():
    """Two kept tokens with the same direction ((1, 0) and (2, 0): an exact cosine tie) -> every other image token
    goes to the FIRST kept one; its members i1 < i2 < i3 weigh 1/8, 1/4, 1/2 and the kept token itself 1/8; the
    other kept token is unchanged."""
    h = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [3.0, 1.0], [2.0, 0.0], [5.0, 2.0], [4.0, 0.5], [7.0, 7.0]]])
    pos, keep = torch.tensor([[1, 2, 3, 4, 5]]), torch.tensor([[0, 2]])  # kept positions 1 and 3: (1, 0), (2, 0)
    want = h.clone()
    want[0, 1] = h[0, 1] / 8 + h[0, 2] / 8 + h[0, 4] / 4 + h[0, 5] / 2
    for fn in (merge_into_kept, reference_merge):
        torch.testing.assert_close(fn(h, pos, keep), want, atol=0, rtol=0)


@pytest.fixture(scope="module")
def merged(model, exported, tmp_path_factory):
    """fastv(merge=true)@1:6: only lm_prefill.onnx is exported (merging changes neither vision_prune nor lm_decode);
    the plain export's other files are copied next to it and the manifest is rewritten with the merge spec."""
    spec = parse_fastv(f"fastv(merge=true)@{LAYER}:{R}", 3, N)
    out = tmp_path_factory.mktemp("fastv_merge")
    for name in ("vision", "decode", "embed"):
        shutil.copy(exported.paths[name], out)
    onnx_model = export_part(FastvPrefill(model, spec).eval(), fastv_prefill_spec(exported.layout, spec),
                             what="lm_prefill.onnx")
    paths, ops = write_parts({"prefill": onnx_model}, out)
    result = dataclasses.replace(exported, out_dir=out, paths={k: out / p.name for k, p in exported.paths.items()},
                                 prefill_ops=ops["prefill"], inner=spec, engines={}, removed_engines=[])
    _write_manifest(result)
    return result


def test_merge_export_matches_eager_holitom_and_changes_logits(merged, exported):
    """fastv(merge=true): ORT greedy ids, kept image tokens and every step's logits equal the eager reference (HoliTom's
    literal loop); the prefill is static (Pow for the weights, no scatter). Control: on the same input plain FastV keeps
    the same image tokens (merging does not move the selection) but its logits differ, so the merge is live."""
    spec = merged.inner
    assert spec.merge and spec.shorthand() == f"fastv(merge=true)@{LAYER}:{R}"
    assert json.loads(merged.paths["manifest"].read_text())["inner"]["merge"] is True
    assert not set(merged.prefill_ops) & set(FORBIDDEN_OPS) and merged.prefill_ops.get("Pow", 0) >= 1
    report = verify_llava(merged, batch=2, max_new_tokens=4)
    assert report.tokens_match and report.inner_keep_idx_match and report.passed, report.to_dict()
    assert report.max_abs_diff_logits <= 1e-4, report.to_dict()
    ids, pixels = _verify_input(merged.layout)
    with LlavaOrtPipeline(merged.out_dir) as pipe:
        got = pipe.generate(ids.numpy(), pixels.numpy(), 4)
    with LlavaOrtPipeline(exported.out_dir) as pipe:
        plain = pipe.generate(ids.numpy(), pixels.numpy(), 4)
    np.testing.assert_array_equal(got.inner_keep_idx, plain.inner_keep_idx)
    assert np.abs(got.logits[0] - plain.logits[0]).max() > 1e-3
    want = reference_generate(merged.model, merged.vision, ids, pixels, 4, inner=spec)
    np.testing.assert_allclose(got.logits, want.logits, atol=1e-4, rtol=0)


def test_merge_prefill_builds_rtx_engine(merged, tmp_path):
    """TensorRT-RTX parses and builds the merging prefill (Pow, ReduceMin/ReduceMax, the weight MatMuls; SM86)."""
    pytest.importorskip("tensorrt_rtx")
    from tokensieve import api

    info = api.build(merged.paths["prefill"], tmp_path / "merge.engine", max_batch=2,
                     dims={"sequence": (N + 1, N + 7, 64)})
    assert info.size_bytes > 0 and info.engine_path.exists()


@pytest.mark.parametrize("inner, match", [
    ("fastv@2:6", "layer 2 is out of range"),     # 3 layers: prune after 0..1
    ("fastv@-1:6", "out of range"),
    ("fastv@1:0", "keep count 0 is out of range"),
    ("fastv@1:17", "keep=17 is out of range"),
    ("fastv@1:1.5", "ratio 1.5 is out of range"),
    ("fastv@1:abc", "not a number"),
    ("fastv:6", "Cannot parse"),
    ("fastv(foo=1)@1:6", "parameters are debias"),
    ("fastv(debias=true)@1:6", "needs the per-position bias"),
    ("fastv(uniform=1.0)@1:6", "uniform=1.0 is out of range"),
    ("fastv(uniform=-0.1)@1:6", "uniform=-0.1 is out of range"),
    ("fastv(uniform=x)@1:6", "uniform='x' is not a number"),
    ("fastv(uniform=0.5,uniform=0.2)@1:6", "given twice"),
    ("fastv(merge=yes)@1:6", "merge='yes' must be true or false"),
    ("fastv(merge)@1:6", "Parameter 'merge' in .* must be name=value"),
    ("fastv(merge=true,merge=false)@1:6", "given twice"),
])
def test_bad_inner_is_one_line(model, tmp_path, inner, match):
    with pytest.raises(ConfigError, match=match) as e:
        export_llava(model, tmp_path, "cls-topk:1.0", inner=inner)
    _one_line(e)
    assert not any(tmp_path.iterdir())  # nothing written


def test_merge_option_parses():
    """merge=true|false parses (any case) alone and with uniform/debias; shorthand and manifest dict carry it."""
    spec = parse_fastv(f"fastv(uniform=0.5, merge=TRUE)@{LAYER}:{R}", 3, N)
    assert spec.merge and spec.num_uniform == 3 and spec.to_dict()["merge"] is True
    assert spec.shorthand() == f"fastv(uniform=0.5,merge=true)@{LAYER}:{R}"
    assert parse_fastv(spec.shorthand(), 3, N) == spec
    both = parse_fastv(f"fastv(debias=true,merge=true)@{LAYER}:{R}", 3, N, [0.0] * N)
    assert both.merge and both.bias is not None
    assert not parse_fastv(f"fastv(merge=false)@{LAYER}:{R}", 3, N).merge
    assert parse_fastv(f"fastv(merge=false)@{LAYER}:{R}", 3, N) == parse_fastv(f"fastv@{LAYER}:{R}", 3, N)


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


# --------------------------------------------------------------------------- engines


def test_fastv_parts_build_engines(exported):
    """The known gap, settled: the FastV prefill's keep TopK takes a K computed at run time (sequence - (N - R)) and
    TensorRT-RTX builds it; the profiles follow FastV: the prompt holds at least N + 1 tokens, decode's pruned layers
    get pruned_past_sequence = past_sequence - (N - R) (their masks: NAME + 1)."""
    pytest.importorskip("tensorrt_rtx")
    infos = build_vlm(exported, max_batch=2, max_sequence=64)
    engines = json.loads(exported.paths["manifest"].read_text())["engines"]
    d = N - R
    assert engines["prefill"]["dims"] == {"sequence": {"min": N + 1, "opt": N + 7, "max": 64}}
    assert engines["decode"]["dims"]["pruned_past_sequence"] == {"min": 0, "opt": N + 7 - d, "max": 64 - d}
    assert engines["decode"]["profile"]["attention_mask_pruned"]["max"] == [2, 64 - d + 1]
    assert engines["decode"]["profile"]["past.2.key"]["max"] == [2, 2, 64 - d, 8]  # layer 2: after the pruning
    assert engines["decode"]["profile"]["past.1.key"]["max"] == [2, 2, 64, 8]
    assert all(i.size_bytes > 0 for i in infos.values())
    assert not [w for i in infos.values() for w in i.metadata["build_warnings"] if "self-consistent" in w]


def test_fastv_sequence_is_bounded_by_the_topk_limit(exported, tmp_path):
    """K = S - (N - R) must stay <= 3840 (TensorRT's TopK limit): S defaults to at most 3840 + N - R, a larger
    --max-sequence is one line naming lm_prefill.onnx; an engine whose profile TensorRT flags as inconsistent is
    deleted and refused in one line."""
    d = N - R
    assert vlm_profiles(exported, max_sequence=3840 + d).max_sequence == 3840 + d
    with pytest.raises(ConfigError, match=f"lm_prefill.onnx .fastv@1:6.: at --max-sequence 5000 its keep TopK takes "
                                          f"K = sequence - {d} = {5000 - d} tokens") as e:
        vlm_profiles(exported, max_sequence=5000)
    assert f"use --max-sequence {3840 + d} or less" in _one_line(e)
    pytest.importorskip("tensorrt_rtx")
    from tokensieve import api
    from tokensieve.vlm_api import _refuse_inconsistent_profile

    info = api.build(exported.paths["prefill"], tmp_path / "p.engine", max_batch=1,
                     dims={"sequence": (N + 1, N + 7, 5000)})
    with pytest.raises(TargetError, match="lm_prefill.onnx: TensorRT cannot run its profile: .*K exceeds") as e:
        _refuse_inconsistent_profile("prefill", info)
    _one_line(e)
    assert not info.engine_path.exists() and not info.metadata_path.exists()


@pytest.mark.gpu
def test_fastv_tensorrt_greedy_equals_onnxruntime(exported, pixels):
    """On the GPU: the FastV engines keep the same image tokens and give ORT's greedy ids (logits within 1e-3)."""
    from gpu_target import engine_target

    build_vlm(exported, target=engine_target(), max_batch=2, max_sequence=64)
    ids = llava_prompt(exported.layout, N, 2, seed=3)
    with LlavaPipeline(exported.out_dir) as pipe:
        want = pipe.generate(ids.numpy(), pixels[:2].numpy(), STEPS)
    with LlavaPipeline(exported.out_dir, backend="tensorrt") as pipe:
        got = pipe.generate(ids.numpy(), pixels[:2].numpy(), STEPS)
    np.testing.assert_array_equal(got.inner_keep_idx, want.inner_keep_idx)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logits, want.logits, atol=1e-3, rtol=0)


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
                 "--steps", "4", "--no-build"]) == 0  # the FastV engines: test_fastv_parts_build_engines
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
    (["--inner", "fastv(debias=true)@0:4"], "needs the calibrated bias: pass --inner-bias FILE.npy"),
])
def test_cli_bad_inner_is_one_line(llava_dir, tmp_path, capsys, args, match):
    out = tmp_path / "out"
    assert main(["export-vlm", str(llava_dir), "-o", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tokensieve export-vlm: error: "), err
    assert match in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("num_image_tokens, keep", [(16, 6), (576, 144), (196, 195)])
def test_decode_example_cache_lengths_fit_any_drop(model, num_image_tokens, keep):
    """The decode part's example caches: full-length p and pruned q = p - dropped, distinct and >= 2 however many
    image tokens FastV drops (a fixed p = 12 gave a negative q once more than 11 were dropped: LLaVA-1.5 sizes)."""
    from tokensieve.exporter.vlm.fastv import fastv_decode_spec

    layout = llava_layout(model)
    spec = parse_fastv(f"fastv@{LAYER}:{keep}", layout.num_text_layers, num_image_tokens)
    args = fastv_decode_spec(layout, spec).args
    mask, pruned_mask, past = args[1], args[2], args[4:]
    p, q = mask.shape[1] - 1, pruned_mask.shape[1] - 1
    assert p - q == spec.dropped and q >= 2 and p != q
    assert [t.shape[2] for t in past] == [p if i // 2 <= LAYER else q for i in range(len(past))]
