"""place_in_block: ToMe, EViT's fused token and DiffRate run between the attention residual add and the MLP of their
block, as their released code does; the FX graph equals the eager reference (which places them alike) on every tiny
architecture, the exported ONNX equals a hand-written ToMeBlock / EViT block forward, and block L's MLP runs on the
merged tokens (fewer MACs than `at=block_out`)."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reference.evit import evit_block_prune
from reference.tome import tome_step
from tiny_models import build
from tiny_traced import run_recipe, traced_tiny
from tokensieve import api
from tokensieve.exporter.trace import FirstOutput, trace
from tokensieve.flops import count_model_macs
from tokensieve.graph_passes.blocks import STAGE_TAG
from tokensieve.graph_passes.fx.place_in_block import place_in_block
from tokensieve.graph_passes.methods.reference import HookStage, run_reference
from tokensieve.graph_passes.pipeline import run_fx_passes


def _passed(module, x, ep, recipe: str):
    gm, ctx, blocks, layout = run_recipe(ep, x, recipe)
    hooks = [HookStage.for_block([b.path for b in blocks], s.stage.after_block, s.stage.method, s.keep,
                                 s.num_prefix_tokens, tuple(s.options.items()), layout.grid, s.stage.placement)
             for s in ctx.stages]
    return gm, ctx, hooks


def _placements(gm) -> dict[int, str]:
    return {n.meta[STAGE_TAG]["block"]: n.meta[STAGE_TAG]["placement"] for n in gm.graph.nodes
            if n.meta.get(STAGE_TAG, {}).get("pass") == "insert_prune_stages"}


ARCHS = {
    "vit": "tome@1:0.5+cls-topk(fuse=true)@2:0.5",
    "deit": "tome@0:0.5+cls-topk(fuse=true)@2:0.5",
    "dinov2": "diffrate(prune_keep=0.75)@1:0.5+cls-topk(fuse=true)@2:0.5",
    "dinov2_registers": "tome(prop_attn=true)@1:0.5+tome(prop_attn=true)@2:4",
    "clip_vision": "tome@1:0.5+cls-topk(fuse=true)@2:0.5",
    "siglip_vision": "tome@1:0.5+tome@2:4",
    "plain_vit": "tome@0:0.5+cls-topk(fuse=true)@2:0.5",
}


@pytest.mark.parametrize("name", list(ARCHS))
def test_graph_equals_the_in_block_eager_reference_on_every_architecture(name):
    module, x, ep = traced_tiny(name)
    gm, ctx, hooks = _passed(module, x, ep, ARCHS[name])
    assert set(_placements(gm).values()) == {"in_block"}
    with torch.no_grad():
        out, *kept = gm(x)
        ref, ref_kept = run_reference(module, x, hooks)
        plain, _ = run_reference(module, x, [HookStage(**{**h.__dict__, "placement": "block_out"}) for h in hooks])
    for got, want in zip(kept, ref_kept, strict=True):
        assert torch.equal(got, want)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert (plain - ref).abs().max() > 1e-4  # control: the placement changes the values (a merge is not per-token)


def test_idempotent():
    module, x, ep = traced_tiny("vit")
    gm, ctx, _ = _passed(module, x, ep, ARCHS["vit"])
    code = gm.code
    assert place_in_block(gm, ctx).modified is False
    assert run_fx_passes(gm, ctx).modified is False
    assert gm.code == code


def test_at_block_out_keeps_the_stage_on_the_block_output():
    module, x, ep = traced_tiny("vit")
    gm, _, hooks = _passed(module, x, ep, "tome(at=block_out)@1:0.5+cls-topk(fuse=true,at=block_out)@2:0.5")
    assert set(_placements(gm).values()) == {"block_out"}
    with torch.no_grad():
        out, *kept = gm(x)
        ref, ref_kept = run_reference(module, x, hooks)
    assert all(torch.equal(a, b) for a, b in zip(kept, ref_kept, strict=True))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


class _ParallelBlock(nn.Module):
    """x + attn(norm1(x)) + mlp(norm2(x)) (GPT-J / ViT-22B style): no attention residual add feeds the MLP."""

    def __init__(self, dim=16):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj, self.fc = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, 1, c).permute(2, 0, 3, 1, 4).unbind(0)
        a = self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))
        return x + a + self.fc(self.norm2(x))


class _ParallelViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, 16))
        self.blocks = nn.ModuleList(_ParallelBlock() for _ in range(3))

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        for b in self.blocks:
            x = b(x)
        return x[:, 0]


def test_a_block_of_another_shape_keeps_the_stage_on_its_output_with_the_reason():
    torch.manual_seed(0)
    module = FirstOutput(_ParallelViT().eval())
    x = torch.randn(2, 3, 16, 16)
    gm, ctx, hooks = _passed(module, x, trace(module, x), "tome@1:0.5")
    tags = [n.meta[STAGE_TAG] for n in gm.graph.nodes if n.meta.get(STAGE_TAG, {}).get("pass") == "insert_prune_stages"]
    assert {t["placement"] for t in tags} == {"block_out"}
    assert "candidate attention residual adds" in tags[0]["placement_reason"]
    with torch.no_grad():
        out, kept = gm(x)
        ref, (ref_kept,) = run_reference(module, x, hooks)  # the eager reference falls back alike
    assert torch.equal(kept, ref_kept)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- the paper's forward, by hand


def _paper_forward(model, x):
    """The hand-written ViT (tests/tiny_models.py TinyViT) with ToMe's ToMeBlock in block 0 (r = 8, sizes carried,
    tests/reference/tome.py) and EViT's fused block in block 2 (keep 4, tests/reference/evit.py), both between the
    attention residual add and the MLP. -> (logits, [(kept positions of each stage)])."""
    t = model.patch_embed(x).flatten(2).transpose(1, 2)
    t = torch.cat([model.cls_token.expand(t.shape[0], -1, -1), t], dim=1) + model.pos_embed
    kept = []
    for i, blk in enumerate(model.blocks):
        b, n, c = t.shape
        q, k, v = blk.qkv(blk.norm1(t)).reshape(b, n, 3, blk.num_heads, blk.head_dim).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * blk.head_dim ** -0.5).softmax(dim=-1)
        t = t + blk.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
        if i == 0:   # ToMeBlock: merge(x) with metric = k.mean(1)
            t, _, groups = tome_step(t, k.mean(1), 8, class_token=True)
            # each output token's survivor: its B token (odd position) when it merged, else its only member
            pos = torch.arange(n)
            odd = groups & (pos % 2 == 1)
            kept.append(torch.where(odd.any(-1), odd.float().argmax(-1), groups.float().argmax(-1))[:, 1:])
        if i == 2:   # EViT: keep the 4 most attended patch tokens + the fused token
            t, idx = evit_block_prune(t, attn, 4, fuse_token=True)
            kept.append(idx.sort(dim=1).values + 1)
        t = t + blk.fc2(F.gelu(blk.fc1(blk.norm2(t))))
    return model.head(model.norm(t)[:, 0]), kept


@pytest.fixture(scope="module")
def exported():
    model, x = build("plain_vit")
    return model, x, api.export(model, x, ARCHS["plain_vit"])


def test_exported_onnx_equals_the_papers_in_block_forward(exported):
    model, x, result = exported
    assert api.verify(result, num_inputs=2, batch=2).passed  # vs the eager reference, which places them in block
    session = ort.InferenceSession(result.debug_onnx.SerializeToString(), providers=["CPUExecutionProvider"])
    out, *kept = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        ref, ref_kept = _paper_forward(model, x)
    assert np.array_equal(kept[0], ref_kept[0].numpy())                 # ToMe's survivors, in its output order
    assert np.array_equal(np.sort(kept[1], axis=1), ref_kept[1].numpy())  # EViT's kept set (ours: position order)
    np.testing.assert_allclose(out, ref.numpy(), rtol=0, atol=1e-5)


def test_block_out_placement_differs_from_the_paper(exported):
    """Control: the same recipe at=block_out does not give the paper's output."""
    model, x, _ = exported
    module, _, ep = traced_tiny("plain_vit")
    gm, *_ = _passed(module, x, ep, "tome(at=block_out)@0:0.5+cls-topk(fuse=true,at=block_out)@2:0.5")
    with torch.no_grad():
        out = gm(x)[0]
        ref, _ = _paper_forward(model, x)
    assert (out - ref).abs().max() > 1e-4


def test_in_block_counts_fewer_macs_by_the_mlp_of_each_stage_block():
    module, x, ep = traced_tiny("plain_vit")
    paper, *_ = _passed(module, x, ep, ARCHS["plain_vit"])
    block_out, *_ = _passed(module, x, ep, "tome(at=block_out)@0:0.5+cls-topk(fuse=true,at=block_out)@2:0.5")
    # the MLP of blocks 0 and 2 (fc1 + fc2: 2 x 48 x 96 MACs per token) on 17 -> 9 and 9 -> 6 tokens
    assert count_model_macs(block_out, x) - count_model_macs(paper, x) == (8 + 3) * 2 * 48 * 96
