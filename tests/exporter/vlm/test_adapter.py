"""The VLM model-adapter interface (exporter/vlm/adapter.py) and its registry (exporter/vlm/families.py).

Both families implement every abstract method; the registry maps HF classes (and their subclasses) to them and
refuses anything else in one line; the pipeline takes its family facts from the adapter, so a deliberately wrong
adapter (Qwen2-VL with 1-D positions after FastV's pruning) changes what the model outputs. No ONNX export here:
the torch parts the adapter builds are what export_vlm traces.
"""
from __future__ import annotations

import inspect

import pytest
import torch
from test_llava_parts import _one_line, tiny_llava
from test_qwen2_vl_parts import _tiny_qwen2_vl
from transformers import ViTConfig, ViTModel

import tokensieve.exporter.vlm.qwen2_vl_adapter as qa
from tokensieve.errors import ConfigError
from tokensieve.exporter.vlm.adapter import VlmAdapter
from tokensieve.exporter.vlm.families import ADAPTERS, adapter_by_type, adapter_class, adapter_for
from tokensieve.exporter.vlm.gemma3_adapter import Gemma3Adapter
from tokensieve.exporter.vlm.llava_adapter import LlavaAdapter
from tokensieve.exporter.vlm.qwen2_5_vl_adapter import Qwen25VLAdapter
from tokensieve.exporter.vlm.qwen2_vl_adapter import Qwen2VLAdapter
from tokensieve.vlm_api import plan_vlm


@pytest.fixture(scope="module")
def llava():
    return tiny_llava()


@pytest.fixture(scope="module")
def qwen():
    return _tiny_qwen2_vl()


@pytest.mark.parametrize("cls", [LlavaAdapter, Qwen2VLAdapter, Qwen25VLAdapter, Gemma3Adapter])
def test_adapters_implement_the_whole_interface(cls):
    assert issubclass(cls, VlmAdapter) and not inspect.isabstract(cls)
    for name in ("model_type", "hf_class", "label", "manifest_name", "batched", "static_grid", "default_verify_batch",
                 "prompt_extra", "prompt_extra_what"):
        assert getattr(cls, name) is not None and getattr(cls, name) is not getattr(VlmAdapter, name, None), name
    assert ADAPTERS[cls.hf_class] is cls and adapter_by_type(cls.model_type) is cls
    assert cls.hf_class in cls.label


def test_registry_picks_the_family_and_refuses_others(llava, qwen):
    assert type(adapter_for(llava)) is LlavaAdapter and type(adapter_for(qwen)) is Qwen2VLAdapter
    sub = type("MyLlava", (type(llava),), {})  # a subclass of a registered HF class is that family
    assert adapter_class(sub.__new__(sub)) is LlavaAdapter
    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8))
    for model, got in ((vit, "'vit'"), (torch.nn.Linear(2, 2), "'Linear'")):
        with pytest.raises(ConfigError) as e:
            adapter_for(model)
        msg = _one_line(e)
        assert got in msg and all(hf in msg for hf in ADAPTERS)
    with pytest.raises(ConfigError) as e:
        adapter_by_type("mllama")
    assert "'mllama'" in _one_line(e) and "qwen2_vl" in str(e.value)


def test_family_facts_come_from_the_adapter(llava, qwen):
    """The plan's layout, K, prompt layout and manifest facts are the adapter's: LLaVA batched with a fixed image,
    Qwen2-VL batch 1 with a grid (a video: video placeholders and modality)."""
    a, b = adapter_for(llava), adapter_for(qwen)
    plan_a, plan_b = plan_vlm(llava, "cls-topk:4"), plan_vlm(qwen, "attn-mean:6", grid=(2, 8, 8))
    assert a.manifest_fields(plan_a.layout) == {"modality": "image", "grid_thw": None}
    assert b.manifest_fields(plan_b.layout) == {"modality": "video", "grid_thw": [2, 8, 8]}
    assert b.placeholder_id(plan_b.layout) == qwen.config.video_token_id
    prompt = b.sample_prompt(plan_b.layout, plan_b.num_image_tokens, 1, 0)
    assert int((prompt == qwen.config.video_token_id).sum()) == plan_b.layout.num_merged
    assert a.sample_prompt(plan_a.layout, 4, 3, 0).shape == (3, 4 + a.prompt_extra)
    assert a.sample_pixels(plan_a.layout, 3, 0).shape == (3, 3, 32, 32)
    assert b.sample_pixels(plan_b.layout, 1, 0).shape == (plan_b.layout.num_patches, plan_b.layout.patch_dim)
    assert (a.check_verify_batch(None), b.check_verify_batch(None)) == (2, 1)
    with pytest.raises(ConfigError, match="exported for batch 1") as e:
        b.check_verify_batch(2)
    _one_line(e)
    assert set(a.part_exporters(plan_a, a.vision_module(plan_a))) == {"vision", "prefill", "decode"}


class OneDQwen2VL(Qwen2VLAdapter):
    """Deliberately wrong: after FastV's pruning the kept tokens get 1-D positions 0..T'-1 on all three M-RoPE axes
    instead of keeping their (t, h, w) ids."""

    def gather_positions(self, positions, cols):
        return torch.arange(cols.shape[1]).expand(3, cols.shape[0], -1)


def test_wrong_positions_in_the_adapter_change_the_output(qwen):
    plan = plan_vlm(qwen, "uniform:1.0", grid=(1, 8, 8), inner="fastv@0:8")
    good, wrong = Qwen2VLAdapter(qwen), OneDQwen2VL(qwen)
    vision = good.vision_module(plan)
    prompt = good.sample_prompt(plan.layout, plan.num_image_tokens, 1, 0)
    pixels = good.sample_pixels(plan.layout, 1, 0)
    with torch.no_grad():
        feats, keep = vision(pixels)
    pos, cols, _ = qa.pruned_mrope_positions(qa.prompt_mrope_positions(qwen, prompt, plan.layout),
                                             prompt == good.placeholder_id(plan.layout), keep)
    ids = prompt.gather(1, cols)
    outs = {}
    for name, adapter in (("good", good), ("wrong", wrong)):
        with torch.no_grad():
            outs[name] = adapter.part_modules(plan)["prefill"](ids, feats, pos)
    assert torch.equal(outs["good"][-1], outs["wrong"][-1])  # the same tokens are kept (layer 0 sees every token)
    assert (outs["good"][0] - outs["wrong"][0]).abs().max() > 1e-3  # but the logits after layer 0 move
