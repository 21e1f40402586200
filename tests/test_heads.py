"""Heads and outputs: a HF folder exports as the class its config names (head included), CLIP / SigLIP folders as
their image-embedding towers, and `--outputs` picks among the model's output fields; every exported output matches
the HF model's own (dense ONNX) and the eager reference (pruned, same kept indices)."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tiny_models import save_tiny_folder
from tokensieve import api
from tokensieve.cli import main
from tokensieve.errors import ConfigError
from tokensieve.models import load_model

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _run(proto, x: torch.Tensor) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"pixel_values": x.numpy()})))


def _export(tmp_path_factory, name: str, recipe: str, outputs):
    """-> (the model as saved, the model as loaded from its folder, the export of the loaded one)."""
    folder = tmp_path_factory.mktemp(name)
    saved = save_tiny_folder(name, folder)
    model, shape = load_model(folder)
    result = api.export(model, torch.randn(*shape), recipe, outputs=outputs)
    ver = api.verify(result, num_inputs=2, batch=2)
    assert ver.passed and all(ver.indices_match), ver   # every output equal to eager, kept indices identical
    return saved, model, result


def _names(proto) -> list[str]:
    return [o.name for o in proto.graph.output]


def _dense(result, x: torch.Tensor) -> dict[str, np.ndarray]:
    """The traced dense program's outputs by name (the ONNX files are checked against the eager model by verify;
    converting dense.onnx too would double each test's time)."""
    with torch.no_grad():
        out = result.dense_program.module()(x)
    return dict(zip(result.outputs, (t.numpy() for t in (out if isinstance(out, tuple) else (out,)))))


def test_distilled_deit_keeps_its_teacher_head(tmp_path_factory):
    saved, model, result = _export(tmp_path_factory, "deit_teacher", "cls-topk@0:0.5",
                                   "logits,cls_logits,distillation_logits")
    assert type(model).__name__ == "DeiTForImageClassificationWithTeacher"   # not a bare encoder
    assert api.choose_outputs(model, X, None) == ["logits"]                   # default: what the class returns first
    assert _names(result.onnx_model) == ["logits", "cls_logits", "distillation_logits"]
    assert _names(result.debug_onnx) == ["logits", "cls_logits", "distillation_logits", "kept_idx.0"]
    assert result.summary()["outputs"] == ["logits", "cls_logits", "distillation_logits"]
    got = _dense(result, X)   # dense.onnx against a HF forward: tests/test_hf_folder.py
    with torch.no_grad():
        want = saved(pixel_values=X)
    for name in ("logits", "cls_logits", "distillation_logits"):
        np.testing.assert_allclose(got[name], want[name].numpy(), atol=1e-5)
    assert got["logits"].shape == (2, 5)


def test_clip_folder_exports_image_embeddings(tmp_path_factory):
    saved, model, result = _export(tmp_path_factory, "clip", "cls-topk@0:0.5", ["image_embeds", "last_hidden_state"])
    assert type(model).__name__ == "CLIPVisionModelWithProjection"
    assert api.choose_outputs(model, X, None) == ["image_embeds"]
    assert _names(result.onnx_model) == ["image_embeds", "last_hidden_state"]
    got = _dense(result, X)
    with torch.no_grad():
        feats = saved.get_image_features(pixel_values=X)
        feats = getattr(feats, "pooler_output", feats)   # transformers 5 returns a ModelOutput
        tower = saved.vision_model(pixel_values=X).last_hidden_state
    np.testing.assert_allclose(got["image_embeds"], feats.numpy(), atol=1e-5)
    np.testing.assert_allclose(got["last_hidden_state"], tower.numpy(), atol=1e-5)
    pruned = _run(result.onnx_model, X)
    assert pruned["image_embeds"].shape == (2, 16) and pruned["last_hidden_state"].shape == (2, 9, 48)


def test_siglip_folder_exports_pooled_embeddings(tmp_path_factory):
    saved, model, result = _export(tmp_path_factory, "siglip", "attn-mean@0:0.5", "pooler_output")
    assert type(model).__name__ == "SiglipVisionModel"
    assert api.choose_outputs(model, X, None) == ["last_hidden_state"]
    assert _names(result.onnx_model) == ["pooler_output"]
    got = _dense(result, X)
    with torch.no_grad():
        feats = saved.get_image_features(pixel_values=X)
        feats = getattr(feats, "pooler_output", feats)
    np.testing.assert_allclose(got["pooler_output"], feats.numpy(), atol=1e-5)


def test_unknown_output_lists_the_available_names(tmp_path_factory, capsys):
    model, shape = load_model("tiny")
    with pytest.raises(ConfigError, match=r"choose from logits$"):
        api.export(model, torch.randn(*shape), "cls-topk@0:0.5", outputs="pooler_output")
    with pytest.raises(ConfigError, match="twice"):
        api.choose_outputs(model, torch.randn(*shape), "logits,logits")
    out = tmp_path_factory.mktemp("unknown-output") / "out"
    assert main(["export", "--model", "tiny", "--prune", "cls-topk@0:0.5", "-o", str(out), "--no-build", "--no-bench",
                 "--outputs", "logits,nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("tokensieve export: error: --outputs 'nope' is not an output of ViTForImageClassification; "
                       "choose from logits")
    assert not out.exists()
