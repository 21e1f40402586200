"""discover_blocks + token_layout on every tiny model, and on hand-built models they must reject."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tiny_models import TINY_MODEL_INFO, TINY_MODELS, TinyViT
from tiny_traced import traced_tiny
from tokensieve.errors import ModelError
from tokensieve.exporter.trace import FirstOutput, trace
from tokensieve.graph_passes.blocks import SDPA_TARGETS, discover_blocks, token_layout

MODELS = sorted(TINY_MODELS)
HIDDEN = 48  # tiny_models._COMMON hidden_size


def _graph(module: nn.Module, x: torch.Tensor):
    return trace(FirstOutput(module), x).module()


@pytest.mark.parametrize("name", MODELS)
def test_discover_blocks_finds_every_block(name):
    info = TINY_MODEL_INFO[name]
    _, _, ep = traced_tiny(name)
    blocks = discover_blocks(ep.module())

    assert len(blocks) == info.num_blocks
    assert {b.type_name for b in blocks} == {info.block_class}
    assert [b.index for b in blocks] == list(range(info.num_blocks))
    prefix = blocks[0].path.rpartition(".")[0]
    assert [b.path for b in blocks] == [f"{prefix}.{i}" for i in range(info.num_blocks)]
    for b in blocks:
        assert len(b.attention) == 1 and b.attention[0].target in SDPA_TARGETS
        assert b.input.meta["val"].shape[1:] == (info.seq_len, HIDDEN)
        assert b.output.meta["val"].shape[1:] == (info.seq_len, HIDDEN)
    # Blocks are chained: each block's token input is the previous block's token output.
    for prev, nxt in zip(blocks, blocks[1:]):
        assert nxt.input is prev.output


@pytest.mark.parametrize("name", MODELS)
def test_block_paths_name_real_submodules(name):
    module, _, ep = traced_tiny(name)
    for b in discover_blocks(ep.module()):
        assert type(module.get_submodule(b.path)).__name__ == TINY_MODEL_INFO[name].block_class


@pytest.mark.parametrize("name", MODELS)
def test_token_layout_matches_model_info(name):
    info = TINY_MODEL_INFO[name]
    _, _, ep = traced_tiny(name)
    gm = ep.module()
    layout = token_layout(gm, discover_blocks(gm))

    assert layout.num_prefix_tokens == info.num_prefix_tokens
    assert layout.num_patches == info.num_patches
    assert layout.num_tokens == info.seq_len
    assert layout.grid == (4, 4)
    assert layout.hidden_size == HIDDEN


def test_token_layout_explicit_prefix_overrides_the_conv_grid():
    _, _, ep = traced_tiny("plain_vit")
    gm = ep.module()
    layout = token_layout(gm, discover_blocks(gm), num_prefix_tokens=3)
    assert (layout.num_tokens, layout.num_prefix_tokens, layout.num_patches) == (17, 3, 14)


@pytest.mark.parametrize("prefix", [-1, 17, 40])
def test_token_layout_rejects_prefix_outside_sequence(prefix):
    _, _, ep = traced_tiny("plain_vit")
    gm = ep.module()
    with pytest.raises(ModelError, match="num_prefix_tokens"):
        token_layout(gm, discover_blocks(gm), num_prefix_tokens=prefix)


def test_mlp_without_attention_raises_model_error():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    gm = _graph(mlp.eval(), torch.randn(2, 3, 8, 8))
    with pytest.raises(ModelError, match="No repeated transformer blocks"):
        discover_blocks(gm)


class _LinearPatchViT(TinyViT):
    """TinyViT with a Linear patch embedding (no conv): the prefix/patch split cannot be inferred."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.patch_embed = nn.Linear(3 * 8 * 8, 48)

    def forward(self, pixel_values):
        b = pixel_values.shape[0]
        patches = pixel_values.reshape(b, 3, 4, 8, 4, 8).permute(0, 2, 4, 1, 3, 5).reshape(b, 16, 3 * 8 * 8)
        x = torch.cat([self.cls_token.expand(b, -1, -1), self.patch_embed(patches)], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


def test_token_layout_without_conv_needs_explicit_prefix():
    torch.manual_seed(0)
    gm = _graph(_LinearPatchViT(dim=48, depth=2, mlp_dim=96).eval(), torch.randn(2, 3, 32, 32))
    blocks = discover_blocks(gm)
    assert len(blocks) == 2
    with pytest.raises(ModelError, match="pass num_prefix_tokens"):
        token_layout(gm, blocks)
    layout = token_layout(gm, blocks, num_prefix_tokens=1)
    assert (layout.num_tokens, layout.num_prefix_tokens, layout.num_patches, layout.grid) == (17, 1, 16, None)


class _AdapterViT(TinyViT):
    """TinyViT with a longer ModuleList of attention-free token MLPs in front of its 2 blocks."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.adapters = nn.ModuleList(nn.Linear(48, 48) for _ in range(5))

    def forward(self, pixel_values):
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for a in self.adapters:
            x = x + a(x)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


def test_longer_attention_free_stack_is_not_taken_for_blocks():
    torch.manual_seed(0)
    gm = _graph(_AdapterViT(dim=48, depth=2, mlp_dim=96).eval(), torch.randn(2, 3, 32, 32))
    blocks = discover_blocks(gm)
    assert [b.path for b in blocks] == ["model.blocks.0", "model.blocks.1"]
    assert {b.type_name for b in blocks} == {"TinyBlock"}
