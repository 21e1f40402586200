"""Model sources: the bundled default (ViT-S/16-224, deterministic random init), a tiny ViT, or a local HF folder."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

from tokensieve.errors import ModelError, first_line

BUILTIN = {
    # name: (ViTConfig kwargs, summary)
    "default": (dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                     image_size=224, patch_size=16, num_labels=1000), "ViT-S/16-224 (HF ViTForImageClassification, random init)"),
    "tiny": (dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                  image_size=64, patch_size=8, num_labels=10), "tiny ViT (64x64 image, 8x8 patches, 4 blocks)"),
}


def builtin_vit(name: str = "default", seed: int = 0) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    kwargs, _ = BUILTIN[name]
    torch.manual_seed(seed)
    model = ViTForImageClassification(ViTConfig(**kwargs, attn_implementation="sdpa"))
    return model.eval()


def load_model(spec: str | os.PathLike) -> tuple[nn.Module, tuple[int, ...]]:
    """`default`, `tiny` or a local Hugging Face checkpoint folder -> (eval model, input shape (1, C, H, W))."""
    spec = str(spec)
    if spec in BUILTIN:
        model = builtin_vit(spec)
    else:
        model = _load_hf_dir(Path(spec))
    return model, input_shape(model)


def _load_hf_dir(path: Path) -> nn.Module:
    if not path.is_dir():
        raise ModelError(f"Model {str(path)!r} is neither a built-in model ({', '.join(BUILTIN)}) nor a folder; pass --model default or a local HF checkpoint folder")
    if not (path / "config.json").is_file():
        raise ModelError(f"Model folder {str(path)!r} has no config.json; pass a folder written by save_pretrained()")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

        config = AutoConfig.from_pretrained(path, local_files_only=True)
        auto = AutoModelForImageClassification if getattr(config, "architectures", None) and any(
            a.endswith("ForImageClassification") for a in config.architectures) else AutoModel
        with quiet_loading():
            model = auto.from_pretrained(path, local_files_only=True, attn_implementation="sdpa")
    except Exception as e:  # noqa: BLE001 - transformers raises OSError/ValueError/KeyError variants
        raise ModelError(f"Cannot load model folder {str(path)!r}: {first_line(e, 200)}") from e
    return model.eval()


@contextlib.contextmanager
def quiet_loading():
    """No "Loading weights" progress bar on stderr: errors stay one line, summaries stay readable."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def input_shape(model: nn.Module) -> tuple[int, ...]:
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "vision_config", cfg)
    size = getattr(cfg, "image_size", None)
    if size is None:
        raise ModelError("Cannot tell the model's input size (no config.image_size); pass --input-shape B,C,H,W")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (1, getattr(cfg, "num_channels", 3), h, w)
