"""Models shared by the benchmark-script tests."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def two_block_vit(tmp_path_factory) -> Path:
    """The built-in `tiny` ViT (64x64 image, 8x8 patches: 65 tokens; seed 0) with 2 blocks instead of 4, as a local
    HF checkpoint folder for the scripts' --model. Exports cost about 60 % of tiny's (they scale with the blocks),
    and a stage after block 0 still leaves block 1 to speed up. Per worker (--dist loadfile)."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    from tokensieve.models import BUILTIN

    path = tmp_path_factory.mktemp("models") / "tiny-2-blocks"
    torch.manual_seed(0)
    cfg = ViTConfig(**(BUILTIN["tiny"][0] | {"num_hidden_layers": 2}), attn_implementation="sdpa")
    ViTForImageClassification(cfg).eval().save_pretrained(path)
    return path
