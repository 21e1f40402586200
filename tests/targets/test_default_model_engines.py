"""The bundled ViT-S with one method of each graph family builds TensorRT-RTX sm86 engines in fp32 and fp16, without a
GPU; DivPrune also with the DiversitySelect plugin swapped in. (cls-topk: test_fp16_engines.) Slow: one ViT-S export
per family (~15-20 s each), shared by every test that builds from it."""
from __future__ import annotations

import pytest
import torch

import tokensieve
from tokensieve import api
from tokensieve.runtime.tensorrt_flavors import available_flavors

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(available_flavors()["tensorrt_rtx"] is None, reason="tensorrt-rtx is not installed")]

# family -> recipe on the 12-block ViT-S (196 patches)
FAMILIES = {
    "hidden-state (ttv)": "ttv@4:0.5",
    "merging (tome)": "tome@4:0.5",
    "diversity (divprune)": "divprune@4:0.5",
    "attention graph (hiprune)": "hiprune@4:0.5",
    "adaptive count (adaptive)": "adaptive@4:0.5",
}


@pytest.fixture(scope="module")
def vit_s():
    model, shape = tokensieve.load_model("default")
    return model, torch.randn(*shape, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def exported(vit_s, tmp_path_factory):
    """family -> the model.onnx of its export, exported once on first use (the divprune one serves both tests).

    Only the deployable model is written: api.save would also convert the dense baseline (a third of an export's
    time), which no test here builds. The ExportResult is dropped once written, so one ViT-S export is in memory."""
    paths = {}

    def get(family: str):
        if family not in paths:
            result = api.export(*vit_s, FAMILIES[family])
            path = tmp_path_factory.mktemp("vit_s") / "model.onnx"
            path.write_bytes(result.onnx_model.SerializeToString())
            paths[family] = path
        return paths[family]

    return get


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fp32_and_fp16_engines_build(exported, family, tmp_path):
    onnx_path = exported(family)
    fp32 = api.build(onnx_path, tmp_path / "fp32.engine", target="rtx-sm86", precision="fp32", max_batch=2)
    fp16 = api.build(onnx_path, tmp_path / "fp16.engine", target="rtx-sm86", precision="fp16", max_batch=2)
    print(f"{family}: fp32 {fp32.size_bytes / 2**20:.1f} MiB in {fp32.build_seconds:.1f} s, "
          f"fp16 {fp16.size_bytes / 2**20:.1f} MiB in {fp16.build_seconds:.1f} s")
    assert fp32.metadata["precision"] == "fp32" and fp16.metadata["precision"] == "fp16"
    assert 0.4 <= fp16.size_bytes / fp32.size_bytes <= 0.7  # the weights halve


def test_divprune_engine_with_the_diversity_plugin(exported, plugin_lib, tmp_path):
    info = api.build(exported("diversity (divprune)"), tmp_path / "plugin.engine", target="rtx-sm86", max_batch=2,
                     plugin_library=plugin_lib)
    subs = info.metadata["plugin_substitutions"]
    assert [s["method"] for s in subs] == ["divprune"] and subs[0]["k"] == 98
