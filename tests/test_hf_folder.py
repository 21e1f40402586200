"""An export folder is a Hugging Face-style folder: config.json and preprocessor_config.json beside the ONNX files
(transformers' AutoConfig / AutoImageProcessor read them; optimum's ORTModelForImageClassification loads the folder),
ONNX metadata_props say what the file is (recipe, token counts, tokensieve version), and no absolute path of the
exporting machine is inside an ONNX file."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import tokensieve
from tiny_models import tiny_vit_hf
from tokensieve import api
from tokensieve.models import _resized_processor, hf_files, load_model

REPO = Path(tokensieve.__file__).resolve().parents[1]   # the checkout (core/ is the package tokensieve)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny HF ViT folder (with a processor config) exported at 48x48 (its config says 32): -> (model folder, OUT)."""
    from transformers import ViTImageProcessor

    root = tmp_path_factory.mktemp("hf-folder")
    folder, out = root / "vit", root / "out"
    model, _ = tiny_vit_hf()
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    api.export_folder(str(folder), "cls-topk@1:0.5", out, build=False, bench=False, verify_inputs=1, image_size=(48, 48))
    return folder, out


def test_vit_exported_at_another_size(exported):
    """--image-size on a ViT (interpolate_pos_encoding=True): 6 x 6 patches instead of 4 x 4, tokens follow."""
    import onnxruntime as ort

    folder, out = exported
    report = json.loads((out / "report.json").read_text())
    assert report["input_shape"] == [1, 3, 48, 48] and report["tokens_per_block"] == [37, 37, 19, 19]
    assert report["verify"]["passed"] and report["verify"]["indices_match"] == [True]
    sess = ort.InferenceSession(str(out / "dense.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_modelmeta().custom_metadata_map["tokensieve.part"] == "dense"   # what ORT users see
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(5))
    model, _ = tiny_vit_hf()
    with torch.no_grad():
        want = model(pixel_values=x, interpolate_pos_encoding=True).logits
    assert sess.get_inputs()[0].shape == ["batch", 3, 48, 48]
    np.testing.assert_allclose(sess.run(None, {"pixel_values": x.numpy()})[0], want.numpy(), atol=1e-5)


def test_folder_holds_the_hf_configs_and_the_report_lists_them(exported):
    from transformers import AutoConfig, AutoImageProcessor

    folder, out = exported
    report = json.loads((out / "report.json").read_text())
    assert report["files"]["config"] == str(out / "config.json")
    assert report["files"]["preprocessor"] == str(out / "preprocessor_config.json")
    processor, own = (json.loads((f / "preprocessor_config.json").read_text()) for f in (out, folder))
    assert processor == {**own, "size": {"height": 48, "width": 48}}   # images come out as the ONNX takes them
    config = AutoConfig.from_pretrained(out)   # exported at 48x48: the config says what the ONNX takes
    assert config.architectures == ["ViTForImageClassification"] and config.image_size == 48
    assert config.hidden_size == 48 and config.num_labels == 10
    assert type(AutoImageProcessor.from_pretrained(out)).__name__.startswith("ViTImageProcessor")


def test_configs_copied_as_they_are_or_written_for_builtin_models(exported):
    folder, _ = exported
    model, shape = load_model(folder)
    files = hf_files(folder, model, shape)   # the folder's own class and size: its files, byte for byte
    assert files == {name: (folder / name).read_bytes() for name in ("config.json", "preprocessor_config.json")}
    crop = json.dumps({"do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "size": {"shortest_edge": 256}})
    assert json.loads(_resized_processor(crop.encode(), 112, 112)) == {
        "do_center_crop": True, "crop_size": {"height": 112, "width": 112}, "size": {"shortest_edge": 128}}
    assert _resized_processor(crop.encode(), 224, 224) == crop.encode()   # already what the ONNX takes
    model, shape = load_model("tiny")
    files = hf_files("tiny", model, shape)   # built from a config in code: that config, and a processor at its size
    config = json.loads(files["config.json"])
    assert config["architectures"] == ["ViTForImageClassification"] and config["image_size"] == 64
    assert config["hidden_size"] == 64 and "_name_or_path" not in config
    assert json.loads(files["preprocessor_config.json"])["size"] == {"height": 64, "width": 64}


def test_onnx_metadata_and_no_machine_paths(exported, tmp_path_factory):
    folder, out = exported
    expect = {"tokensieve.version": tokensieve.__version__, "tokensieve.recipe": "cls-topk@1:0.5",
              "tokensieve.input_shape": "[3, 48, 48]", "tokensieve.outputs": '["logits"]'}
    pruned = {p.key: p.value for p in onnx.load(out / "model.onnx").metadata_props}
    dense = {p.key: p.value for p in onnx.load(out / "dense.onnx").metadata_props}
    assert pruned.items() >= {**expect, "tokensieve.part": "pruned", "tokensieve.tokens": "[37, 19]",
                              "tokensieve.tokens_per_block": "[37, 37, 19, 19]"}.items()
    assert dense.items() >= {**expect, "tokensieve.part": "dense", "tokensieve.tokens_per_block": "[37, 37, 37, 37]"}.items()
    assert json.loads(pruned["tokensieve.recipe_json"])["stages"][0]["method"] == "cls-topk"
    roots = {str(folder.parent), str(REPO), str(Path(tokensieve.__file__).resolve().parent), os.path.expanduser("~")}
    for name in ("model.onnx", "model.debug.onnx", "dense.onnx"):
        data = (out / name).read_bytes()
        assert b"pkg.torch.onnx.stack_trace" in data and b"modeling_vit.py" in data   # traces kept, paths relative
        found = [r for r in roots if len(r) > 1 and r.encode() in data]
        assert not found, f"{name} holds {found}"


OPTIMUM_HOW = ("optimum is not installed (optimum-onnx pins transformers<4.58, tokensieve needs 5.x); overlay it: pip "
               "install --target /tmp/optsite --no-deps optimum-onnx 'optimum~=2.1.0' 'transformers==4.57.*' "
               "'huggingface_hub<1.0' 'tokenizers>=0.22,<0.23' requests charset-normalizer urllib3 idna certifi, then "
               "PYTHONPATH=/tmp/optsite python -m pytest -m optimum tests/test_hf_folder.py")


@pytest.mark.optimum
def test_optimum_loads_the_folder(exported):
    """optimum's ORTModelForImageClassification loads the export folder (config.json + model.onnx) and gives
    model.onnx's logits; transformers' processor from the same folder feeds it. Run as OPTIMUM_HOW says (passed so
    with optimum 2.1.0, optimum-onnx 0.1.0, transformers 4.57.6 over this venv: tokensieve exports with 4.57 too)."""
    ort_models = pytest.importorskip("optimum.onnxruntime", reason=OPTIMUM_HOW)
    _, out = exported
    model = ort_models.ORTModelForImageClassification.from_pretrained(out, file_name="model.onnx")
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(4))
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    want = sess.run(None, {"pixel_values": x.numpy()})[0]
    np.testing.assert_allclose(model(pixel_values=x).logits.numpy(), want, atol=1e-5)
    from transformers import AutoImageProcessor

    image = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    inputs = AutoImageProcessor.from_pretrained(out)(images=image, return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 48, 48)   # the exported size, not the model folder's 32
    assert model(**inputs).logits.shape == (1, 10)
