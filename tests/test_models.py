"""Loading a local Hugging Face folder (models.load_model): vision encoders, the vision tower of a dual encoder,
VLM folders pointed at `export-vlm`, missing weights reported in one line instead of transformers' table."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tokensieve import api
from tokensieve.errors import ModelError
from tokensieve.models import load_model


def _vision(**extra):
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                patch_size=8, **extra)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    path = tmp_path_factory.mktemp("clip") / "clip"
    torch.manual_seed(0)
    cfg = CLIPConfig(vision_config=_vision(), text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                               num_attention_heads=2, vocab_size=99),
                     projection_dim=16)
    model = CLIPModel(cfg).eval()
    model.save_pretrained(path)
    return path, model


def test_dual_encoder_folder_loads_its_vision_tower_with_its_weights(clip_dir, capsys):
    path, full = clip_dir
    capsys.readouterr()
    model, shape = load_model(path)
    assert type(model).__name__ == "CLIPVisionModelWithProjection" and shape == (1, 3, 32, 32)  # + image embeddings
    tower = getattr(model, "vision_model", model)  # transformers 5 flattened CLIPVisionModel
    assert torch.equal(tower.embeddings.patch_embedding.weight,
                       full.vision_model.embeddings.patch_embedding.weight)  # the checkpoint's, not random
    err = capsys.readouterr().err
    assert "LOAD REPORT" not in err and "warning" not in err  # the text tower's keys are expected leftovers
    result = api.export(model, torch.randn(*shape), "cls-topk@0:0.5")
    assert result.tokens == [17, 9] and api.verify(result, num_inputs=2, batch=2).passed


def test_missing_weights_are_one_warning_line(tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(**_vision())).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = sorted(k for k in weights if ".1." in k)  # every weight of block 1
    assert dropped
    save_file({k: v for k, v in weights.items() if k not in dropped}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    capsys.readouterr()
    load_model(tmp_path)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("tokensieve: warning: ") and "randomly initialized" in lines[0]
    assert f"{len(dropped)} weight(s)" in lines[0]


def test_vlm_folder_points_to_export_vlm(tmp_path):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**_vision()),
                      text_config=LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=2, vocab_size=64), image_token_id=63)
    LlavaForConditionalGeneration(cfg).save_pretrained(tmp_path)
    with pytest.raises(ModelError) as e:
        load_model(tmp_path)
    msg = str(e.value)
    assert "LLaVA vision-language model" in msg and f"tokensieve export-vlm {tmp_path}" in msg and "\n" not in msg
    proc = subprocess.run([sys.executable, "-m", "tokensieve.cli", "export", "--model", str(tmp_path), "--prune",
                           "cls-topk@0:0.5", "-o", str(tmp_path / "out"), "--no-build", "--no-bench"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "LOAD REPORT" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("tokensieve export: error: Model folder")
    assert not (tmp_path / "out").exists()
