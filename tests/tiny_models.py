"""Tiny random-init vision transformers used by the tests.

Every factory seeds torch itself, so two calls return bit-identical weights, and returns
``(model, input_shape)`` with the model in eval mode. No model hub is touched: HF models are
built from configs. All HF models use ``attn_implementation="sdpa"`` so torch.export shows one
``aten.scaled_dot_product_attention`` per block.

``TINY_MODEL_INFO[name]`` records, per model, the number of tokens in front of the patch tokens
(``num_prefix_tokens``), the number of patch tokens, the number of transformer blocks and the
class name of the repeated block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TINY_MODELS", "TINY_MODEL_INFO", "TinyModelInfo", "TinyViT", "build"]

BATCH = 2
SEED = 0


@dataclass(frozen=True)
class TinyModelInfo:
    num_prefix_tokens: int  # tokens before the patch tokens ([CLS], distillation, registers)
    num_patches: int
    num_blocks: int
    block_class: str  # class name of the repeated transformer block

    @property
    def seq_len(self) -> int:
        return self.num_prefix_tokens + self.num_patches


# --------------------------------------------------------------------------------------------
# Hand-written ViT
# --------------------------------------------------------------------------------------------


class TinyBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x)); x + mlp(norm2(x)). Fused qkv, F.sdpa."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, N, head_dim]
        attn = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, n, c))
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return x


class TinyViT(nn.Module):
    """Plain ViT: conv patch embed, [CLS], learned pos embed, ``blocks``, norm, head on [CLS]."""

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 8,
        dim: int = 32,
        depth: int = 4,
        num_heads: int = 2,
        mlp_dim: int = 64,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.num_patches = (image_size // patch_size) ** 2
        self.num_prefix_tokens = 1
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + self.num_patches, dim) * 0.02)
        self.blocks = nn.ModuleList(TinyBlock(dim, num_heads, mlp_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)  # [B, P, D]
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return self.head(x[:, 0])


# --------------------------------------------------------------------------------------------
# Factories
# --------------------------------------------------------------------------------------------

# Sizes are picked so that token counts (16 patches; 16/17/18/21 tokens) never equal a channel
# size (hidden 48, head_dim 24, MLP 96, fused qkv 144): a literal 17 in a graph is a token count.
_IMAGE = 32
_PATCH = 8
_NUM_PATCHES = (_IMAGE // _PATCH) ** 2  # 16
_SHAPE = (BATCH, 3, _IMAGE, _IMAGE)

_COMMON = dict(
    hidden_size=48,
    num_hidden_layers=4,
    num_attention_heads=2,
    intermediate_size=96,
    image_size=_IMAGE,
    patch_size=_PATCH,
    num_channels=3,
    attn_implementation="sdpa",
)


def _no_intermediate() -> dict:
    # DINOv2 configs size the MLP with ``mlp_ratio`` instead of ``intermediate_size``.
    return {k: v for k, v in _COMMON.items() if k != "intermediate_size"}


def _finish(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def tiny_vit_hf() -> tuple[nn.Module, tuple[int, ...]]:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(SEED)
    cfg = ViTConfig(**_COMMON, num_labels=10)
    return _finish(ViTForImageClassification(cfg)), _SHAPE


def tiny_deit() -> tuple[nn.Module, tuple[int, ...]]:
    from transformers import DeiTConfig, DeiTForImageClassification

    torch.manual_seed(SEED)
    cfg = DeiTConfig(**_COMMON, num_labels=10)
    return _finish(DeiTForImageClassification(cfg)), _SHAPE


def tiny_dinov2() -> tuple[nn.Module, tuple[int, ...]]:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(SEED)
    cfg = Dinov2Config(**_no_intermediate(), mlp_ratio=2)  # MLP width = 2 * 48 = 96
    return _finish(Dinov2Model(cfg)), _SHAPE


def tiny_dinov2_registers() -> tuple[nn.Module, tuple[int, ...]]:
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(SEED)
    cfg = Dinov2WithRegistersConfig(
        **_no_intermediate(), mlp_ratio=2, num_register_tokens=4
    )
    return _finish(Dinov2WithRegistersModel(cfg)), _SHAPE


def tiny_clip_vision() -> tuple[nn.Module, tuple[int, ...]]:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(SEED)
    cfg = CLIPVisionConfig(**_COMMON, projection_dim=48)
    return _finish(CLIPVisionModel(cfg)), _SHAPE


def tiny_siglip_vision() -> tuple[nn.Module, tuple[int, ...]]:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(SEED)
    cfg = SiglipVisionConfig(**_COMMON)
    return _finish(SiglipVisionModel(cfg)), _SHAPE


def tiny_plain_vit() -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(SEED)
    model = TinyViT(image_size=_IMAGE, patch_size=_PATCH, dim=48, depth=4, num_heads=2, mlp_dim=96)
    return _finish(model), _SHAPE


TINY_MODELS: dict[str, Callable[[], tuple[nn.Module, tuple[int, ...]]]] = {
    "vit": tiny_vit_hf,
    "deit": tiny_deit,
    "dinov2": tiny_dinov2,
    "dinov2_registers": tiny_dinov2_registers,
    "clip_vision": tiny_clip_vision,
    "siglip_vision": tiny_siglip_vision,
    "plain_vit": tiny_plain_vit,
}

TINY_MODEL_INFO: dict[str, TinyModelInfo] = {
    "vit": TinyModelInfo(1, _NUM_PATCHES, 4, "ViTLayer"),
    "deit": TinyModelInfo(2, _NUM_PATCHES, 4, "DeiTLayer"),  # [CLS] + distillation
    "dinov2": TinyModelInfo(1, _NUM_PATCHES, 4, "Dinov2Layer"),
    "dinov2_registers": TinyModelInfo(5, _NUM_PATCHES, 4, "Dinov2WithRegistersLayer"),  # [CLS] + 4 reg
    "clip_vision": TinyModelInfo(1, _NUM_PATCHES, 4, "CLIPEncoderLayer"),
    "siglip_vision": TinyModelInfo(0, _NUM_PATCHES, 4, "SiglipEncoderLayer"),  # no [CLS]
    "plain_vit": TinyModelInfo(1, _NUM_PATCHES, 4, "TinyBlock"),
}


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    """Return ``(model, example_input)`` for ``TINY_MODELS[name]`` (the input is seeded too)."""
    model, shape = TINY_MODELS[name]()
    gen = torch.Generator().manual_seed(SEED + 1)
    return model, torch.randn(shape, generator=gen)


# --------------------------------------------------------------------------------------------
# Heads: models whose export keeps a head (classifier, pooler, projection); not in TINY_MODELS (the per-model sweeps
# of every test), written as HF folders by the tests that load them (save_tiny_folder)
# --------------------------------------------------------------------------------------------

# the sizes of _COMMON (no token count equals a channel size), 2 blocks
_HEAD_VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, image_size=_IMAGE,
                    patch_size=_PATCH, num_channels=3)
_HEAD_TEXT = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2, vocab_size=99,
                  bos_token_id=0, eos_token_id=1, pad_token_id=1)


def tiny_deit_teacher() -> nn.Module:
    """Distilled DeiT: logits = mean of the [CLS] and distillation heads (DeiTForImageClassificationWithTeacher)."""
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    torch.manual_seed(SEED)
    cfg = DeiTConfig(**_HEAD_VISION, num_labels=5, attn_implementation="sdpa")
    return _finish(DeiTForImageClassificationWithTeacher(cfg))


def tiny_clip() -> nn.Module:
    """Full CLIP dual encoder (image + text towers, projections to 16 dims)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(SEED)
    cfg = CLIPConfig(vision_config=_HEAD_VISION, text_config=_HEAD_TEXT, projection_dim=16)
    return _finish(CLIPModel(cfg))


def tiny_clip_projection() -> nn.Module:
    """CLIP's vision tower with its projection (CLIPVisionModelWithProjection: image_embeds first)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(SEED)
    return _finish(CLIPVisionModelWithProjection(CLIPVisionConfig(**_HEAD_VISION, projection_dim=16,
                                                                  attn_implementation="sdpa")))


def tiny_siglip() -> nn.Module:
    """Full SigLIP dual encoder; its vision tower pools with an attention-probe head (pooler_output)."""
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(SEED)
    return _finish(SiglipModel(SiglipConfig(vision_config=_HEAD_VISION, text_config=_HEAD_TEXT)))


def tiny_dinov2_small() -> nn.Module:
    """DINOv2 (Dinov2Model: last_hidden_state first, pooler_output = the normed [CLS] token)."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(SEED)
    cfg = Dinov2Config(**{k: v for k, v in _HEAD_VISION.items() if k != "intermediate_size"}, mlp_ratio=2,
                       attn_implementation="sdpa")
    return _finish(Dinov2Model(cfg))


TINY_HEAD_MODELS: dict[str, Callable[[], nn.Module]] = {
    "deit_teacher": tiny_deit_teacher,
    "clip": tiny_clip,
    "clip_projection": tiny_clip_projection,
    "siglip": tiny_siglip,
    "dinov2": tiny_dinov2_small,
}


def save_tiny_folder(name: str, path) -> nn.Module:
    """Write TINY_HEAD_MODELS[name] with save_pretrained into `path` (a HF folder, as `--model` takes) and return the
    model."""
    model = TINY_HEAD_MODELS[name]()
    model.save_pretrained(path)
    return model
