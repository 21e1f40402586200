"""The bundled ViT-S with one method of each graph family builds TensorRT-RTX sm86 engines in fp32 and fp16, without a
GPU; DivPrune also with the DiversitySelect plugin swapped in. (cls-topk: test_fp16_engines.) Slow: one ViT-S export
(~30 s) holding a stage of every family, shared by both tests; a family whose graph TensorRT-RTX cannot build fails
both builds (the error names the node)."""
from __future__ import annotations

import pytest
import torch

import tokensieve
from tokensieve import api
from tokensieve.runtime.tensorrt_flavors import available_flavors

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(available_flavors()["tensorrt_rtx"] is None, reason="tensorrt-rtx is not installed")]

# family -> its stage on the 12-block ViT-S (196 patches), chained into one recipe (HiPrune needs the full patch grid,
# so it comes first; keeping 0.9 each leaves every later stage >= 130 tokens)
FAMILIES = {
    "attention graph (hiprune)": "hiprune@2:0.9",
    "hidden-state (ttv)": "ttv@4:0.9",
    "merging (tome)": "tome@6:0.9",
    "diversity (divprune)": "divprune@8:0.9",
    "adaptive count (adaptive)": "adaptive@10:0.9",
}
RECIPE = "+".join(FAMILIES.values())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(the model.onnx of the one export, its ExportResult's stages). Only the deployable model is written: api.save
    would also convert the dense baseline, which no test here builds."""
    model, shape = tokensieve.load_model("default")
    result = api.export(model, torch.randn(*shape, generator=torch.Generator().manual_seed(0)), RECIPE)
    assert [s.stage.method for s in result.stages] == [r.split("@")[0] for r in FAMILIES.values()]
    assert result.tokens[0] == 197 and all(a > b for a, b in zip(result.tokens, result.tokens[1:]))  # every stage cuts
    path = tmp_path_factory.mktemp("vit_s") / "model.onnx"
    path.write_bytes(result.onnx_model.SerializeToString())
    return path, result.stages


def test_fp32_and_fp16_engines_build(exported, tmp_path):
    onnx_path, _ = exported
    fp32 = api.build(onnx_path, tmp_path / "fp32.engine", target="rtx-sm86", precision="fp32", max_batch=2)
    fp16 = api.build(onnx_path, tmp_path / "fp16.engine", target="rtx-sm86", precision="fp16", max_batch=2)
    print(f"{RECIPE}: fp32 {fp32.size_bytes / 2**20:.1f} MiB in {fp32.build_seconds:.1f} s, "
          f"fp16 {fp16.size_bytes / 2**20:.1f} MiB in {fp16.build_seconds:.1f} s")
    assert fp32.metadata["precision"] == "fp32" and fp16.metadata["precision"] == "fp16"
    assert 0.4 <= fp16.size_bytes / fp32.size_bytes <= 0.7  # the weights halve


def test_divprune_engine_with_the_diversity_plugin(exported, plugin_lib, tmp_path):
    onnx_path, stages = exported
    info = api.build(onnx_path, tmp_path / "plugin.engine", target="rtx-sm86", max_batch=2, plugin_library=plugin_lib)
    subs = info.metadata["plugin_substitutions"]
    divprune = next(s for s in stages if s.stage.method == "divprune")
    assert [s["method"] for s in subs] == ["divprune"] and subs[0]["k"] == divprune.keep == 130
