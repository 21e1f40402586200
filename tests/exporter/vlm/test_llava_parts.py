"""LLaVA in parts with outer (FasterVLM-style) pruning: ORT greedy generation vs the same pruning in eager torch.

One tiny random-init LLaVA (CLIP 32 px / patch 8 = 16 patches, 3 layers; Llama 2 layers, vocab 128), exported
once per module with cls-topk keeping 4 of 16 patches, every part with external data (external_data_threshold=0,
the layout of a > 2 GB real-size part), so each test below also runs on `<part>.onnx` + `<part>.onnx.data`; the
FastV and Qwen2-VL exports (test_fastv, test_export_vlm_cli) write inline parts. Engines: one build_vlm of it (~2 s).
"""
from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from tokensieve.errors import ConfigError, TargetError
from tokensieve.exporter.vlm.export_part import export_part
from tokensieve.exporter.vlm.llava import VisionPrune, llava_layout, vision_spec
from tokensieve.graph_passes.onnx.check_static import FORBIDDEN_OPS, check_static
from tokensieve.runtime.llava_pipeline import LlavaOrtPipeline, LlavaPipeline
from tokensieve.vlm_api import (build_vlm, export_llava, export_vlm, llava_prompt, reference_generate,
                                unpruned_generate, verify_llava, verify_vlm, vlm_profiles)

NUM_PATCHES, KEEP, STEPS = 16, 4, 8


def tiny_llava(strategy: str = "default", text_layers: int = 2) -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=text_layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=127, projector_hidden_act="gelu",
                      vision_feature_select_strategy=strategy)
    return LlavaForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    return export_vlm(model, tmp_path_factory.mktemp("llava"), f"cls-topk:{KEEP}", external_data_threshold=0)


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


def test_export_layout(exported):
    assert exported.model_type == "llava" and exported.grid is None and exported.inner is None
    assert exported.keep == KEEP and exported.num_tokens == NUM_PATCHES and exported.num_image_tokens == KEEP
    assert exported.prune == f"cls-topk@1:{KEEP}" and exported.method == "cls-topk"
    assert exported.layout.feature_layer == 1  # vision_feature_layer -2 of 3 layers = the output of layer 1
    assert all(p.is_file() for p in exported.paths.values())
    assert all(exported.sizes[k] > 0 for k in ("vision", "prefill", "decode", "embed"))


def test_ort_greedy_matches_eager(exported):
    report = verify_vlm(exported, max_new_tokens=STEPS)  # LLaVA: batch 2 by default
    assert report.model_type == "llava" and report.batch == 2 and report.passed, report.to_dict()
    assert report.tokens_match and report.keep_idx_match, report.to_dict()
    assert report.max_abs_diff_logits <= 1e-5 and report.max_abs_diff_features <= 1e-5, report.to_dict()
    assert np.array(report.tokens).shape == (2, STEPS)
    assert verify_llava(exported, batch=1, max_new_tokens=2).to_dict()["passed"]  # the wrapper = verify_vlm


@pytest.mark.parametrize("batch", [1, 3])
def test_batch_is_dynamic(exported, model, pixels, batch):
    """Exported at batch 2; batch 1 and 3 run and match eager."""
    ids = llava_prompt(exported.layout, KEEP, batch, seed=batch)
    with LlavaOrtPipeline(exported.out_dir) as pipe:
        got = pipe.generate(ids.numpy(), pixels[:batch].numpy(), STEPS)
    want = reference_generate(model, exported.vision, ids, pixels[:batch], STEPS)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.keep_idx, want.keep_idx)
    np.testing.assert_allclose(got.logits, want.logits, atol=1e-5, rtol=0)


def test_left_padded_prompt_matches_eager(exported, model, pixels):
    """attention_mask with left padding: positions cumsum(mask) - 1 in both, same ids and logits."""
    ids = llava_prompt(exported.layout, KEEP, 2, before=5, seed=3)
    mask = torch.ones_like(ids)
    mask[0, :2], ids[0, :2] = 0, 0
    with LlavaOrtPipeline(exported.out_dir) as pipe:
        got = pipe.generate(ids.numpy(), pixels[:2].numpy(), STEPS, attention_mask=mask.numpy())
    want = reference_generate(model, exported.vision, ids, pixels[:2], STEPS, attention_mask=mask)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logits, want.logits, atol=1e-5, rtol=0)


def test_keep_idx_is_fastervlm_selection(exported, model, pixels):
    """Independent reference: HF's eager attention of the feature layer, [CLS] row, head mean, top-K, sorted. The
    features are HF LLaVA's own projected features at those patches. Fails if the pruning were skipped (shape)."""
    with LlavaOrtPipeline(exported.out_dir) as pipe:
        features, keep_idx = pipe.image_features(pixels.numpy())
    eager = copy.deepcopy(model)
    eager.model.vision_tower.config._attn_implementation = "eager"
    with torch.no_grad():
        att = eager.model.vision_tower(pixels, output_attentions=True).attentions[exported.layout.feature_layer]
        want_idx = att[:, :, 0, 1:].mean(1).topk(KEEP, dim=-1).indices.sort(dim=-1).values
        full = torch.stack(list(model.model.get_image_features(pixel_values=pixels).pooler_output))
    assert full.shape[1] == NUM_PATCHES and features.shape == (3, KEEP, full.shape[-1])
    np.testing.assert_array_equal(keep_idx, want_idx.numpy())
    want = full.gather(1, want_idx[..., None].expand(-1, -1, full.shape[-1]))
    np.testing.assert_allclose(features, want.numpy(), atol=1e-5, rtol=0)
    assert not (keep_idx == np.arange(KEEP)).all(axis=1).all()  # a real selection, not the first K patches


def test_vision_onnx_is_static(exported):
    model = onnx.load(str(exported.paths["vision"]))
    census = check_static(model)["ops"]  # raises on NonZero/ScatterND/If/Loop or any unknown size but batch
    assert not set(census) & set(FORBIDDEN_OPS)
    assert census.get("TopK", 0) >= 1
    dims = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    assert dims == {"image_features": ["batch", KEEP, 32], "keep_idx": ["batch", KEEP]}


@pytest.mark.parametrize("strategy", ["default", "full"])
def test_all_patches_equal_unpruned(strategy, pixels):
    """Control of the pruning path: K = every patch gives HF LLaVA's own generation ('full': + the [CLS] feature)."""
    model = tiny_llava(strategy)
    layout = llava_layout(model)
    vision = VisionPrune(model, layout, "cls-topk", NUM_PATCHES, {})
    ids = llava_prompt(layout, NUM_PATCHES + layout.keep_cls, 3, seed=2)
    pruned = reference_generate(model, vision, ids, pixels, STEPS)
    tokens, logits = unpruned_generate(model, ids, pixels, STEPS)
    np.testing.assert_array_equal(pruned.keep_idx, np.arange(NUM_PATCHES)[None].repeat(3, 0))
    np.testing.assert_array_equal(pruned.tokens, tokens)
    np.testing.assert_allclose(pruned.logits, logits, atol=1e-6, rtol=0)
    # and a real budget changes what the LLM sees: fewer image tokens, other logits
    small = reference_generate(model, VisionPrune(model, layout, "cls-topk", KEEP, {}),
                               llava_prompt(layout, KEEP + layout.keep_cls, 3, seed=2), pixels, STEPS)
    assert small.image_features.shape[1] == KEEP + layout.keep_cls
    assert np.abs(small.logits - logits).max() > 1e-3


@pytest.mark.parametrize("method, options", [("divprune", {}), ("attn-mean", {}), ("cls-topk", {"recycle": True})])
def test_cls_free_method_exports(model, pixels, method, options):
    """A CLS-free method (or recycling) in the same stage: ORT keep_idx and features equal eager, the graph stays
    static; recycle keeps the same patches as without it but changes the features."""
    layout = llava_layout(model)
    vision = VisionPrune(model, layout, method, 5, options).eval()  # {}: VisionPrune fills in the defaults
    proto = ir.to_proto(export_part(vision, vision_spec(layout), what=method))
    check_static(proto)
    got_features, got_idx = ort.InferenceSession(proto.SerializeToString()).run(None, {"pixel_values": pixels.numpy()})
    with torch.no_grad():
        features, idx = vision(pixels)
    np.testing.assert_array_equal(got_idx, idx.numpy())
    np.testing.assert_allclose(got_features, features.numpy(), atol=1e-5, rtol=0)
    assert (np.diff(got_idx, axis=1) > 0).all()  # ascending: original order kept
    if options.get("recycle"):
        with torch.no_grad():
            plain, plain_idx = VisionPrune(model, layout, method, 5, {}).eval()(pixels)
        np.testing.assert_array_equal(plain_idx.numpy(), got_idx)
        assert np.abs(plain.numpy() - got_features).max() > 1e-3


@pytest.mark.parametrize("recipe, match", [
    ("cls-topk:17", "out of range"),
    ("cls-topk:0", "out of range"),
    ("cls-topk@0:4", "after CLIP layer 1"),
    ("nope:4", "Unknown method"),
    ("tome:4", "merges tokens"),
    ("cls-topk(fuse=true):4", "fuse/pospad"),
    ("cls-topk@1:0.5+divprune@2:0.5", "Two stages|exactly one stage"),
])
def test_bad_recipe_is_one_line(model, tmp_path, recipe, match):
    with pytest.raises(ConfigError, match=match) as e:
        export_vlm(model, tmp_path, recipe)
    _one_line(e)
    assert not any(tmp_path.iterdir())  # nothing written


def test_not_llava_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="LlavaForConditionalGeneration") as e:
        export_llava(torch.nn.Linear(2, 2), tmp_path, "cls-topk:4")
    _one_line(e)


def test_wrong_image_token_count_is_one_line(exported, pixels):
    ids = llava_prompt(exported.layout, KEEP + 1, 2)
    with LlavaOrtPipeline(exported.out_dir) as pipe, pytest.raises(ConfigError, match="exactly 4") as e:
        pipe.generate(ids.numpy(), pixels[:2].numpy(), STEPS)
    _one_line(e)


def test_vision_engine_builds_for_rtx_sm86(exported, tmp_path):
    pytest.importorskip("tensorrt_rtx")
    from tokensieve.targets.tensorrt import BuildSpec, build_engine

    info = build_engine(exported.paths["vision"], tmp_path / "vision_prune.engine", BuildSpec(target="rtx-sm86", max_batch=4))
    assert info.size_bytes > 0 and info.engine_path.is_file()


def test_lm_axes_are_named_for_dims(exported, tmp_path):
    """The LM parts' dynamic axes are `sequence` and `past_sequence`; decode's mask is `past_sequence + 1` (derived,
    not a name of its own), so `tokensieve build lm_decode.onnx --dims sequence=...,past_sequence=...` sizes it."""
    def dims(part):
        proto = onnx.load(str(exported.paths[part]))
        return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}

    assert dims("prefill") == {"inputs_embeds": ["batch", "sequence", 32], "attention_mask": ["batch", "sequence"],
                               "position_ids": ["batch", "sequence"]}
    decode = dims("decode")
    assert decode["attention_mask"] == ["batch", "past_sequence + 1"]
    past = [f"past.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert all(decode[name] == ["batch", 2, "past_sequence", 8] for name in past)
    pytest.importorskip("tensorrt_rtx")
    from tokensieve.cli import main

    engine = tmp_path / "lm_decode.engine"
    assert main(["build", str(exported.paths["decode"]), "--max-batch", "4", "--dims",
                 "sequence=1:16:64,past_sequence=0:16:64", "-o", str(engine)]) == 0
    meta = json.loads(engine.with_name(engine.name + ".json").read_text())
    assert meta["optimization_profile"]["attention_mask"] == {"min": [1, 1], "opt": [1, 17], "max": [4, 65]}
    assert meta["optimization_profile"]["past.0.key"] == {"min": [1, 2, 0, 8], "opt": [1, 2, 16, 8],
                                                          "max": [4, 2, 64, 8]}
    assert meta["dims"] == {"past_sequence": {"min": 0, "opt": 16, "max": 64},
                            "past_sequence + 1": {"min": 1, "opt": 17, "max": 65}}


# --------------------------------------------------------------------------- external data


def test_parts_are_written_with_external_data(exported):
    """external_data_threshold=0: each part is <part>.onnx + one <part>.onnx.data next to it, listed in the manifest;
    the .onnx holds no weight bytes of its own (every initializer of 1 KiB or more points into the .data file by its
    final name), and no temporary file is left behind. ORT, the pipeline and verify run on them (the tests above)."""
    assert set(exported.external_data) == {"vision", "prefill", "decode"}
    manifest = json.loads(exported.paths["manifest"].read_text())
    for part, data in exported.external_data.items():
        onnx_path = exported.paths[part]
        assert data == onnx_path.with_name(onnx_path.name + ".data") and data.is_file()
        assert manifest["files"][f"{part}_data"] == data.name and exported.sizes[f"{part}_data"] == data.stat().st_size
        proto = onnx.load(str(onnx_path), load_external_data=False)
        external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        inline = [t for t in proto.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
        assert external and all(len(t.raw_data) < 1024 for t in inline)
        assert {e.value for t in external for e in t.external_data if e.key == "location"} == {data.name}
        end = max(int(e.value) for t in external for e in t.external_data if e.key == "offset")
        assert end < data.stat().st_size  # the offsets point into the file written
    assert not list(exported.out_dir.glob(".*.tmp"))


def test_external_data_threshold_is_checked(model, tmp_path):
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="external_data_threshold") as e:
            export_vlm(model, tmp_path, f"cls-topk:{KEEP}", external_data_threshold=bad)
        _one_line(e)
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------- engines


@pytest.fixture(scope="module")
def engines(exported):
    """One engine per part of the external-data export, batch 1..2, sequence up to 64 (TensorRT-RTX, SM86)."""
    pytest.importorskip("tensorrt_rtx")
    return build_vlm(exported, target="rtx-sm86", max_batch=2, max_sequence=64)


def test_profiles_follow_the_parts(exported):
    """batch 1..B; prefill sequence 1..S with opt = verify's prompt (4 text + K image + 3 text); decode past 0..S."""
    prof = vlm_profiles(exported, max_batch=2, max_sequence=64)
    assert prof.batch == (1, 1, 2) and prof.prompt_length == KEEP + 7
    assert prof.dims == {"vision": {}, "prefill": {"sequence": (1, KEEP + 7, 64)},
                         "decode": {"past_sequence": (0, KEEP + 7, 64)}}
    assert vlm_profiles(exported).max_sequence == 256  # default: the Llama config's max_position_embeddings
    for kwargs, words in [({"max_sequence": KEEP + 6}, "shorter than the example prompt"),
                          ({"max_batch": 0}, "--max-batch 0"), ({"max_sequence": 0}, "--max-sequence 0")]:
        with pytest.raises(ConfigError, match=words) as e:
            vlm_profiles(exported, **kwargs)
        _one_line(e)


def test_build_vlm_builds_every_part_from_external_data(exported, engines):
    """Three engines next to the parts, each with its .json; the manifest lists file, target and profile of each;
    the LM engines' profiles are the derived ones (decode's mask axis follows past_sequence + 1)."""
    assert set(engines) == {"vision", "prefill", "decode"}
    manifest = json.loads(exported.paths["manifest"].read_text())
    for part, info in engines.items():
        assert info.engine_path.parent == exported.out_dir and info.engine_path.is_file() and info.size_bytes > 0
        entry = manifest["engines"][part]
        assert entry["file"] == info.engine_path.name and entry["target"] == "rtx-sm86"
        assert entry["precision"] == "fp32" and entry["size_bytes"] == info.size_bytes
        assert info.metadata["tokensieve"]["vlm_part"] == part
        assert info.metadata["onnx"]["file"] == exported.paths[part].name
    assert manifest["engines"]["vision"]["profile"]["pixel_values"]["max"] == [2, 3, 32, 32]
    prefill, decode = manifest["engines"]["prefill"], manifest["engines"]["decode"]
    assert prefill["dims"] == {"sequence": {"min": 1, "opt": KEEP + 7, "max": 64}}
    assert prefill["profile"]["inputs_embeds"] == {"min": [1, 1, 32], "opt": [1, KEEP + 7, 32], "max": [2, 64, 32]}
    assert decode["profile"]["attention_mask"] == {"min": [1, 1], "opt": [1, KEEP + 8], "max": [2, 65]}
    assert decode["profile"]["past.1.value"]["max"] == [2, 2, 64, 8]
    assert exported.engines == manifest["engines"]


def test_tensorrt_pipeline_finds_the_engines(exported, engines):
    """backend="tensorrt" opens the manifest's engines (TrtRunner per part); without a GPU, entering it is one line."""
    pipe = LlavaPipeline(exported.out_dir, backend="tensorrt")
    assert [r.engine_path for r in (pipe.vision, pipe.prefill, pipe.decode)] == \
        [engines[k].engine_path for k in ("vision", "prefill", "decode")]
    assert pipe.prefill.dim_ranges["sequence"] == (1, KEEP + 7, 64)
    if not torch.cuda.is_available():  # what TrtRunner needs to deserialize an engine
        with pytest.raises(TargetError, match="needs an NVIDIA GPU") as e:
            with pipe:
                pass
        _one_line(e)
    assert LlavaOrtPipeline is LlavaPipeline


def test_missing_engines_name_the_build_command(exported, tmp_path):
    """A folder exported with --no-build, or whose engine file is gone: one line naming `export-vlm --target`."""
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(exported.out_dir, folder, ignore=shutil.ignore_patterns("*.engine", "*.engine.json"))
    manifest = json.loads((folder / "llava_parts.json").read_text())
    engines = manifest.pop("engines", None)
    (folder / "llava_parts.json").write_text(json.dumps(manifest))
    with pytest.raises(TargetError, match="lists no TensorRT engine for vision_prune.onnx") as e:
        LlavaPipeline(folder, backend="tensorrt")
    assert "tokensieve export-vlm MODEL -o" in _one_line(e) and "--target rtx-smXX" in str(e.value)
    if engines is not None:  # listed, but the file is missing
        (folder / "llava_parts.json").write_text(json.dumps(manifest | {"engines": engines}))
        with pytest.raises(TargetError, match="does not exist") as e:
            LlavaPipeline(folder, backend="tensorrt")
        assert "--target rtx-sm86" in _one_line(e)
    with pytest.raises(ConfigError, match="not one of onnxruntime, tensorrt") as e:
        LlavaPipeline(folder, backend="openvino")
    _one_line(e)


def test_fp16_build_of_a_part_over_the_proto_limit(exported, tmp_path, monkeypatch):
    """The fp16 conversion loads the weights into memory; one over protobuf's 2 GB limit is handed to the parser as a
    temporary external-data copy (here: the limit forced to 0) that is gone after the build."""
    pytest.importorskip("tensorrt_rtx")
    from tokensieve.targets.tensorrt import BuildSpec, build_engine, builder

    monkeypatch.setattr(builder, "PROTO_LIMIT", 0)
    info = build_engine(exported.paths["prefill"], tmp_path / "lm_prefill.fp16.engine",
                        BuildSpec(max_batch=1, precision="fp16", dims={"sequence": (1, 11, 32)}))
    assert info.size_bytes > 0 and info.metadata["precision"] == "fp16"
    assert {p.name for p in tmp_path.iterdir()} == {"lm_prefill.fp16.engine", "lm_prefill.fp16.engine.json"}


@pytest.mark.gpu
def test_tensorrt_greedy_equals_onnxruntime(exported, pixels):
    """On the GPU: the fp32 engines give ORT's greedy ids on batch 1..2 and its logits within 1e-3 (TF32), and
    verify_vlm(backend="tensorrt") passes against eager."""
    from gpu_target import engine_target

    target = engine_target()
    build_vlm(exported, target=target, max_batch=2, max_sequence=64)
    for batch in (1, 2):
        ids = llava_prompt(exported.layout, KEEP, batch, seed=batch)
        with LlavaPipeline(exported.out_dir) as ort_pipe:
            want = ort_pipe.generate(ids.numpy(), pixels[:batch].numpy(), STEPS)
        with LlavaPipeline(exported.out_dir, backend="tensorrt") as trt_pipe:
            got = trt_pipe.generate(ids.numpy(), pixels[:batch].numpy(), STEPS)
        np.testing.assert_array_equal(got.keep_idx, want.keep_idx)
        np.testing.assert_array_equal(got.tokens, want.tokens)
        np.testing.assert_allclose(got.logits, want.logits, atol=1e-3, rtol=0)
    report = verify_vlm(exported, max_new_tokens=STEPS, backend="tensorrt", atol=1e-3)
    assert report.passed and report.backend == "tensorrt", report.to_dict()
