"""MACs of the traced pruned graph (what the export reports) against the papers' published figures, on DeiT-S/16-224
built from its config (random init: MACs do not depend on the weights). Passes and one run of the graph, no ONNX
and no re-trace: `count_model_macs` counts the model's matrix products (Linear, the two attention products, the patch
conv), a stage as 0 as the papers' counters do (ToMe's merge is a gather / scatter_reduce in its code, EViT's fusion
a weighted sum); what tokensieve's stages add on top (ToMe's one-hot merge MatMuls: +0.08 G at r = 13) is in the
exported MACs (docs/fidelity.md).

EViT (youweiliang/evit README): DeiT-S 4.6 G dense; keep 0.7 in blocks 3, 6, 9 with token fusion 3.0 G.
ToMe (Bolya et al., ICLR 2023, the comparison with token-pruning methods on DeiT-S): r = 8 3.4 G, r = 13 2.7 G,
r = 16 2.3 G, ToMe merging r tokens in every block (`tome(r=R)`).
"""
from __future__ import annotations

import pytest
import torch

from tiny_traced import run_recipe
from tokensieve.exporter.trace import FirstOutput, trace
from tokensieve.flops import count_macs, count_model_macs


@pytest.fixture(scope="module")
def deit_s():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                       image_size=224, patch_size=16, num_labels=1000, attn_implementation="sdpa")
    module = FirstOutput(ViTForImageClassification(config).eval())
    x = torch.randn(2, 3, 224, 224)
    return trace(module, x), x


def _gmacs(deit_s, recipe: str) -> float:
    ep, x = deit_s
    gm, *_ = run_recipe(ep, x, recipe)
    return count_model_macs(gm, x) / 1e9


def test_evit_fused_in_block_is_evits_figure(deit_s):
    ep, x = deit_s
    assert abs(count_macs(ep.graph_module) / 1e9 - 4.6) < 0.01
    assert count_model_macs(ep.module(), x) == count_macs(ep.graph_module)  # the two counters agree on the dense
    paper = _gmacs(deit_s, "cls-topk(fuse=true)@3,6,9:0.7")
    assert abs(paper - 3.0) / 3.0 < 0.01, paper
    block_out = _gmacs(deit_s, "cls-topk(fuse=true,at=block_out)@3,6,9:0.7")
    assert abs(block_out - 3.0) / 3.0 > 0.04, block_out  # control: after the block it is ~5 % more


@pytest.mark.parametrize("r, published", [(13, 2.7)])
def test_tome_every_block_is_tomes_figure(deit_s, r, published):
    macs = _gmacs(deit_s, f"tome(r={r})")
    assert abs(macs - published) / published < 0.01, macs
