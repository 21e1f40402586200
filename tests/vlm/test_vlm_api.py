"""export_vlm / verify_vlm dispatch on the model type: what each architecture takes, and one-line errors for the rest.

The exports themselves (both architectures through export_vlm and verify_vlm) are the module fixtures of
test_llava_parts.py and test_qwen2_vl_parts.py; the checks here stop before any export (plan_vlm runs first).
"""
from __future__ import annotations

import pytest
import torch
from transformers import ViTConfig, ViTModel

from test_llava_parts import tiny_llava
from test_qwen2_vl_parts import _tiny_qwen2_vl
from tokensieve.errors import ConfigError
from tokensieve.exporter.vlm.llava import LlavaLayout
from tokensieve.exporter.vlm.qwen2_vl import ImageLayout
from tokensieve.vlm_api import export_llava, export_vlm, plan_vlm, vlm_type


@pytest.fixture(scope="module")
def llava():
    return tiny_llava()


@pytest.fixture(scope="module")
def qwen():
    return _tiny_qwen2_vl()


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    return msg


def test_plan_dispatches_on_model_type(llava, qwen):
    """The same call shape for both: LLaVA counts patches (after CLIP layer 1), Qwen2-VL merged tokens of its grid."""
    a = plan_vlm(llava, "cls-topk:0.25")
    assert (vlm_type(llava), a.model_type, type(a.layout)) == ("llava", "llava", LlavaLayout)
    assert (a.num_tokens, a.keep, a.num_image_tokens, a.prune) == (16, 4, 4, "cls-topk@1:0.25")
    b = plan_vlm(qwen, "attn-mean:0.5", grid=(1, 8, 8))
    assert (vlm_type(qwen), b.model_type, type(b.layout)) == ("qwen2_vl", "qwen2_vl", ImageLayout)
    assert (b.num_tokens, b.keep, b.num_image_tokens, b.prune) == (16, 8, 8, "attn-mean:0.5")
    assert plan_vlm(qwen, "divprune(loop=false):3", grid=(1, 8, 8)).prune == "divprune(loop=false):3"


@pytest.mark.parametrize("kind", ["linear", "vit"])
def test_unsupported_model_names_the_supported_types(kind, tmp_path):
    if kind == "linear":  # no config at all
        model, got = torch.nn.Linear(2, 2), "'Linear'"
    else:
        model, got = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=64, image_size=32, patch_size=8)), "'vit'"
    with pytest.raises(ConfigError) as e:
        export_vlm(model, tmp_path, "cls-topk:4")
    msg = _one_line(e)
    assert "LlavaForConditionalGeneration" in msg and "Qwen2VLForConditionalGeneration" in msg and got in msg
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("kind, kwargs, words", [
    ("llava", {"grid": (1, 8, 8)}, "grid is for Qwen2-VL"),
    ("qwen", {}, "needs the static image grid"),
    ("qwen", {"grid": (1, 8, 8), "inner": "fastv@1:0.5"}, "LLaVA only"),
    ("qwen", {"grid": (1, 7, 8)}, "multiples of spatial_merge_size"),
    ("qwen", {"grid": (1, 8, 8), "prune": "attn-mean@1:4"}, "METHOD[(options)]:KEEP"),
    ("qwen", {"grid": (1, 8, 8), "prune": "cls-topk:4"}, "[CLS]"),
    ("qwen", {"grid": (1, 8, 8), "prune": "attn-mean:17"}, "[1, 16]"),
    ("llava", {"inner_bias": [0.0] * 4}, "pass inner too"),
])
def test_arguments_that_do_not_fit_the_architecture(llava, qwen, tmp_path, kind, kwargs, words):
    model = llava if kind == "llava" else qwen
    kwargs = {"prune": "cls-topk:4" if kind == "llava" else "attn-mean:4"} | kwargs
    with pytest.raises(ConfigError) as e:
        export_vlm(model, tmp_path, kwargs.pop("prune"), **kwargs)
    assert words in _one_line(e)
    assert not any(tmp_path.iterdir())  # nothing written


def test_export_llava_refuses_a_qwen2_vl(qwen, tmp_path):
    with pytest.raises(ConfigError) as e:
        export_llava(qwen, tmp_path, "attn-mean:4")
    assert "LlavaForConditionalGeneration" in _one_line(e) and "'qwen2_vl'" in str(e.value)
