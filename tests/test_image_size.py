"""`--image-size H[,W]`: export at an input size other than the config's, through the position-embedding
interpolation the model supports (interpolate_pos_encoding=True for ViT/DeiT/CLIP/SigLIP; DINOv2 always
interpolates); the token counts follow the new patch grid, and a model that cannot change its size says so. The tiny
ViT at another size: tests/test_hf_folder.py (its export folder is exported at 48x48)."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tiny_models import save_tiny_folder
from tokensieve import api
from tokensieve.cli import main
from tokensieve.errors import ModelError
from tokensieve.models import load_model, resize_kwargs


def test_dinov2_folder_at_another_size_with_its_pooled_output(tmp_path):
    """The export folder's report records size and output: `tokensieve verify` rebuilds the same reference. Exported
    into the model folder itself, which keeps its own config.json (not one saying 48x48)."""
    folder = out = tmp_path / "dinov2"
    saved = save_tiny_folder("dinov2", folder)   # configured for 32x32
    config = (folder / "config.json").read_bytes()
    report = api.export_folder(str(folder), "cls-topk@0:0.5", out, build=False, bench=False, verify_inputs=2,
                               image_size=(48, 48), outputs="pooler_output")
    assert (folder / "config.json").read_bytes() == config and report["files"]["config"] == str(folder / "config.json")
    assert report["input_shape"] == [1, 3, 48, 48] and report["outputs"] == ["pooler_output"]
    assert report["tokens_per_block"] == [37, 19] and report["verify"]["passed"]   # 1 + 6 x 6 patches
    assert main(["verify", str(out), "--inputs", "1", "--batch", "2"]) == 0
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    sess = ort.InferenceSession(str(out / "dense.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["pooler_output"]
    with torch.no_grad():
        want = saved(pixel_values=x).pooler_output
    np.testing.assert_allclose(sess.run(None, {"pixel_values": x.numpy()})[0], want.numpy(), atol=1e-5)


def test_sizes_a_model_cannot_take_are_one_line():
    from transformers import CLIPConfig, CLIPForImageClassification

    model = CLIPForImageClassification(CLIPConfig(
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=99, bos_token_id=0, eos_token_id=1, pad_token_id=1)))
    assert resize_kwargs(model, (32, 32)) == {}   # its own size needs nothing
    with pytest.raises(ModelError, match=r"^CLIPForImageClassification cannot change its input size .*export it at "
                                         r"32x32 \(drop --image-size\)$"):
        resize_kwargs(model, (48, 48))
    with pytest.raises(ModelError, match=r"^--image-size 60,64 is not a multiple of the model's patch size 8x8; pass "
                                         r"e.g. --image-size 56,64$"):
        load_model("tiny", image_size=(60, 64))
