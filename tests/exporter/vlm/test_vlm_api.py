"""export_vlm / verify_vlm dispatch on the model type: what each architecture takes, and one-line errors for the rest.

The exports themselves (both architectures through export_vlm and verify_vlm) are the module fixtures of
test_llava_parts.py and test_qwen2_vl_parts.py; the checks here stop before any export (plan_vlm runs first), and
write_parts (how export_vlm writes the parts: staged, external data past a threshold) runs on hand-built graphs.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from transformers import ViTConfig, ViTModel

from test_llava_parts import tiny_llava
from test_qwen2_vl_parts import _tiny_qwen2_vl
from tokensieve.errors import ConfigError, ExportError
from tokensieve.exporter.vlm.llava import LlavaLayout
from tokensieve.exporter.vlm.qwen2_vl import ImageLayout
from tokensieve.runtime.onnxruntime_runner import OrtRunner
from tokensieve.vlm_api import export_llava, export_vlm, plan_vlm, vlm_profiles, vlm_type, write_parts


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
    ("qwen", {"grid": (1, 8, 8), "inner": "fastv@1:0.5"}, "layer 1 is out of range; the language model has 2 layers"),
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


def test_plan_gives_the_engine_profiles(llava, qwen):
    """vlm_profiles works from the plan (before any export): the CLI checks --max-batch / --max-sequence there. Qwen2-VL
    parts are batch 1 and their example prompt is K + 9 tokens (7 text, <vision_start>, <vision_end>)."""
    prof = vlm_profiles(plan_vlm(qwen, "attn-mean:6", grid=(1, 8, 8)), max_sequence=100)
    assert prof.batch == (1, 1, 1) and prof.prompt_length == 6 + 9
    assert prof.dims["prefill"] == {"sequence": (1, 15, 100)} and prof.dims["decode"] == {"past_sequence": (0, 15, 100)}
    with pytest.raises(ConfigError, match="exported for batch 1") as e:
        vlm_profiles(plan_vlm(qwen, "attn-mean:6", grid=(1, 8, 8)), max_batch=2)
    _one_line(e)
    assert vlm_profiles(plan_vlm(llava, "cls-topk:4"), max_batch=3).batch == (1, 1, 3)


def _matmul_part(extra: str | None = None) -> ir.Model:
    """y = x @ w with a 16x64 float weight (4 KiB: external at threshold 0) and a 2-element bias (stays inline)."""
    w = numpy_helper.from_array(np.arange(16 * 64, dtype=np.float32).reshape(16, 64) / 1000, "w")
    b = numpy_helper.from_array(np.array([1.0, 2.0], dtype=np.float32).reshape(2, 1), "b")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])]
    if extra:
        nodes.append(helper.make_node(extra, ["x"], ["nz"]))
        outputs.append(helper.make_tensor_value_info("nz", TensorProto.INT64, [2, None]))
    graph = helper.make_graph(nodes, "part", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                              outputs, [w, b])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def test_write_parts_external_data_staging_and_stale_files(tmp_path):
    """threshold 0: each part is <part>.onnx + <part>.onnx.data (the bias stays inline) and runs on ONNX Runtime; a part
    failing its check changes nothing on disk (no part renamed in, no temp file); an inline rewrite deletes the
    now-stale .data files."""
    parts = ("vision", "prefill", "decode")
    x = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)
    want = x @ (np.arange(16 * 64, dtype=np.float32).reshape(16, 64) / 1000) + np.array([[1.0], [2.0]], np.float32)
    models = {k: _matmul_part() for k in parts}
    paths, ops = write_parts(models, tmp_path, external_data_threshold=0)
    assert not models  # handed over: each proto is freed once written
    assert set(paths) == {*parts, *(f"{k}_data" for k in parts)} and ops["vision"] == {"MatMul": 1, "Add": 1}
    proto = onnx.load(str(paths["prefill"]), load_external_data=False)
    assert [t.name for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL] == ["w"]
    assert paths["prefill_data"].stat().st_size == 16 * 64 * 4
    with OrtRunner(paths["decode"]) as runner:
        np.testing.assert_allclose(runner.infer({"x": x})["y"], want, rtol=1e-6)

    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    bad = {"vision": _matmul_part(), "prefill": _matmul_part(), "decode": _matmul_part("NonZero")}
    with pytest.raises(ExportError, match="lm_decode.onnx contains NonZero") as e:
        write_parts(bad, tmp_path, external_data_threshold=10**9)  # inline this time: would replace every file
    _one_line(e)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before

    paths, _ = write_parts({k: _matmul_part() for k in parts}, tmp_path)  # default threshold: inline
    assert set(paths) == set(parts) and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["vision_prune.onnx", "lm_prefill.onnx", "lm_decode.onnx"])
    with OrtRunner(paths["prefill"]) as runner:
        np.testing.assert_allclose(runner.infer({"x": x})["y"], want, rtol=1e-6)
