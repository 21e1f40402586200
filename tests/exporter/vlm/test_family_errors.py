"""`tokensieve export-vlm` on bad input, per VLM family: one line on stderr, exit code 2, no traceback, nothing written.

The issue: "a family not supported, a grid or tile count the export layout can't hold, a video passed to an image-only
family give one line and exit 2". Tiny random-init models of every family (LLaVA, Qwen2-VL, Qwen2.5-VL, Gemma 3,
InternVL) and a plain Qwen2 language model (not a VLM) are written once with save_pretrained (module-scoped); each
case runs the CLI in-process (tokensieve.cli.main), as a user would. Cases the CLI refuses before loading the weights
(grid / tiles flags a family does not take) and cases the export plan refuses after loading them (a merge multiple,
a tile count over the language model's positions, a video method, an inner layer out of range) are both here.
"""
from __future__ import annotations

import pytest
import torch
from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, Qwen2_5_VLConfig,
                          Qwen2_5_VLForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig)

from test_internvl import tiny_internvl
from test_llava_parts import tiny_llava
from test_qwen2_vl_parts import _tiny_qwen2_vl
from tokensieve.cli import main


def _tiny_gemma3() -> Gemma3ForConditionalGeneration:
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                image_size=32, patch_size=4)
    text = Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=8, vocab_size=128, max_position_embeddings=256,
                            sliding_window=6, layer_types=["sliding_attention", "full_attention"],
                            query_pre_attn_scalar=8)
    return Gemma3ForConditionalGeneration(Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=16,
                                                       image_token_index=127, boi_token_index=125,
                                                       eoi_token_index=126))


def _tiny_qwen2_5_vl() -> Qwen2_5_VLForConditionalGeneration:
    """The tiny Qwen2-VL's language model and special tokens with a one-block Qwen2.5-VL tower."""
    qwen2 = _tiny_qwen2_vl().config
    tokens = {f"{k}_token_id": getattr(qwen2, f"{k}_token_id") for k in ("image", "video", "vision_start", "vision_end")}
    text = {k: v for k, v in qwen2.text_config.to_dict().items() if k != "model_type"}
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=32, fullatt_block_indexes=[0])
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(vision_config=vision, text_config=text, **tokens))


def _tiny_qwen2_lm() -> Qwen2ForCausalLM:
    return Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    """{name: save_pretrained folder}; "missing" is a folder that does not exist."""
    root = tmp_path_factory.mktemp("vlm_families")
    torch.manual_seed(0)
    builders = {"llava": tiny_llava, "qwen2_vl": _tiny_qwen2_vl, "qwen2_5_vl": _tiny_qwen2_5_vl,
                "gemma3": _tiny_gemma3, "internvl": tiny_internvl, "qwen2_lm": _tiny_qwen2_lm}
    for name, build in builders.items():
        build().save_pretrained(root / name)
    return {**{name: root / name for name in builders}, "missing": root / "missing"}


# every family has 2 decoder layers: FastV may prune after layer 0 only
INNER_RANGE = "the language model has 2 layers, prune after layer 0..0"
QWEN_IMAGE = ["--prune", "attn-mean:0.5", "--grid", "1,8,8"]
CASES = {
    # a folder that is no supported VLM
    "not a VLM": ("qwen2_lm", [], "model_type 'qwen2' is not a supported VLM (llava, qwen2_vl"),
    "no model folder": ("missing", [], "is not a Hugging Face model folder (no config.json)"),
    # a grid the family cannot hold: a grid for a fixed-size family, a wrong merge multiple, no grid for Qwen2-VL
    "grid llava": ("llava", ["--grid", "1,8,8"], "LLaVA's image size comes from its vision config, drop --grid"),
    "grid gemma3": ("gemma3", ["--prune", "attn-mean:0.5", "--grid", "1,8,8"],
                    "Gemma 3's image size comes from its vision config, drop --grid"),
    "grid internvl": ("internvl", ["--grid", "1,8,8"], "InternVL's image size comes from its vision config"),
    "grid merge qwen2_vl": ("qwen2_vl", ["--prune", "attn-mean:0.5", "--grid", "1,7,7"],
                            "multiples of spatial_merge_size=2"),
    "grid merge qwen2_5_vl": ("qwen2_5_vl", ["--prune", "attn-mean:0.5", "--grid", "1,6,7"],
                              "multiples of spatial_merge_size=2"),
    "no grid qwen2_vl": ("qwen2_vl", ["--prune", "attn-mean:0.5"], "needs the static image grid: pass --grid t,h,w"),
    # tiles: a family without tiles, a tile count InternVL's export cannot hold
    "tiles llava": ("llava", ["--tiles", "2"], "--tiles is for InternVL; a LLaVA takes no tiles, drop --tiles"),
    "tiles gemma3": ("gemma3", ["--prune", "attn-mean:0.5", "--tiles", "2"], "a Gemma 3 takes no tiles"),
    "tiles qwen2_vl": ("qwen2_vl", [*QWEN_IMAGE, "--tiles", "2"], "a Qwen2-VL takes no tiles"),
    "tiles qwen2_5_vl": ("qwen2_5_vl", [*QWEN_IMAGE, "--tiles", "2"], "a Qwen2.5-VL takes no tiles"),
    "tiles 0 internvl": ("internvl", ["--tiles", "0"], "--tiles 0 must be >= 1"),
    "tiles 100 internvl": ("internvl", ["--tiles", "100"],
                           "exceed the language model's max_position_embeddings 256; lower tiles or keep"),
    # a video for an image-only family: a video grid, a video method
    "video grid llava": ("llava", ["--grid", "2,8,8"], "is a video grid (t > 1), but LLaVA takes one image"),
    "video grid gemma3": ("gemma3", ["--prune", "attn-mean:0.5", "--grid", "4,8,8"],
                          "is a video grid (t > 1), but Gemma 3 takes one image"),
    "video grid internvl": ("internvl", ["--grid", "2,8,8"], "is a video grid (t > 1), but InternVL takes one image"),
    "video method llava": ("llava", ["--prune", "evs:0.5"], "evs is a video method"),
    "video method gemma3": ("gemma3", ["--prune", "evs:0.5"], "evs is a video method"),
    "video method internvl": ("internvl", ["--prune", "evs:0.5"], "evs is a video method"),
    # an inner layer out of range
    "inner llava": ("llava", ["--inner", "fastv@2:0.5"], f"fastv layer 2 is out of range; {INNER_RANGE}"),
    "inner qwen2_vl": ("qwen2_vl", [*QWEN_IMAGE, "--inner", "fastv@5:0.5"], INNER_RANGE),
    "inner qwen2_5_vl": ("qwen2_5_vl", [*QWEN_IMAGE, "--inner", "fastv@1:0.5"], INNER_RANGE),
    "inner gemma3": ("gemma3", ["--prune", "attn-mean:0.5", "--inner", "fastv@1:0.5"], INNER_RANGE),
    "inner internvl": ("internvl", ["--inner", "fastv@3:4"], INNER_RANGE),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_2(folders, tmp_path, capsys, case):
    """Exit code 2, exactly one stderr line `tokensieve export-vlm: error: ...` naming what is wrong, no traceback,
    no output folder."""
    family, args, words = CASES[case]
    out = tmp_path / "out"
    rc = main(["export-vlm", str(folders[family]), "-o", str(out), "--no-build", *args])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, (rc, captured.err)
    assert lines[0].startswith("tokensieve export-vlm: error: ") and words in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out and not out.exists()
